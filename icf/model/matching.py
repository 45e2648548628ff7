"""Set prediction for video object masks: ground-truth objects from masks, box operations, Hungarian matching and
the set criterion (QDFormer Eq. 10; DETR / ReferFormer conventions, which QDFormer follows [code: R2VOS]).

A clip's predictions are N tokens, each with per-frame class logits, a box (normalised cx, cy, w, h) and a mask.
Its ground truth is G ≤ N objects (`clip_objects`), each a class and a mask per frame; boxes and presence come
from the masks (`masks_to_boxes`). The Hungarian assignment σ̂ (`hungarian`, scipy's ``linear_sum_assignment``)
minimises the clip-level cost C_ij = mean over scored frames of

    λ_cls·focal_cost(p_{i,t,c_j}) + present_{j,t}·(λ_L1·‖b_{i,t} − b_{j,t}‖₁ − λ_giou·GIoU) + λ_mask·BCE + λ_dice·Dice

and the loss (Eq. 10 on the assigned pairs) is: sigmoid focal loss on every token's class logits (target one-hot
c_j where its matched object is present, zeros otherwise), L1 + (1 − GIoU) where present, BCE + Dice on every
matched pair's frames (empty targets included). Every term is summed and divided by the number of
(object, scored frame) pairs of the batch, at least 1 (ReferFormer's ``num_boxes``: its targets are per frame).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


# ----------------------------------------------------------------------------- boxes


def masks_to_boxes(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Tight boxes of binary masks ``(…, H, W)`` → (boxes ``(…, 4)`` normalised cx, cy, w, h; present ``(…)`` bool).

    The box covers the pixels' edges: a mask whose columns x0..x1 and rows y0..y1 are set has
    cx = (x0 + x1 + 1) / 2W, w = (x1 + 1 − x0) / W (likewise y). Empty masks give a zero box and present = False."""
    h, w = masks.shape[-2:]
    m = masks.bool()
    cols, rows = m.any(-2), m.any(-1)  # (…, W), (…, H)
    present = cols.any(-1)
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    big = max(h, w) + 1
    x0 = torch.where(cols, xs, big).amin(-1)
    x1 = torch.where(cols, xs, -1).amax(-1) + 1
    y0 = torch.where(rows, ys, big).amin(-1)
    y1 = torch.where(rows, ys, -1).amax(-1) + 1
    box = torch.stack([(x0 + x1) / (2 * w), (y0 + y1) / (2 * h), (x1 - x0) / w, (y1 - y0) / h], -1).float()
    return torch.where(present[..., None], box, torch.zeros_like(box)), present


def cxcywh_to_xyxy(box: Tensor) -> Tensor:
    """``(…, 4)`` cx, cy, w, h → x0, y0, x1, y1."""
    cx, cy, w, h = box.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise GIoU (Rezatofighi et al. 2019) of xyxy boxes a ``(…, n, 4)``, b ``(…, m, 4)`` → ``(…, n, m)``."""
    a, b = a[..., :, None, :], b[..., None, :, :]
    area_a = (a[..., 2] - a[..., 0]).clamp_min(0) * (a[..., 3] - a[..., 1]).clamp_min(0)
    area_b = (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp_min(1e-7)
    lt_c, rb_c = torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])
    hull = (rb_c - lt_c).clamp_min(0).prod(-1)
    return iou - (hull - union) / hull.clamp_min(1e-7)


# ----------------------------------------------------------------------------- element losses and pairwise costs


def sigmoid_focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017): α_t (1 − p_t)^γ · BCE, same shape as ``logits``."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * (1 - p_t).pow(gamma) * bce


def focal_cost(logits: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable DETR's classification cost of predicting a class with logit x: focal(x, 1) − focal(x, 0)."""
    prob = logits.sigmoid()
    pos = alpha * (1 - prob).pow(gamma) * F.softplus(-logits)
    neg = (1 - alpha) * prob.pow(gamma) * F.softplus(logits)
    return pos - neg


def pairwise_bce(logits: Tensor, target: Tensor) -> Tensor:
    """Mean-over-pixels BCE of every prediction against every target: logits ``(…, n, P)``, target ``(…, m, P)``
    (0/1) → ``(…, n, m)``."""
    pos = F.softplus(-logits)  # −log σ(x)
    neg = F.softplus(logits)  # −log(1 − σ(x))
    return (pos @ target.transpose(-1, -2) + neg @ (1 - target).transpose(-1, -2)) / logits.shape[-1]


