"""Labelled examples for the towers, read from a dataset's clips (Samples) and their GT masks.

* **Object crops** (image tower): for every frame with ground truth and every class in its mask, the
  square box around that class's pixels (with a margin), resized to the CLIP input side. Crops make
  each image single-label, so multi-object frames need no multi-positive images.
* **Audio seconds** (audio tower): second ``t`` of the audio ↔ the classes of frame ``t``'s mask (the
  visible sounding objects). Several classes → several positives (:mod:`icf.towers.loss`). Seconds
  whose frame has no GT or an empty mask are left out; off-screen sources are heard but unlabelled.

S4 masks are binary: the class is the clip's ``category``. MS3 names no classes, so it cannot train towers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from icf.clitools import UserError
from icf.data.io import read_mask, read_rgb, read_wav
from icf.data.datasets import load_info, object_vocabulary
from icf.data.sample import Sample

MARGIN = 0.15  # of the box side, on each side
MIN_PIXELS = 16  # smaller mask regions are noise, not objects


@dataclass
class Examples:
    """Labelled crops and seconds of one split.

    ``crops (N, S, S, 3)`` uint8 with ``crop_labels (N,)`` vocabulary indices; ``seconds (M, sr)``
    float32 at the CLAP sample rate with ``second_labels`` (a tuple of vocabulary indices each).
    """

    crops: np.ndarray
    crop_labels: np.ndarray
    seconds: np.ndarray
    second_labels: list[tuple[int, ...]] = field(default_factory=list)

    def second_positives(self, k: int) -> np.ndarray:
        """``(M, k)`` 0/1 matrix of each second's classes."""
        out = np.zeros((len(self.second_labels), k), np.float32)
        for i, labels in enumerate(self.second_labels):
            out[i, list(labels)] = 1.0
        return out


def mask_classes(mask: np.ndarray, sample: Sample, vocabulary: Sequence[str]) -> dict[int, np.ndarray]:
    """``{vocabulary index: (H, W) bool region}`` of the classes in one GT mask (regions ≥ MIN_PIXELS)."""
    info = load_info(sample.dataset)
    if info.binary:
        if not sample.classes:
            raise UserError(f"{sample.dataset} names no classes in its CSV: it cannot train towers")
        regions = {vocabulary.index(sample.classes[0]): mask > 0}
    else:
        regions = {vocabulary.index(info.classes[i]): mask == i for i in np.unique(mask) if i != 0}
    return {k: r for k, r in regions.items() if r.sum() >= MIN_PIXELS}


def square_box(region: np.ndarray, margin: float = MARGIN) -> tuple[int, int, int]:
    """``(top, left, side)`` of the square around ``region (H, W)`` with ``margin``, inside the image."""
    ys, xs = np.nonzero(region)
    h, w = region.shape
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    side = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) * (1 + 2 * margin)
    side = int(min(max(round(side), 2), h, w))
    top = int(np.clip(round(cy - side / 2), 0, h - side))
    left = int(np.clip(round(cx - side / 2), 0, w - side))
    return top, left, side


def crop(rgb: np.ndarray, region: np.ndarray, size: int) -> np.ndarray:
    """The square crop of ``rgb (H, W, 3)`` around ``region`` (mask coordinates) resized to ``size``²."""
    top, left, side = square_box(region)
    sy, sx = rgb.shape[0] / region.shape[0], rgb.shape[1] / region.shape[1]  # masks may be another size
    box = (round(left * sx), round(top * sy), round((left + side) * sx), round((top + side) * sy))
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR, box=box))


def clip_examples(sample: Sample, vocabulary: Sequence[str], image_size: int, sr: int) -> Examples:
    """The crops and labelled seconds of one clip (raises ``ValueError`` naming a bad file)."""
    crops, crop_labels, second_labels, keep = [], [], [], []
    wave = read_wav(sample.audio_path, sr=sr)
    n_seconds = min(len(wave) // sr, sample.n_frames)
    for t, (has_gt, mask_path) in enumerate(zip(sample.gt_frames, sample.mask_paths)):
        if not has_gt:
            continue
        regions = mask_classes(read_mask(mask_path, sample.dataset), sample, vocabulary)
        if not regions:
            continue
        rgb = read_rgb(sample.frame_paths[t])
        for k, region in regions.items():
            crops.append(crop(rgb, region, image_size))
            crop_labels.append(k)
        if t < n_seconds:
            keep.append(t)
            second_labels.append(tuple(sorted(regions)))
    seconds = np.stack([wave[t * sr : (t + 1) * sr] for t in keep]) if keep else np.zeros((0, sr), np.float32)
    return Examples(_stack(crops, image_size), np.array(crop_labels, np.int64), seconds.astype(np.float32), second_labels)


def _stack(crops: list[np.ndarray], size: int) -> np.ndarray:
    return np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)


def split_examples(
    samples: Sequence[Sample], vocabulary: Sequence[str], image_size: int, sr: int,
    on_clip: Callable[[], None] | None = None,
) -> tuple[Examples, list[str]]:
    """All examples of ``samples`` and the reasons of the clips that could not be read (``uid: reason``)."""
    parts, failed = [], []
    for s in samples:
        try:
            parts.append(clip_examples(s, vocabulary, image_size, sr))
        except (ValueError, OSError) as err:
            failed.append(f"{s.uid}: {err}")
        if on_clip is not None:
            on_clip()
    if not parts:
        return Examples(_stack([], image_size), np.zeros(0, np.int64), np.zeros((0, sr), np.float32), []), failed
    return Examples(
        np.concatenate([p.crops for p in parts]),
        np.concatenate([p.crop_labels for p in parts]),
        np.concatenate([p.seconds for p in parts]),
        [lab for p in parts for lab in p.second_labels],
    ), failed


def towers_vocabulary(dataset: str) -> tuple[str, ...]:
    """The classes the towers' prompts name: the dataset's object vocabulary (as the extract text banks)."""
    if load_info(dataset).binary and dataset == "ms3":
        raise UserError("ms3 names no classes in its CSV: it cannot train towers (use avss or s4)")
    return object_vocabulary(dataset)
