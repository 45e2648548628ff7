"""VGGish (Hershey et al. 2017) in the layout of the torchvggish port, without PCA postprocessing.

Input is one log-Mel patch per example, ``(N, 1, 96, 64)`` (0.96 s × 64 mel bands, the mel stage's
output); output is the 128-d embedding ``(N, 128)``. Parameter names follow torchvggish
(``features.<i>.*`` for the conv stack, ``embeddings.<i>.*`` for the MLP), so its released
``vggish-10086976.pth`` state dict loads directly. Widths are arguments so the tiny preset can use a
narrow copy of the same architecture.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from icf.encoders.spec import load_strict, read_checkpoint

# conv widths per block; each block ends with a 2×2 max-pool: 96×64 → 6×4
VGGISH_CHANNELS = ((64,), (128,), (256, 256), (512, 512))
PATCH_FRAMES, MEL_BANDS = 96, 64


def _conv_stack(channels: tuple[tuple[int, ...], ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = 1
    for block in channels:
        for out in block:
            layers += [nn.Conv2d(width, out, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            width = out
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """log-Mel patches ``(N, 1, 96, 64)`` → embeddings ``(N, embed_dim)``.

    Args:
        weights: local torchvggish-style state dict (``vggish-10086976.pth``), or None (random init).
        channels: conv widths per block (default: VGGish's 64-128-256²-512²).
        hidden: width of the two hidden fully connected layers (default 4096).
        embed_dim: embedding size (default 128).
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        channels: tuple[tuple[int, ...], ...] = VGGISH_CHANNELS,
        hidden: int = 4096,
        embed_dim: int = 128,
    ):
        super().__init__()
        self.features = _conv_stack(channels)
        grid = (PATCH_FRAMES // 2 ** len(channels)) * (MEL_BANDS // 2 ** len(channels))
        self.embeddings = nn.Sequential(
            nn.Linear(channels[-1][-1] * grid, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, embed_dim),
            nn.ReLU(inplace=True),
        )
        self.embed_dim = embed_dim
        if weights is not None:
            load_strict(self, read_checkpoint(weights, "VGGish"), weights, "VGGish")

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``(N, 1, 96, 64)`` → ``(N, embed_dim)``."""
        if mel.ndim != 4 or mel.shape[1:] != (1, PATCH_FRAMES, MEL_BANDS):
            expected = (1, PATCH_FRAMES, MEL_BANDS)
            raise ValueError(f"VGGish expects log-Mel patches (N, *{expected}), got {tuple(mel.shape)}")
        x = self.features(mel)  # (N, C, 6, 4)
        # flatten in (time, freq, channel) order, the order of the original TensorFlow weights
        x = x.permute(0, 2, 3, 1).flatten(1)
        return self.embeddings(x)
