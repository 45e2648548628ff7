"""A timm backbone walked stage by stage, with a hook where audio enters each stage (DDESeg Eq. 1, Fig. 3 (a)).

`Backbone` (``features_only``) returns the four stride-4/8/16/32 maps in one call; a method that fuses audio
*inside* the visual encoder needs to change the features between and within stages. `StagedBackbone` builds
the same timm model (same names, same weights file) without ``features_only`` and runs its parts itself:

* PVT-v2 (``pvt_v2_*``): stage l = downsample (``patch_embed`` for stage 1), then blocks, then norm. The hook
  is called before each block j of the stage (``hook(l, j, x)``, x ``(N, C_l, h, w)``), as DDESeg's
  FAVSBackbone fuses after the downsample and before the blocks [code: favs_backbone.py].
* ResNet (``resnet*``): stem, then ``layer1..4``; the hook is called once after ``layer_l`` (j = 0).

``points(l)`` says how many hook points stage l has. With no hook (or the identity) the four maps equal
`Backbone`'s bit for bit (tests/test_ddeseg.py).

``first_stride=2`` (PVT only) gives the first patch embedding stride 2 instead of timm's 4, with the same weights
(the 7×7 convolution keeps its padding 3): all four stages then run at twice the resolution, strides 2/4/8/16,
as DDESeg's official FAVSBackbone (``OverlapPatchEmbed(patch_size=7, stride=2)`` [code: favs_backbone.py]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from icf.model.backbone import create_timm

Hook = Callable[[int, int, Tensor], Tensor]  # (stage l, point j, map (N, C_l, h, w)) → map


FIRST_STRIDES = (2, 4)


class StagedBackbone(nn.Module):
    """Frames ``(N, 3, H, W)`` → four maps ``(N, C_l, H/s_l, W/s_l)``, s = 4, 8, 16, 32 (``first_stride=2``:
    2, 4, 8, 16), with a per-stage hook.

    Attributes:
        channels: C_l of the four stages.
        kind: ``"pvt"`` or ``"resnet"``.
    """

    def __init__(self, name: str, weights: str | None = None, kwargs: dict[str, Any] | None = None,
                 first_stride: int = 4):
        super().__init__()
        if first_stride not in FIRST_STRIDES:
            raise ValueError(f"staged backbone: first_stride must be one of {FIRST_STRIDES}, got {first_stride!r}")
        if first_stride != 4 and not name.startswith("pvt_v2"):
            raise ValueError(f"staged backbone: first_stride={first_stride} needs a pvt_v2 backbone (its first patch "
                             f"embedding), not {name!r}")
        if name.startswith("pvt_v2"):
            self.kind = "pvt"
        elif name.startswith("resnet"):
            self.kind = "resnet"
        else:
            raise ValueError(f"staged backbone: {name!r} is neither a pvt_v2 nor a resnet timm model")
        self.body = create_timm(name, weights, kwargs, num_classes=0)
        info = self.body.feature_info[-4:]
        if [i["reduction"] for i in info] != [4, 8, 16, 32]:
            raise ValueError(f"backbone {name} gives feature strides {[i['reduction'] for i in info]}, expected [4, 8, 16, 32]")
        self.channels: list[int] = [int(i["num_chs"]) for i in info]
        if first_stride != 4:
            self.body.patch_embed.proj.stride = (first_stride, first_stride)  # same 7×7 weights, padding 3

    def points(self, stage: int) -> int:
        """Hook points of ``stage`` (0-based): its blocks (PVT) or 1 (ResNet, after the stage)."""
        return len(self.body.stages[stage].blocks) if self.kind == "pvt" else 1

    def forward(self, x: Tensor, hook: Hook | None = None) -> list[Tensor]:
        return self._pvt(x, hook) if self.kind == "pvt" else self._resnet(x, hook)

    def _resnet(self, x: Tensor, hook: Hook | None) -> list[Tensor]:
        b = self.body
        x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        maps = []
        for l, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4)):
            x = layer(x)
            if hook is not None:
                x = hook(l, 0, x)
            maps.append(x)
        return maps

    def _pvt(self, x: Tensor, hook: Hook | None) -> list[Tensor]:
        x = self.body.patch_embed(x)  # (N, h, w, C) channels last
        maps = []
        for l, stage in enumerate(self.body.stages):
            if stage.downsample is not None:
                x = stage.downsample(x)
            n, h, w, c = x.shape
            tokens = x.reshape(n, -1, c)
            for j, block in enumerate(stage.blocks):
                if hook is not None:
                    tokens = hook(l, j, tokens.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
                tokens = block(tokens, (h, w))
            x = stage.norm(tokens).reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
            maps.append(x)
        return maps
