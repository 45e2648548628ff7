"""The ICF model (paper Fig. 2): baseline segmenter + MIT + SC + CDCL.

Baseline (always on, the only path in eval mode): timm backbone → MSDeformAttn pixel decoder → audio-conditioned
bidirectional query decoder → mask head, on frames ``(B, T, 3, H, W)`` and log-Mel ``(B, T, 96, 64)``.

Training adds (each switchable with ``cfg.ablate``, as in the paper's Table 2):

* MIT (``mit.py``): composite factual text z from soft prompts through the frozen text towers and the batch's
  cached CLIP/VideoCLIP/CLAP embeddings;
* SC (``sc.py``): counterfactual texts ℓ^cf from z (needs MIT);
* CDCL (``cdcl.py``): Gaussian contrasts between the decoder-side visual features F^v (per-frame mean of the
  decoder-updated per-pixel embedding), audio features A (per-frame mean of the decoded audio queries) and the
  texts (supplement note 3: CDCL uses features after interaction). Features are L2-normalised per frame so
  that D (Eq. 15) has a fixed scale for τ.

Fallbacks when a component is ablated (the paper: "when text information is not provided, the CDCL degenerates
into visual-audio distribution contrast"): without MIT, L_v↔a's positives are anchored on the cached CLAP clip
embedding instead of ℓ^a and L_v↔l, L_a↔l are off; without SC, the negatives of L_v↔l / L_a↔l are the other
clips' factual texts z_j, uniformly weighted (Σw = 1 as in Eq. 17). The CDCL math runs in float64 outside
autocast: its matrices are tiny (n ≤ 2T) and √ of eigenvalues near ε² needs the precision.

The frozen text towers are not parameters of this module and are not saved in its ``state_dict``; rebuild them
from the run's `EncoderSpec` (``icf.encoders.load``) on the training device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icf.config import ModelConfig, TrainConfig
from icf.model import cdcl
from icf.model.audio import AudioEncoder
from icf.model.backbone import Backbone
from icf.model.decoder import MaskHead, QueryDecoder
from icf.model.losses import contrast_sum, segmentation_loss, total_loss
from icf.model.mit import LEVELS, MultiGranularityText
from icf.model.pixel_decoder import PixelDecoder
from icf.model.sc import SemanticCounterfactual

Batch = Mapping[str, Tensor]


def _text_dims(encoders: object | None, text_bank: Mapping[str, np.ndarray] | None, mode: str) -> dict[str, int]:
    """Width of each level's text/foundation space (tower dims, or the bank's columns)."""
    if mode == "bank" and text_bank is not None:
        dims = {lv: int(np.asarray(text_bank[lv]).shape[1]) for lv in LEVELS}
    elif encoders is not None:
        dims = {lv: int(encoders.tower(lv).dim) for lv in LEVELS}
    else:
        raise ValueError(f"MIT needs {'a text bank' if mode == 'bank' else 'the encoders'} (text_mode={mode!r})")
    dims["audio_clip"] = dims["audio"]
    return dims


class ICF(nn.Module):
    """Implicit counterfactual framework for audio-visual segmentation.

    Args:
        cfg: model configuration (`icf.config.preset`).
        encoders: ``icf.encoders.Encoders`` (frozen text towers); needed only when MIT is on with
            ``text_mode = "tower"``.
        text_bank: cached prompt embeddings per level (``icf.encoders.text_bank``); needed only for
            ``text_mode = "bank"``.
    """

    def __init__(self, cfg: ModelConfig, encoders: object | None = None, text_bank: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.backbone = Backbone(cfg.backbone, cfg.backbone_weights, cfg.backbone_kwargs)
        self.pixel_decoder = PixelDecoder(self.backbone.channels, d, cfg.ffn_dim, cfg.enc_layers, cfg.num_heads, cfg.num_points, cfg.dropout)
        self.audio = AudioEncoder(cfg)
        self.decoder = QueryDecoder(d, cfg.num_heads, cfg.ffn_dim, cfg.dec_layers, cfg.num_queries, cfg.num_audio_queries, cfg.dropout)
        self.mask_head = MaskHead(d, cfg.num_classes, cfg.pixel_classifier)
        self.mit: MultiGranularityText | None = None
        self.sc: SemanticCounterfactual | None = None
        if cfg.uses("mit"):
            towers = {lv: encoders.tower(lv) for lv in LEVELS} if (encoders is not None and cfg.text_mode == "tower") else None
            dims = _text_dims(encoders, text_bank, cfg.text_mode)
            self.mit = MultiGranularityText(cfg, self.backbone.channels[-1], towers, text_bank, dims)
        if cfg.uses("sc"):
            self.sc = SemanticCounterfactual(cfg)

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Batch (ARCHITECTURE.md) → ``logits`` ``(B, T, K, H, W)``; in training mode also the auxiliaries
        ``vis_feat``/``aud_feat`` ``(B, T, d)`` and, when on, ``z``/``ell_a`` (MIT), ``cf``/``cf_alpha``/``loss_cf`` (SC)."""
        frames, valid = batch["frames"], batch["valid"]
        b, t = frames.shape[:2]
        feats = self.backbone(frames.flatten(0, 1))
        levels, lateral = self.pixel_decoder(feats)
        audio = self.audio(batch["mel"])
        level_pos = self.pixel_decoder.level_positions([lv.shape[-2:] for lv in levels], audio)
        queries, levels = self.decoder(levels, level_pos, audio, valid)
        pixels = self.pixel_decoder.mask_features(levels, lateral)
        logits = F.interpolate(self.mask_head(queries, pixels), size=frames.shape[-2:], mode="bilinear", align_corners=False)
        out = {"logits": logits.view(b, t, *logits.shape[1:])}
        if not self.training:
            return out
        out["vis_feat"] = F.normalize(pixels.mean((-1, -2)).view(b, t, -1), dim=-1)
        out["aud_feat"] = F.normalize(queries[:, -self.decoder.num_audio :].mean(1).view(b, t, -1), dim=-1)
        if self.mit is not None:
            out.update(self.mit(batch, feats[-1], audio))
        if self.sc is not None:
            real = valid.to(out["vis_feat"].dtype)[..., None]
            v = (out["vis_feat"] * real).sum(1) / real.sum(1)
            sc = self.sc(out["z"], v)
            out.update(cf=sc["cf"], cf_alpha=sc["cf_alpha"], loss_cf=sc["loss_cf"], cf_degree=sc["degree"])
        return out

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

    # ---- losses --------------------------------------------------------------------------------

    def loss(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Eq. 19 and its parts: ``total``, ``seg`` (+ ``bce``, ``dice``, ``focal``) and, when on and in training
        outputs, ``cf``, ``cdcl`` (the λ-weighted contrast sum), ``v_a``, ``v_l``, ``a_l``."""
        parts = segmentation_loss(out["logits"], batch["masks"], batch["gt"], batch["valid"], self.cfg)
        if "loss_cf" in out:
            parts["cf"] = out["loss_cf"]
        if self.cfg.uses("cdcl") and "vis_feat" in out:
            parts.update(self._contrast(out, batch))
        parts["total"] = total_loss(parts, self.cfg)
        return parts

    def _contrast(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Eq. 15–17 (module docstring for the fallbacks)."""
        cfg = self.cfg
        kw = dict(eps=cfg.cov_eps, gamma=cfg.gamma, per_dim=cfg.entropy_per_dim)
        with torch.autocast(device_type=out["vis_feat"].device.type, enabled=False):
            valid = batch["valid"]
            v, a = out["vis_feat"].double(), out["aud_feat"].double()
            anchor = out["ell_a"] if "ell_a" in out else batch["clap_clip"]
            dist = cdcl.distribution_distance(v, a, x_mask=valid, y_mask=valid, **kw)  # Eq. 15, all pairs
            parts = {"v_a": cdcl.loss_visual_audio(dist, cdcl.audio_positives(anchor, cfg.theta), cfg.tau)}  # Eq. 16
            if "z" in out:
                negatives, weights = self._text_negatives(out)
                if negatives is not None:
                    z = F.normalize(out["z"].double(), dim=-1)[:, None]
                    for name, x in (("v_l", v), ("a_l", a)):
                        pos = cdcl.distribution_distance(x, z, x_mask=valid, paired=True, **kw)
                        neg = self._paired_to_many(x, valid, negatives, kw)
                        parts[name] = cdcl.loss_text(pos, neg, weights, cfg.tau)  # Eq. 17
        parts = {k: p.to(out["vis_feat"].dtype) for k, p in parts.items()}
        parts["cdcl"] = contrast_sum(parts, cfg)
        return parts

    @staticmethod
    def _text_negatives(out: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor | None]:
        """Negatives ``(B, K, d)`` and weights ``(B, K)``: ℓ^cf with w_k (SC on), else the other clips' z_j."""
        if "cf" in out:
            return out["cf"].double(), cdcl.counterfactual_weights(out["cf_alpha"].double())
        z = F.normalize(out["z"].double(), dim=-1)
        b = z.shape[0]
        if b < 2:
            return None, None
        others = ~torch.eye(b, dtype=torch.bool, device=z.device)
        negatives = z[None].expand(b, b, -1)[others].view(b, b - 1, -1)
        return negatives, z.new_full((b, b - 1), 1.0 / (b - 1))

    @staticmethod
    def _paired_to_many(x: Tensor, valid: Tensor, texts: Tensor, kw: dict) -> Tensor:
        """D(x_i, text_ik) for every sample i and its K texts: x ``(B, T, d)``, texts ``(B, K, d)`` → ``(B, K)``."""
        b, k = texts.shape[:2]
        xs = x.repeat_interleave(k, 0)
        mask = valid.repeat_interleave(k, 0)
        return cdcl.distribution_distance(xs, texts.reshape(b * k, 1, -1), x_mask=mask, paired=True, **kw).view(b, k)

    # ---- optimisation helpers ------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter that trains (frozen towers are not parameters; a frozen pretrained VGGish is excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_groups(self, train: TrainConfig) -> list[dict]:
        """AdamW groups: the backbone at ``lr·backbone_lr_mult``, everything else at ``lr``."""
        backbone = {id(p) for p in self.backbone.parameters()}
        params = self.trainable_parameters()
        return [
            {"params": [p for p in params if id(p) in backbone], "lr": train.lr * train.backbone_lr_mult},
            {"params": [p for p in params if id(p) not in backbone], "lr": train.lr},
        ]
