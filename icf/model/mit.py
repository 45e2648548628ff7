"""Multi-granularity implicit text (MIT, paper §3.2, Eq. 1–5), training only.

Visual side, three granularities of the clip's visual features F (the backbone's stride-32 map projected to d
channels and pooled to p×p, one token per channel):

* video level (Eq. 1–2): channel attention over the T·C channel tokens of all real frames, F := F + V·A;
* segment level: the same attention inside each backward window of ⌈T/2⌉ (S4/MS3) or ⌈T/4⌉ (AVSS) frames,
  windows from `icf.encoders.videoclip.segment_windows` (the rule the extract stage used for ``vclip_seg``);
* frame level: intra-frame C×C channel attention.

Implicit text (Eq. 3): per level, k^t learnable soft prompts (CoOp-style pseudo-word embeddings spliced into the
level's template, ``icf.encoders.PROMPT_TEMPLATES``) go through the level's **frozen** text tower (CLIP text for
frames, VideoCLIP text for video/segments, CLAP text for audio) → candidates l_1..l_k. Each granularity's visual
query is the cached foundation embedding of that level (``vclip``, ``vclip_seg``, ``clip``; ``clap_clip``,
``clap`` for audio) plus a zero-initialised projection of the MIT feature, so training starts from the
foundation model's own space. The level's text is the softmax(sim/τ_s)-weighted candidate (or, with
``hard_top1``, the arg-max candidate with a straight-through gradient).

Eq. 4: one learnable weight query w scores all N_v + N_s + N_f visual texts (1 video, S segments, T frames;
padding masked) and ℓ^v is their softmax-weighted sum; audio likewise over 1 clip + T per-second texts → ℓ^a.
Eq. 5: z = F(Concat(Gate(ℓ^v), Gate(ℓ^a))), Gate a three-layer gMLP-style gating MLP.

Decisions: texts of every level are mapped to d by a per-level linear layer before Eq. 4 (the towers'
widths differ); with ``text_mode = "bank"`` the candidates are the cached class-prompt embeddings
(``text_bank[level]``) plus a zero-initialised residual adapter, and no tower runs. Frozen towers are held
outside the module tree: they are not parameters, not in ``state_dict`` (the trainer rebuilds them from the
`EncoderSpec`), and ``.to()`` does not move them — build them on the training device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
_CACHED = {"video": "vclip", "segment": "vclip_seg", "frame": "clip"}  # Batch key of each level's foundation embedding


class TextTower(Protocol):
    """The text side MIT needs from a frozen tower (`icf.encoders` CLIP / VideoCLIP / CLAP satisfy it)."""

    def tokenize(self, texts: list[str]) -> Tensor: ...

    def token_embedding(self, ids: Tensor) -> Tensor: ...

    def encode_text_embeddings(self, embeds: Tensor, ids: Tensor) -> Tensor: ...


def placeholder_span(tower: TextTower, template: str, n_ctx: int) -> tuple[Tensor, int]:
    """Token ids ``(1, L)`` of ``template`` with n_ctx pseudo-words and the index of the first one.

    The pseudo-word positions are where the ids of two fillings ("x x …" vs "y y …") differ; they must be n_ctx
    consecutive tokens.
    """
    a, b = (tower.tokenize([template.format(" ".join([w] * n_ctx))]) for w in ("x", "y"))
    pos = (a[0] != b[0]).nonzero().flatten().tolist()
    if len(pos) != n_ctx or pos != list(range(pos[0], pos[0] + n_ctx)):
        raise ValueError(f"cannot locate {n_ctx} pseudo-word tokens in {template!r} (found positions {pos})")
    return a, pos[0]


class SoftPrompts(nn.Module):
    """k learnable soft prompts of one level through its frozen text tower → candidates ``(k, D)`` (Eq. 3's l_i)."""

    def __init__(self, tower: TextTower, template: str, k: int, n_ctx: int):
        super().__init__()
        ids, self.start = placeholder_span(tower, template, n_ctx)
        self.register_buffer("ids", ids.cpu().expand(k, -1).clone(), persistent=False)
        width = tower.token_embedding(ids).shape[-1]
        self.ctx = nn.Parameter(torch.randn(k, n_ctx, width) * 0.02)

    def forward(self, tower: TextTower) -> Tensor:
        base = tower.token_embedding(self.ids)
        n = self.ctx.shape[1]
        ctx = self.ctx.to(base.device, base.dtype)
        embeds = torch.cat([base[:, : self.start], ctx, base[:, self.start + n :]], dim=1)
        return tower.encode_text_embeddings(embeds, self.ids).to(self.ctx.device, self.ctx.dtype)


class BankCandidates(nn.Module):
    """``text_mode = "bank"``: cached class-prompt embeddings + a zero-initialised residual adapter → ``(K, D)``."""

    def __init__(self, bank: np.ndarray):
        super().__init__()
        self.register_buffer("bank", torch.as_tensor(np.asarray(bank), dtype=torch.float32), persistent=False)
        self.adapter = nn.Linear(self.bank.shape[1], self.bank.shape[1])
        nn.init.zeros_(self.adapter.weight)
        nn.init.zeros_(self.adapter.bias)

    def forward(self, _tower: object = None) -> Tensor:
        return F.normalize(self.bank + self.adapter(self.bank), dim=-1)


def zero_linear(cin: int, cout: int) -> nn.Linear:
    """A linear layer initialised to output zeros (the visual query starts as the cached foundation embedding)."""
    layer = nn.Linear(cin, cout)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class ChannelAttention(nn.Module):
    """Eq. 1–2: channel tokens attend to each other; F := F + V·A.

    Input ``(N, G, C, p, p)`` — G frames of C channels whose tokens are the p² pooled pixels. Q, K, V come from a
    1×1 convolution (the three mapping matrices); Q and K rows are L2-normalised and A = softmax(QKᵀ/τ) over
    the G·C tokens (the O(C²) channel form instead of O(H²W²)). ``real`` ``(N, G)`` masks padded frames as keys.
    """

    def __init__(self, channels: int, tau: float):
        super().__init__()
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.tau = tau

    def forward(self, x: Tensor, real: Tensor | None = None) -> Tensor:
        n, g, c, p, _ = x.shape
        q, k, v = self.qkv(x.flatten(0, 1)).view(n, g, 3, c, p * p).unbind(2)
        q, k, v = (y.reshape(n, g * c, p * p) for y in (q, k, v))
        logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(1, 2) / self.tau  # (N, GC, GC) Eq. 1
        if real is not None:
            logits = logits.masked_fill(~real.repeat_interleave(c, dim=1)[:, None], float("-inf"))
        return x + (logits.softmax(-1) @ v).view(n, g, c, p, p)  # Eq. 2


class GatingMLP(nn.Module):
    """Eq. 5's Gate: three linear layers, out = W_3(GELU(W_1 x) ⊙ W_2 x) + x (gMLP-style multiplicative gating)."""

    def __init__(self, dim: int):
        super().__init__()
        self.value, self.gate, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        return x + self.out(F.gelu(self.value(h)) * self.gate(h))


def select_text(query: Tensor, candidates: Tensor, tau: float, hard: bool) -> Tensor:
    """Eq. 3: the candidate text that best matches each visual query.

    Args:
        query: ``(…, D)`` visual (or audio) queries; candidates: ``(k, D)``.
        hard: arg-max with a straight-through softmax gradient instead of the softmax mixture.
    Returns: ``(…, D)``.
    """
    sim = F.normalize(query, dim=-1) @ F.normalize(candidates, dim=-1).T
    weights = (sim / tau).softmax(-1)
    if hard:
        onehot = F.one_hot(weights.argmax(-1), weights.shape[-1]).to(weights.dtype)
        weights = onehot + weights - weights.detach()
    return weights @ candidates


def fuse_texts(texts: Tensor, real: Tensor, query: Tensor) -> Tensor:
    """Eq. 4: Σ_n softmax_n(⟨w, l_n⟩/√d)·l_n over the real texts; texts ``(B, N, d)``, real ``(B, N)``, w ``(d,)``."""
    scores = (texts @ query / math.sqrt(texts.shape[-1])).masked_fill(~real, float("-inf"))
    return torch.einsum("bn,bnd->bd", scores.softmax(-1), texts)


class MultiGranularityText(nn.Module):
    """The MIT branch (module docstring): batch + visual/audio features → z, ℓ^v, ℓ^a."""

    def __init__(
        self,
        cfg: ModelConfig,
        visual_channels: int,
        towers: Mapping[str, TextTower] | None,
        text_bank: Mapping[str, np.ndarray] | None,
        dims: Mapping[str, int],
    ):
        """
        Args:
            visual_channels: channels of the backbone map MIT reads (stride 32).
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
            self.candidates = nn.ModuleDict(
                {lv: SoftPrompts(towers[lv], PROMPT_TEMPLATES[lv], cfg.k_t, cfg.n_ctx) for lv in LEVELS}
            )
        else:
            if text_bank is None or any(lv not in text_bank for lv in LEVELS):
                raise ValueError(f"MIT with text_mode='bank' needs a text bank with levels {LEVELS}")
            self._towers = {}
            self.candidates = nn.ModuleDict({lv: BankCandidates(text_bank[lv]) for lv in LEVELS})
        self.inp = nn.Sequential(nn.Conv2d(visual_channels, d, 1), nn.AdaptiveAvgPool2d(cfg.mit_pool))
        self.attend = nn.ModuleDict({lv: ChannelAttention(d, cfg.mit_tau) for lv in VISUAL_LEVELS})
        self.query_proj = nn.ModuleDict({lv: zero_linear(d, dims[lv]) for lv in (*VISUAL_LEVELS, "audio_clip", "audio")})
        self.text_proj = nn.ModuleDict({lv: nn.Linear(dims[lv], d) for lv in LEVELS})
        self.weight_query = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * d**-0.5) for m in ("visual", "audio")})
        self.gate_v, self.gate_a = GatingMLP(d), GatingMLP(d)
        self.fuse = nn.Linear(2 * d, d)

    def level_candidates(self) -> dict[str, Tensor]:
        """Candidates l_1..l_k ``(k, D)`` per level (runs the frozen towers in tower mode)."""
        return {lv: self.candidates[lv](self._towers.get(lv)) for lv in LEVELS}

    def visual_features(self, stride32: Tensor, valid: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Video/segment/frame MIT features pooled to ``(B, N_level, d)`` with their real-mask ``(B, N_level)``.

        ``stride32``: the backbone's last map ``(B·T, C, h, w)``; ``valid`` ``(B, T)``.
        """
        b, t = valid.shape
        x = self.inp(stride32)
        x = x.view(b, t, *x.shape[1:])  # (B, T, d, p, p)
        real = valid.to(x.dtype)[..., None]
        video = self.attend["video"](x, valid).mean((-1, -2))  # (B, T, d)
        video = (video * real).sum(1, keepdim=True) / real.sum(1, keepdim=True)
        frame = self.attend["frame"](x.flatten(0, 1)[:, None]).mean((-1, -2)).view(b, t, -1)
        segment, seg_real = self._segments(x, valid)
        ones = torch.ones(b, 1, dtype=torch.bool, device=x.device)
        return {"video": (video, ones), "segment": (segment, seg_real), "frame": (frame, valid)}

    def _segments(self, x: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Segment level: channel attention inside each backward window of the clip's real frames.

        Clips are grouped by their number of real frames n (window ⌈n/segment_div⌉, windows from
        `segment_windows`), so padded AVSS v1 clips use their own windows, as the extract stage did.
        """
        b = x.shape[0]
        counts = valid.sum(1)
        per_clip: list[Tensor | None] = [None] * b
        for n in counts.unique().tolist():
            idx = (counts == n).nonzero().flatten()
            windows = torch.tensor(segment_windows(n, segment_window(n, self.cfg.segment_div)), device=x.device)
            s, w = windows.shape
            chunk = x[idx][:, windows].flatten(0, 1)  # (b_n·S, w, d, p, p)
            pooled = self.attend["segment"](chunk).mean((1, -1, -2)).view(len(idx), s, -1)
            for j, i in enumerate(idx.tolist()):
                per_clip[i] = pooled[j]
        s_max = max(p.shape[0] for p in per_clip)
        out = x.new_zeros(b, s_max, x.shape[2])
        real = torch.zeros(b, s_max, dtype=torch.bool, device=x.device)
        for i, p in enumerate(per_clip):
            out[i, : p.shape[0]] = p
            real[i, : p.shape[0]] = True
        return out, real

    def forward(self, batch: Mapping[str, Tensor], stride32: Tensor, audio: Tensor) -> dict[str, Tensor]:
        """
        Args:
            batch: the Batch (``valid``, ``vclip``, ``vclip_seg``, ``clip``, ``clap``, ``clap_clip``).
            stride32: backbone map ``(B·T, C, h, w)``; audio: A ``(B, T, d)``.
        Returns: ``z`` ``(B, d)`` (Eq. 5), ``ell_v`` and ``ell_a`` ``(B, d)`` (Eq. 4).
        """
        valid = batch["valid"]
        cand = self.level_candidates()
        feats = self.visual_features(stride32, valid)
        cached = {"video": batch["vclip"][:, None], "segment": batch["vclip_seg"], "frame": batch["clip"]}
        texts, reals = [], []
        for lv in VISUAL_LEVELS:
            feat, real = feats[lv]
            if cached[lv].shape[1] < feat.shape[1]:
                raise ValueError(f"batch['{_CACHED[lv]}'] has {cached[lv].shape[1]} entries per clip, MIT needs {feat.shape[1]}")
            query = cached[lv][:, : feat.shape[1]].to(feat.dtype) + self.query_proj[lv](feat)
            texts.append(self.text_proj[lv](select_text(query, cand[lv], self.cfg.select_tau, self.cfg.hard_top1)))  # Eq. 3
            reals.append(real)
        ell_v = fuse_texts(torch.cat(texts, 1), torch.cat(reals, 1), self.weight_query["visual"])  # Eq. 4
        real_f = valid.to(audio.dtype)[..., None]
        audio_clip = (audio * real_f).sum(1, keepdim=True) / real_f.sum(1, keepdim=True)
        audio_queries = [
            batch["clap_clip"][:, None].to(audio.dtype) + self.query_proj["audio_clip"](audio_clip),
            batch["clap"].to(audio.dtype) + self.query_proj["audio"](audio),
        ]
        audio_texts = torch.cat(
            [self.text_proj["audio"](select_text(q, cand["audio"], self.cfg.select_tau, self.cfg.hard_top1)) for q in audio_queries], 1
        )
        audio_real = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
        ell_a = fuse_texts(audio_texts, audio_real, self.weight_query["audio"])
        z = self.fuse(torch.cat([self.gate_v(ell_v), self.gate_a(ell_a)], dim=-1))  # Eq. 5
        return {"z": z, "ell_v": ell_v, "ell_a": ell_a}

