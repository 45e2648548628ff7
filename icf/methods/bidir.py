"""``bidir``: the bidirectional-query baseline segmenter alone (ICF's baseline row, `icf.model.bidir`)."""

from __future__ import annotations

from dataclasses import dataclass

from icf.config import ModelConfig
from icf.methods.base import segmenter_method
from icf.model.bidir import BidirSegmenter


@dataclass(frozen=True)
class BidirOptions:
    """``channel_context``: the Eq. 1–2 channel context at the stride-32 level (supplement note 4; default on)."""

    channel_context: bool = True


def make(cfg: ModelConfig, options: BidirOptions) -> BidirSegmenter:
    return BidirSegmenter(cfg, channel_context=options.channel_context)


METHOD = segmenter_method("bidir", "bidirectional-query segmenter (ICF's baseline)", BidirOptions, make)
