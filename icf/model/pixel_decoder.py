"""Multi-scale deformable-attention pixel decoder (paper §4: "Multi-Scale Deformable Attention Transformer as the
pixel decoder", following COMBO / Mask2Former), in pure PyTorch.

The three coarsest backbone maps (strides 8, 16, 32) are projected to d, flattened into one token sequence
and refined by MSDeformAttn encoder layers: every token samples ``num_points`` locations per head and level
around its reference point with ``grid_sample`` and mixes them with learned weights (Deformable DETR's
sampling, no custom CUDA kernel). The stride-4 map is kept as a lateral; ``mask_features`` fuses it with the
(decoder-updated) stride-8 level into the per-pixel embedding the mask head dots with the queries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sine_position(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """2-D sine/cosine position encoding ``(h·w, dim)`` (DETR), normalised coordinates in (0, 2π]."""
    quarter = dim // 4
    freq = 10000 ** (torch.arange(quarter, device=device, dtype=dtype) / quarter)
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w * 2 * math.pi
    py, px = ys[:, None] / freq, xs[:, None] / freq  # (h, q), (w, q)
    py = torch.cat([py.sin(), py.cos()], -1)[:, None].expand(h, w, 2 * quarter)
    px = torch.cat([px.sin(), px.cos()], -1)[None].expand(h, w, 2 * quarter)
    pos = torch.cat([py, px], -1).reshape(h * w, 4 * quarter)
    return F.pad(pos, (0, dim - 4 * quarter))


def ms_deform_attn(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Multi-scale deformable attention core (Deformable DETR Eq. 3) with ``grid_sample``.

    Args:
        value: ``(N, S, M, Dh)`` values of all levels' tokens (S = Σ h_l·w_l), M heads.
        shapes: the (h_l, w_l) of each level, in token order.
        locations: ``(N, Q, M, L, P, 2)`` sampling points in [0, 1] (x, y).
        weights: ``(N, Q, M, L, P)`` attention weights (softmax over L·P).
    Returns: ``(N, Q, M·Dh)``.
    """
    n, _, m, dh = value.shape
    q, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    grids = 2 * locations - 1
    sampled = []
    for lvl, level_value in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        h, w = shapes[lvl]
        v = level_value.permute(0, 2, 3, 1).reshape(n * m, dh, h, w)
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(n * m, q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # (NM, Dh, Q, P)
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # (NM, Dh, Q, L·P)
    attn = weights.permute(0, 2, 1, 3, 4).reshape(n * m, 1, q, levels * points)
    return (stacked * attn).sum(-1).view(n, m, dh, q).permute(0, 3, 1, 2).reshape(n, q, m * dh)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module: offsets and weights predicted from the query."""

    def __init__(self, dim: int, levels: int, heads: int, points: int):
        super().__init__()
        self.levels, self.heads, self.points = levels, heads, points
        self.offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attn = nn.Linear(dim, heads * levels * points)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self._reset()

    def _reset(self) -> None:
        """Deformable DETR's initialisation: zero offset weights, biases on a ring of directions, uniform weights."""
        nn.init.zeros_(self.offsets.weight)
        theta = torch.arange(self.heads, dtype=torch.float32) * (2 * math.pi / self.heads)
        ring = torch.stack([theta.cos(), theta.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        ring = ring.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        ring = ring * torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attn.weight)
        nn.init.zeros_(self.attn.bias)
        nn.init.xavier_uniform_(self.value.weight)
        nn.init.zeros_(self.value.bias)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, query: Tensor, reference: Tensor, value: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query ``(N, Q, d)``, reference ``(N, Q, 2)`` in [0, 1], value tokens ``(N, S, d)`` → ``(N, Q, d)``."""
        n, q, _ = query.shape
        m, lv, p = self.heads, self.levels, self.points
        v = self.value(value).view(n, value.shape[1], m, -1)
        offsets = self.offsets(query).view(n, q, m, lv, p, 2)
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)  # (L, 2) as (x, y)
        locations = reference[:, :, None, None, None, :] + offsets / norm[None, None, None, :, None, :]
        weights = self.attn(query).view(n, q, m, lv * p).softmax(-1).view(n, q, m, lv, p)
        return self.out(ms_deform_attn(v, shapes, locations, weights))


class DeformEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention over all levels, then an FFN."""

    def __init__(self, dim: int, ffn: int, levels: int, heads: int, points: int, dropout: float):
        super().__init__()
        self.attn = MSDeformAttn(dim, levels, heads, points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        src = self.norm1(src + self.drop(self.attn(src + pos, reference, src, shapes)))
        return self.norm2(src + self.drop(self.ffn(src)))


def _proj(cin: int, dim: int, kernel: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, dim, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(_groups(dim), dim))


def _groups(dim: int) -> int:
    return math.gcd(32, dim)


class PixelDecoder(nn.Module):
    """Backbone maps (strides 4, 8, 16, 32) → refined levels (strides 8, 16, 32) and a stride-4 lateral.

    ``forward`` returns ``(levels, lateral)``: ``levels`` a list of ``(N, d, h_l, w_l)`` ordered fine → coarse,
    ``lateral`` ``(N, d, H/4, W/4)``. ``mask_features(levels, lateral)`` gives the per-pixel embedding
    ``(N, d, H/4, W/4)`` (``mask_features_tapped`` also its pre-ReLU map).
    """

    def __init__(self, in_channels: list[int], dim: int, ffn: int, layers: int, heads: int, points: int, dropout: float):
        super().__init__()
        self.dim = dim
        self.inputs = nn.ModuleList(_proj(c, dim) for c in in_channels[1:])
        self.level_embed = nn.Parameter(torch.randn(len(self.inputs), dim) * 0.02)
        self.layers = nn.ModuleList(DeformEncoderLayer(dim, ffn, len(self.inputs), heads, points, dropout) for _ in range(layers))
        self.lateral = _proj(in_channels[0], dim)
        self.output = nn.Sequential(_proj(dim, dim, 3), nn.ReLU(inplace=True))

    def level_positions(self, shapes: list[tuple[int, int]], like: Tensor) -> list[Tensor]:
        """Sine position + level embedding per level, ``(h_l·w_l, d)`` each (also used by the query decoder)."""
        return [sine_position(h, w, self.dim, like.device, like.dtype) + self.level_embed[i] for i, (h, w) in enumerate(shapes)]

    @staticmethod
    def _reference(shapes: list[tuple[int, int]], like: Tensor) -> Tensor:
        """Pixel-centre reference points of all levels ``(S, 2)`` (x, y) in [0, 1]."""
        refs = []
        for h, w in shapes:
            ys, xs = torch.meshgrid(
                (torch.arange(h, device=like.device, dtype=like.dtype) + 0.5) / h,
                (torch.arange(w, device=like.device, dtype=like.dtype) + 0.5) / w,
                indexing="ij",
            )
            refs.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        return torch.cat(refs)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], Tensor]:
        maps = [proj(f) for proj, f in zip(self.inputs, feats[1:])]
        shapes = [(m.shape[-2], m.shape[-1]) for m in maps]
        n = maps[0].shape[0]
        src = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (N, S, d)
        pos = torch.cat(self.level_positions(shapes, src))[None]
        reference = self._reference(shapes, src)[None].expand(n, -1, -1)
        for layer in self.layers:
            src = layer(src, pos, reference, shapes)
        levels = [t.transpose(1, 2).reshape(n, self.dim, h, w) for t, (h, w) in zip(src.split([h * w for h, w in shapes], 1), shapes)]
        return levels, self.lateral(feats[0])

    def mask_features(self, levels: list[Tensor], lateral: Tensor) -> Tensor:
        """FPN step: stride-4 lateral + upsampled stride-8 level → 3×3 conv → ``(N, d, H/4, W/4)``."""
        return self.mask_features_tapped(levels, lateral)[0]

    def mask_features_tapped(self, levels: list[Tensor], lateral: Tensor) -> tuple[Tensor, Tensor]:
        """`mask_features` and the same map before its final ReLU (signed; CDCL's ``cdcl_visual = "pre_relu"`` tap)."""
        up = F.interpolate(levels[0], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        pre = self.output[0](lateral + up)
        return F.relu(pre), pre
