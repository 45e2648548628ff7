"""Bilinear resizing as two small matrix products.

``F.interpolate(mode="bilinear")`` on CPU converts many-channel NCHW maps to channels-last and back, forward and
backward; on the tiny preset's (B·T, 71, 16, 16) → 64×64 AVSS logits that was a fifth of a training step. Bilinear
resizing is separable and linear: out = R_h · x · R_wᵀ with R (out × in) holding each output pixel's two
interpolation weights, so it runs as two batched matmuls with the same values (up to float summation order).
"""

from __future__ import annotations

import torch
from torch import Tensor


def bilinear_matrix(out_size: int, in_size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(out_size, in_size)`` weights of 1-D linear interpolation with ``align_corners=False`` (PyTorch's rule:
    source coordinate (i + ½)·in/out − ½, clamped at 0; the right neighbour clamped at the last pixel)."""
    src = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp_min(0)
    left = src.floor().long().clamp_max(in_size - 1)
    right = (left + 1).clamp_max(in_size - 1)
    frac = src - left
    rows = torch.arange(out_size)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    weights.index_put_((rows, left), 1 - frac, accumulate=True)
    weights.index_put_((rows, right), frac, accumulate=True)
    return weights.to(device=device, dtype=dtype)


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for ``x`` ``(…, h, w)`` → ``(…, H, W)``."""
    h, w = x.shape[-2:]
    rows = bilinear_matrix(size[0], h, x.device, x.dtype)
    cols = bilinear_matrix(size[1], w, x.device, x.dtype)
    return rows @ (x @ cols.T)  # the wide product first: one GEMM, then batched (H × h) products (measured fastest)
