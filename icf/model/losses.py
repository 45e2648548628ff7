"""Segmentation loss L_Seg (paper Eq. 18): λ_bce·BCE + λ_dice·Dice + λ_focal·focal, on ground-truth frames only.

Binary form (S4/MS3, one logit channel): sigmoid BCE, soft Dice per frame, sigmoid focal loss (α, γ).
Multi-class form (AVSS, K logits): softmax cross-entropy, soft Dice per frame and class (averaged over the
classes), softmax focal loss (1 − p_y)^γ·CE. Frames count only where ``gt & valid``: frames without
annotation (S4 train frames 2–5, AVSS v1s frames 1–4) and padding never contribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from icf.config import ModelConfig
from icf.model.resize import resize_bilinear


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


class _SoftmaxLosses(torch.autograd.Function):
    """CE, Dice and focal loss of softmax(logits) as one autograd node with a closed-form backward.

    The forward keeps p = softmax(z) and per-pixel / per-class sums; the backward writes dL/dz in a few passes
    over ``(N, K, H, W)`` instead of autograd's chain through log-softmax, gather, exp and sum (these
    full-resolution passes were the largest part of a tiny AVSS training step). With u = 1 − p_y, M pixels,
    D = Σp + Σy + 1 and I = Σ p·y per (frame, class):

    * ∂CE_i/∂z_k = p_k − δ_ky;  ∂focal_i/∂z_k = (p_k − δ_ky)·(u^γ + γ·u^(γ−1)·p_y·CE_i);
    * ∂dice_nk/∂p_j = A_nk·δ_jy·δ_jk + B_nk with A = −2/D, B = (2I + 1)/D², pulled back through the softmax
      Jacobian p_k(δ_jk − p_j).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, gamma: float) -> Tensor:
        n, k = logits.shape[:2]
        p = logits.log_softmax(1)
        logp_y = p.gather(1, target[:, None]).squeeze(1)  # (N, H, W)
        ce, p_y = -logp_y, logp_y.exp()
        u = 1 - p_y
        focal = u.pow(gamma) * ce
        p = p.exp_()
        ids = target.flatten(1)
        inter = p_y.new_zeros(n, k).scatter_add_(1, ids, p_y.flatten(1))  # Σ p·y per class
        count = p_y.new_zeros(n, k).scatter_add_(1, ids, p_y.new_ones(ids.shape))  # Σ y per class
        denom = p.flatten(2).sum(-1) + count + 1.0  # Σ p + Σ y + smooth
        dice = 1 - (2 * inter + 1.0) / denom  # `dice_loss` with smooth = 1
        ctx.save_for_backward(p, target, p_y, ce, u, inter, denom)
        ctx.gamma = gamma
        return torch.stack([ce.mean(), dice.mean(), focal.mean()])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        p, target, p_y, ce, u, inter, denom = ctx.saved_tensors
        gamma = ctx.gamma
        n, k = p.shape[:2]
        g_ce, g_dice, g_focal = grad.unbind()
        f = u.pow(gamma)
        if gamma != 0:
            f = f + gamma * torch.where(u > 0, u.clamp_min(1e-30).pow(gamma - 1), 0.0) * p_y * ce
        c = (g_ce + g_focal * f) / p_y.numel()  # (N, H, W): weight of (p_k − δ_ky)
        w = g_dice / (n * k)
        a, b = -2 / denom, (2 * inter + 1.0) / denom**2  # (N, K)
        a_y = a.gather(1, target.flatten(1)).view_as(p_y)
        shared = torch.einsum("nk,nkhw->nhw", b, p) + a_y * p_y  # Σ_j p_j·∂dice/∂p_j, per pixel
        out = torch.mul(p, (c - w * shared)[:, None]).addcmul_(p, w * b[..., None, None])  # no full-size temporary
        out.scatter_add_(1, target[:, None], (w * a_y * p_y - c)[:, None])  # the δ_ky terms
        return out, None, None


def multiclass_losses(logits: Tensor, target: Tensor, gamma: float) -> dict[str, Tensor]:
    """logits ``(N, K, H, W)``, target ``(N, H, W)`` class ids → mean CE, Dice (over classes) and softmax focal loss.

    The values of CE, `dice_loss` on the one-hot target and (1 − p_y)^γ·CE, computed by `_SoftmaxLosses` (one
    softmax, Dice's per-class sums Σ p·y and Σ y as scatter-adds over the target ids, a closed-form backward)."""
    ce, dice, focal = _SoftmaxLosses.apply(logits, target, gamma).unbind()
    return {"bce": ce, "dice": dice, "focal": focal}


