"""The ICF framework (paper Fig. 1 (III), Fig. 2): MIT + SC + CDCL attached to any `Segmenter`.

The segmenter (`icf.model.segmenter`; the bidirectional baseline, `icf.model.bidir`, or AVSBench's TPAVI) runs in
two halves. ICF plugs in between them and after them:

* **Eq. 1–2** live in the segmenter's context hook: ICF installs `ChannelContext` there if the segmenter has none,
  so the channel attention updates the segmenter's own visual features in training and inference.
* **MIT (Eq. 3–5)** reads the context's descriptors and the batch's cached foundation embeddings → z, ℓ^v, ℓ^a,
  the per-frame texts z_t and Eq. 3's matching loss ``mit``.
* **Text hook (§4.2)**: with ``text_injection = "xattn"`` (``"auto"``: when MIT is on and CDCL is off, the rows
  where nothing else would carry the text) the implicit text enters the segmenter's modality interaction by
  zero-gated cross-attention, so MIT runs in eval too. Otherwise MIT/SC are training-only (§3.3 Discussion).
* **SC (Eq. 6–12)** turns z into counterfactuals ℓ^cf; with ``sc_detach = "auto"`` z and v are detached when CDCL
  is on (SC learns to counterfactualise z) and not otherwise, so L_cf shapes z in the MIT+SC row.
* **CDCL (Eq. 13–17)** on the segmenter's decoder-side features (supplement note 3), float64 outside autocast.
  L_v↔a's positives: cos(ℓ^a_i − ℓ̄^a, ℓ^a_j − ℓ̄^a) ≥ θ on the **batch-centred** anchor (``va_centre``; every ℓ^a
  shares the candidates' common component, so raw cosines all pass θ and the loss is identically 0). Text is a
  distribution (``text_distribution = "frames"``): the Gaussian of the points ẑ + (ẑ_t − mean ẑ_t), mean z and the
  spread of the per-frame texts; counterfactuals are points (εI), so the Bures and entropy terms of Eq. 17 differ
  between the positive and the negatives. Eq. 17 runs at its own temperature ``text_tau`` and, with
  ``text_negatives = "counterfactual+batch"`` (default), also contrasts against the other clips' text distributions
  (with ℓ^cf alone at τ 0.1 both terms saturate within a few steps; ARCHITECTURE.md, Eq. 17 row).

Fallbacks ("when text information is not provided, the CDCL degenerates into visual-audio distribution
contrast"): without MIT, L_v↔a's anchor is the cached CLAP clip embedding (centred alike) and L_v↔l, L_a↔l are
off; without SC, the negatives of L_v↔l / L_a↔l are the other clips' text distributions, uniformly weighted.

Diagnostics (in ``loss``'s output, no gradient; the trainer logs them to ``metrics.jsonl``): ``pos_frac`` (fraction
of positive pairs in L_v↔a), ``z_xcos`` (mean cross-clip cosine of z), ``cf_degree`` (mean c), ``cf_cos`` (mean
cos(ℓ^cf, z)), ``cf_cos_mix`` (the same for the mixed z' before diffusion) and, every ``grad_share_every`` training
steps, ``gs_<term>`` / ``gcos_<term>`` (each weighted term's share of the gradient norm at the segmenter's parameters
and its cosine to L_Seg's gradient, `icf.model.losses.gradient_shares`).

The frozen text towers are not parameters of this module and are not saved in its ``state_dict``; rebuild them
from the run's `EncoderSpec` (``icf.encoders.load``) on the training device.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from icf.model import cdcl
from icf.model.losses import contrast_sum, gradient_shares, total_loss, weighted_terms
from icf.model.mit import LEVELS, ImplicitText, MultiGranularityText
from icf.model.sc import SemanticCounterfactual
from icf.model.segmenter import Batch, SegModel, Segmenter, TextTokens


def text_dims(encoders: object | None, text_bank: Mapping[str, np.ndarray] | None, mode: str) -> dict[str, int]:
    """Width of each level's text/foundation space (tower dims, or the bank's columns), plus ``audio_clip``."""
    if mode == "bank" and text_bank is not None:
        dims = {lv: int(np.asarray(text_bank[lv]).shape[1]) for lv in LEVELS}
    elif encoders is not None:
        dims = {lv: int(encoders.tower(lv).dim) for lv in LEVELS}
    else:
        raise ValueError(f"MIT needs {'a text bank' if mode == 'bank' else 'the encoders'} (text_mode={mode!r})")
    dims["audio_clip"] = dims["audio"]
    return dims


class ICF(SegModel):
    """Implicit counterfactual framework over a segmenter.

    Args:
        segmenter: any `Segmenter` (its ``cfg`` is the model configuration).
        encoders: ``icf.encoders.Encoders`` (frozen text towers); needed only when MIT is on with
            ``text_mode = "tower"``.
        text_bank: cached prompt embeddings per level (``icf.encoders.text_bank``); for ``text_mode = "bank"``.
    """

    def __init__(self, segmenter: Segmenter, encoders: object | None = None, text_bank: Mapping[str, np.ndarray] | None = None):
        super().__init__()
        cfg = self.cfg = segmenter.cfg
        self.segmenter = segmenter
        # training loss calls so far: a buffer, so that a resumed run logs the gradient shares at the same steps
        self.register_buffer("loss_calls", torch.zeros((), dtype=torch.long))
        self.mit: MultiGranularityText | None = None
        self.sc: SemanticCounterfactual | None = None
        if cfg.uses("mit"):
            segmenter.install_context()  # Eq. 1–2 are MIT's visual side
            towers = {lv: encoders.tower(lv) for lv in LEVELS} if (encoders is not None and cfg.text_mode == "tower") else None
            self.mit = MultiGranularityText(cfg, towers, text_bank, text_dims(encoders, text_bank, cfg.text_mode))
            if self.injects_text:
                segmenter.install_text_attention()
        if cfg.uses("sc"):
            self.sc = SemanticCounterfactual(cfg)

    @property
    def injects_text(self) -> bool:
        """Whether the implicit text enters the segmenter's forward pass (§4.2 cross-attention)."""
        mode = self.cfg.text_injection
        return self.cfg.uses("mit") and (mode == "xattn" or (mode == "auto" and not self.cfg.uses("cdcl")))

    @property
    def detaches_sc(self) -> bool:
        """Whether SC sees z and v detached (``sc_detach``; ``auto``: when CDCL is on)."""
        mode = self.cfg.sc_detach
        return mode == "always" or (mode == "auto" and self.cfg.uses("cdcl"))

    def backbone_parameters(self) -> list[torch.nn.Parameter]:
        return self.segmenter.backbone_parameters()

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        """Batch (ARCHITECTURE.md) → ``logits`` ``(B, T, K, H, W)`` (in training the segmenter's, e.g. bidir's at stride 4:
        Eq. 18 upsamples the scored frames); in training mode also ``vis_feat``/``aud_feat``
        ``(B, T, d)`` and, when on, ``z``, ``z_frames``, ``ell_a``, ``loss_mit`` (MIT), ``cf``, ``cf_alpha``,
        ``loss_cf`` and SC's diagnostics."""
        enc = self.segmenter.encode(batch)
        text: ImplicitText | None = None
        if self.mit is not None and (self.training or self.injects_text):
            text = self.mit(batch, enc.granular, enc.audio)
        tokens = TextTokens(text.tokens, text.real) if (text is not None and self.injects_text) else None
        out = self.segmenter.decode(batch, enc, tokens)
        if not self.training:
            return {"logits": out["logits"]}
        if text is not None:
            out.update(z=text.z, z_frames=text.z_frames, ell_a=text.ell_a, loss_mit=text.loss)
        if self.sc is not None:
            z = text.z
            v = cdcl.gaussian_moments(out["vis_feat"], batch["valid"])[0]
            if self.detaches_sc:
                z, v = z.detach(), v.detach()
            sc = self.sc(z, v)
            out.update(cf=sc["cf"], cf_alpha=sc["cf_alpha"], loss_cf=sc["loss_cf"], cf_degree=sc["degree"],
                       cf_cos=sc["cf_cos"], cf_cos_mix=sc["cf_cos_mix"])
        return out

    # ---- losses --------------------------------------------------------------------------------

    def loss(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Eq. 19 and its parts: ``total``, the segmenter's own L_Seg parts (Eq. 18 for ``bidir``: ``seg``, ``bce``,
        ``dice``, ``focal``; AVSBench's objective for ``tpavi`` with ``loss=official``) and, when on and in training
        outputs, ``mit`` (Eq. 3), ``cf``, ``cdcl`` (the λ-weighted contrast sum), ``v_a``, ``v_l``, ``a_l``; plus
        the detached diagnostics (module docstring)."""
        cfg = self.cfg
        parts = dict(self.segmenter.loss(out, batch))
        seg = parts.pop("total")
        if "loss_mit" in out:
            parts["mit"] = out["loss_mit"]
        if "loss_cf" in out:
            parts["cf"] = out["loss_cf"]
        if cfg.uses("cdcl") and "vis_feat" in out:
            parts.update(self._contrast(out, batch))
        parts["total"] = total_loss(parts, cfg, seg=seg)
        parts.update(self._diagnostics(out))
        terms = weighted_terms(parts, cfg, seg)
        if len(terms) > 1 and self._shares_due():  # the baseline row (L_Seg alone) has nothing to share
            parts.update(gradient_shares(terms, list(self.segmenter.parameters())))
        return parts

    def _shares_due(self) -> bool:
        """Whether this training-mode loss call logs `gradient_shares` (every ``grad_share_every``-th call, from the first)."""
        every = self.cfg.grad_share_every
        if not (every > 0 and self.training and torch.is_grad_enabled()):
            return False
        self.loss_calls += 1
        return (int(self.loss_calls) - 1) % every == 0

    def _contrast(self, out: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Eq. 15–17 (module docstring for the anchors, the text distribution and the fallbacks)."""
        cfg = self.cfg
        kw = dict(eps=cfg.cov_eps, gamma=cfg.gamma, per_dim=cfg.entropy_per_dim)
        with torch.autocast(device_type=out["vis_feat"].device.type, enabled=False):
            valid = batch["valid"]
            v, a = out["vis_feat"].double(), out["aud_feat"].double()
            anchor = out["ell_a"] if "ell_a" in out else batch["clap_clip"]
            positives = cdcl.audio_positives(anchor.double(), cfg.theta, centre=cfg.va_centre)
            dist = cdcl.distribution_distance(v, a, x_mask=valid, y_mask=valid, **kw)  # Eq. 15, all pairs
            parts = {"v_a": cdcl.loss_visual_audio(dist, positives, cfg.tau), "pos_frac": positives.double().mean()}  # Eq. 16
            if "z" in out:
                text, text_mask = self._text_distribution(out, valid)
                negatives, neg_mask, weights = self._text_negatives(out, text, text_mask)
                if negatives is not None:
                    for name, x in (("v_l", v), ("a_l", a)):
                        pos = cdcl.distribution_distance(x, text, x_mask=valid, y_mask=text_mask, paired=True, **kw)
                        neg = self._paired_to_many(x, valid, negatives, neg_mask, kw)
                        parts[name] = cdcl.loss_text(pos, neg, weights, cfg.text_tau)  # Eq. 17
        parts = {k: p.to(out["vis_feat"].dtype) for k, p in parts.items()}
        parts["pos_frac"] = parts["pos_frac"].detach()
        parts["cdcl"] = contrast_sum(parts, cfg)
        return parts

    def _text_distribution(self, out: Mapping[str, Tensor], valid: Tensor) -> tuple[Tensor, Tensor]:
        """The factual text's points ``(B, T', d)`` and mask: ẑ + (ẑ_t − mean ẑ_t) over real frames ("frames"),
        or the single point ẑ ("point", covariance εI)."""
        z = F.normalize(out["z"].double(), dim=-1)
        if self.cfg.text_distribution == "point":
            return z[:, None], torch.ones_like(valid[:, :1])
        zt = F.normalize(out["z_frames"].double(), dim=-1)
        mean = cdcl.gaussian_moments(zt, valid)[0]
        return z[:, None] + zt - mean[:, None], valid

    def _text_negatives(self, out: Mapping[str, Tensor], text: Tensor, mask: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Negatives ``(B, K, T', d)`` with mask ``(B, K, T')`` and weights ``(B, K)``: ℓ^cf (points) with w_k when SC
        is on, plus (``text_negatives = "counterfactual+batch"``) or else the other clips' text distributions with
        weights 1/(B − 1)."""
        groups = []
        if "cf" in out:
            cf = out["cf"].double()[:, :, None]
            groups.append((cf, torch.ones(cf.shape[:3], dtype=torch.bool, device=cf.device), cdcl.counterfactual_weights(out["cf_alpha"].double())))
        if text.shape[0] > 1 and (not groups or self.cfg.text_negatives == "counterfactual+batch"):
            groups.append(cdcl.other_clips(text, mask))
        return cdcl.join_negatives(groups) if groups else (None, None, None)

    @staticmethod
    def _paired_to_many(x: Tensor, valid: Tensor, texts: Tensor, mask: Tensor, kw: dict) -> Tensor:
        """D(x_i, text_ik) for every sample i and its K texts: x ``(B, T, d)``, texts ``(B, K, T', d)`` → ``(B, K)``."""
        b, k = texts.shape[:2]
        xs = x.repeat_interleave(k, 0)
        x_mask = valid.repeat_interleave(k, 0)
        return cdcl.distribution_distance(xs, texts.flatten(0, 1), x_mask=x_mask, y_mask=mask.flatten(0, 1), paired=True, **kw).view(b, k)

    @staticmethod
    def _diagnostics(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``z_xcos``, ``cf_degree``, ``cf_cos``, ``cf_cos_mix`` (detached scalars) where the outputs allow."""
        diag = {k: out[k].detach() for k in ("cf_degree", "cf_cos", "cf_cos_mix") if k in out}
        if "z" in out and len(out["z"]) > 1:
            z = F.normalize(out["z"].detach(), dim=-1)
            off = ~torch.eye(len(z), dtype=torch.bool, device=z.device)
            diag["z_xcos"] = (z @ z.T)[off].mean()
        return diag
