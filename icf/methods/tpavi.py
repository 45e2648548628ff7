"""``tpavi``: the official AVSBench baseline (Zhou et al., ECCV 2022; `icf.model.tpavi`), alone or under ICF
(``icf train --method icf --set method.segmenter=tpavi``, the paper's Table 3)."""

from __future__ import annotations

from dataclasses import dataclass

from icf.config import ModelConfig
from icf.methods.base import segmenter_method
from icf.model.tpavi import STAGES, TPAVISegmenter, check_options


@dataclass(frozen=True)
class TPAVIOptions:
    """Options (``--set method.KEY=VALUE``).

    Attributes:
        tpavi_stages: 0-based backbone stages with a TPAVI block (official ``--tpavi_stages 0 1 2 3``).
        loss: ``"official"`` (S4: BCE; MS3: BCE + 0.5·AVM; AVSS: CE + 0.5·AVM) or ``"eq18"`` (the project's loss).
            Only the plain ``tpavi`` method uses it: under ICF the loss is ICF's Eq. 19.
        avm_weight: λ_1 of the AVM audio–visual matching term; unset: the official value of the dataset.
    """

    tpavi_stages: tuple[int, ...] = STAGES
    loss: str = "official"
    avm_weight: float | None = None

    def __post_init__(self) -> None:
        check_options(tuple(self.tpavi_stages), self.loss)


def make(cfg: ModelConfig, options: TPAVIOptions) -> TPAVISegmenter:
    return TPAVISegmenter(cfg, stages=tuple(options.tpavi_stages), loss=options.loss, avm_weight=options.avm_weight)


METHOD = segmenter_method("tpavi", "AVSBench TPAVI baseline (Zhou et al. 2022)", TPAVIOptions, make)
