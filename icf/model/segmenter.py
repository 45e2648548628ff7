"""The segmenter contract every method builds on, and the two hooks ICF attaches to a segmenter.

A **segmenter** maps a Batch (ARCHITECTURE.md) to mask logits in two halves, so that ICF (paper Fig. 1 (III),
Table 3: ICF on top of AVSBench / AVSegFormer) can plug in between them:

* ``encode(batch) -> Encoded``: visual features up to the point where audio and vision interact, with the
  segmenter's *context hook* applied (`ChannelContext`, Eq. 1–2: F^v := F^v + V^v A^v at video, segment and
  frame level) and the audio features A ``(B, T, d)``;
* ``decode(batch, enc, text) -> {"logits", "vis_feat", "aud_feat"}``: modality interaction and mask head.
  ``vis_feat`` / ``aud_feat`` ``(B, T, d)`` are the decoder-side per-frame features CDCL contrasts
  (supplement note 3). ``text`` (optional `TextTokens`) is read by the segmenter's *text hook*: zero-gated
  cross-attention from its interaction tokens to the implicit text (paper §4.2, the rows without CDCL).

`SegModel` is what the trainer and eval see (forward, loss, predict, parameter groups); a plain segmenter is a
SegModel whose loss is Eq. 18.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icf.config import ModelConfig, TrainConfig
from icf.model.losses import segmentation_loss, total_loss
from icf.model.mit import ChannelContext, Granular

Batch = Mapping[str, Tensor]


@dataclass
class Encoded:
    """The first half of a segmenter's forward pass.

    Attributes:
        visual: the map at the context hook ``(B·T, d, h, w)``, after `ChannelContext` when the segmenter has one.
        granular: pooled video / segment / frame descriptors of that map (MIT's visual queries), or None.
        audio: A ``(B, T, d)``.
        state: anything else the segmenter's ``decode`` needs (private to the segmenter).
    """

    visual: Tensor
    granular: Granular | None
    audio: Tensor
    state: dict[str, object] = field(default_factory=dict)


@dataclass
class TextTokens:
    """Implicit-text tokens for the text hook: ``tokens`` ``(B, N, d)``, ``real`` ``(B, N)`` bool."""

    tokens: Tensor
    real: Tensor


class SegModel(nn.Module):
    """What the trainer and eval need from any method's model.

    Subclasses set ``self.cfg`` and implement ``forward(batch) -> {"logits": (B, T, K, H, W), ...}``.
    """

    cfg: ModelConfig

    def loss(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Eq. 18: ``total`` = ``seg`` and its parts ``bce``, ``dice``, ``focal``."""
        parts = segmentation_loss(out["logits"], batch["masks"], batch["gt"], batch["valid"], self.cfg)
        parts["total"] = total_loss(parts, self.cfg)
        return parts

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """Eval-mode prediction: probabilities ``(B, T, H, W)`` (binary) or class-index maps ``(B, T, H, W)`` int64."""
        was_training = self.training
        self.eval()
        try:
            logits = self(batch)["logits"]
        finally:
            self.train(was_training)
        return logits[:, :, 0].sigmoid() if self.cfg.binary else logits.argmax(2)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at ``lr · backbone_lr_mult`` (the ImageNet backbone's)."""
        backbone = getattr(self, "backbone", None)
        return list(backbone.parameters()) if isinstance(backbone, nn.Module) else []

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that trains (frozen towers are not parameters; a frozen pretrained VGGish is excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, train: TrainConfig) -> list[dict]:
        """AdamW groups: the backbone at ``lr·backbone_lr_mult``, everything else at ``lr``."""
        backbone = {id(p) for p in self.backbone_parameters()}
        params = self.trainable_parameters()
        return [
            {"params": [p for p in params if id(p) in backbone], "lr": train.lr * train.backbone_lr_mult},
            {"params": [p for p in params if id(p) not in backbone], "lr": train.lr},
        ]


class TextCrossAttention(nn.Module):
    """The text hook (paper §4.2: implicit text "as an additional cue through cross-attention in modality
    interaction"): x := x + g·Attn(LN(x), text), with a learnable gate g initialised to 0 so that a model with
    the hook starts as the baseline; x ``(B·T, N, d)`` tokens of the clip's frames, text ``(B, M, d)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, text: TextTokens) -> Tensor:
        b = text.tokens.shape[0]
        t = x.shape[0] // b
        tokens = text.tokens.repeat_interleave(t, 0)
        pad = (~text.real).repeat_interleave(t, 0)
        return x + self.gate * self.attn(self.norm(x), tokens, tokens, key_padding_mask=pad, need_weights=False)[0]


class Segmenter(SegModel, metaclass=abc.ABCMeta):
    """Base of the segmenters ICF plugs into (module docstring).

    Subclasses build their layers, set ``self.width`` (d of ``Encoded.visual`` and of the decoder features),
    implement ``encode`` / ``decode``, call ``self.attend(visual_map, valid)`` at their context hook inside
    ``encode`` and ``self.read_text(i, tokens, text)`` at each of their ``text_points`` hook points inside
    ``decode``. ``install_context`` / ``install_text_attention`` add the hooks' modules (ICF calls them).
    """

    width: int

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.context: ChannelContext | None = None
        self.text_attn: nn.ModuleList | None = None

    # ---- hooks -----------------------------------------------------------------------------------

    def install_context(self) -> None:
        """Add the Eq. 1–2 channel context at the context hook (no-op when present)."""
        if self.context is None:
            self.context = ChannelContext(self.width, self.cfg.mit_tau, self.cfg.segment_div)

    def install_text_attention(self) -> None:
        """Add zero-gated text cross-attention at each of the segmenter's ``text_points`` hook points."""
        if self.text_attn is None:
            self.text_attn = nn.ModuleList(TextCrossAttention(self.width, self.cfg.num_heads) for _ in range(self.text_points))

    @property
    def text_points(self) -> int:
        """Number of text-hook points in ``decode`` (subclasses override)."""
        return 1

    def attend(self, visual: Tensor, valid: Tensor) -> tuple[Tensor, Granular | None]:
        """The context hook: ``visual`` ``(B·T, d, h, w)`` → (updated map, granular descriptors) or unchanged."""
        if self.context is None:
            return visual, None
        return self.context(visual, valid)

    def read_text(self, point: int, tokens: Tensor, text: TextTokens | None) -> Tensor:
        """The text hook at ``point``: ``tokens`` ``(B·T, N, d)`` attend to ``text`` (unchanged without the hook)."""
        if text is None or self.text_attn is None:
            return tokens
        return self.text_attn[point](tokens, text)

    # ---- the two halves ------------------------------------------------------------------------------

    @abc.abstractmethod
    def encode(self, batch: Batch) -> Encoded:
        """Visual features up to the context hook (applied) and the audio features."""

    @abc.abstractmethod
    def decode(self, batch: Batch, enc: Encoded, text: TextTokens | None = None) -> dict[str, Tensor]:
        """Modality interaction (text hook when ``text`` is given) and mask head → logits, vis_feat, aud_feat."""

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """``encode`` then ``decode`` without text: ``logits`` ``(B, T, K, H, W)`` (+ ``vis_feat``/``aud_feat`` in training,
        where the logits may be smaller than the frames: Eq. 18 upsamples the frames it scores, `segmentation_loss`)."""
        out = self.decode(batch, self.encode(batch))
        return out if self.training else {"logits": out["logits"]}


def frame_features(pixels: Tensor, b: int, weight: Tensor | None = None) -> Tensor:
    """CDCL's per-frame visual feature (Eq. 13's F^v_t): the L2-normalised spatial mean of a per-pixel map
    ``(B·T, d, h, w)`` → ``(B, T, d)``; with ``weight`` ``(B·T, h, w)`` ≥ 0 the weighted mean (masked average pooling,
    supplement note 6)."""
    if weight is None:
        pooled = pixels.mean((-1, -2))
    else:
        w = weight[:, None]
        pooled = (pixels * w).sum((-1, -2)) / w.sum((-1, -2)).clamp_min(1e-6)
    return F.normalize(pooled.view(b, -1, pixels.shape[1]), dim=-1)


def foreground_probability(logits: Tensor, binary: bool) -> Tensor:
    """P(pixel belongs to a sounding object) ``(N, h, w)`` from mask logits ``(N, K, h, w)``: σ of the one logit for
    the binary subsets, 1 − softmax's background (class 0) share for AVSS."""
    return logits[:, 0].sigmoid() if binary else 1 - logits.softmax(1)[:, 0]
