"""Dynamic mask convolution (QDFormer Eq. 7: M_{i,t} = f^out_t ∗ θ_{i,t}; CondInst, Tian et al. 2020, as ReferFormer
and R2VOS use it).

Every token i of frame t owns a tiny per-pixel MLP (``layers`` 1×1 convolutions, ``channels`` wide, ReLU between):
its input is [f^out_t; relative coordinates of the pixel to the token's reference point] (D_m + 2 channels), its
output one mask logit. θ_{i,t} holds all its weights and biases, P = (D_m+2)·c + c + (layers−2)·(c·c + c) + c + 1
numbers (c = ``channels``; for 3 layers, c = 8: (D_m+2)·8 + 8 + 8·8 + 8 + 8 + 1). It is run as one grouped
convolution with a group per (frame, token).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def layer_shapes(in_channels: int, channels: int = 8, layers: int = 3) -> list[tuple[int, int]]:
    """(out, in) of every 1×1 layer: in → c → … → c → 1."""
    if layers < 1:
        raise ValueError(f"dynamic conv needs at least one layer, got {layers}")
    widths = [in_channels] + [channels] * (layers - 1) + [1]
    return list(zip(widths[1:], widths[:-1]))


def param_count(in_channels: int, channels: int = 8, layers: int = 3) -> int:
    """P, the length of θ (module docstring)."""
    return sum(o * i + o for o, i in layer_shapes(in_channels, channels, layers))


def split_params(theta: Tensor, in_channels: int, channels: int = 8, layers: int = 3) -> list[tuple[Tensor, Tensor]]:
    """θ ``(M, P)`` → per layer (weights ``(M, out, in)``, biases ``(M, out)``); weights first, then biases (CondInst)."""
    shapes = layer_shapes(in_channels, channels, layers)
    sizes = [o * i for o, i in shapes] + [o for o, _ in shapes]
    parts = theta.split(sizes, dim=-1)
    m = theta.shape[0]
    return [(parts[k].reshape(m, o, i), parts[len(shapes) + k]) for k, (o, i) in enumerate(shapes)]


def relative_coords(reference: Tensor, h: int, w: int) -> Tensor:
    """Pixel centres minus reference points, in normalised image units: reference ``(…, 2)`` (x, y) in [0, 1] →
    ``(…, 2, h, w)``; zero at the pixel whose centre is the reference."""
    ys = (torch.arange(h, device=reference.device, dtype=reference.dtype) + 0.5) / h
    xs = (torch.arange(w, device=reference.device, dtype=reference.dtype) + 0.5) / w
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), 0)  # (2, h, w): x, y
    return grid - reference[..., :, None, None]


def dynamic_masks(features: Tensor, theta: Tensor, reference: Tensor, channels: int = 8, layers: int = 3) -> Tensor:
    """Eq. 7 for every (frame, token).

    Args:
        features: f^out ``(F, D_m, h, w)`` (F frames).
        theta: ``(F, N, P)`` dynamic parameters.
        reference: ``(F, N, 2)`` reference points (x, y) in [0, 1].
    Returns: mask logits ``(F, N, h, w)``.
    """
    f, dm, h, w = features.shape
    n = theta.shape[1]
    x = torch.cat([features[:, None].expand(f, n, dm, h, w), relative_coords(reference, h, w)], 2)  # (F, N, D_m+2, h, w)
    x = x.reshape(1, f * n * (dm + 2), h, w)
    params = split_params(theta.reshape(f * n, -1), dm + 2, channels, layers)
    for k, (weight, bias) in enumerate(params):
        x = F.conv2d(x, weight.reshape(-1, weight.shape[-1], 1, 1), bias.reshape(-1), groups=f * n)
        if k < len(params) - 1:
            x = F.relu(x)
    return x.reshape(f, n, h, w)


class Controller(nn.Module):
    """φ_segm: the 2-layer MLP d → d → P that turns a decoder token into θ (xavier weights, zero biases)."""

    def __init__(self, dim: int, params: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, params))
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(tokens)
