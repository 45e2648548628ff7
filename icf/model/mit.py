"""Multi-granularity implicit text (MIT, paper §3.2, Eq. 1–5).

**Visual context (Eq. 1–2), part of the segmenter.** `ChannelContext` updates a segmenter's visual map at its
context hook (`icf.model.segmenter`), in training and inference: channel tokens attend to each other and
F := F + V·A, at three granularities in turn —

* video level: the T·C channel tokens of all real frames (global temporal correlation);
* segment level: inside each backward window of ⌈T/2⌉ (S4/MS3) or ⌈T/4⌉ (AVSS) frames
  (`icf.encoders.videoclip.segment_windows`, the rule the extract stage used for ``vclip_seg``); a frame that
  lies in two windows gets the mean of both updates;
* frame level: intra-frame C×C channel attention.

It also pools the map after each step into MIT's visual descriptors (`Granular`): 1 video, S segment and T frame
vectors per clip. Supplement note 4 (the baseline uses MIT's channel-wise attention on its visual features) is
why the segmenter owns this module.

**Implicit text (Eq. 3), training only unless the text hook is on.** Per level, a visual (audio) query in the
level's foundation space — the cached embedding (``vclip``, ``vclip_seg``, ``clip``; ``clap_clip``, ``clap``)
plus a zero-initialised projection of the MIT descriptor — is inverted into k^t pseudo-word prompts
(`ConditionalPrompts`: learnable context tokens ctx_i plus a per-query shift φ(q), the mapping-network form of
textual inversion) that go through the level's **frozen** text tower; the level's text is the mean of the k^t
encodings (Eq. 3's (1/k^t)Σ_i). `matching_loss` is Eq. 3's "argmax sim" as an objective: an InfoNCE that
matches each clip's query with its own text against the other clips' texts (a constant text cannot satisfy it).
The segmenter's descriptors enter the query detached (``mit_detach_visual``, default): Eq. 3 picks the text for a
given F^v and never changes F^v; attached, λ_mit·L_mit's gradient at the segmenter's backbone exceeded L_Seg's
(ARCHITECTURE.md, Eq. 3 row).
With ``text_mode = "bank"`` (no towers) the text is a softmax selection among the cached class prompts
(`BankSelection`).

**Eq. 4–5.** One learnable weight query w scores the clip's N_v + N_s + N_f visual texts (1 video, S segments,
T frames; padding masked) and ℓ^v is their softmax-weighted sum; audio likewise over 1 clip + T per-second
texts → ℓ^a; z = F(Concat(Gate(ℓ^v), Gate(ℓ^a))). The same fusion restricted to the texts that cover frame t
(the video text, the windows holding t, frame t's own text) gives per-frame composite texts z_t, the points of
the text Gaussian in CDCL (Eq. 17, `icf.model.icf`).

Frozen towers are held outside the module tree: not parameters, not in ``state_dict`` (the trainer rebuilds them
from the `EncoderSpec`), and ``.to()`` does not move them — build them on the training device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icf.config import ModelConfig
from icf.encoders import PROMPT_TEMPLATES
from icf.encoders.videoclip import segment_window, segment_windows

VISUAL_LEVELS = ("video", "segment", "frame")
LEVELS = (*VISUAL_LEVELS, "audio")
CACHED = {"video": "vclip", "segment": "vclip_seg", "frame": "clip", "audio_clip": "clap_clip", "audio": "clap"}


class TextTower(Protocol):
    """The text side MIT needs from a frozen tower (`icf.encoders` CLIP / VideoCLIP / CLAP satisfy it)."""

    def tokenize(self, texts: list[str]) -> Tensor: ...

    def token_embedding(self, ids: Tensor) -> Tensor: ...

    def encode_text_embeddings(self, embeds: Tensor, ids: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------- Eq. 1-2: the visual context


@dataclass
class Granular:
    """MIT's visual descriptors of a batch (`ChannelContext`).

    Attributes:
        video: ``(B, 1, d)``; segment: ``(B, S, d)`` with ``segment_real`` ``(B, S)``; frame: ``(B, T, d)``.
        cover: ``(B, S, T)`` bool, window s holds frame t; valid: ``(B, T)`` real frames.
    """

    video: Tensor
    segment: Tensor
    segment_real: Tensor
    cover: Tensor
    frame: Tensor
    valid: Tensor


class ChannelAttention(nn.Module):
    """Eq. 1: A = softmax(Q Kᵀ/τ) over channel tokens; Eq. 2's update V·A (`update`) and F + V·A (`forward`).

    Input ``(N, G, C, L)``: G frames of C channels whose features are the L = h·w pixels. Q, K, V come from one
    linear map per channel feature (the three mapping matrices, a 1×1 convolution); Q and K rows are
    L2-normalised (cosine attention, a documented deviation: it bounds the logits for any L). ``real``
    ``(N, G)`` masks padded frames as keys.
    """

    def __init__(self, channels: int, tau: float):
        super().__init__()
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.tau = tau

    def update(self, x: Tensor, real: Tensor | None = None) -> Tensor:
        n, g, c, length = x.shape
        q, k, v = self.qkv(x.flatten(0, 1)).view(n, g, 3, c, length).unbind(2)
        q, k, v = (y.reshape(n, g * c, length) for y in (q, k, v))
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2) / self.tau  # Eq. 1, (N, GC, GC)
        if real is not None:
            logits = logits.masked_fill(~real.repeat_interleave(c, dim=1)[:, None], float("-inf"))
        return (logits.softmax(-1) @ v).view(n, g, c, length)

    def forward(self, x: Tensor, real: Tensor | None = None) -> Tensor:
        return x + self.update(x, real)  # Eq. 2


def _masked_mean(x: Tensor, real: Tensor) -> Tensor:
    """Mean of ``x`` ``(B, T, …)`` over the real rows ``real`` ``(B, T)`` → ``(B, …)``."""
    w = real.to(x.dtype).view(*real.shape, *([1] * (x.ndim - 2)))
    return (x * w).sum(1) / w.sum(1).clamp_min(1)


class ChannelContext(nn.Module):
    """Eq. 1–2 at video, segment and frame level on a segmenter's map (module docstring).

    ``forward(visual (B·T, C, h, w), valid (B, T))`` → (updated map, `Granular`).
    """

    def __init__(self, channels: int, tau: float, segment_div: int):
        super().__init__()
        self.attend = nn.ModuleDict({lv: ChannelAttention(channels, tau) for lv in VISUAL_LEVELS})
        self.segment_div = segment_div

    def forward(self, visual: Tensor, valid: Tensor) -> tuple[Tensor, Granular]:
        b, t = valid.shape
        shape = visual.shape
        x = visual.reshape(b, t, shape[1], -1)  # (B, T, C, L)
        x = self.attend["video"](x, valid)  # global temporal correlation
        video = _masked_mean(x.mean(-1), valid)[:, None]
        x, segment, seg_real, cover = self._segments(x, valid)  # clip semantic partitioning
        x = self.attend["frame"](x.reshape(b * t, 1, *x.shape[2:])).view_as(x)  # intra-frame context
        frame = x.mean(-1)
        return x.reshape(shape), Granular(video, segment, seg_real, cover, frame, valid)

    def _segments(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Segment level. Clips are grouped by their number n of real frames (window ⌈n/segment_div⌉, windows
        from `segment_windows`), so padded AVSS v1 clips use their own windows, as the extract stage did."""
        b, t, c, _ = x.shape
        counts = valid.sum(1)
        groups = []
        for n in counts.unique().tolist():
            idx = (counts == n).nonzero().flatten()
            windows = torch.tensor(segment_windows(n, segment_window(n, self.segment_div)), device=x.device)
            s, w = windows.shape
            chunk = x[idx][:, windows]  # (b_n, S, w, C, L)
            upd = self.attend["segment"].update(chunk.flatten(0, 1)).view_as(chunk)
            pooled = (chunk + upd).mean((2, -1))  # (b_n, S, C)
            summed = upd.new_zeros(len(idx), t, *x.shape[2:]).index_add(1, windows.flatten(), upd.flatten(1, 2))
            hits = torch.bincount(windows.flatten(), minlength=t).clamp_min(1).to(x.dtype)
            groups.append((idx, summed / hits.view(1, t, 1, 1), pooled))
        s_max = max(p.shape[1] for _, _, p in groups)
        delta = torch.zeros_like(x)
        segment = x.new_zeros(b, s_max, c)
        real = torch.zeros(b, s_max, dtype=torch.bool, device=x.device)
        cover = torch.zeros(b, s_max, t, dtype=torch.bool, device=x.device)
        for idx, d, pooled in groups:
            delta = delta.index_copy(0, idx, d)
            s = pooled.shape[1]
            segment = segment.index_copy(0, idx, F.pad(pooled, (0, 0, 0, s_max - s)))
            n = int(valid[idx[0]].sum())
            windows = segment_windows(n, segment_window(n, self.segment_div))
            for j, win in enumerate(windows):
                real[idx, j] = True
                cover[idx[:, None], j, torch.tensor(win, device=x.device)[None]] = True
        return x + delta, segment, real, cover


