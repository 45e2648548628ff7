"""QDFormer (Li et al., CVPR 2024, "QDFormer: Towards Robust Audiovisual Segmentation in Complex Environments with
Quantization-based Semantic Decomposition"), written from the paper and `../shared/specs/peers.md` §2; it has no
official code (the decisions where the paper is silent are ARCHITECTURE.md's "QDFormer" faithfulness rows).

frames ``(B, T, 3, H, W)`` → timm backbone → MSDeformAttn pixel decoder ("a transformer encoder on top of the
backbone") → F_v: three levels ``(B·T, d, h_l, w_l)`` at strides 8/16/32 and a stride-4 lateral. log-Mel → the
project's `AudioEncoder` → F_a ``(B, T, d)``. Then

* **global decomposition**: `AVFuse` (Eq. 3, F_a attends to the clip's stride-32 tokens) → F'_a; the global ASD
  (Eq. 4) decodes N prototypes P against F'_a → g ``(B, N, d)``; the shared codebook quantises them (Eq. 2,
  `icf.model.vq`) → ĝ; `AVSR` (Eq. 5) modulates every level with filters from ĝ;
* **local calibration**: the local ASD (Eq. 6) decodes P against the frame's single audio token f_{a,t} →
  l ``(B, T, N, d)``, quantised with the *detached* codebook → l̂; the mask decoder TrD_segm (per frame, round robin
  over the modulated levels) turns l̂ into tokens h, and the heads give class logits, a box and the dynamic-conv
  parameters θ of each token; Eq. 7 (`icf.model.dynamic_conv`) on F^out (the FPN map, 1×1 to D_m) gives its mask.

Loss (Eq. 8): λ_quant·L_quant (Eq. 9) + L_segm, the Hungarian set loss (Eq. 10, `icf.model.matching`), plus the
same loss on every earlier decoder layer when ``aux_loss`` is on.

Inference → ``logits (B, T, K, H, W)``: binary — the token with the highest mean class score over the clip's real
frames gives channel 0; AVSS — channel k = logit S_k with S_k(x) = max_i σ(class_{i,t,k})·σ(M_{i,t}(x)), channel 0
= logit(``bg_threshold``), so argmax is background unless some S_k exceeds it. In training the logits are computed
without gradient (the set loss reads the per-token outputs).

Ablations (paper Table 2): ``quant`` (identity instead of VQ, no L_quant, no codebook), ``avsr`` (no Eq. 5),
``local`` (decoder queries = ĝ for every frame, no local ASD), ``decompose`` (the baseline: N learnable queries
+ F_a[t]; no AVFuse, ASD, VQ or AVSR).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icf.config import ModelConfig
from icf.model.audio import AudioEncoder
from icf.model.backbone import Backbone
from icf.model.decoder import DecoderLayer
from icf.model.dynamic_conv import Controller, dynamic_masks, param_count
from icf.model.matching import Prediction, SetCriterion, SetWeights
from icf.model.pixel_decoder import PixelDecoder
from icf.model.segmenter import Batch, SegModel
from icf.model.vq import VectorQuantizer, perplexity

if TYPE_CHECKING:
    from icf.methods.qdformer import QDFormerOptions

COMPONENTS = frozenset({"quant", "avsr", "local", "decompose"})
LOGIT_CLAMP = 1e-6  # S_k is clamped to [ε, 1 − ε] before the logit


class AVFuse(nn.Module):
    """Eq. 3: h_a = LN(MCA(F_a, F_v) + F_a), F'_a = LN(FFN(h_a) + h_a) (post-norm, as written). The keys are the
    stride-32 tokens of the clip's real frames with their level positions; audio ``(B, T, d)`` → ``(B, T, d)``."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))

    def forward(self, audio: Tensor, visual: Tensor, pos: Tensor, valid: Tensor) -> Tensor:
        """audio ``(B, T, d)``, visual ``(B·T, d, h, w)``, pos ``(h·w, d)``, valid ``(B, T)`` → F'_a ``(B, T, d)``."""
        b, t, d = audio.shape
        keys = visual.flatten(2).transpose(1, 2).reshape(b, -1, d)  # (B, T·hw, d)
        key_pos = pos.repeat(t, 1)[None]
        pad = (~valid).repeat_interleave(pos.shape[0], dim=1)
        h = self.norm1(audio + self.attn(audio, keys + key_pos, keys, key_padding_mask=pad, need_weights=False)[0])
        return self.norm2(h + self.ffn(h))


