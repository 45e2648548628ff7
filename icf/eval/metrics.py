"""AVSBench metrics exactly as the official evaluation code computes them (Decisions D2), streaming.

Two accumulators, one per task. Both take one batch at a time (``update``) and give every number at the
end (``compute``); the per-frame work is vectorised, the aggregation follows the official loops.

S4 / MS3 (binary, :class:`BinaryMetrics`, Decisions D2), on foreground probabilities in [0, 1]:

* J: per frame, foreground IoU of ``prob > 0.5`` with the GT, ``inter / (union + 1e-7)``; a frame whose GT
  is empty scores the background IoU instead (true negatives / H·W).
* F: per frame, precision and recall of ``prob >= th`` for the official 255 thresholds
  ``linspace(0, 1 - 1e-10, 255)`` (float32), F_β with β² = 0.3, NaN → 0; empty-GT frames are skipped.
  ``official`` mode: the frames of each batch of 4 clips (in CSV order when every clip was given its
  ``order``, else in arrival order; see :class:`BinaryMetrics`) give a mean F curve whose
  maximum is that batch's F; a batch without a non-empty frame scores 0 (as the official code does); the
  result is the mean over batches. J is averaged the official way too (mean per batch, then over
  batches). ``dataset`` mode: one mean curve over every non-empty frame of the split, then its maximum
  (the batch-size independent fix); J is the plain mean over frames.

* F_boundary (QDFormer's F, "contour accuracy F as defined in [54]" = DAVIS ``db_eval_boundary``): per frame,
  the boundary maps (``seg2bmap``) of ``prob > 0.5`` and of the GT, each dilated by a disk of radius
  ``ceil(0.008 · image diagonal)``; boundary precision and recall, F = 2PR / (P + R); averaged per clip, then
  over clips (DAVIS: per sequence, then over sequences). ``JF_boundary`` = (J + F_boundary) / 2 is QDFormer's
  J&F. Source: davisvideochallenge/davis2017-evaluation ``davis2017/metrics.py`` (``f_measure``, ``_seg2bmap``).

AVSS (71 classes incl. background, :class:`SemanticMetrics`, Decisions D2), on class-index maps:

* per frame and per class c: IoU_c = inter / (2.22e-16 + union), F_c = F_β(P_c, R_c) with NaN → 0; the
  class's frame count grows only where c is in prediction ∪ GT. Per-class mean = sum / count (0 where a
  class never occurs), J (= mIoU) and F are the means over **all** classes, background included.
* ``J_present`` / ``F_present``: the same per-class means averaged over the classes that occur in the
  split's ground truth (Decisions D3; the official mean caps a split holding k classes at (k + 1) / 71).
* Padded frames: the official AVSS test pads v1s/v1m clips to 10 frames with all-background labels and
  all-background predictions and scores them, which inflates the background IoU. By default (``avss_padding``
  ``real``) only frames with ground truth are scored (``gt``; padded frames never have GT), as COMBO-AVS does;
  ``official`` adds each clip's missing frames up to 10 as such frames (J, F and their present-class versions
  move; FDR and the dataset-level scores stay on the real frames).

FDR (both tasks; CAVP ``ForegroundDetect``, Decisions D4): a dataset-level pixel confusion matrix over the
scored frames (rows GT, columns prediction; binary tasks use the two classes background/foreground at the
0.5 threshold), FDR_c = FP_c / (FP_c + TP_c), NaN-mean over classes (classes never predicted drop out).

DDESeg's protocol (``J_dh`` / ``F_dh`` / ``JF_dh``, :class:`DatasetHardMetrics`; "following CAVP" [DDESeg
``train.py:compute_metrics_ddp``, ``util_tools/metrics.py``; CAVP ``utils/eval_utils.py``]), reported beside the
official numbers under its own names: **hard** predictions (the 0.5 threshold / argmax), pixel TP, FP, FN
accumulated over the whole split per class (the FDR confusion matrix above), IoU_c = TP/(TP + FP + FN) and
F_c = (1 + β²)TP / ((1 + β²)TP + β²FN + FP) with β² = 0.3, each averaged over the classes whose union is
non-empty, **background included** (binary tasks count two classes); ``JF_dh`` is their mean.

Negative audio (:mod:`icf.augment.negatives`; :class:`FalsePositiveMetrics`): on a negative clip nothing
sounds, so every pixel predicted sounding is a false positive. A pixel is predicted sounding when its
foreground probability is > 0.5 (S4/MS3, the J threshold) or its class is not background (AVSS). Over the
real frames (``valid``; the empty target is known on each of them):

* ``FPR_frame`` = frames with any pixel predicted sounding / frames;
* ``FPR_pixel`` = pixels predicted sounding / pixels.

:func:`negative_score` combines a setting's FPR with the clean split's J into ``HM``, the harmonic mean
of J on positives (``J_present`` for AVSS, which equals the official J when the split holds every class,
and is the readable one on synthetic data; ``J`` for S4/MS3) and ``1 − FPR_frame`` on negatives: it is
high only when the model both segments sounding objects and stays silent when nothing on screen sounds,
and 0 when either fails completely (a model that ignores the audio has FPR_frame 1 wherever objects are
visible; one that never predicts anything has J 0).

Every returned value is a fraction in [0, 1] (papers print ×100).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from icf.data.datasets import load_info

F_BETA2 = 0.3
N_THRESHOLDS = 255
J_EPS = 1e-7
SEM_EPS = 2.220446049250313e-16
OFFICIAL_CLIPS_PER_BATCH = 4
F_MODES = ("official", "dataset")
BOUNDARY_TH = 0.008  # DAVIS db_eval_boundary: tolerance as a fraction of the image diagonal
AVSS_PADDINGS = ("real", "official")  # AVSS frames scored: the real ones, or v1s/v1m padded to 10 (official test)


def f_thresholds(n: int = N_THRESHOLDS) -> torch.Tensor:
    """The official thresholds ``torch.linspace(0, 1 - 1e-10, n)`` in float32 (the last one rounds to 1.0)."""
    return torch.linspace(0, 1 - 1e-10, n, dtype=torch.float32)


def binary_frame_iou(probs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Official per-frame J.

    Args:
        probs: ``(N, H, W)`` foreground probabilities.
        masks: ``(N, H, W)`` 0/1 ground truth.
    Returns:
        ``(N,)`` float64 IoU; empty-GT frames give TN / H·W.
    """
    pred = probs.float() > 0.5
    target = masks.bool()
    n_pixels = target.shape[-1] * target.shape[-2]
    inter = (pred & target).flatten(1).sum(1).double()
    union = (pred | target).flatten(1).sum(1).double()
    empty = target.flatten(1).sum(1) == 0
    inter_bg = (~pred & ~target).flatten(1).sum(1).double()
    inter = torch.where(empty, inter_bg, inter)
    union = torch.where(empty, torch.full_like(union, float(n_pixels)), union)
    return inter / (union + J_EPS)


