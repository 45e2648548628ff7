"""Official AVSBench metrics: hand-computed cases and a slow, loop-by-loop reference (Decisions D2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from icf.eval.metrics import (
    BinaryMetrics,
    SemanticMetrics,
    binary_frame_fcurves,
    binary_frame_iou,
    f_thresholds,
    make_metrics,
)

# ---------------------------------------------------------------- hand-computed cases


def test_binary_frame_j_by_hand() -> None:
    gt = torch.tensor([[[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    probs = torch.tensor([[[0.9, 0.4, 0.6], [0.1, 0.0, 0.2]], [[0.6, 0.1, 0.1], [0.1, 0.5, 0.1]]])
    iou = binary_frame_iou(probs, gt)
    # frame 0: pred = p > 0.5 = {(0,0), (0,2)}; GT = {(0,0), (0,1)} → inter 1, union 3 → 1 / (3 + 1e-7)
    # frame 1: empty GT → background IoU; 0.5 is not > 0.5 so only (0,0) is foreground → TN 5 of 6 pixels
    assert iou.tolist() == pytest.approx([1 / (3 + 1e-7), 5 / (6 + 1e-7)], abs=1e-12)


def test_binary_frame_f_curve_by_hand() -> None:
    gt = torch.tensor([[[1, 1, 0], [0, 0, 0]]])
    probs = torch.tensor([[[0.9, 0.4, 0.6], [0.1, 0.0, 0.2]]])
    curve = binary_frame_fcurves(probs, gt)[0]
    # F = 1.3 P R / (0.3 P + R); GT = the pixels at 0.9 and 0.4
    # th = 0          : all 6 positive, P 2/6 R 1  → 1.3/3 / 1.1          = 0.393939…
    # th in (0.4, 0.6]: {0.9, 0.6},     P 1/2 R 1/2 → 0.325 / 0.65         = 0.5
    # th in (0.2, 0.4]: {0.9, 0.4, 0.6} P 2/3 R 1  → 0.86667 / 1.2       = 0.722222…
    # th in (0.6, 0.9]: {0.9},          P 1  R 1/2 → 0.65 / 0.8            = 0.8125 (the maximum)
    # th > 0.9        : nothing         → 0
    th = f_thresholds()
    assert curve[0] == pytest.approx((1.3 / 3) / 1.1)
    assert curve[int((th <= 0.4).sum()) - 1] == pytest.approx(0.86666666 / 1.2)  # last th <= 0.4
    assert curve[int((th <= 0.6).sum()) - 1] == pytest.approx(0.5)
    assert curve[int((th <= 0.9).sum()) - 1] == pytest.approx(0.8125)
    assert curve[-1] == 0.0
    assert float(curve.max()) == pytest.approx(0.8125)


def _frame(pixels: list[list[int]]) -> torch.Tensor:
    return torch.tensor(pixels).view(1, 1, 2, 3)


def test_binary_official_vs_dataset_by_hand() -> None:
    # five one-frame clips; GT = 2 of 6 pixels. A: perfect 0/1 prediction; B: one wrong pixel only.
    gt = [[1, 1, 0], [0, 0, 0]]
    good, bad = [[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]]
    order = [good, good, good, bad, bad]
    for mode in ("official", "dataset"):
        m = BinaryMetrics(f_mode=mode)
        for pred in order:
            m.update(_frame(pred).float(), _frame(gt), torch.ones(1, 1, dtype=torch.bool))
        r = m.compute()
        # F curves: A = 1 for every th > 0 and 0.393939 at th = 0; B = 0 for th > 0 and 0.393939 at th = 0
        # J: A = 2 / (2 + 1e-7) ≈ 1, B = 0
        if mode == "official":
            # batches of 4 clips: {A, A, A, B} → J 3/4, F max(3/4, 0.3939) = 3/4; {B} → J 0, F 0.393939
            assert r["J"] == pytest.approx((0.75 + 0.0) / 2, abs=1e-7)
            assert r["F"] == pytest.approx((0.75 + (1.3 / 3) / 1.1) / 2)
        else:
            # one curve over 5 frames: th > 0 → 3/5, th = 0 → 0.3939 → F = 0.6; J = 3/5
            assert r["J"] == pytest.approx(0.6, abs=1e-7)
            assert r["F"] == pytest.approx(0.6)
        assert r["JF"] == pytest.approx((r["J"] + r["F"]) / 2)
        # pixel confusion: fg TP 3·2 = 6, FP 2 (one per B); bg TP 3·4 + 2·3 = 18, FP (GT fg → bg) 2·2 = 4
        # FDR = mean(2/8, 4/22)
        assert r["FDR"] == pytest.approx((2 / 8 + 4 / 22) / 2)
        assert r["n_frames"] == 5


def test_binary_official_regroups_clips_by_csv_order() -> None:
    # CSV order A A A B B (A perfect, B wrong; see above) → batches {A, A, A, B}, {B}. The clips arrive
    # shuffled (as shards hold them) in uneven caller batches, each with its CSV position.
    gt = [[1, 1, 0], [0, 0, 0]]
    good, bad = [[1, 1, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]]
    csv = [good, good, good, bad, bad]
    arrival = [4, 1, 0, 3, 2]  # CSV positions in arrival order: B A A B A

    def feed(m: BinaryMetrics, positions: list[int], with_order: bool) -> dict:
        for chunk in (positions[:2], positions[2:]):
            probs = torch.cat([_frame(csv[i]).float() for i in chunk])
            masks = torch.cat([_frame(gt) for _ in chunk])
            m.update(probs, masks, torch.ones(len(chunk), 1, dtype=torch.bool), order=chunk if with_order else None)
        return m.compute()

    in_csv = feed(BinaryMetrics(), list(range(5)), with_order=False)
    regrouped = feed(BinaryMetrics(), arrival, with_order=True)
    as_arrived = feed(BinaryMetrics(), arrival, with_order=False)
    assert in_csv["J"] == pytest.approx((0.75 + 0.0) / 2, abs=1e-7)
    assert in_csv["F"] == pytest.approx((0.75 + (1.3 / 3) / 1.1) / 2)
    assert regrouped["J"] == in_csv["J"] and regrouped["F"] == in_csv["F"] and regrouped["FDR"] == in_csv["FDR"]
    # arrival order batches {B, A, A, B}, {A}: J (1/2 + 1) / 2, F (1/2 + 1) / 2 — the grouping matters
    assert as_arrived["J"] == pytest.approx(0.75, abs=1e-7) and as_arrived["F"] == pytest.approx(0.75)
    assert as_arrived["F"] != pytest.approx(in_csv["F"])
    # dataset mode does not depend on the grouping at all
    ds = [feed(BinaryMetrics(f_mode="dataset"), arrival, w) for w in (True, False)]
    assert ds[0]["F"] == ds[1]["F"] == pytest.approx(0.6)
    # a clip without an order (old shards) → arrival order for every clip
    m = BinaryMetrics()
    m.update(_frame(bad).float(), _frame(gt), torch.ones(1, 1, dtype=torch.bool), order=[None])
    m.update(_frame(good).float(), _frame(gt), torch.ones(1, 1, dtype=torch.bool), order=[0])
    assert [c.arrival for c in m.ordered()] == [0, 1]
    with pytest.raises(ValueError, match="order has 2 entries"):
        m.update(_frame(good).float(), _frame(gt), torch.ones(1, 1, dtype=torch.bool), order=[0, 1])


def test_binary_matches_reference_in_csv_order_whatever_the_arrival_order() -> None:
    rng = np.random.default_rng(3)
    clips = []
    for _ in range(9):
        y = (rng.random((5, 8, 6)) < rng.uniform(0.05, 0.7)).astype(np.float64)
        p = (np.round(np.clip(0.5 * y + 0.6 * rng.random((5, 8, 6)), 0, 1) * 255) / 255).astype(np.float32)
        clips.append((p, y))
    perm = rng.permutation(9).tolist()
    m = BinaryMetrics()
    for start in range(0, 9, 4):
        idx = perm[start : start + 4]
        p = torch.from_numpy(np.stack([clips[i][0] for i in idx]))
        y = torch.from_numpy(np.stack([clips[i][1] for i in idx])).long()
        m.update(p, y, torch.ones(p.shape[:2], dtype=torch.bool), order=idx)
    r = m.compute()
    ref_j, ref_f = _ref_binary(clips, "official")
    assert r["J"] == pytest.approx(ref_j, abs=1e-12) and r["F"] == pytest.approx(ref_f, abs=1e-12)
    shuffled_j, shuffled_f = _ref_binary([clips[i] for i in perm], "official")
    assert (shuffled_j, shuffled_f) != pytest.approx((ref_j, ref_f), abs=1e-9)  # the order does matter here


def test_binary_all_empty_batch_scores_zero_f_officially() -> None:
    # official quirk: a batch of 4 clips without any non-empty-GT frame contributes F = 0
    m = BinaryMetrics()
    for _ in range(4):
        m.update(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool))
    r = m.compute()
    assert r["F"] == 0.0
    assert r["J"] == pytest.approx(6 / (6 + 1e-7))  # all background correctly predicted


def test_semantic_by_hand() -> None:
    gt = torch.tensor([[[0, 1, 1], [0, 2, 2]], [[0, 0, 0], [0, 0, 0]]]).view(1, 2, 2, 3)
    pred = torch.tensor([[[0, 1, 2], [0, 2, 0]], [[0, 0, 0], [0, 0, 3]]]).view(1, 2, 2, 3)
    m = SemanticMetrics(num_classes=4)
    m.update(pred, gt, torch.ones(1, 2, dtype=torch.bool))
    r = m.compute()
    # frame 1: c0 GT 2 pred 3 inter 2 → IoU 2/3, P 2/3 R 1 → F = 1.3·(2/3)/(0.2+1)     = 0.722222
    #          c1 GT 2 pred 1 inter 1 → IoU 1/2, P 1 R 1/2   → F = 0.65/0.8             = 0.8125
    #          c2 GT 2 pred 2 inter 1 → IoU 1/3, P R = 1/2   → F = 0.5
    # frame 2: c0 GT 6 pred 5 inter 5 → IoU 5/6, P 1 R 5/6   → F = 1.3·(5/6)/(0.3+5/6) = 0.955882
    #          c3 GT 0 pred 1         → IoU 0, F 0, counted (in pred ∪ GT)
    f0 = (1.3 * 2 / 3 / 1.2 + 1.3 * 5 / 6 / (0.3 + 5 / 6)) / 2
    iou = [(2 / 3 + 5 / 6) / 2, 0.5, 1 / 3, 0.0]
    fs = [f0, 0.8125, 0.5, 0.0]
    assert r["J"] == pytest.approx(sum(iou) / 4)
    assert r["F"] == pytest.approx(sum(fs) / 4)
    assert r["J_present"] == pytest.approx(sum(iou[:3]) / 3)  # class 3 never in the GT
    assert r["F_present"] == pytest.approx(sum(fs[:3]) / 3)
    assert r["present_classes"] == [0, 1, 2]
    # confusion columns: pred0 TP 7 FP 1; pred1 TP 1 FP 0; pred2 TP 1 FP 1; pred3 TP 0 FP 1
    assert r["FDR"] == pytest.approx((1 / 8 + 0 + 1 / 2 + 1) / 4)
    assert r["n_frames"] == 2


def test_semantic_skips_frames_without_gt() -> None:
    gt_map = torch.zeros(1, 2, 2, 3, dtype=torch.long)
    pred = torch.zeros(1, 2, 2, 3, dtype=torch.long)
    pred[0, 1] = 5  # the padded frame is all wrong, but it has no GT
    m = SemanticMetrics(num_classes=71)
    m.update(pred, gt_map, torch.tensor([[True, False]]))
    r = m.compute()
    assert r["n_frames"] == 1
    assert r["J"] == pytest.approx(1 / 71)  # background IoU 1, 70 classes never seen score 0
    assert r["J_present"] == pytest.approx(1.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match="f_mode"):
        BinaryMetrics(f_mode="best")
    with pytest.raises(ValueError, match="no frame"):
        BinaryMetrics().compute()
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        SemanticMetrics(num_classes=4).update(
            torch.full((1, 1, 2, 2), 4), torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.ones(1, 1, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="expected"):
        BinaryMetrics().update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), torch.ones(1, 1, dtype=torch.bool))
    assert isinstance(make_metrics("ms3"), BinaryMetrics) and isinstance(make_metrics("avss"), SemanticMetrics)


# ---------------------------------------------------------------- slow reference (official loops)


def _ref_binary(clips: list[tuple[np.ndarray, np.ndarray]], mode: str) -> tuple[float, float]:
    """Per-threshold loops exactly as AVSBench utility.py, in float64; batches of 4 clips."""
    th = f_thresholds().numpy()  # the official float32 thresholds

    def frame_j(p: np.ndarray, y: np.ndarray) -> float:
        pred = (p > np.float32(0.5)).astype(np.float64)
        if y.sum() == 0:
            return float(((1 - pred) * (1 - y)).sum() / (y.size + 1e-7))
        return float((pred * y).sum() / (np.maximum(pred, y).sum() + 1e-7))

    def frame_f(p: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = np.zeros(len(th))
        for i, t in enumerate(th):
            yt = (p >= t).astype(np.float64)
            tp = (yt * y).sum()
            prec, rec = tp / (yt.sum() + 1e-20), tp / (y.sum() + 1e-20)
            with np.errstate(invalid="ignore"):
                f = 1.3 * prec * rec / (0.3 * prec + rec)
            out[i] = 0.0 if math.isnan(f) else f
        return out

    groups = [clips[i : i + 4] for i in range(0, len(clips), 4)] if mode == "official" else [clips]
    js, fs = [], []
    for g in groups:
        frames = [(p[t], y[t]) for p, y in g for t in range(p.shape[0])]
        js.append(np.mean([frame_j(p, y) for p, y in frames]))
        curves = [frame_f(p, y) for p, y in frames if y.sum() > 0]
        fs.append(np.mean(curves, axis=0).max() if curves else 0.0)
    return float(np.mean(js)), float(np.mean(fs))


@pytest.mark.parametrize("mode", ["official", "dataset"])
def test_binary_matches_reference(mode: str) -> None:
    rng = np.random.default_rng(0)
    clips = []
    for c in range(7):  # 7 clips → one full and one partial official batch
        y = (rng.random((5, 12, 10)) < rng.uniform(0.1, 0.6)).astype(np.float64)
        if c == 2:
            y[1] = 0  # an empty-GT frame
        noise = rng.random((5, 12, 10))
        p = np.clip(0.6 * y + 0.5 * noise, 0, 1)
        p = (np.round(p * 255) / 255).astype(np.float32)  # PNG quantisation: ties land on thresholds
        clips.append((p, y))
    m = BinaryMetrics(f_mode=mode)
    for start in (0, 3, 5):  # uneven caller batches must not change the official 4-clip grouping
        stop = {0: 3, 3: 5, 5: 7}[start]
        p = torch.from_numpy(np.stack([c[0] for c in clips[start:stop]]))
        y = torch.from_numpy(np.stack([c[1] for c in clips[start:stop]])).long()
        m.update(p, y, torch.ones(p.shape[:2], dtype=torch.bool))
    r = m.compute()
    ref_j, ref_f = _ref_binary(clips, mode)
    assert r["J"] == pytest.approx(ref_j, abs=1e-12)
    assert r["F"] == pytest.approx(ref_f, abs=1e-12)
    assert r["n_frames"] == 35


def _ref_semantic(pred: np.ndarray, target: np.ndarray, k: int) -> dict[str, float]:
    """Per frame, per class loops as AVSBench compute_color_metrics.py + test.py, float64."""
    iou_sum, f_sum, count, gt_area = np.zeros(k), np.zeros(k), np.zeros(k), np.zeros(k)
    cm = np.zeros((k, k))
    for p, y in zip(pred, target):
        for c in range(k):
            inter = float(((p == c) & (y == c)).sum())
            ap, al = float((p == c).sum()), float((y == c).sum())
            union = ap + al - inter
            iou_sum[c] += inter / (2.220446049250313e-16 + union)
            count[c] += union > 0
            gt_area[c] += al
            with np.errstate(invalid="ignore", divide="ignore"):
                prec, rec = np.float64(inter) / ap, np.float64(inter) / al
                f = 1.3 * prec * rec / (0.3 * prec + rec)
            f_sum[c] += 0.0 if np.isnan(f) else f
        for a, b in zip(y.ravel(), p.ravel()):
            cm[a, b] += 1
    with np.errstate(invalid="ignore"):
        iou = np.nan_to_num(iou_sum / count)
        fs = np.nan_to_num(f_sum / count)
        tp = np.diag(cm)
        fdr = np.nanmean((cm.sum(0) - tp) / cm.sum(0))
    present = gt_area > 0
    return {"J": iou.mean(), "F": fs.mean(), "J_present": iou[present].mean(), "F_present": fs[present].mean(), "FDR": fdr}


def test_semantic_matches_reference() -> None:
    rng = np.random.default_rng(1)
    k = 9
    target = rng.integers(0, 6, size=(3, 4, 8, 8))  # classes 6..8 never in the GT
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, k, size=target.shape))
    pred[0, 0] = 0  # a frame predicting only background
    gt = torch.tensor([[True, True, True, False], [True] * 4, [True, False, True, True]])
    m = SemanticMetrics(num_classes=k)
    m.update(torch.from_numpy(pred[:2]), torch.from_numpy(target[:2]), gt[:2])
    m.update(torch.from_numpy(pred[2:]), torch.from_numpy(target[2:]), gt[2:])
    r = m.compute()
    sel = gt.numpy()
    ref = _ref_semantic(pred[sel], target[sel], k)
    for key, value in ref.items():
        assert r[key] == pytest.approx(value, abs=1e-12), key
    assert r["n_frames"] == int(sel.sum())


# ---------------------------------------------------------------- DAVIS contour accuracy (QDFormer's F)


def _ref_boundary(mask: np.ndarray) -> np.ndarray:
    """DAVIS seg2bmap, pixel by pixel: a pixel differs from its E, S or SE neighbour; the last row looks east
    only, the last column south only, the bottom-right corner is never a boundary."""
    h, w = mask.shape
    b = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            if i < h - 1 and j < w - 1:
                b[i, j] = mask[i, j] != mask[i, j + 1] or mask[i, j] != mask[i + 1, j] or mask[i, j] != mask[i + 1, j + 1]
            elif i == h - 1 and j < w - 1:
                b[i, j] = mask[i, j] != mask[i, j + 1]
            elif j == w - 1 and i < h - 1:
                b[i, j] = mask[i, j] != mask[i + 1, j]
    return b


def _ref_boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = 0.008) -> float:
    """float64 db_eval_boundary: scipy dilation by a disk of radius ceil(bound_th · diagonal)."""
    from scipy import ndimage

    radius = int(np.ceil(bound_th * np.sqrt(pred.shape[0] ** 2 + pred.shape[1] ** 2)))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (xx.astype(np.float64) ** 2 + yy.astype(np.float64) ** 2) <= radius**2
    fg_b, gt_b = _ref_boundary(pred), _ref_boundary(gt)
    fg_dil = ndimage.binary_dilation(fg_b, structure=disk)
    gt_dil = ndimage.binary_dilation(gt_b, structure=disk)
    n_fg, n_gt = float(fg_b.sum()), float(gt_b.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision, recall = float((fg_b & gt_dil).sum()) / n_fg, float((gt_b & fg_dil).sum()) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _blobs(rng: np.random.Generator, h: int, w: int, n: int) -> np.ndarray:
    """``n`` random discs and rectangles (some touching the border), plus a sprinkle of isolated pixels."""
    yy, xx = np.mgrid[0:h, 0:w]
    m = np.zeros((h, w), dtype=bool)
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(3, min(h, w) // 3))
        m |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2) if rng.random() < 0.5 else \
            ((abs(yy - cy) <= r) & (abs(xx - cx) <= r // 2 + 1))
    return m | (rng.random((h, w)) < 0.01)


@pytest.mark.parametrize("shape", [(24, 32), (64, 64), (120, 90)])  # tolerance radius 1, 1, 2
def test_boundary_f_equals_a_float64_davis_reference(shape: tuple[int, int]) -> None:
    from icf.eval.metrics import binary_frame_boundary_f

    rng = np.random.default_rng(shape[0])
    h, w = shape
    gts, preds = [], []
    for k in range(10):
        gt = _blobs(rng, h, w, int(rng.integers(1, 4)))
        pred = gt ^ (rng.random((h, w)) < 0.03) if k % 2 else _blobs(rng, h, w, 2)  # near misses and unrelated
        gts.append(gt)
        preds.append(pred)
    empty = np.zeros((h, w), dtype=bool)
    gts += [empty, empty, gts[0], np.ones((h, w), dtype=bool)]  # empty GT vs a prediction / vs empty; empty pred
    preds += [preds[0], empty, empty, np.ones((h, w), dtype=bool)]  # (a full mask has no boundary either)
    probs = torch.from_numpy(np.stack(preds)).double() * 0.4 + 0.3  # 0.7 where predicted, 0.3 elsewhere
    got = binary_frame_boundary_f(probs, torch.from_numpy(np.stack(gts)).long())
    expected = [_ref_boundary_f(p, g) for p, g in zip(preds, gts)]
    assert got.dtype == torch.float64
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    assert expected[-4:] == [0.0, 1.0, 0.0, 1.0] and 0.0 < min(expected[:10]) and max(expected[:10]) < 1.0


def test_boundary_f_is_averaged_per_clip_then_over_clips() -> None:
    """F_boundary = mean over clips of the clip's mean over its scored frames (DAVIS: per sequence, then over
    sequences); JF_boundary = (J + F_boundary) / 2."""
    rng = np.random.default_rng(3)
    gts = np.stack([_blobs(rng, 32, 32, 2) for _ in range(10)]).reshape(2, 5, 32, 32)
    preds = np.stack([_blobs(rng, 32, 32, 2) for _ in range(10)]).reshape(2, 5, 32, 32)
    scored = torch.ones(2, 5, dtype=torch.bool)
    scored[1, 2:] = False  # clip 1 has 2 scored frames, clip 0 has 5
    m = BinaryMetrics()
    m.update(torch.from_numpy(preds).float(), torch.from_numpy(gts).long(), scored)
    r = m.compute()
    clip0 = np.mean([_ref_boundary_f(preds[0, t], gts[0, t]) for t in range(5)])
    clip1 = np.mean([_ref_boundary_f(preds[1, t], gts[1, t]) for t in range(2)])
    assert r["F_boundary"] == pytest.approx((clip0 + clip1) / 2, abs=1e-12)
    assert r["JF_boundary"] == pytest.approx((r["J"] + r["F_boundary"]) / 2)


# ---------------------------------------------------------------- official AVSS padding


def test_official_avss_padding_equals_scoring_padded_frames() -> None:
    """``pad_to=10`` scores each clip's missing frames as all-background GT and prediction: the same J, F,
    J_present and F_present as feeding those padded frames through the metric; FDR and the dataset-level scores
    stay on the real frames."""
    gen = torch.Generator().manual_seed(5)
    classes = torch.tensor([0, 3, 7, 9])
    masks = classes[torch.randint(0, 4, (3, 10, 12, 12), generator=gen)]
    pred = torch.where(torch.rand(3, 10, 12, 12, generator=gen) < 0.6, masks, classes[torch.randint(0, 4, (3, 10, 12, 12), generator=gen)])
    real = torch.ones(3, 10, dtype=torch.bool)
    real[0, 5:] = real[2, 5:] = False  # clips 0 and 2 are 5-frame (v1s/v1m) clips, clip 1 a 10-frame v2 clip
    official = SemanticMetrics(71, pad_to=10)
    official.update(pred, masks, real, real=real)
    plain = SemanticMetrics(71)
    plain.update(pred, masks, real)
    literal = SemanticMetrics(71)
    literal.update(pred * real[..., None, None], masks * real[..., None, None], torch.ones(3, 10, dtype=torch.bool))
    a, b, c = official.compute(), literal.compute(), plain.compute()
    for key in ("J", "F", "J_present", "F_present"):
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    assert a["J"] != pytest.approx(c["J"])  # the padding moves the official J (background IoU ≈ 1 on 10 more frames)
    for key in ("FDR", "J_dh", "F_dh", "n_frames"):
        assert a[key] == c[key], key
    assert a["n_padded"] == 10 and "n_padded" not in c and "F_boundary" not in c  # boundary F: binary tasks only
    assert isinstance(make_metrics("avss", avss_padding="official"), SemanticMetrics)
    assert make_metrics("avss", avss_padding="official").pad_to == 10
    with pytest.raises(ValueError, match="AVSS only"):
        make_metrics("s4", avss_padding="official")
