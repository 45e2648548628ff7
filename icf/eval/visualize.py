"""PNG panels of clips: the frames, the ground truth and the prediction overlaid in palette colours.

One panel per clip, three rows × T columns (frames without GT show the frame in the GT row; padded
frames are left out): row 1 the frame, row 2 the GT overlay, row 3 the predicted overlay.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from icf.data.shards import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from icf.config import ModelConfig
    from icf.data.shards import ShardSet

ALPHA = 0.55
GAP = 2
MIN_TILE = 160  # small frames (the tiny preset's 64 px) are enlarged, nearest-neighbour, to at least this side


def denormalise(frames: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised ``(T, 3, H, W)`` → uint8 ``(T, H, W, 3)``."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = (frames.cpu().float() * std + mean).clamp(0, 1) * 255
    return rgb.round().byte().permute(0, 2, 3, 1).numpy()


def region_edges(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: non-background pixels with a 4-neighbour of another id (or on the image border)."""
    padded = np.pad(ids.astype(np.int64), 1, constant_values=-1)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre) | (padded[2:, 1:-1] != centre) | (padded[1:-1, :-2] != centre) | (padded[1:-1, 2:] != centre)
    )
    return differs & (ids > 0)


def overlay(rgb: np.ndarray, ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Blend the palette colour of every non-background pixel of ``ids (H, W)`` into ``rgb (H, W, 3)`` and
    outline each region in white, so a mask stays visible when its colour resembles the object's."""
    out = rgb.astype(np.float32)
    fg = ids > 0
    out[fg] = (1 - ALPHA) * out[fg] + ALPHA * palette[ids[fg]].astype(np.float32)
    out[region_edges(ids)] = 255.0
    return out.round().astype(np.uint8)


def clip_panel(frames: torch.Tensor, gt_masks: torch.Tensor, gt: torch.Tensor, pred: torch.Tensor,
               valid: torch.Tensor, palette: np.ndarray) -> np.ndarray:
    """One clip → uint8 panel ``(3·H + 2·GAP, n·W + (n-1)·GAP, 3)`` over its ``n`` real frames.

    Args:
        frames: ``(T, 3, H, W)`` normalised; gt_masks, pred: ``(T, H, W)`` class ids (0/1 for binary);
        gt, valid: ``(T,)`` bool.
    """
    rgb = denormalise(frames)
    cols = []
    for t in valid.nonzero().flatten().tolist():
        gt_view = overlay(rgb[t], gt_masks[t].numpy(), palette) if gt[t] else rgb[t]
        cols.append([rgb[t], gt_view, overlay(rgb[t], pred[t].numpy(), palette)])
    h, w = rgb.shape[1:3]
    panel = np.full((3 * h + 2 * GAP, len(cols) * w + (len(cols) - 1) * GAP, 3), 255, np.uint8)
    for c, col in enumerate(cols):
        for r, img in enumerate(col):
            panel[r * (h + GAP) : r * (h + GAP) + h, c * (w + GAP) : c * (w + GAP) + w] = img
    return panel


def panel_palette(colors: tuple[tuple[int, int, int], ...], binary: bool) -> np.ndarray:
    """The overlay colours: the dataset palette, with a visible foreground colour for binary masks."""
    if binary:
        return np.array([[0, 0, 0], [255, 64, 32]], np.uint8)
    return np.asarray(colors, np.uint8)


def save_panels(batch: dict, pred_ids: torch.Tensor, out: Path, palette: np.ndarray) -> list[Path]:
    """Write ``out/<uid>.png`` for every clip of ``batch``; ``pred_ids (B, T, H, W)`` class ids or 0/1."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for b, uid in enumerate(batch["uid"]):
        panel = clip_panel(batch["frames"][b], batch["masks"][b], batch["gt"][b], pred_ids[b].cpu(), batch["valid"][b], palette)
        path = out / f"{uid.replace('/', '_')}.png"
        image = Image.fromarray(panel)
        scale = -(-MIN_TILE // batch["frames"].shape[-1])
        if scale > 1:
            image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
        image.save(path)
        paths.append(path)
    return paths


@torch.no_grad()
def write_panels(model: torch.nn.Module, shards: ShardSet, split: str, model_cfg: ModelConfig, out: Path,
                 limit: int | None = None) -> list[Path]:
    """Predict the first ``limit`` clips of ``split`` and write one panel per clip into ``out``."""
    from icf.data.manifests import load_info
    from icf.eval.evaluate import batches

    palette = panel_palette(load_info(shards.dataset).palette, model_cfg.binary)
    device = next(model.parameters()).device
    paths: list[Path] = []
    for batch in batches(shards, split, model_cfg.image_size, limit):
        pred = model.predict({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).cpu()
        ids = (pred > 0.5).long() if model_cfg.binary else pred
        paths += save_panels(batch, ids, out, palette)
    return paths
