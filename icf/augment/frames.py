"""Training augmentation of frames and masks (``train.augment``), applied by the training loader only, to each
decoded clip before `icf.data.shards.collate` resizes it to the model's square size.

``ddeseg`` — DDESeg's official training transforms [code: dataload/data_augmentation.py, used by
dataload/data_load_aug_avss.py with ``aspect_ratio_range=(0.75, 1.33), min_area_ratio=0.6``], in their order:

1. box-constrained random crop (`box_crop`): aspect a ~ U(0.75, 1.33), area A ~ U(0.6·|box|, h·w), crop
   ``min(⌊√(A·a)⌋, w) × min(⌊√(A/a)⌋, h)`` at a uniform position; kept only when it holds at least 0.6 of the
   sounding object's box, else the frame stays whole (one draw, as the official code). The box is the bounding
   box of the GT foreground (mask ≠ 0; the official code reads it from a box file of the same objects), over the
   clip's GT frames; with no foreground every crop is kept (the box has area 0);
2. horizontal flip with probability 0.5 (frames and masks together);
3. colour jitter (brightness 0.2, contrast 0.2, saturation 0.2, hue 0.1; torchvision's ``ColorJitter``, random
   order) on the frames only.

One draw per clip: every frame of a clip gets the same crop, flip and jitter (under ``train.batch_unit=gt_frames``
a clip is one frame, as in the official per-frame loader). The draws come from ``seed`` alone
(`ShardStream.item_seed`: seed, epoch, position in the stream), under a forked torch RNG, so the global RNG the
model draws from is untouched and a resumed or multi-worker run sees the same augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive, pixels
Crop = tuple[int, int, int, int]  # (top, left, height, width)
ASPECT = (0.75, 1.33)
KEEP = 0.6  # share of the box a crop must keep
JITTER = dict(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1)


def foreground_box(masks: Tensor) -> Box | None:
    """Bounding box of the pixels ≠ 0 over masks ``(N, h, w)``, or None when there are none."""
    fg = (masks != 0).any(0)
    if not bool(fg.any()):
        return None
    rows, cols = fg.any(1).nonzero()[:, 0], fg.any(0).nonzero()[:, 0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def overlap(box: Box, crop: Crop) -> int:
    """Pixels of ``box`` inside ``crop``."""
    top, left, height, width = crop
    dx = min(box[2], left + width) - max(box[0], left)
    dy = min(box[3], top + height) - max(box[1], top)
    return max(0, dx) * max(0, dy)


def box_crop(h: int, w: int, box: Box | None, generator: torch.Generator,
             aspect: tuple[float, float] = ASPECT, keep: float = KEEP) -> Crop | None:
    """One draw of the box-constrained crop (module docstring, step 1) → ``(top, left, height, width)``, or None
    when the draw keeps less than ``keep`` of ``box`` (the frame stays whole)."""
    area = 0 if box is None else (box[2] - box[0]) * (box[3] - box[1])

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    a = uniform(*aspect)
    target = uniform(keep * area, h * w)
    width = max(1, min(int(math.sqrt(target * a)), w))
    height = max(1, min(int(math.sqrt(target / a)), h))
    left = int(torch.randint(0, w - width + 1, (), generator=generator))
    top = int(torch.randint(0, h - height + 1, (), generator=generator))
    crop = (top, left, height, width)
    return crop if box is None or overlap(box, crop) >= keep * area else None


def ddeseg_augment(clip: dict[str, Any], seed: int) -> dict[str, Any]:
    """DDESeg's transforms (module docstring) on a decoded clip: ``frames (T, 3, h, w)`` uint8 and ``masks (T, h, w)``
    change (crop → flip → jitter); every other entry is kept."""
    g = torch.Generator().manual_seed(seed)
    frames, masks = clip["frames"], tv_tensors.Mask(clip["masks"])
    crop = box_crop(frames.shape[-2], frames.shape[-1], foreground_box(masks[clip["gt"]]), g)
    if crop is not None:
        frames, masks = (v2.functional.crop(x, *crop) for x in (frames, masks))
    if float(torch.rand((), generator=g)) < 0.5:
        frames, masks = (v2.functional.horizontal_flip(x) for x in (frames, masks))
    with torch.random.fork_rng(devices=[]):  # ColorJitter draws from the global RNG: fork it, seeded from g
        torch.manual_seed(int(torch.randint(0, 2**62, (), generator=g)))
        frames = v2.ColorJitter(**JITTER)(frames)
    return {**clip, "frames": frames, "masks": masks.as_subclass(Tensor)}


TRANSFORMS: dict[str, Callable[[dict[str, Any], int], dict[str, Any]] | None] = {"none": None, "ddeseg": ddeseg_augment}


def clip_transform(name: str) -> Callable[[dict[str, Any], int], dict[str, Any]] | None:
    """The transform ``train.augment=name`` names (None for ``none``)."""
    return TRANSFORMS[name]