# ----------------------------------------------------------------------------- Eq. 3: implicit text


def placeholder_span(tower: TextTower, template: str, n_ctx: int) -> tuple[Tensor, int]:
    """Token ids ``(1, L)`` of ``template`` with n_ctx pseudo-words and the index of the first one.

    The pseudo-word positions are where the ids of two fillings ("x x …" vs "y y …") differ; they must be n_ctx
    consecutive tokens. Trailing padding is cut (the towers' outputs do not depend on it: causal attention
    pooled at EOT, or RoBERTa's padding mask), which saves most of the tower's work.
    """
    a, b = (tower.tokenize([template.format(" ".join([w] * n_ctx))]) for w in ("x", "y"))
    pos = (a[0] != b[0]).nonzero().flatten().tolist()
    if len(pos) != n_ctx or pos != list(range(pos[0], pos[0] + n_ctx)):
        raise ValueError(f"cannot locate {n_ctx} pseudo-word tokens in {template!r} (found positions {pos})")
    pad = a[0, -1]
    if int((a[0] == pad).sum()) > 1:  # the tail is padding: keep up to the last real token
        a = a[:, : int((a[0] != pad).nonzero().max()) + 1]
    return a, pos[0]


def zero_linear(cin: int, cout: int) -> nn.Linear:
    """A linear layer initialised to output zeros (training starts from the un-shifted value)."""
    layer = nn.Linear(cin, cout)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ConditionalPrompts(nn.Module):
    """Eq. 3 through a frozen tower: query q ``(M, D)`` → implicit text ``(M, D)`` (unit rows averaged).

    k^t prompts per query: pseudo-words ctx_i + φ(q) (φ: a two-layer mapping network, last layer zero-initialised)
    spliced into the level's template, encoded by the tower; the text is (1/k^t)·Σ_i tower(prompt_i).
    """

    def __init__(self, tower: TextTower, template: str, k: int, n_ctx: int, query_dim: int):
        super().__init__()
        ids, self.start = placeholder_span(tower, template, n_ctx)
        self.register_buffer("ids", ids.cpu(), persistent=False)
        width = tower.token_embedding(ids).shape[-1]
        self.ctx = nn.Parameter(torch.randn(k, n_ctx, width) * 0.02)
        self.meta = nn.Sequential(nn.Linear(query_dim, width), nn.ReLU(), zero_linear(width, width))

    def forward(self, tower: TextTower, query: Tensor) -> Tensor:
        m, (k, n, width) = query.shape[0], self.ctx.shape
        ids = self.ids.to(query.device).expand(m * k, -1)
        base = tower.token_embedding(ids[:1])
        shift = self.meta(F.normalize(query, dim=-1))  # (M, W)
        ctx = (self.ctx[None] + shift[:, None, None]).reshape(m * k, n, width).to(base.device, base.dtype)
        embeds = torch.cat([base.expand(m * k, -1, -1)[:, : self.start], ctx, base.expand(m * k, -1, -1)[:, self.start + n :]], 1)
        texts = tower.encode_text_embeddings(embeds, ids).to(query.device, query.dtype)
        return texts.view(m, k, -1).mean(1)  # Eq. 3: (1/k^t) Σ_i


