"""`icf.model.backbone.Backbone`: four NCHW maps at strides 4…32 from any timm model, channels-last ones (Swin)
included; random weights only (no hub)."""

from __future__ import annotations

import pytest
import torch

from icf.config import preset
from icf.model.backbone import Backbone

SWIN_T = "swin_tiny_patch4_window7_224"


def test_swin_t_gives_four_nchw_maps_at_strides_4_to_32() -> None:
    """QDFormer's Swin-T: channels 96/192/384/768, NCHW. A non-square input (224 × 448, every stage a multiple of
    the 7×7 window) tells H from W, so a wrong permute cannot pass; each map is timm's NHWC map, permuted."""
    torch.manual_seed(0)
    backbone = Backbone(SWIN_T, kwargs={"img_size": (224, 448)}).eval()
    assert backbone.channels == [96, 192, 384, 768] and backbone.nhwc
    x = torch.randn(1, 3, 224, 448)
    with torch.no_grad():
        maps = backbone(x)
        raw = backbone.body(x)
    assert [tuple(m.shape) for m in maps] == [(1, c, 224 // s, 448 // s) for c, s in zip([96, 192, 384, 768], [4, 8, 16, 32])]
    for m, r in zip(maps, raw, strict=True):
        assert r.shape[-1] == m.shape[1]  # timm's map is channels-last
        assert torch.equal(m, r.permute(0, 3, 1, 2))


def test_swin_t_at_the_paper_size_feeds_the_preset() -> None:
    """The ``paper-swin-t`` preset names this backbone at 224² (timm's default window grid)."""
    model_cfg, _ = preset("paper-swin-t", "s4")
    assert (model_cfg.backbone, model_cfg.image_size) == (SWIN_T, 224)
    backbone = Backbone(model_cfg.backbone).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape[1:]) for m in maps] == [(96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7)]


@pytest.mark.parametrize("name", ["resnet18", "pvt_v2_b0"])
def test_channels_first_models_pass_through_unchanged(name: str) -> None:
    torch.manual_seed(0)
    kwargs = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 96]} if name == "resnet18" else None
    backbone = Backbone(name, kwargs=kwargs).eval()
    assert not backbone.nhwc
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        maps, raw = backbone(x), backbone.body(x)
    for m, r, c, s in zip(maps, raw, backbone.channels, [4, 8, 16, 32], strict=True):
        assert torch.equal(m, r) and tuple(m.shape) == (1, c, 64 // s, 96 // s)
