"""``icf score``: the official metrics (:mod:`icf.eval.metrics`) applied to any method's PNG predictions.

Mirror rule: the prediction for a ground-truth mask lies at the mask's path relative to the dataset root,
re-rooted under the prediction folder — ``PRED / relpath(mask, ROOT)``:

* S4:   ``PRED/s4_data/gt_masks/{split}/{category}/{name}/{name}_{n}.png``
* MS3:  ``PRED/ms3_data/gt_masks/{split}/{video_id}/{video_id}_{n}.png``
* AVSS: ``PRED/{v1s|v1m|v2}/{uid}/labels_semantic/{i}.png``

Only frames that have ground truth in the split are read (S4/AVSS-v1s train have GT on frame 1 only).
S4/MS3 predictions are single-channel uint8 **probability** maps (value / 255 = foreground probability;
mode ``L``, or ``1`` for hard masks); AVSS predictions are single-channel uint8 **class-index** maps
(mode ``L`` or ``P``, ids 0..70). A prediction must have its mask's size unless ``resize`` is set
(bilinear for probabilities, nearest for class ids). Clips are scored in CSV order, the order of the
official test loaders, so the ``official`` F groups the same 4-clip batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from icf.clitools import UserError
from icf.data.adapters import check_root, load_samples
from icf.data.io import read_mask
from icf.data.datasets import load_info
from icf.eval.metrics import make_metrics

MAX_LISTED = 3


def prediction_path(pred_root: Path, mask_path: str, data_root: Path) -> Path:
    """Where the prediction for ``mask_path`` must lie: ``pred_root / relpath(mask_path, data_root)``."""
    return pred_root / Path(mask_path).relative_to(data_root)


def read_prediction(path: Path, dataset: str, shape: tuple[int, int], resize: bool) -> np.ndarray:
    """One prediction PNG → ``(H, W)`` float32 probabilities (S4/MS3) or int64 class ids (AVSS).

    Raises ``UserError`` naming the file for an unreadable image, a multi-channel image, a class id out
    of range, or a size that differs from the mask's ``shape`` (without ``resize``).
    """
    info = load_info(dataset)
    semantic = not info.binary
    try:
        img = Image.open(path)
        img.load()
    except Exception as err:
        raise UserError(f"{path}: unreadable prediction ({err})") from None
    allowed = ("L", "P") if semantic else ("L", "1")
    if img.mode not in allowed:
        what = "class-index" if semantic else "probability"
        raise UserError(f"{path}: a {what} prediction must be a single-channel PNG (mode {'/'.join(allowed)}), found mode {img.mode}")
    size = (shape[1], shape[0])
    if img.size != size:
        if not resize:
            raise UserError(f"{path}: prediction is {img.size[0]}x{img.size[1]} but its mask is {size[0]}x{size[1]} (use --resize)")
        img = img.resize(size, Image.NEAREST if semantic else Image.BILINEAR)
    if not semantic:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    ids = np.asarray(img, dtype=np.int64)
    if int(ids.max(initial=0)) >= info.num_classes:
        raise UserError(f"{path}: class id {int(ids.max())} out of range (the {dataset} dataset has {info.num_classes} classes)")
    return ids


def score_predictions(
    dataset: str, root: str | Path, pred: str | Path, split: str = "test", f_mode: str = "official", resize: bool = False,
    avss_padding: str = "real",
) -> dict:
    """Score the PNG predictions under ``pred`` against the ``split`` ground truth under ``root``.

    Returns the metric dict of :mod:`icf.eval.metrics` (``J``, ``F``, ``JF``, ``FDR``, ``n_frames``; S4/MS3 also
    ``F_boundary``, ``JF_boundary``; AVSS also ``J_present``, ``F_present``, and ``n_padded`` with
    ``avss_padding="official"``, which pads each clip's ``n_frames`` to 10) plus ``n_clips``. Raises ``UserError``
    (one line) when a prediction is missing or malformed, a ground-truth mask cannot be read, or every S4/MS3
    prediction holds only 0 and 1 (hard masks saved as 0/1, which would score as near-empty probabilities).
    """
    data_root = check_root(root)
    pred_root = Path(pred).expanduser()
    if not pred_root.is_dir():
        raise UserError(f"{pred_root}: prediction folder not found")
    samples = [s for s in load_samples(dataset, data_root, [split]) if any(s.gt_frames)]
    if not samples:
        raise UserError(f"{data_root}: no {split} clip with ground truth")
    pairs = [
        [(Path(m), prediction_path(pred_root, m, data_root)) for m, g in zip(s.mask_paths, s.gt_frames) if g]
        for s in samples
    ]
    missing = [str(p) for clip in pairs for _, p in clip if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:MAX_LISTED]) + (", ..." if len(missing) > MAX_LISTED else "")
        raise UserError(f"{len(missing)} prediction file(s) missing (expected at PRED/<mask path relative to root>): {shown}")
    info = load_info(dataset)
    metrics = make_metrics(dataset, info.num_classes, f_mode, avss_padding)
    top = 0.0  # the largest probability of any S4/MS3 prediction
    for sample, clip in zip(samples, pairs):
        masks, preds = [], []
        for mask_path, pred_path in clip:
            try:
                mask = read_mask(mask_path, dataset)
            except ValueError as err:
                raise UserError(str(err)) from None
            masks.append(mask.astype(np.int64))
            preds.append(read_prediction(pred_path, dataset, mask.shape, resize))
        if len({m.shape for m in masks}) > 1:
            raise UserError(f"{clip[0][0].parent}: ground-truth masks of one clip differ in size")
        p, m = torch.from_numpy(np.stack(preds))[None], torch.from_numpy(np.stack(masks))[None]
        real = torch.ones(1, sample.n_frames, dtype=torch.bool)  # all of the clip's frames, GT or not (padding)
        metrics.update(p, m, torch.ones(1, len(clip), dtype=torch.bool), real=real)
        top = max(top, float(p.max())) if info.binary else top
    if 0 < top <= 1.5 / 255:
        raise UserError(f"{pred_root}: every prediction holds only the values 0 and 1 (0/1 hard masks?); "
                        "S4/MS3 predictions are uint8 probabilities 0..255: save hard masks as 0/255 (or mode '1')")
    return {**metrics.compute(), "n_clips": len(samples)}
