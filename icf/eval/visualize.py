"""PNG panels of clips: the frames, the ground truth and the prediction overlaid in palette colours.

One panel per clip, three labelled rows × T columns (frames without GT show the frame in the GT row;
padded frames are left out): "frames", "ground truth", "prediction". Under the prediction row each frame's
IoU (:func:`frame_iou`; "no GT" where the frame has none); at the bottom a legend of the class colours
that appear in the panel.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from icf.data.shards import IMAGENET_MEAN, IMAGENET_STD
from icf.pipeline.store import atomic_write

if TYPE_CHECKING:
    from icf.config import ModelConfig
    from icf.data.shards import ShardSet

ALPHA = 0.55
GAP = 2
MIN_TILE = 160  # small frames (the tiny preset's 64 px) are enlarged, nearest-neighbour, to at least this side
ROW_NAMES = ("frames", "ground truth", "prediction")
LABEL_W = 104  # left column holding the row names
TEXT_H = 20  # height of the IoU line and of each legend line
FONT_SIZE = 13


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


def frame_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of one frame's prediction with its GT, class-aware: pixels where both show the same object
    class over pixels where either shows an object (0/1 masks: the foreground IoU). 1.0 when both are empty."""
    union = (pred > 0) | (gt > 0)
    if not union.any():
        return 1.0
    return float(((pred == gt) & (gt > 0)).sum() / union.sum())


def legend_entries(ids: list[np.ndarray], names: tuple[str, ...], binary: bool) -> list[tuple[int, str]]:
    """``(id, name)`` of every non-background id in ``ids`` (``foreground`` for binary masks), sorted."""
    present = sorted({int(v) for a in ids for v in np.unique(a) if v > 0})
    return [(i, "sounding object" if binary else names[i]) for i in present]


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


def annotate(tiles: Image.Image, centres: list[float], ious: list[float | None], legend: list[tuple[int, str]],
             palette: np.ndarray) -> Image.Image:
    """Add the row names (left), the per-frame IoU line and the colour legend (below) to a tile grid.

    ``tiles`` is the 3-row grid (already enlarged); ``centres`` the x of each column's centre in it and
    ``ious`` its IoU (None: the frame has no GT).
    """
    font = _font()
    lines = _legend_lines(legend, tiles.width + LABEL_W, font)
    canvas = Image.new("RGB", (tiles.width + LABEL_W, tiles.height + TEXT_H * (1 + len(lines)) + 4), "white")
    canvas.paste(tiles, (LABEL_W, 0))
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(ROW_NAMES):
        draw.text((6, tiles.height * (r + 0.5) / 3), name, fill="black", font=font, anchor="lm")
    for x, iou in zip(centres, ious):
        text = "no GT" if iou is None else f"IoU {iou:.2f}"
        draw.text((LABEL_W + x, tiles.height + TEXT_H / 2 + 2), text, fill="black", font=font, anchor="mm")
    y = tiles.height + TEXT_H + 4
    for line in lines:
        x = 6
        for i, name in line:
            draw.rectangle((x, y + 4, x + 12, y + 16), fill=tuple(int(v) for v in palette[i]), outline="black")
            draw.text((x + 16, y + 10), name, fill="black", font=font, anchor="lm")
            x += _entry_width(name, font)
        y += TEXT_H
    return canvas


def _entry_width(name: str, font: ImageFont.ImageFont) -> int:
    return 16 + int(font.getlength(name)) + 14


def _legend_lines(legend: list[tuple[int, str]], width: int, font: ImageFont.ImageFont) -> list[list[tuple[int, str]]]:
    """Legend entries wrapped into lines that fit ``width`` pixels."""
    lines: list[list[tuple[int, str]]] = [[]]
    x = 6
    for entry in legend:
        w = _entry_width(entry[1], font)
        if lines[-1] and x + w > width:
            lines.append([])
            x = 6
        lines[-1].append(entry)
        x += w
    return [line for line in lines if line]


def panel_palette(colors: tuple[tuple[int, int, int], ...], binary: bool) -> np.ndarray:
    """The overlay colours: the dataset palette, with a visible foreground colour for binary masks."""
    if binary:
        return np.array([[0, 0, 0], [255, 64, 32]], np.uint8)
    return np.asarray(colors, np.uint8)


def save_panels(batch: dict, pred_ids: torch.Tensor, out: Path, palette: np.ndarray, names: tuple[str, ...] = (),
                binary: bool = False) -> list[Path]:
    """Write ``out/<uid>.png`` for every clip of ``batch``; ``pred_ids (B, T, H, W)`` class ids or 0/1;
    ``names`` the class names by id (for the legend)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    w = batch["frames"].shape[-1]
    scale = max(1, -(-MIN_TILE // w))
    for b, uid in enumerate(batch["uid"]):
        masks, pred, gt = batch["masks"][b].numpy(), pred_ids[b].cpu().numpy(), batch["gt"][b]
        frames = batch["valid"][b].nonzero().flatten().tolist()
        panel = clip_panel(batch["frames"][b], batch["masks"][b], gt, pred_ids[b].cpu(), batch["valid"][b], palette)
        tiles = Image.fromarray(panel)
        if scale > 1:
            tiles = tiles.resize((tiles.width * scale, tiles.height * scale), Image.Resampling.NEAREST)
        ious = [frame_iou(pred[t], masks[t]) if gt[t] else None for t in frames]
        shown = [masks[t] for t in frames if gt[t]] + [pred[t] for t in frames]
        centres = [scale * (c * (w + GAP) + w / 2) for c in range(len(frames))]
        image = annotate(tiles, centres, ious, legend_entries(shown, names, binary), palette)
        path = out / f"{uid.replace('/', '_')}.png"
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        atomic_write(path, buf.getvalue())  # a full disk names the file
        paths.append(path)
    return paths


@torch.no_grad()
def write_panels(model: torch.nn.Module, shards: ShardSet, split: str, model_cfg: ModelConfig, out: Path,
                 limit: int | None = None) -> list[Path]:
    """Predict the first ``limit`` clips of ``split`` and write one panel per clip into ``out``."""
    from icf.data.datasets import load_info
    from icf.eval.evaluate import batches

    info = load_info(shards.dataset)
    palette = panel_palette(info.palette, model_cfg.binary)
    device = next(model.parameters()).device
    paths: list[Path] = []
    for batch in batches(shards, split, model_cfg.image_size, limit):
        pred = model.predict({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).cpu()
        ids = (pred > 0.5).long() if model_cfg.binary else pred
        paths += save_panels(batch, ids, out, palette, info.classes, model_cfg.binary)
    return paths