class ASD(nn.Module):
    """Audio semantic decoder (Eq. 4 TrD_global / Eq. 6 TrD_local): N prototypes P ``(N, d)`` cross-attend to
    audio tokens (zero positions), self-attend among themselves, FFN; ``layers`` such layers, then a LayerNorm (so
    the token scale matches the N(0, 1) codebook)."""

    def __init__(self, dim: int, heads: int, ffn: int, layers: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim, heads, ffn, dropout, temporal=False, reverse=False) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, prototypes: Tensor, memory: Tensor, pad: Tensor | None = None) -> Tensor:
        """prototypes ``(N, d)``, memory ``(M, S, d)``, pad ``(M, S)`` True = ignored → tokens ``(M, N, d)``."""
        m = memory.shape[0]
        queries = prototypes.expand(m, -1, -1)
        zeros = torch.zeros_like(queries)
        for layer in self.layers:
            queries, _ = layer(queries, zeros, memory, torch.zeros_like(memory), m, None, pixel_pad=pad)
        return self.norm(queries)


class AVSR(nn.Module):
    """Eq. 5: w_i = Lin₂(ReLU(Lin₁(ĝ_i))) ∈ R^d; per level F'_v = BN_l(φ_l(w_1⊙F_v ⊕ … ⊕ w_N⊙F_v) + F_v), φ_l a 1×1
    conv N·d → d, ⊙ channel-wise (broadcast over space and over the clip's frames). ``act="sigmoid"`` squashes w."""

    def __init__(self, dim: int, tokens: int, levels: int, act: str = "none"):
        super().__init__()
        self.act = act
        self.filters = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))
        self.phi = nn.ModuleList(nn.Conv2d(tokens * dim, dim, 1) for _ in range(levels))
        self.bn = nn.ModuleList(nn.BatchNorm2d(dim) for _ in range(levels))

    def forward(self, tokens: Tensor, levels: list[Tensor]) -> list[Tensor]:
        """tokens ĝ ``(B, N, d)``, levels ``(B·T, d, h_l, w_l)`` → modulated levels (same shapes)."""
        w = self.filters(tokens)
        w = w.sigmoid() if self.act == "sigmoid" else w
        b, n, d = w.shape
        out = []
        for phi, bn, x in zip(self.phi, self.bn, levels, strict=True):
            bt, _, h, wd = x.shape
            clip = x.view(b, bt // b, 1, d, h, wd)
            stacked = (w[:, None, :, :, None, None] * clip).reshape(bt, n * d, h, wd)  # w_1⊙F_v ⊕ … ⊕ w_N⊙F_v
            out.append(bn(phi(stacked) + x))
        return out


class MLP(nn.Module):
    """``layers`` linear layers with ReLU between (DETR's box head)."""

    def __init__(self, dim: int, out: int, layers: int):
        super().__init__()
        widths = [dim] * layers + [out]
        self.net = nn.Sequential(*[m for i in range(layers) for m in
                                   ([nn.Linear(widths[i], widths[i + 1])] + ([nn.ReLU(inplace=True)] if i < layers - 1 else []))])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


PRIOR_PROB = 0.01  # the focal-loss prior of the class logits (RetinaNet; DETR family)


def init_detr_heads(class_head: nn.Linear, box_head: MLP) -> None:
    """R2VOS / ReferFormer's head initialisation (`models/referformer.py`): the class bias at −log((1 − π)/π) with
    π = `PRIOR_PROB`, so every token starts at σ = 0.01 under the focal loss, not 0.5; the box MLP's last layer zeroed,
    its w/h biases at −2 (boxes start at centre (0.5, 0.5), size σ(−2) ≈ 0.12)."""
    with torch.no_grad():
        class_head.bias.fill_(-math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        last = box_head.net[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[2:] = -2.0


@dataclass
class Semantics:
    """The audio side of one forward pass: g ``(B, N, d)`` and its quantisation ĝ, l ``(B, T, N, d)`` and l̂, the
    code indices (None where not quantised), the L_quant parts and how many dead codes were restarted."""

    g: Tensor | None
    g_hat: Tensor | None
    l: Tensor | None
    l_hat: Tensor | None
    g_idx: Tensor | None
    l_idx: Tensor | None
    losses: dict[str, Tensor]
    restarted: int = 0


def set_logits(pred: Prediction, valid: Tensor, binary: bool, bg_threshold: float = 0.5) -> Tensor:
    """Set outputs → ``logits (B, T, K, H, W)`` (module docstring, "Inference"); valid ``(B, T)`` marks real frames."""
    scores = pred.classes.sigmoid()  # (B, T, N, K_c)
    if binary:
        real = valid[:, :, None].to(scores.dtype)
        mean = (scores[..., 0] * real).sum(1) / real.sum(1).clamp_min(1.0)  # (B, N): mean over the real frames
        best = mean.argmax(-1)
        idx = best[:, None, None, None, None].expand(-1, pred.masks.shape[1], 1, *pred.masks.shape[-2:])
        return pred.masks.gather(2, idx)  # (B, T, 1, H, W)
    prob = pred.masks.sigmoid()
    s = None
    for i in range(prob.shape[2]):  # S_k = max_i σ(class_{i,t,k})·σ(M_{i,t}); a running max keeps memory at K·H·W
        si = scores[:, :, i, :, None, None] * prob[:, :, i, None]
        s = si if s is None else torch.maximum(s, si)
    s = s.clamp(LOGIT_CLAMP, 1 - LOGIT_CLAMP)
    bg = torch.full_like(s[:, :, :1], math.log(bg_threshold / (1 - bg_threshold)))
    return torch.cat([bg, torch.logit(s)], dim=2)


class QDFormer(SegModel):
    """The QDFormer model (module docstring). ``options``: `icf.methods.qdformer.QDFormerOptions`."""

    def __init__(self, cfg: ModelConfig, options: QDFormerOptions):
        super().__init__()
        self.cfg, self.opts = cfg, options
        d, n, ab = cfg.d_model, options.num_tokens, cfg.ablate
        self.decompose = "decompose" not in ab
        self.quant = self.decompose and "quant" not in ab
        self.local = self.decompose and "local" not in ab
        self.use_avsr = self.decompose and "avsr" not in ab
        self.backbone = Backbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_kwargs)
        self.pixel_decoder = PixelDecoder(self.backbone.channels, d, cfg.ffn_dim, cfg.enc_layers, cfg.num_heads, cfg.num_points, cfg.dropout)
        self.audio = AudioEncoder(cfg)
        self.prototypes = nn.Parameter(torch.randn(n, d))  # p_i, shared by the global and local ASD (Eq. 4, 6)
        if self.decompose:
            self.av_fuse = AVFuse(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout)
            self.global_asd = ASD(d, cfg.num_heads, cfg.ffn_dim, options.asd_layers, cfg.dropout)
        if self.quant:
            self.vq = VectorQuantizer(options.codebook_size, d, options.lambda_com, options.vq_init,
                                      options.vq_restart, options.vq_buffer)
        if self.use_avsr:
            self.avsr = AVSR(d, n, levels=3, act=options.avsr_act)
        if self.local:
            self.local_asd = ASD(d, cfg.num_heads, cfg.ffn_dim, options.asd_layers, cfg.dropout)
        self.query_pos = nn.Parameter(torch.randn(n, d))  # N(0, 1) as nn.Embedding in DETR / ReferFormer
        self.segm = nn.ModuleList(DecoderLayer(d, cfg.num_heads, cfg.ffn_dim, cfg.dropout, temporal=False, reverse=False)
                                  for _ in range(cfg.dec_layers))
        self.segm_norm = nn.LayerNorm(d)
        self.mask_proj = nn.Conv2d(d, options.mask_dim, 1)  # FPN → F^out (D_m channels)
        self.num_cls = 1 if cfg.binary else cfg.num_classes - 1
        self.class_head = nn.Linear(d, self.num_cls)
        self.box_head = MLP(d, 4, 3)
        init_detr_heads(self.class_head, self.box_head)
        self.controller = Controller(d, param_count(options.mask_dim + 2, options.dyn_channels, options.dyn_layers))
        self.criterion = SetCriterion(cfg.binary, SetWeights(options.cls_weight, options.l1_weight, options.giou_weight,
                                                             options.mask_weight, options.dice_weight,
                                                             cfg.focal_alpha, cfg.focal_gamma))

    # ---- audio semantics ---------------------------------------------------------------------------------

    def semantics(self, audio: Tensor, coarse: Tensor, coarse_pos: Tensor, valid: Tensor) -> Semantics:
        """Eq. 2–4, 6, 9: F_a ``(B, T, d)``, the stride-32 level ``(B·T, d, h, w)`` and its positions → `Semantics`."""
        if not self.decompose:
            return Semantics(None, None, None, None, None, None, {})
        fused = self.av_fuse(audio, coarse, coarse_pos, valid)  # Eq. 3
        g = self.global_asd(self.prototypes, fused, pad=~valid)  # Eq. 4: (B, N, d)
        losses: dict[str, Tensor] = {}
        g_hat, g_idx, restarted = g, None, 0
        if self.quant:
            q = self.vq(g)  # Eq. 2, the shared codebook
            g_hat, g_idx = q.st, q.idx
            losses.update(vq_codebook=q.codebook_loss, vq_commit=q.commit_loss)
            restarted = q.restarted
        l = l_hat = l_idx = None
        if self.local:
            b, t, d = audio.shape
            l = self.local_asd(self.prototypes, audio.reshape(b * t, 1, d)).view(b, t, -1, d)  # Eq. 6
            l_hat = l
            if self.quant:
                real = valid[:, :, None].expand(l.shape[:-1])
                ql = self.vq(l, update_codebook=False, mask=real)  # C.detach(): the local path never updates C
                l_hat, l_idx = ql.st, ql.idx
                losses["vq_local"] = ql.commit_loss
        if losses:
            losses["quant"] = sum(losses.values())  # Eq. 9
        return Semantics(g, g_hat, l, l_hat, g_idx, l_idx, losses, restarted)

    def decoder_queries(self, sem: Semantics, audio: Tensor) -> Tensor:
        """The content queries of TrD_segm ``(B·T, N, d)``: l̂ (full model), ĝ for every frame (``local``
        ablated) or P + F_a[t] (``decompose`` ablated)."""
        b, t, d = audio.shape
        if sem.l_hat is not None:
            return sem.l_hat.reshape(b * t, -1, d)
        if sem.g_hat is not None:
            return sem.g_hat[:, None].expand(b, t, -1, d).reshape(b * t, -1, d)
        return (self.prototypes[None, None] + audio[:, :, None]).reshape(b * t, -1, d)

    # ---- heads -------------------------------------------------------------------------------------------

    def heads(self, tokens: Tensor, features: Tensor, b: int, size: tuple[int, int]) -> Prediction:
        """Decoder tokens ``(B·T, N, d)`` and F^out ``(B·T, D_m, h, w)`` → `Prediction` at ``size`` (Eq. 7)."""
        h = self.segm_norm(tokens)
        classes = self.class_head(h)
        boxes = self.box_head(h).sigmoid()
        theta = self.controller(h)
        masks = dynamic_masks(features, theta, boxes[..., :2].detach(), self.opts.dyn_channels, self.opts.dyn_layers)  # Eq. 7
        masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        return Prediction(classes.unflatten(0, (b, -1)), boxes.unflatten(0, (b, -1)), masks.unflatten(0, (b, -1)))

    # ---- forward and loss ------------------------------------------------------------------------------

    def outputs(self, batch: Batch) -> tuple[list[Prediction], Semantics]:
        """Every decoder layer's `Prediction` (last = final) and the `Semantics`."""
        frames, valid = batch["frames"], batch["valid"]
        b = frames.shape[0]
        levels, lateral = self.pixel_decoder(self.backbone(frames.flatten(0, 1)))
        level_pos = self.pixel_decoder.level_positions([lv.shape[-2:] for lv in levels], lateral)
        audio = self.audio(batch["mel"])
        sem = self.semantics(audio, levels[-1], level_pos[-1], valid)
        if self.use_avsr:
            levels = self.avsr(sem.g_hat, levels)  # Eq. 5
        features = self.mask_proj(self.pixel_decoder.mask_features(levels, lateral))  # F^out
        queries = self.decoder_queries(sem, audio)
        query_pos = self.query_pos.expand(queries.shape[0], -1, -1)
        tokens = [lv.flatten(2).transpose(1, 2) for lv in levels]
        order = list(range(len(levels)))[::-1]  # coarse → fine, round robin
        preds = []
        for i, layer in enumerate(self.segm):
            lv = order[i % len(order)]
            queries, _ = layer(queries, query_pos, tokens[lv], level_pos[lv][None], b, None)
            if self.opts.aux_loss or i == len(self.segm) - 1:
                preds.append(self.heads(queries, features, b, frames.shape[-2:]))
        return preds, sem

    def forward(self, batch: Batch) -> dict[str, object]:
        """``logits`` ``(B, T, K, H, W)``; in training also ``preds`` (per decoder layer) and ``quant_parts``."""
        preds, sem = self.outputs(batch)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.training):
            logits = set_logits(preds[-1], batch["valid"], self.cfg.binary, self.opts.bg_threshold)
        if not self.training:
            return {"logits": logits}
        return {"logits": logits, "preds": preds, "quant_parts": sem.losses, "codes": sem.g_idx, "restarted": sem.restarted}

    def loss(self, out: Mapping[str, object], batch: Batch) -> dict[str, Tensor]:
        """Eq. 8: ``total`` = λ_quant·``quant`` + ``segm`` (+ the aux layers' set losses, ``aux``); also the
        Eq. 10 parts of the last layer, the Eq. 9 parts, the codebook ``perplexity`` and ``codes_restarted``
        (diagnostics)."""
        scored = batch["gt"] & batch["valid"]
        preds = out["preds"]
        parts = self.criterion(preds[-1], batch["masks"], scored)
        total = parts["segm"]
        if len(preds) > 1:
            parts["aux"] = sum(self.criterion(p, batch["masks"], scored)["segm"] for p in preds[:-1])
            total = total + parts["aux"]
        quant = out["quant_parts"]
        if "quant" in quant:
            parts.update(quant)
            parts["perplexity"] = perplexity(out["codes"], self.vq.size).detach()
            parts["codes_restarted"] = torch.tensor(float(out["restarted"]))
            total = total + self.opts.lambda_quant * quant["quant"]
        parts["total"] = total
        return parts
