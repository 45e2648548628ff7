"""`icf.augment.frames` (``train.augment=ddeseg``): the box-constrained crop keeps frames and masks aligned and at
least 0.6 of the object's box, flips move both, the jitter touches frames only, all from the seed alone."""

from __future__ import annotations

import torch

from icf.augment.frames import TRANSFORMS, box_crop, clip_transform, ddeseg_augment, foreground_box, overlap
from icf.config import AUGMENTS

H, W = 40, 48
BOX = (20, 8, 44, 30)  # x0, y0, x1, y1: an asymmetric object near the right edge


def clip(t: int = 2, label: int = 3) -> dict:
    """``t`` identical frames: a white object (the mask's box, class ``label``) on black; GT on frame 0 only."""
    frames = torch.zeros(t, 3, H, W, dtype=torch.uint8)
    masks = torch.zeros(t, H, W, dtype=torch.int64)
    x0, y0, x1, y1 = BOX
    frames[:, :, y0:y1, x0:x1] = 255
    masks[0, y0:y1, x0:x1] = label
    gt = torch.zeros(t, dtype=torch.bool)
    gt[0] = True
    return {"frames": frames, "masks": masks, "gt": gt, "mel": torch.ones(t, 4), "meta": {"uid": "x"}}


def test_crop_and_flip_move_frame_and_mask_pixels_together_and_keep_the_box() -> None:
    area = (BOX[2] - BOX[0]) * (BOX[3] - BOX[1])
    sizes, kept, flipped = set(), [], 0
    for seed in range(200):
        out = ddeseg_augment(clip(), seed)
        f, m = out["frames"], out["masks"]
        assert f.dtype == torch.uint8 and m.dtype == torch.int64 and f.shape[-2:] == m.shape[-2:]
        bright = f[0].float().mean(0) > 128  # the jitter moves levels by at most ±20 % around the mean
        assert torch.equal(bright, m[0] == 3), seed  # frame pixels moved with mask pixels (crop, flip)
        assert torch.equal(f[0], f[1])  # one draw per clip: every frame gets the same crop, flip and jitter
        assert set(m.unique().tolist()) <= {0, 3} and int(m[1].abs().sum()) == 0
        kept.append(int((m[0] == 3).sum()) / area)
        sizes.add(tuple(f.shape[-2:]))
        cols = (m[0] == 3).any(0).nonzero()[:, 0]
        flipped += int(f.shape[-1] == W and int(cols[0]) == W - BOX[2])  # uncropped and mirrored
        assert torch.equal(out["mel"], torch.ones(2, 4)) and out["gt"].tolist() == [True, False]
    assert min(kept) >= 0.6  # the official constraint: at least 0.6 of the sounding object's box
    assert min(kept) < 1.0 and len(sizes) > 50  # crops happen, and sometimes cut into the box
    assert 0 < flipped


def test_the_seed_alone_decides_and_the_global_rng_is_untouched() -> None:
    state = torch.get_rng_state()
    a, b, c = ddeseg_augment(clip(), 5), ddeseg_augment(clip(), 5), ddeseg_augment(clip(), 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a["frames"], b["frames"]) and torch.equal(a["masks"], b["masks"])
    assert a["frames"].shape != c["frames"].shape or not torch.equal(a["frames"], c["frames"])


def test_jitter_changes_colours_of_frames_only() -> None:
    grey = clip()
    grey["frames"] = torch.full_like(grey["frames"], 120)
    grey["frames"][:, 0] = 180  # a colour, so saturation and hue have something to move
    changed = [not torch.equal(ddeseg_augment(grey, s)["frames"][0, :, 0, 0], grey["frames"][0, :, 0, 0]) for s in range(20)]
    assert sum(changed) >= 18


def test_box_crop_draws_and_refusals() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(300):  # no box: every draw is a crop inside the frame, with the official aspect range
        top, left, height, width = box_crop(H, W, None, g)
        assert 0 <= top and top + height <= H and 0 <= left and left + width <= W and height >= 1 and width >= 1
    box = (0, 0, 40, 40)
    results = [box_crop(100, 100, box, g) for _ in range(300)]
    assert any(r is None for r in results)  # a draw that keeps < 0.6 of the box leaves the frame whole
    assert all(overlap(box, r) >= 0.6 * 1600 for r in results if r is not None)


def test_foreground_box_and_overlap_by_hand() -> None:
    m = torch.zeros(2, 6, 7, dtype=torch.int64)
    m[0, 1:3, 2:4] = 1
    m[1, 4, 6] = 2
    assert foreground_box(m) == (2, 1, 7, 5)
    assert foreground_box(torch.zeros(1, 3, 3)) is None
    assert overlap((2, 1, 7, 5), (0, 0, 3, 4)) == 2 * 2  # crop rows 0–2, cols 0–3 ∩ box cols 2–6, rows 1–4
    assert overlap((0, 0, 2, 2), (5, 5, 2, 2)) == 0


def test_every_augment_choice_has_a_transform() -> None:
    assert set(TRANSFORMS) == set(AUGMENTS)
    assert clip_transform("none") is None and clip_transform("ddeseg") is ddeseg_augment