def segmentation_loss(logits: Tensor, masks: Tensor, gt: Tensor, valid: Tensor, cfg: ModelConfig) -> dict[str, Tensor]:
    """Eq. 18 on the frames with ground truth.

    Args:
        logits: ``(B, T, K, h, w)``; masks: ``(B, T, H, W)`` int64; gt, valid: ``(B, T)`` bool. Logits of another
            size than the masks (a segmenter's stride-4 training logits) are resized bilinearly
            (``align_corners=False``) to H×W on the scored frames only.
    Returns: ``seg`` (weighted sum) and its parts ``bce`` (CE in the multi-class form), ``dice``, ``focal``.
    """
    keep = gt & valid
    if not bool(keep.any()):
        zero = logits.sum() * 0.0  # keeps the graph connected when a batch has no annotated frame
        return {"seg": zero, "bce": zero, "dice": zero, "focal": zero}
    picked, target = logits[keep], masks[keep]
    if picked.shape[-2:] != target.shape[-2:]:
        picked = resize_bilinear(picked, target.shape[-2:])
    if cfg.binary:
        parts = binary_losses(picked[:, 0], target, cfg.focal_gamma, cfg.focal_alpha)
    else:
        parts = multiclass_losses(picked, target, cfg.focal_gamma)
    parts["seg"] = cfg.lambda_bce * parts["bce"] + cfg.lambda_dice * parts["dice"] + cfg.lambda_focal * parts["focal"]
    return parts


CONTRAST_TERMS = ("v_a", "v_l", "a_l")


def _contrast_weights(cfg: ModelConfig) -> dict[str, float]:
    return {"v_a": cfg.lambda_va, "v_l": cfg.lambda_vl, "a_l": cfg.lambda_al}


def contrast_sum(parts: dict[str, Tensor], cfg: ModelConfig) -> Tensor:
    """Σ_{p,q} λ_{p↔q}·L_{p↔q} of Eq. 19 over the contrast terms present (``v_a``, ``v_l``, ``a_l``)."""
    weights = _contrast_weights(cfg)
    return sum(weights[k] * parts[k] for k in CONTRAST_TERMS if k in parts)


def weighted_terms(parts: dict[str, Tensor], cfg: ModelConfig, seg: Tensor | None = None) -> dict[str, Tensor]:
    """The summands of `total_loss` by name, each with its weight applied: ``seg`` (L_Seg, or ``seg`` when given),
    ``mit`` (λ_mit·L_mit), ``cf`` (λ_cf·L_cf) and ``v_a``, ``v_l``, ``a_l`` (λ_CDCL·λ_{p↔q}·L_{p↔q}), over the
    terms present in ``parts``."""
    terms = {"seg": parts["seg"] if seg is None else seg}
    for key, weight in (("mit", cfg.lambda_mit), ("cf", cfg.lambda_cf)):
        if key in parts:
            terms[key] = weight * parts[key]
    weights = _contrast_weights(cfg)
    for key in CONTRAST_TERMS:
        if key in parts:
            terms[key] = cfg.lambda_cdcl * weights[key] * parts[key]
    return terms


def total_loss(parts: dict[str, Tensor], cfg: ModelConfig, seg: Tensor | None = None) -> Tensor:
    """Eq. 19: L_Seg + λ_cf·L_cf + λ_CDCL·Σ λ_{p↔q}·L_{p↔q}, over the terms present (`weighted_terms`), plus
    λ_mit·``mit`` (Eq. 3's matching objective; not in Eq. 19, which leaves Eq. 3's argmax implicit). ``seg``
    replaces ``parts["seg"]`` as L_Seg (a segmenter's own objective, e.g. AVSBench's BCE + AVM)."""
    return sum(weighted_terms(parts, cfg, seg).values())


def gradient_shares(terms: Mapping[str, Tensor], params: Sequence[Tensor]) -> dict[str, Tensor]:
    """Where each loss term pushes ``params`` (the segmenter's): for every term k of ``terms`` (`weighted_terms`)
    ``gs_k`` = ‖∇L_k‖ / Σ_j ‖∇L_j‖ (the shares sum to 1) and, for k ≠ ``seg``, ``gcos_k`` = cos(∇L_k, ∇L_seg)
    (< 0: the term pulls against segmentation). Detached scalars; one extra backward pass per term, the graph kept
    for the caller's own backward."""
    params = [p for p in params if p.requires_grad]
    grads = {}
    for key, term in terms.items():
        if not term.requires_grad:
            continue
        got = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        grads[key] = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, got)]
    norms = {k: torch.sqrt(sum(g.double().pow(2).sum() for g in gs)) for k, gs in grads.items()}
    total = sum(norms.values())
    out = {f"gs_{k}": n / total.clamp_min(1e-30) for k, n in norms.items()}
    if "seg" in grads:
        for key, gs in grads.items():
            if key != "seg":
                dot = sum((g.double() * s.double()).sum() for g, s in zip(gs, grads["seg"]))
                out[f"gcos_{key}"] = dot / (norms[key] * norms["seg"]).clamp_min(1e-30)
    return {k: v.float() for k, v in out.items()}
