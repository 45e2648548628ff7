"""Audio encoder on the cached log-Mel patches (one 0.96 s patch per frame, VGGish framing).

``vggish`` (paper §4): `icf.encoders.vggish.VGGish` (128-d embedding per patch, weights from a local
torchvggish state dict) followed by a linear map to d. With loaded weights and ``freeze_audio`` the VGGish
stays fixed, as in AVSBench-style baselines; with random weights it is always trained (a frozen random
tower would carry no information). ``cnn`` (tiny preset): a few conv–BN–ReLU–pool blocks, global pooling
and a linear map to d. With ``project=False`` the linear map (and its LayerNorm) is not built and the encoder
gives the body's raw embedding (VGGish: 128-d), as the official AVSBench TPAVI reads it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from icf.config import ModelConfig
from icf.encoders.vggish import VGGish

log = logging.getLogger("icf.model")


def _small_cnn(channels: tuple[int, ...]) -> nn.Sequential:
    """conv–BN–ReLU–pool blocks, the max-pool applied before the ReLU: max and ReLU commute (same values and the
    same gradients, the argmax of a window with a positive maximum being the same either way), and the ReLU then
    runs on a quarter of the pixels."""
    layers: list[nn.Module] = []
    width = 1
    for out in channels:
        layers += [nn.Conv2d(width, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.MaxPool2d(2), nn.ReLU(inplace=True)]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


class AudioEncoder(nn.Module):
    """log-Mel ``(B, T, 96, 64)`` → audio features A ``(B, T, d)`` (paper §3.1), or the raw embedding
    ``(B, T, width)`` when ``project`` is False.

    Attributes:
        width: the output width (d, or the body's embedding width without the projection).
        layout: the memory format of the body's weights and input, channels-last (NHWC strides): the same values
            as NCHW, but CPU max-pooling and BatchNorm over NCHW maps with few channels are several times slower
            (tiny preset: the audio CNN took a fifth of a training step).
    """

    layout = torch.channels_last

    def __init__(self, cfg: ModelConfig, project: bool = True):
        super().__init__()
        if cfg.audio_encoder == "vggish":
            vggish = VGGish(weights=cfg.audio_weights)
            if cfg.audio_weights is None:
                log.warning("audio encoder: VGGish with RANDOM initialisation (no audio_weights); it will be trained")
            elif cfg.freeze_audio:
                vggish.requires_grad_(False)
            self.body: nn.Module = vggish
            width = vggish.embed_dim
        else:
            self.body = _small_cnn(cfg.audio_channels)
            width = cfg.audio_channels[-1]
        self.body.to(memory_format=self.layout)
        self.proj = nn.Sequential(nn.Linear(width, cfg.d_model), nn.LayerNorm(cfg.d_model)) if project else nn.Identity()
        self.width = cfg.d_model if project else width

    def forward(self, mel: Tensor) -> Tensor:
        b, t = mel.shape[:2]
        feats = self.body(mel.reshape(b * t, 1, *mel.shape[2:]).contiguous(memory_format=self.layout))
        return self.proj(feats).view(b, t, -1)
