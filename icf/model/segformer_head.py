"""SegFormer's all-MLP decoder (Xie et al. 2021), DDESeg's mask decoder 𝒟 of Eq. 1 [code: models/seg_head.py].

Each of the four maps V^l ``(N, C_l, H/s_l, W/s_l)`` → a linear map to E channels (a 1×1 convolution), upsampled
(bilinear) to the first map's size (stride s_1: 4, or 2 with the official stride-2 first patch embedding); the four
are concatenated (4E) → 1×1 conv + BN + ReLU → E → Dropout2d(0.1) → 1×1 conv → ``(N, K_out, H/s_1, W/s_1)``.
The BN has the official ConvModule's eps 1e-3 and momentum 0.03 [code: backbones/pre_modules.py]. Initialisation
as the official head's: the per-level linear maps truncated-normal std 0.02 (they are ``nn.Linear`` there), the
other convolutions normal with std √(2 / fan_out), biases 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SegFormerHead(nn.Module):
    """Four maps → mask logits at the first map's stride s_1 ``(N, K_out, H/s_1, W/s_1)``."""

    def __init__(self, channels: list[int], embed: int, out_channels: int, dropout: float = 0.1):
        super().__init__()
        self.linear = nn.ModuleList(nn.Conv2d(c, embed, 1) for c in channels)
        self.fuse = nn.Sequential(nn.Conv2d(embed * len(channels), embed, 1, bias=False),
                                  nn.BatchNorm2d(embed, eps=1e-3, momentum=0.03),
                                  nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(embed, out_channels, 1)
        for conv in self.modules():
            if isinstance(conv, nn.Conv2d):
                if any(conv is lin for lin in self.linear):
                    nn.init.trunc_normal_(conv.weight, std=0.02)
                else:
                    nn.init.normal_(conv.weight, 0.0, (2.0 / (conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels)) ** 0.5)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def forward(self, maps: list[Tensor]) -> Tensor:
        size = maps[0].shape[-2:]
        up = [F.interpolate(lin(m), size=size, mode="bilinear", align_corners=False) for lin, m in zip(self.linear, maps)]
        return self.classify(self.dropout(self.fuse(torch.cat(up[::-1], dim=1))))
