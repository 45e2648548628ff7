"""The bidirectional-query segmenter (ICF's baseline, paper Fig. 2 and supplement note 4).

timm backbone → MSDeformAttn pixel decoder → **channel context** (Eq. 1–2 at video, segment and frame level on
the stride-32 level; note 4: "in the baseline, we leverage videos from MIT, employing frame-level channel-wise
cross-attention and self-attention to enhance the spatiotemporal context modelling of visual features") →
audio-conditioned bidirectional query decoder (the modality interaction; its text hook is one zero-gated
cross-attention per decoder layer) → mask head, on frames ``(B, T, 3, H, W)`` and log-Mel ``(B, T, 96, 64)``.

In training the logits stay at the mask head's stride 4: Eq. 18 upsamples only the frames with ground truth to
the mask size (`icf.model.losses.segmentation_loss`), the same values as upsampling every frame first (resizing
is per frame) without the full-size logits of unannotated and padded frames (AVSS v1s: 4 of 5 frames; S4 train:
4 of 5). In eval they are frame-sized.

``vis_feat`` (CDCL, note 3) is the per-frame mean of the decoder-updated per-pixel embedding, taken before its
final ReLU (``cdcl_visual = "pre_relu"``; after it every mean lies in the positive orthant, which compresses the
distances between clips; ``cdcl_visual_pool = "mask"`` weights the mean by the predicted, detached foreground
probability instead: masked average pooling, supplement note 6), ``aud_feat`` the per-frame mean of the decoded
audio queries, both L2-normalised.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from icf.config import ModelConfig
from icf.model.audio import AudioEncoder
from icf.model.backbone import Backbone
from icf.model.decoder import MaskHead, QueryDecoder
from icf.model.pixel_decoder import PixelDecoder
from icf.model.resize import resize_bilinear
from icf.model.segmenter import Batch, Encoded, Segmenter, TextTokens, foreground_probability, frame_features


class BidirSegmenter(Segmenter):
    """The baseline segmenter (module docstring). ``channel_context`` builds the Eq. 1–2 context (default on)."""

    def __init__(self, cfg: ModelConfig, channel_context: bool = True):
        super().__init__(cfg)
        d = self.width = cfg.d_model
        self.backbone = Backbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_kwargs)
        self.pixel_decoder = PixelDecoder(self.backbone.channels, d, cfg.ffn_dim, cfg.enc_layers, cfg.num_heads, cfg.num_points, cfg.dropout)
        self.audio = AudioEncoder(cfg)
        self.decoder = QueryDecoder(d, cfg.num_heads, cfg.ffn_dim, cfg.dec_layers, cfg.num_queries, cfg.num_audio_queries, cfg.dropout)
        self.mask_head = MaskHead(d, cfg.num_classes, cfg.pixel_classifier)
        if channel_context:
            self.install_context()

    @property
    def text_points(self) -> int:
        return self.cfg.dec_layers

    def encode(self, batch: Batch) -> Encoded:
        """Backbone, pixel decoder and the context hook on the stride-32 level."""
        frames, valid = batch["frames"], batch["valid"]
        levels, lateral = self.pixel_decoder(self.backbone(frames.flatten(0, 1)))
        coarse, granular = self.attend(levels[-1], valid)  # Eq. 1–2
        return Encoded(coarse, granular, self.audio(batch["mel"]), {"levels": levels[:-1], "lateral": lateral})

    def decode(self, batch: Batch, enc: Encoded, text: TextTokens | None = None) -> dict[str, Tensor]:
        frames, valid = batch["frames"], batch["valid"]
        b, t = frames.shape[:2]
        levels = [*enc.state["levels"], enc.visual]
        level_pos = self.pixel_decoder.level_positions([lv.shape[-2:] for lv in levels], enc.audio)
        hook = (lambda i, q: self.read_text(i, q, text)) if text is not None else None
        queries, levels = self.decoder(levels, level_pos, enc.audio, valid, hook)
        pixels, pre = self.pixel_decoder.mask_features_tapped(levels, enc.state["lateral"])
        logits = self.mask_head(queries, pixels)  # (B·T, K, H/4, W/4)
        pool = foreground_probability(logits.detach(), self.cfg.binary) if self.cfg.cdcl_visual_pool == "mask" else None
        vis = frame_features(pre if self.cfg.cdcl_visual == "pre_relu" else pixels, b, pool)
        if not self.training:  # training: Eq. 18 resizes the frames it scores (`segmentation_loss`)
            logits = resize_bilinear(logits, frames.shape[-2:])  # = F.interpolate(bilinear), faster on CPU
        aud = F.normalize(queries[:, -self.decoder.num_audio :].mean(1).view(b, t, -1), dim=-1)
        return {"logits": logits.view(b, t, *logits.shape[1:]), "vis_feat": vis, "aud_feat": aud}