class BankSelection(nn.Module):
    """``text_mode = "bank"``: softmax(cos(q, b_j)/τ_s)-weighted cached class prompts b_j (+ a zero-initialised
    residual adapter) → ``(M, D)``."""

    def __init__(self, bank: np.ndarray, tau: float):
        super().__init__()
        self.register_buffer("bank", torch.as_tensor(np.asarray(bank), dtype=torch.float32), persistent=False)
        self.adapter = zero_linear(self.bank.shape[1], self.bank.shape[1])
        self.tau = tau

    def forward(self, _tower: object, query: Tensor) -> Tensor:
        cand = F.normalize(self.bank + self.adapter(self.bank), dim=-1)
        weights = (F.normalize(query, dim=-1) @ cand.T / self.tau).softmax(-1)
        return weights @ cand


def matching_loss(query: Tensor, text: Tensor, tau: float) -> Tensor:
    """Eq. 3 as an objective: symmetric InfoNCE between clip queries and clip texts ``(B, D)`` (diagonal positive).

    Uncentred on purpose: a text component shared by every clip cancels in the softmax, so the loss falls only
    when the texts differ between clips by ≳ τ in cosine (batch-centred variants are satisfied by differences
    of any size, and z stays one constant vector; measured on the tiny towers)."""
    logits = F.normalize(query, dim=-1) @ F.normalize(text, dim=-1).T / tau
    target = torch.arange(len(query), device=query.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


# ----------------------------------------------------------------------------- Eq. 4-5: fusion


class GatingMLP(nn.Module):
    """Eq. 5's Gate: three linear layers, out = W_3(GELU(W_1 x) ⊙ W_2 x) + x (gMLP-style multiplicative gating)."""

    def __init__(self, dim: int):
        super().__init__()
        self.value, self.gate, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.out(F.gelu(self.value(h)) * self.gate(h))


def fuse_texts(texts: Tensor, real: Tensor, query: Tensor) -> Tensor:
    """Eq. 4: Σ_n softmax_n(⟨w, l_n⟩/√d)·l_n over the texts a mask admits.

    Args:
        texts: ``(B, N, d)``; query: w ``(d,)``.
        real: ``(B, N)`` (one fused text per clip → ``(B, d)``) or ``(B, T, N)`` (one per frame → ``(B, T, d)``).
    """
    scores = texts @ query / math.sqrt(texts.shape[-1])  # (B, N)
    if real.ndim == 3:
        scores = scores[:, None].expand_as(real)
    weights = scores.masked_fill(~real, float("-inf")).softmax(-1)
    return torch.einsum("bn,bnd->bd" if real.ndim == 2 else "btn,bnd->btd", weights, texts)


@dataclass
class ImplicitText:
    """MIT's outputs for a batch.

    Attributes:
        z: composite text ``(B, d)`` (Eq. 5); z_frames: per-frame composite texts ``(B, T, d)``.
        ell_v, ell_a: fused visual / audio texts ``(B, d)`` (Eq. 4).
        tokens, real: every level text ``(B, N, d)`` (visual, audio, z) and its mask, for the text hook.
        loss: Eq. 3's matching objective (scalar).
    """

    z: Tensor
    z_frames: Tensor
    ell_v: Tensor
    ell_a: Tensor
    tokens: Tensor
    real: Tensor
    loss: Tensor


class MultiGranularityText(nn.Module):
    """Eq. 3–5 (module docstring): batch + `Granular` + audio features → `ImplicitText`."""

    def __init__(self, cfg: ModelConfig, towers: Mapping[str, TextTower] | None, text_bank: Mapping[str, np.ndarray] | None,
                 dims: Mapping[str, int]):
        """
        Args:
            towers: level → frozen text tower (``text_mode = "tower"``).
            text_bank: level → cached prompt embeddings ``(K, D)`` (``text_mode = "bank"``).
            dims: level → width D of that level's text/foundation space.
        """
        super().__init__()
        d = cfg.d_model
        self.cfg = cfg
        if cfg.text_mode == "tower":
            if towers is None:
                raise ValueError("MIT with text_mode='tower' needs the frozen text towers (pass encoders)")
            self._towers = dict(towers)  # plain dict of non-Module objects: never in state_dict / parameters()
            self.texts = nn.ModuleDict(
                {lv: ConditionalPrompts(towers[lv], PROMPT_TEMPLATES[lv], cfg.k_t, cfg.n_ctx, dims[lv]) for lv in LEVELS}
            )
        else:
            if text_bank is None or any(lv not in text_bank for lv in LEVELS):
                raise ValueError(f"MIT with text_mode='bank' needs a text bank with levels {LEVELS}")
            self._towers = {}
            self.texts = nn.ModuleDict({lv: BankSelection(text_bank[lv], cfg.select_tau) for lv in LEVELS})
        self.query_proj = nn.ModuleDict({lv: zero_linear(d, dims[lv]) for lv in CACHED})
        self.text_proj = nn.ModuleDict({lv: nn.Linear(dims[lv], d) for lv in LEVELS})
        self.weight_query = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * d**-0.5) for m in ("visual", "audio")})
        self.gate_v, self.gate_a = GatingMLP(d), GatingMLP(d)
        self.fuse = nn.Linear(2 * d, d)

    def _level(self, level: str, query: Tensor, real: Tensor) -> Tensor:
        """Implicit texts ``(B, N, D)`` of the real queries ``(B, N, D)`` (padding rows stay 0)."""
        out = query.new_zeros(query.shape)
        return out.index_put((real,), self.texts[level](self._towers.get(level), query[real]))

    def forward(self, batch: Mapping[str, Tensor], granular: Granular, audio: Tensor) -> ImplicitText:
        """
        Args:
            batch: the Batch (``vclip``, ``vclip_seg``, ``clip``, ``clap``, ``clap_clip``).
            granular: the segmenter's visual descriptors; audio: A ``(B, T, d)``.
        """
        valid = granular.valid
        b, t = valid.shape
        ones = torch.ones(b, 1, dtype=torch.bool, device=valid.device)
        feats = {
            "video": (granular.video, ones), "segment": (granular.segment, granular.segment_real), "frame": (granular.frame, valid),
            "audio_clip": (_masked_mean(audio, valid)[:, None], ones), "audio": (audio, valid),
        }
        texts, reals, matches = {}, {}, []
        for key, (feat, real) in feats.items():
            cached = batch[CACHED[key]]
            cached = cached[:, None] if cached.ndim == 2 else cached
            if cached.shape[1] < feat.shape[1]:
                raise ValueError(f"batch['{CACHED[key]}'] has {cached.shape[1]} entries per clip, MIT needs {feat.shape[1]}")
            feat = feat.detach() if self.cfg.mit_detach_visual else feat  # Eq. 3 selects l for a given F^v
            query = cached[:, : feat.shape[1]].to(feat.dtype) + self.query_proj[key](feat)
            level = "audio" if key.startswith("audio") else key
            text = self._level(level, query, real)  # Eq. 3
            if b > 1:
                matches.append(matching_loss(_masked_mean(query, real), _masked_mean(text, real), self.cfg.select_tau))
            texts[key], reals[key] = self.text_proj[level](text), real
        vis = torch.cat([texts[lv] for lv in VISUAL_LEVELS], 1)
        vis_real = torch.cat([reals[lv] for lv in VISUAL_LEVELS], 1)
        aud = torch.cat([texts["audio_clip"], texts["audio"]], 1)
        aud_real = torch.cat([ones, valid], 1)
        eye = torch.eye(t, dtype=torch.bool, device=valid.device)[None].expand(b, t, t) & valid[:, None]
        vis_cover = torch.cat([ones[:, None].expand(b, t, 1), granular.cover.transpose(1, 2), eye], 2)  # (B, T, N_v)
        aud_cover = torch.cat([ones[:, None].expand(b, t, 1), eye], 2)
        ell_v = fuse_texts(vis, vis_real, self.weight_query["visual"])  # Eq. 4
        ell_a = fuse_texts(aud, aud_real, self.weight_query["audio"])
        z = self.fuse(torch.cat([self.gate_v(ell_v), self.gate_a(ell_a)], -1))  # Eq. 5
        per_v = fuse_texts(vis, vis_cover, self.weight_query["visual"])
        per_a = fuse_texts(aud, aud_cover, self.weight_query["audio"])
        z_frames = self.fuse(torch.cat([self.gate_v(per_v), self.gate_a(per_a)], -1))
        loss = torch.stack(matches).mean() if matches else z.sum() * 0.0
        tokens = torch.cat([vis, aud, z[:, None]], 1)
        real = torch.cat([vis_real, aud_real, ones], 1)
        return ImplicitText(z, z_frames, ell_v, ell_a, tokens, real, loss)
