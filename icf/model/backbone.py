"""Visual backbone: a timm model in ``features_only`` mode giving the four stride-4/8/16/32 feature maps.

``resnet50`` and ``pvt_v2_b0`` … ``b5`` are the paper's choices (§4, ImageNet-pretrained); ``swin_tiny_patch4_window7_224``
is QDFormer's Swin-T (timm gives its maps channels-last, NHWC; `Backbone` permutes them to NCHW); the tiny preset
uses timm's ``resnet18`` builder with one block per stage and narrow channels (``backbone_kwargs``).
Pretrained weights are read only from a local file (timm's ``pretrained_cfg_overlay={"file": ...}``, the
state dict of the full classification model); without one the backbone is randomly initialised.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Format
from torch import Tensor, nn

from icf.clitools import UserError
from icf.encoders.spec import first_line


class BackboneWeightsError(UserError):
    """The backbone weights file is missing, cannot be read safely, or does not fit the architecture."""


def create_timm(name: str, weights: str | None, kwargs: dict[str, Any] | None, **create: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs, **create)`` with its weights read only from the local file ``weights``
    (None: random init); `BackboneWeightsError` naming the file when it is missing, holds more than tensors
    (timm reads it with ``weights_only``: a pickled payload is refused, never run) or does not fit."""
    if weights is not None and not Path(weights).expanduser().is_file():
        raise BackboneWeightsError(f"backbone weights {weights}: file does not exist")
    extra: dict[str, Any] = dict(kwargs or {})
    if weights is not None:
        extra["pretrained_cfg_overlay"] = {"file": str(Path(weights).expanduser())}
    try:
        return timm.create_model(name, pretrained=weights is not None, **create, **extra)
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:  # unreadable, or a state-dict mismatch
        reason = first_line(err)
        if isinstance(err, (pickle.UnpicklingError, EOFError)) or "weights_only" in reason or "pickle" in reason:
            raise BackboneWeightsError(f"backbone weights {weights}: cannot be read as a torch checkpoint of tensors "
                                       f"({reason})") from err
        raise BackboneWeightsError(f"backbone weights {weights}: do not fit {name} ({reason})") from err


class Backbone(nn.Module):
    """Frames ``(N, 3, H, W)`` → four maps ``(N, C_i, H/s_i, W/s_i)`` with s = 4, 8, 16, 32 (NCHW whatever layout
    the timm model gives: Swin's NHWC maps are permuted).

    Attributes:
        channels: C_i of the four maps.
        layout: the memory format of the weights and the input, channels-last (NHWC strides; the maps come out
            channels-last too): the same values as NCHW, but CPU max-pooling over NCHW maps is 5-10x slower and
            the convolutions run without layout conversions.
    """

    layout = torch.channels_last

    def __init__(self, name: str, weights: str | None = None, kwargs: dict[str, Any] | None = None):
        super().__init__()
        self.body = create_timm(name, weights, kwargs, features_only=True, out_indices=(-4, -3, -2, -1))
        reductions = self.body.feature_info.reduction()
        if list(reductions) != [4, 8, 16, 32]:
            raise ValueError(f"backbone {name} gives feature strides {reductions}, expected [4, 8, 16, 32]")
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.nhwc = Format(getattr(self.body, "output_fmt", Format.NCHW)) == Format.NHWC
        self.body.to(memory_format=self.layout)

    def forward(self, x: Tensor) -> list[Tensor]:
        maps = self.body(x.contiguous(memory_format=self.layout))
        return [m.permute(0, 3, 1, 2) for m in maps] if self.nhwc else maps
