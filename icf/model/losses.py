"""Segmentation loss L_Seg (paper Eq. 18): λ_bce·BCE + λ_dice·Dice + λ_focal·focal, on ground-truth frames only.

Binary form (S4/MS3, one logit channel): sigmoid BCE, soft Dice per frame, sigmoid focal loss (α, γ).
Multi-class form (AVSS, K logits): softmax cross-entropy, soft Dice per frame and class (averaged over the
classes), softmax focal loss (1 − p_y)^γ·CE. Frames count only where ``gt & valid``: frames without
annotation (S4 train frames 2–5, AVSS v1s frames 1–4) and padding never contribute.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from icf.config import ModelConfig


def dice_loss(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 − (2·Σ p·y + s)/(Σ p + Σ y + s) over the pixels of each map ``(N, …, H, W)`` → ``(N, …)``."""
    inter = (prob * target).flatten(-2).sum(-1)
    total = prob.flatten(-2).sum(-1) + target.flatten(-2).sum(-1)
    return 1 - (2 * inter + smooth) / (total + smooth)


def iou_loss(prob: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Soft IoU (UnitBox): 1 − (Σ p·y + s)/(Σ p + Σ y − Σ p·y + s) over the pixels of each map ``(N, …, H, W)`` → ``(N, …)``."""
    inter = (prob * target).flatten(-2).sum(-1)
    union = prob.flatten(-2).sum(-1) + target.flatten(-2).sum(-1) - inter
    return 1 - (inter + smooth) / (union + smooth)


def binary_losses(logits: Tensor, target: Tensor, gamma: float, alpha: float) -> dict[str, Tensor]:
    """logits, target ``(N, H, W)`` (target 0/1) → mean BCE, Dice and sigmoid focal loss."""
    target = target.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    prob = logits.sigmoid()
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    focal = alpha_t * (1 - p_t).pow(gamma) * bce
    return {"bce": bce.mean(), "dice": dice_loss(prob, target).mean(), "focal": focal.mean()}


def multiclass_losses(logits: Tensor, target: Tensor, gamma: float) -> dict[str, Tensor]:
    """logits ``(N, K, H, W)``, target ``(N, H, W)`` class ids → mean CE, Dice (over classes) and softmax focal loss.

    One log-softmax serves the three terms, and Dice's per-class sums Σ p·y and Σ y are scatter-adds of p_y and 1
    over the target ids instead of products with a one-hot map: the same values as `dice_loss` on a one-hot target,
    without the K-fold one-hot tensor (these full-resolution passes were most of a tiny AVSS training step)."""
    n, k = logits.shape[:2]
    logp = logits.log_softmax(1)
    logp_y = logp.gather(1, target[:, None]).squeeze(1)  # (N, H, W)
    ce, p_y = -logp_y, logp_y.exp()
    focal = (1 - p_y).pow(gamma) * ce
    ids = target.flatten(1)
    inter = p_y.new_zeros(n, k).scatter_add(1, ids, p_y.flatten(1))  # Σ p·y per class
    count = p_y.new_zeros(n, k).scatter_add_(1, ids, p_y.new_ones(ids.shape))  # Σ y per class
    total = logp.exp().flatten(2).sum(-1) + count  # Σ p + Σ y
    dice = 1 - (2 * inter + 1.0) / (total + 1.0)  # `dice_loss` with smooth = 1
    return {"bce": ce.mean(), "dice": dice.mean(), "focal": focal.mean()}


def segmentation_loss(logits: Tensor, masks: Tensor, gt: Tensor, valid: Tensor, cfg: ModelConfig) -> dict[str, Tensor]:
    """Eq. 18 on the frames with ground truth.

    Args:
        logits: ``(B, T, K, H, W)``; masks: ``(B, T, H, W)`` int64; gt, valid: ``(B, T)`` bool.
    Returns: ``seg`` (weighted sum) and its parts ``bce`` (CE in the multi-class form), ``dice``, ``focal``.
    """
    keep = gt & valid
    if not bool(keep.any()):
        zero = logits.sum() * 0.0  # keeps the graph connected when a batch has no annotated frame
        return {"seg": zero, "bce": zero, "dice": zero, "focal": zero}
    picked, target = logits[keep], masks[keep]
    if cfg.binary:
        parts = binary_losses(picked[:, 0], target, cfg.focal_gamma, cfg.focal_alpha)
    else:
        parts = multiclass_losses(picked, target, cfg.focal_gamma)
    parts["seg"] = cfg.lambda_bce * parts["bce"] + cfg.lambda_dice * parts["dice"] + cfg.lambda_focal * parts["focal"]
    return parts


def contrast_sum(parts: dict[str, Tensor], cfg: ModelConfig) -> Tensor:
    """Σ_{p,q} λ_{p↔q}·L_{p↔q} of Eq. 19 over the contrast terms present (``v_a``, ``v_l``, ``a_l``)."""
    weights = {"v_a": cfg.lambda_va, "v_l": cfg.lambda_vl, "a_l": cfg.lambda_al}
    return sum(weights[k] * parts[k] for k in weights if k in parts)


def total_loss(parts: dict[str, Tensor], cfg: ModelConfig, seg: Tensor | None = None) -> Tensor:
    """Eq. 19: L_Seg + λ_cf·L_cf + λ_CDCL·``cdcl`` (the `contrast_sum`), over the terms present, plus
    λ_mit·``mit`` (Eq. 3's matching objective; not in Eq. 19, which leaves Eq. 3's argmax implicit). ``seg``
    replaces ``parts["seg"]`` as L_Seg (a segmenter's own objective, e.g. AVSBench's BCE + AVM)."""
    total = parts["seg"] if seg is None else seg
    if "mit" in parts:
        total = total + cfg.lambda_mit * parts["mit"]
    if "cf" in parts:
        total = total + cfg.lambda_cf * parts["cf"]
    if "cdcl" in parts:
        total = total + cfg.lambda_cdcl * parts["cdcl"]
    return total