def binary_frame_fcurves(probs: torch.Tensor, masks: torch.Tensor, n: int = N_THRESHOLDS) -> torch.Tensor:
    """Official per-frame F_β curves over the ``n`` thresholds, in O(pixels) via threshold buckets.

    A pixel with probability p is predicted positive at threshold i iff ``p >= th[i]``, i.e. for the first
    ``k = #{i : th[i] <= p}`` thresholds; counting pixels per k and taking reverse cumulative sums gives
    the predicted-positive and true-positive counts at every threshold at once.

    Args:
        probs: ``(N, H, W)`` foreground probabilities.
        masks: ``(N, H, W)`` 0/1 ground truth.
    Returns:
        ``(N, n)`` float64 F curves (NaN → 0, as the official code).
    """
    th = f_thresholds(n)
    frames = probs.shape[0]
    k = torch.searchsorted(th, probs.float().flatten(1).contiguous(), right=True)  # (N, HW) in 0..n
    fg = masks.flatten(1).bool()
    offset = torch.arange(frames).unsqueeze(1) * (n + 1)
    hist_all = torch.bincount((k + offset).flatten(), minlength=frames * (n + 1)).view(frames, n + 1)
    hist_fg = torch.bincount((k + offset)[fg], minlength=frames * (n + 1)).view(frames, n + 1)
    # positives at threshold i = pixels whose bucket k > i
    n_pos = hist_all.flip(1).cumsum(1).flip(1)[:, 1:].double()
    tp = hist_fg.flip(1).cumsum(1).flip(1)[:, 1:].double()
    n_gt = fg.sum(1, keepdim=True).double()
    precision = torch.where(n_pos > 0, tp / n_pos.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(n_gt > 0, tp / n_gt.clamp_min(1), torch.zeros_like(tp))
    f = (1 + F_BETA2) * precision * recall / (F_BETA2 * precision + recall)
    return torch.nan_to_num(f, nan=0.0)


def seg2bmap(masks: torch.Tensor) -> torch.Tensor:
    """DAVIS ``seg2bmap`` at the mask's own size: a pixel is on the boundary when it differs from its east, south
    or south-east neighbour; the last row compares east only, the last column south only, the corner is off.

    Args:
        masks: ``(N, H, W)`` bool.
    Returns:
        ``(N, H, W)`` bool boundary maps.
    """
    seg = masks.bool()
    e, s, se = torch.zeros_like(seg), torch.zeros_like(seg), torch.zeros_like(seg)
    e[:, :, :-1] = seg[:, :, 1:]
    s[:, :-1, :] = seg[:, 1:, :]
    se[:, :-1, :-1] = seg[:, 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[:, -1, :] = seg[:, -1, :] ^ e[:, -1, :]
    b[:, :, -1] = seg[:, :, -1] ^ s[:, :, -1]
    b[:, -1, -1] = False
    return b


def boundary_radius(height: int, width: int, bound_th: float = BOUNDARY_TH) -> int:
    """DAVIS tolerance in pixels: ``ceil(bound_th · image diagonal)`` (``bound_th`` ≥ 1 is already pixels)."""
    return int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.hypot(height, width))


def dilate_disk(maps: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of ``(N, H, W)`` bool maps by the disk ``x² + y² ≤ radius²`` (skimage ``disk``), zeros
    outside the image."""
    r = torch.arange(-radius, radius + 1)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]
    hits = torch.nn.functional.conv2d(maps.float()[:, None], disk, padding=radius)[:, 0]
    return hits > 0.5


def binary_frame_boundary_f(probs: torch.Tensor, masks: torch.Tensor, bound_th: float = BOUNDARY_TH) -> torch.Tensor:
    """DAVIS contour accuracy F (``db_eval_boundary``) per frame of ``probs > 0.5`` against the GT.

    Boundaries by :func:`seg2bmap`; a predicted boundary pixel is matched when a GT boundary pixel lies within
    the disk of :func:`boundary_radius` around it, and vice versa; precision = matched predicted / predicted,
    recall = matched GT / GT boundary pixels, F = 2PR / (P + R) (0 when P + R = 0). Empty boundaries follow
    DAVIS: none predicted and none in the GT → P = R = 1; none predicted → P 1, R 0; none in the GT → P 0, R 1.

    Args:
        probs: ``(N, H, W)`` foreground probabilities.
        masks: ``(N, H, W)`` 0/1 ground truth.
    Returns:
        ``(N,)`` float64 F.
    """
    fg, gt = seg2bmap(probs.float() > 0.5), seg2bmap(masks.bool())
    radius = boundary_radius(*masks.shape[-2:], bound_th)
    n_fg, n_gt = fg.flatten(1).sum(1).double(), gt.flatten(1).sum(1).double()
    fg_match = (fg & dilate_disk(gt, radius)).flatten(1).sum(1).double()
    gt_match = (gt & dilate_disk(fg, radius)).flatten(1).sum(1).double()
    precision = torch.where(n_fg > 0, fg_match / n_fg.clamp_min(1), torch.ones_like(n_fg))
    recall = torch.where(n_gt > 0, gt_match / n_gt.clamp_min(1), torch.ones_like(n_gt))
    total = precision + recall
    return torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-300), torch.zeros_like(total))


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pixel confusion matrix ``(K, K)`` int64, rows = GT class, columns = predicted class."""
    idx = target.reshape(-1).long() * num_classes + pred.reshape(-1).long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def false_discovery_rate(cm: torch.Tensor) -> float:
    """CAVP FDR: ``nanmean_c FP_c / (FP_c + TP_c)`` from a dataset-level confusion matrix (nan if empty)."""
    cm = cm.double()
    tp = cm.diag()
    fp = cm.sum(0) - tp
    rates = fp / (fp + tp)
    return float(torch.nanmean(rates)) if torch.isfinite(rates).any() else float("nan")


def dataset_hard_scores(cm: torch.Tensor) -> dict[str, float]:
    """DDESeg/CAVP dataset-level scores of a pixel confusion matrix ``(K, K)`` (rows GT, columns prediction):
    ``J_dh``, ``F_dh`` (means over the classes with a non-empty union, background included), ``JF_dh``."""
    cm = cm.double()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    union = tp + fp + fn
    keep = union > 0
    if not bool(keep.any()):
        return {"J_dh": float("nan"), "F_dh": float("nan"), "JF_dh": float("nan")}
    iou = tp[keep] / union[keep]
    f = (1 + F_BETA2) * tp[keep] / ((1 + F_BETA2) * tp[keep] + F_BETA2 * fn[keep] + fp[keep])
    j, fs = float(iou.mean()), float(f.mean())
    return {"J_dh": j, "F_dh": fs, "JF_dh": (j + fs) / 2}


@dataclass
class DatasetHardMetrics:
    """Streaming DDESeg-protocol J/F (module docstring) over ``num_classes`` classes (2 for S4/MS3)."""

    num_classes: int = 2
    cm: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, masks: torch.Tensor, gt: torch.Tensor) -> None:
        """Add a batch: ``pred (B, T, H, W)`` foreground probabilities (2 classes, hard at 0.5) or class ids,
        ``masks`` GT class ids / 0-1, ``gt (B, T)`` the frames to score."""
        _check(pred, masks, gt)
        gt = gt.detach().cpu().bool()
        pred, masks = pred.detach().cpu()[gt], masks.detach().cpu()[gt]
        hard = (pred.float() > 0.5).long() if self.num_classes == 2 and pred.is_floating_point() else pred.long()
        self.cm += confusion_matrix(hard, masks.long(), self.num_classes)

    def compute(self) -> dict[str, float]:
        return dataset_hard_scores(self.cm)


def semantic_frame_areas(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Per-frame, per-class pixel areas (the official ``histc`` counts).

    Args:
        pred, target: ``(N, H, W)`` class indices in ``[0, K)``.
    Returns:
        ``inter, area_pred, area_lab``, each ``(N, K)`` float64.
    """
    frames = target.shape[0]
    pred = pred.flatten(1).long()
    target = target.flatten(1).long()
    offset = torch.arange(frames).unsqueeze(1) * num_classes
    size = frames * num_classes

    def count(idx: torch.Tensor) -> torch.Tensor:
        return torch.bincount(idx, minlength=size).view(frames, num_classes).double()

    hit = pred == target
    return count((target + offset)[hit]), count((pred + offset).flatten()), count((target + offset).flatten())


def _check(pred: torch.Tensor, masks: torch.Tensor, gt: torch.Tensor) -> None:
    if pred.shape != masks.shape or pred.dim() != 4 or gt.shape != pred.shape[:2]:
        raise ValueError(
            f"expected pred and masks (B, T, H, W) and gt (B, T); got {tuple(pred.shape)}, "
            f"{tuple(masks.shape)}, {tuple(gt.shape)}"
        )


@dataclass
class _ClipStats:
    """What the official batch-wise aggregation needs from one clip (the batch sums are sums of these)."""

    order: int | None  # CSV position, the official loader's order (None: unknown)
    arrival: int  # position in the order clips were fed
    iou_sum: float
    n_frames: int
    f_sum: torch.Tensor  # (255,) sum of F curves over the clip's non-empty-GT frames
    n_nonempty: int
    boundary_sum: float  # sum of the frames' DAVIS contour accuracy


@dataclass
class BinaryMetrics:
    """Streaming S4/MS3 J, F, FDR.

    The ``official`` F and J depend on which clips share a batch of 4, and the official test loaders read
    clips in CSV order. Clips may arrive in any order (shards hold them in id order): each clip's per-frame
    results are reduced to clip sums (an IoU sum and a 255-point F-curve sum; a few KB per clip, no
    frames kept), and ``compute`` sorts the clips by their ``order`` (CSV position) before cutting them
    into batches. Without an ``order`` for every clip the arrival order is used, as before.
    """

    f_mode: str = "official"
    clips_per_batch: int = OFFICIAL_CLIPS_PER_BATCH
    clips: list[_ClipStats] = field(default_factory=list)
    hard: DatasetHardMetrics = field(default_factory=lambda: DatasetHardMetrics(2))  # FDR's and DDESeg's matrix
    _arrived: int = field(default=0, init=False, repr=False)  # clips fed so far (scored or not)

    def __post_init__(self) -> None:
        if self.f_mode not in F_MODES:
            raise ValueError(f"f_mode must be one of {F_MODES}, got {self.f_mode!r}")

    @torch.no_grad()
    def update(
        self, probs: torch.Tensor, masks: torch.Tensor, gt: torch.Tensor, order: Sequence[int | None] | None = None,
        real: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            probs: ``(B, T, H, W)`` foreground probabilities in [0, 1].
            masks: ``(B, T, H, W)`` 0/1 ground truth.
            gt: ``(B, T)`` bool, frames that have ground truth (only those are scored).
            order: per clip, its CSV position (the official batching order), or None if unknown.
            real: accepted for symmetry with :class:`SemanticMetrics` and ignored (no padding protocol here).
        """
        _check(probs, masks, gt)
        if order is not None and len(order) != probs.shape[0]:
            raise ValueError(f"order has {len(order)} entries for {probs.shape[0]} clips")
        probs, masks, gt = probs.detach().cpu(), masks.detach().cpu(), gt.detach().cpu().bool()
        for b in range(probs.shape[0]):
            p, m = probs[b][gt[b]], masks[b][gt[b]]
            if p.shape[0] == 0:
                continue
            nonempty = m.flatten(1).sum(1) > 0
            curves = binary_frame_fcurves(p[nonempty], m[nonempty])
            self.clips.append(
                _ClipStats(
                    order=None if order is None or order[b] is None else int(order[b]),
                    arrival=self._arrived + b,
                    iou_sum=float(binary_frame_iou(p, m).sum()),
                    n_frames=int(p.shape[0]),
                    f_sum=curves.sum(0),
                    n_nonempty=int(nonempty.sum()),
                    boundary_sum=float(binary_frame_boundary_f(p, m).sum()),
                )
            )
            self.hard.cm += confusion_matrix((p.float() > 0.5).long(), m.long(), 2)
        self._arrived += probs.shape[0]

    def ordered(self) -> list[_ClipStats]:
        """The scored clips in CSV order when every one has an ``order``, else in arrival order."""
        if all(c.order is not None for c in self.clips):
            return sorted(self.clips, key=lambda c: (int(c.order or 0), c.arrival))
        return sorted(self.clips, key=lambda c: c.arrival)

    def _batches(self) -> list[list[_ClipStats]]:
        n, clips = self.clips_per_batch, self.ordered()
        return [clips[i : i + n] for i in range(0, len(clips), n)]

    def compute(self) -> dict[str, float | int | str]:
        """``J``, ``F``, ``JF`` = (J + F) / 2, ``F_boundary``, ``JF_boundary`` = (J + F_boundary) / 2, ``FDR``,
        ``J_dh``, ``F_dh``, ``JF_dh``, ``n_frames``, ``f_mode``."""
        if not self.clips:
            raise ValueError("no frame with ground truth was scored")
        if self.f_mode == "official":
            j_b, f_b = [], []
            for batch in self._batches():
                j_b.append(sum(c.iou_sum for c in batch) / sum(c.n_frames for c in batch))
                n_ne = sum(c.n_nonempty for c in batch)
                f_b.append(float((sum(c.f_sum for c in batch) / n_ne).max()) if n_ne else 0.0)
            j, f = float(np.mean(j_b)), float(np.mean(f_b))
        else:
            j = sum(c.iou_sum for c in self.clips) / sum(c.n_frames for c in self.clips)
            n_ne = sum(c.n_nonempty for c in self.clips)
            f = float((sum(c.f_sum for c in self.clips) / n_ne).max()) if n_ne else 0.0
        boundary = float(np.mean([c.boundary_sum / c.n_frames for c in self.clips]))  # DAVIS: per clip, then over clips
        return {
            "J": j,
            "F": f,
            "JF": (j + f) / 2,
            "F_boundary": boundary,
            "JF_boundary": (j + boundary) / 2,
            "FDR": false_discovery_rate(self.hard.cm),
            **self.hard.compute(),
            "n_frames": sum(c.n_frames for c in self.clips),
            "f_mode": self.f_mode,
        }


@dataclass
class SemanticMetrics:
    """Streaming AVSS mIoU (J), F, their present-class versions, and FDR over ``num_classes`` classes."""

    num_classes: int = 71
    iou_sum: torch.Tensor = field(init=False)
    f_sum: torch.Tensor = field(init=False)
    count: torch.Tensor = field(init=False)
    gt_area: torch.Tensor = field(init=False)
    hard: DatasetHardMetrics = field(init=False)  # FDR's and DDESeg's confusion matrix
    n_frames: int = 0
    pad_to: int = 0  # official AVSS test: every clip padded to this many frames (0: real frames only)
    n_padded: int = 0

    def __post_init__(self) -> None:
        k = self.num_classes
        self.iou_sum = torch.zeros(k, dtype=torch.float64)
        self.f_sum = torch.zeros(k, dtype=torch.float64)
        self.count = torch.zeros(k, dtype=torch.int64)
        self.gt_area = torch.zeros(k, dtype=torch.int64)
        self.hard = DatasetHardMetrics(k)

    @torch.no_grad()
    def update(
        self, pred: torch.Tensor, masks: torch.Tensor, gt: torch.Tensor, order: Sequence[int | None] | None = None,
        real: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            pred: ``(B, T, H, W)`` predicted class indices in ``[0, K)``.
            masks: ``(B, T, H, W)`` GT class indices (0 = background).
            gt: ``(B, T)`` bool, frames that have ground truth (only those are scored).
            order: accepted for symmetry with :class:`BinaryMetrics` and ignored: these sums over frames do
                not depend on how clips are batched.
            real: ``(B, T')`` bool, each clip's real frames (default ``gt``; only their count per clip is read);
                with ``pad_to``, each clip is scored with ``pad_to − real frames`` more all-background frames
                predicted all-background.
        """
        _check(pred, masks, gt)
        gt = gt.detach().cpu().bool()
        if self.pad_to:
            n_real = (gt if real is None else real.detach().cpu().bool()).sum(1)
            self._pad(int((self.pad_to - n_real).clamp_min(0).sum()), masks.shape[-2] * masks.shape[-1])
        pred, masks = pred.detach().cpu()[gt].long(), masks.detach().cpu()[gt].long()
        if pred.shape[0] == 0:
            return
        k = self.num_classes
        for name, x in (("prediction", pred), ("mask", masks)):
            if int(x.min()) < 0 or int(x.max()) >= k:
                raise ValueError(f"{name} class ids must lie in [0, {k}); got [{int(x.min())}, {int(x.max())}]")
        inter, area_pred, area_lab = semantic_frame_areas(pred, masks, k)
        union = area_pred + area_lab - inter
        self.iou_sum += (inter / (SEM_EPS + union)).sum(0)
        self.count += (union > 0).sum(0)
        precision, recall = inter / area_pred, inter / area_lab
        f = (1 + F_BETA2) * precision * recall / (F_BETA2 * precision + recall)
        self.f_sum += torch.nan_to_num(f, nan=0.0).sum(0)
        self.gt_area += area_lab.sum(0).long()
        self.hard.cm += confusion_matrix(pred, masks, k)
        self.n_frames += int(pred.shape[0])

    def _pad(self, frames: int, pixels: int) -> None:
        """Score ``frames`` padded frames of ``pixels`` pixels, all background in GT and prediction (the official
        AVSS test): only the background's sums move (inter = union = pred = GT area, so P = R = 1)."""
        if not frames:
            return
        self.iou_sum[0] += frames * (pixels / (SEM_EPS + pixels))
        self.f_sum[0] += frames * ((1 + F_BETA2) / (F_BETA2 + 1))
        self.count[0] += frames
        self.gt_area[0] += frames * pixels
        self.n_padded += frames

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-class mean IoU and F ``(K,)``: sum over frames / frames where the class occurs (0 if never)."""
        iou = torch.nan_to_num(self.iou_sum / self.count, nan=0.0)
        f = torch.nan_to_num(self.f_sum / self.count, nan=0.0)
        return iou, f

    def compute(self) -> dict[str, float | int | list[int]]:
        """``J`` (mIoU over all classes), ``F``, ``JF``, ``J_present``, ``F_present``, ``FDR``, ``J_dh``, ``F_dh``,
        ``JF_dh``, ``n_frames``,
        ``present_classes`` (ids occurring in the GT)."""
        if self.n_frames == 0:
            raise ValueError("no frame with ground truth was scored")
        iou, f = self.per_class()
        present = self.gt_area > 0
        j, fs = float(iou.mean()), float(f.mean())
        return {
            "J": j,
            "F": fs,
            "JF": (j + fs) / 2,
            "J_present": float(iou[present].mean()),
            "F_present": float(f[present].mean()),
            "FDR": false_discovery_rate(self.hard.cm),
            **self.hard.compute(),
            "n_frames": self.n_frames,
            **({"n_padded": self.n_padded} if self.pad_to else {}),
            "present_classes": present.nonzero().flatten().tolist(),
        }


@dataclass
class FalsePositiveMetrics:
    """Streaming ``FPR_frame`` / ``FPR_pixel`` of predictions on negative clips (module docstring)."""

    binary: bool
    frames: int = 0
    frames_fp: int = 0
    pixels: int = 0
    pixels_fp: int = 0

    @torch.no_grad()
    def update(
        self, pred: torch.Tensor, masks: torch.Tensor, scored: torch.Tensor, order: Sequence[int | None] | None = None,
        real: torch.Tensor | None = None,
    ) -> None:
        """Add a batch of negatives.

        Args:
            pred: ``(B, T, H, W)`` foreground probabilities (binary) or class ids.
            masks: ``(B, T, H, W)`` the (empty) targets; only their shape is checked.
            scored: ``(B, T)`` bool, the frames to count (the real frames).
            order, real: accepted for symmetry with the other accumulators and ignored.
        """
        _check(pred, masks, scored)
        pred = pred.detach().cpu()[scored.detach().cpu().bool()]
        sounding = pred.float() > 0.5 if self.binary else pred != 0
        per_frame = sounding.flatten(1).sum(1)
        self.frames += int(per_frame.numel())
        self.frames_fp += int((per_frame > 0).sum())
        self.pixels += int(sounding.numel())
        self.pixels_fp += int(per_frame.sum())

    def compute(self) -> dict[str, float | int]:
        """``FPR_frame``, ``FPR_pixel``, ``n_frames``."""
        if self.frames == 0:
            raise ValueError("no negative frame was scored")
        return {"FPR_frame": self.frames_fp / self.frames, "FPR_pixel": self.pixels_fp / self.pixels,
                "n_frames": self.frames}


def positive_j(clean: dict[str, Any]) -> float:
    """J on positives as :func:`negative_score` reads it: ``J_present`` when given (AVSS), else ``J``."""
    return float(clean.get("J_present", clean["J"]))


def negative_score(j_positive: float, fpr_frame: float) -> float:
    """``HM`` = harmonic mean of ``j_positive`` and ``1 − fpr_frame`` (0 when either is 0)."""
    silent = 1.0 - fpr_frame
    return 0.0 if j_positive + silent == 0 else 2.0 * j_positive * silent / (j_positive + silent)


def make_metrics(task: str, num_classes: int | None = None, f_mode: str = "official",
                 avss_padding: str = "real") -> BinaryMetrics | SemanticMetrics:
    """The accumulator for a dataset: binary ones (S4, MS3) → :class:`BinaryMetrics`, AVSS →
    :class:`SemanticMetrics` over ``num_classes`` (default: the dataset's 71), with ``avss_padding="official"``
    padding every clip to the dataset's longest (10 frames) as the official AVSS test does."""
    info = load_info(task)
    if avss_padding not in AVSS_PADDINGS:
        raise ValueError(f"avss_padding must be one of {AVSS_PADDINGS}, got {avss_padding!r}")
    if info.binary:
        if avss_padding != "real":
            raise ValueError(f"avss_padding={avss_padding!r} applies to AVSS only, not {task}")
        return BinaryMetrics(f_mode=f_mode)
    pad_to = info.max_frames if avss_padding == "official" else 0
    return SemanticMetrics(num_classes=num_classes or info.num_classes, pad_to=pad_to)


_AVSS_FRAMES = {"real": "frames with ground truth only (COMBO-AVS)",
                "official": "real frames plus v1s/v1m clips padded to 10 all-background frames, predicted background "
                            "(official avss/test.py)"}
_OFFICIAL_BATCHES = {"official": "per official test batch of 4 clips in CSV order, then the mean over batches",
                     "dataset": "over the whole split (batch-size independent)"}


def protocols(result: dict[str, Any], binary: bool, f_mode: str = "official", avss_padding: str = "real") -> dict[str, str]:
    """For each metric key of ``result``, the protocol it follows and its source (``icf eval --json``'s
    ``protocols``)."""
    if binary:
        text = {
            "J": "AVSBench J: per-frame IoU of prob > 0.5 (empty GT: background IoU), mean "
                 f"{_OFFICIAL_BATCHES[f_mode]} (avs_scripts/avs_s4/utils/utility.py mask_iou)",
            "F": "AVSBench F: F_beta (beta^2 0.3) over 255 thresholds, max of the mean curve of non-empty-GT frames "
                 f"{_OFFICIAL_BATCHES[f_mode]} (utility.py Eval_Fmeasure)",
            "JF": "(J + F) / 2 with the AVSBench F",
            "F_boundary": "DAVIS contour accuracy F (db_eval_boundary: seg2bmap boundaries, disk dilation of "
                          "ceil(0.008 x image diagonal) px, boundary precision/recall F1) of prob > 0.5, mean per clip "
                          "then over clips; QDFormer's F",
            "JF_boundary": "(J + F_boundary) / 2: QDFormer's J&F (DAVIS-style)",
        }
    else:
        frames = _AVSS_FRAMES[avss_padding]
        text = {
            "J": "AVSBench-semantic mIoU: per-frame per-class IoU, per-class mean over frames where the class is in "
                 f"prediction or GT, mean over all classes incl. background; {frames} "
                 "(avss/utils/compute_color_metrics.py, avss/test.py)",
            "F": f"AVSBench-semantic F: per-frame per-class F_beta (beta^2 0.3), averaged as J; {frames}",
            "JF": "(J + F) / 2",
            "J_present": f"J's per-class means averaged over the classes present in the split's GT (Decisions D3); {frames}",
            "F_present": f"F's per-class means averaged over the classes present in the split's GT (Decisions D3); {frames}",
        }
    text.update({
        "FDR": "CAVP ForegroundDetect: FP / (FP + TP) per class of the split's hard pixel confusion matrix, "
               "NaN-mean over classes (Decisions D4)",
        "J_dh": "DDESeg/CAVP dataset-level IoU of hard predictions, mean over classes with a non-empty union, "
                "background included",
        "F_dh": "DDESeg/CAVP dataset-level F_beta (beta^2 0.3) of hard predictions, classes as J_dh",
        "JF_dh": "(J_dh + F_dh) / 2: DDESeg's J&F",
        "FPR_frame": "negative audio: frames with any pixel predicted sounding / frames (AVSBench-Robust)",
        "FPR_pixel": "negative audio: pixels predicted sounding / pixels",
        "HM": "harmonic mean of J on positives and 1 - FPR_frame on negatives (project)",
    })
    return {k: v for k, v in text.items() if k in result}