def pairwise_dice(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """Dice loss 1 − (2Σσ(x)y + s)/(Σσ(x) + Σy + s) of every prediction against every target → ``(…, n, m)``."""
    prob = logits.sigmoid()
    inter = prob @ target.transpose(-1, -2)
    total = prob.sum(-1)[..., :, None] + target.sum(-1)[..., None, :]
    return 1 - (2 * inter + smooth) / (total + smooth)


def hungarian(cost: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of a ``(N, G)`` cost matrix, G ≤ N → (query indices, object indices), ordered by
    object (scipy's ``linear_sum_assignment``)."""
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    order = np.argsort(cols)
    return rows[order], cols[order]


# ----------------------------------------------------------------------------- targets


@dataclass
class Objects:
    """A clip's ground-truth objects on its scored frames: ``classes`` ``(G,)`` class-head indices and ``masks``
    ``(G, S, H, W)`` float 0/1 (S scored frames)."""

    classes: Tensor
    masks: Tensor


def clip_objects(masks: Tensor, binary: bool, max_objects: int) -> Objects:
    """The objects of one clip's scored frames ``masks`` ``(S, H, W)`` class ids.

    Binary (S4/MS3): one object of class index 0 (the foreground) when any frame is non-empty. Multi-class (AVSS):
    one object per class c ≠ 0 present in any frame, class index c − 1, target m_t = [mask_t = c]. When there are
    more than ``max_objects``, the largest (most pixels over the frames) are kept."""
    if binary:
        fg = masks > 0
        if not bool(fg.any()):
            return Objects(masks.new_zeros(0), masks.new_zeros(0, *masks.shape, dtype=torch.float32))
        return Objects(masks.new_zeros(1), fg[None].float())
    ids = torch.unique(masks)
    ids = ids[ids != 0]
    obj = (masks[None] == ids[:, None, None, None]).float()  # (G, S, H, W)
    if len(ids) > max_objects:
        keep = obj.sum((1, 2, 3)).argsort(descending=True, stable=True)[:max_objects].sort().values
        ids, obj = ids[keep], obj[keep]
    return Objects(ids - 1, obj)


# ----------------------------------------------------------------------------- the criterion


@dataclass
class Prediction:
    """One decoder layer's outputs for the batch: ``classes`` ``(B, T, N, K_c)`` logits, ``boxes`` ``(B, T, N, 4)``
    normalised cxcywh in (0, 1), ``masks`` ``(B, T, N, H, W)`` logits at the target resolution."""

    classes: Tensor
    boxes: Tensor
    masks: Tensor


@dataclass(frozen=True)
class SetWeights:
    """λ of Eq. 10 (R2VOS ``opts.py``: cls 2, L1 5, GIoU 2, mask 2, dice 5) and the focal loss's α, γ."""

    cls: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    mask: float = 2.0
    dice: float = 5.0
    alpha: float = 0.25
    gamma: float = 2.0


def match_cost(pred: Prediction, b: int, frames: Tensor, obj: Objects, boxes: Tensor, present: Tensor,
               w: SetWeights) -> Tensor:
    """C ``(N, G)`` of clip ``b`` (module docstring): the per-frame cost averaged over its scored ``frames`` ``(S,)``.

    ``boxes`` ``(G, S, 4)``, ``present`` ``(G, S)`` are the objects' boxes and presence."""
    logits = pred.classes[b, frames][..., obj.classes]  # (S, N, G)
    cls = focal_cost(logits, w.alpha, w.gamma)
    pb = pred.boxes[b, frames]  # (S, N, 4)
    tb = boxes.transpose(0, 1)  # (S, G, 4)
    l1 = (pb[:, :, None] - tb[:, None]).abs().sum(-1)
    giou = generalized_box_iou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(tb))
    box = present.transpose(0, 1)[:, None].to(l1.dtype) * (w.l1 * l1 - w.giou * giou)
    pm = pred.masks[b, frames].flatten(-2)  # (S, N, P)
    tm = obj.masks.transpose(0, 1).flatten(-2).to(pm.dtype)  # (S, G, P)
    mask = w.mask * pairwise_bce(pm, tm) + w.dice * pairwise_dice(pm, tm)
    return (w.cls * cls + box + mask).mean(0)


class SetCriterion:
    """Hungarian matching + Eq. 10 losses over a batch (module docstring).

    Args:
        binary: S4/MS3 (one foreground object, K_c = 1) or AVSS (objects per class).
        weights: the λ of Eq. 10.
    """

    def __init__(self, binary: bool, weights: SetWeights = SetWeights()):
        self.binary = binary
        self.w = weights

    def targets(self, masks: Tensor, scored: Tensor, num_tokens: int) -> list[tuple[Tensor, Objects, Tensor, Tensor]]:
        """Per clip: (scored frame indices ``(S,)``, objects, boxes ``(G, S, 4)``, present ``(G, S)``)."""
        out = []
        for b in range(masks.shape[0]):
            frames = scored[b].nonzero().flatten()
            obj = clip_objects(masks[b, frames], self.binary, num_tokens)
            boxes, present = masks_to_boxes(obj.masks)
            out.append((frames, obj, boxes, present))
        return out

    def match(self, pred: Prediction, targets: Sequence[tuple[Tensor, Objects, Tensor, Tensor]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """σ̂ per clip: (query indices, object indices)."""
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
        return [hungarian(match_cost(pred, b, *t, self.w)) if len(t[1].classes) and len(t[0]) else empty
                for b, t in enumerate(targets)]

    def __call__(self, pred: Prediction, masks: Tensor, scored: Tensor) -> dict[str, Tensor]:
        """Losses ``cls``, ``l1``, ``giou``, ``mask``, ``dice`` and their weighted sum ``segm``.

        Args:
            pred: the layer's predictions.
            masks: ``(B, T, H, W)`` class ids; scored: ``(B, T)`` bool (``gt & valid``).
        """
        targets = self.targets(masks, scored, pred.classes.shape[2])
        return self.losses(pred, targets, self.match(pred, targets))

    def losses(self, pred: Prediction, targets: Sequence[tuple[Tensor, Objects, Tensor, Tensor]],
               matches: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, Tensor]:
        """Eq. 10 on the assigned pairs ``matches`` (see `__call__`)."""
        zero = pred.masks.sum() * 0.0
        parts = {k: zero for k in ("cls", "l1", "giou", "mask", "dice")}
        pairs = 0
        for b, ((frames, obj, boxes, present), (qi, oj)) in enumerate(zip(targets, matches, strict=True)):
            if len(frames) == 0:
                continue
            logits = pred.classes[b, frames]  # (S, N, K_c)
            target = torch.zeros_like(logits)
            qi_t, oj_t = torch.as_tensor(qi, device=logits.device), torch.as_tensor(oj, device=logits.device)
            if len(qi):
                on = present[oj_t].transpose(0, 1).to(logits.dtype)  # (S, M) matched objects' presence
                target[:, qi_t, obj.classes[oj_t]] = on
            parts["cls"] = parts["cls"] + sigmoid_focal_loss(logits, target, self.w.alpha, self.w.gamma).sum()
            pairs += len(frames) * len(obj.classes)
            if not len(qi):
                continue
            pb = pred.boxes[b, frames][:, qi_t]  # (S, M, 4)
            tb, on = boxes[oj_t].transpose(0, 1), present[oj_t].transpose(0, 1)  # (S, M, 4), (S, M)
            parts["l1"] = parts["l1"] + ((pb - tb).abs().sum(-1) * on).sum()
            giou = torch.diagonal(generalized_box_iou(cxcywh_to_xyxy(pb), cxcywh_to_xyxy(tb)), dim1=-2, dim2=-1)
            parts["giou"] = parts["giou"] + ((1 - giou) * on).sum()
            pm = pred.masks[b, frames][:, qi_t].flatten(-2)  # (S, M, P)
            tm = obj.masks[oj_t].transpose(0, 1).flatten(-2).to(pm.dtype)
            parts["mask"] = parts["mask"] + F.binary_cross_entropy_with_logits(pm, tm, reduction="none").mean(-1).sum()
            prob = pm.sigmoid()
            dice = 1 - (2 * (prob * tm).sum(-1) + 1) / (prob.sum(-1) + tm.sum(-1) + 1)
            parts["dice"] = parts["dice"] + dice.sum()
        n = max(1, pairs)
        parts = {k: v / n for k, v in parts.items()}
        parts["segm"] = sum(getattr(self.w, k) * parts[k] for k in ("cls", "l1", "giou", "mask", "dice"))
        return parts
