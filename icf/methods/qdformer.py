"""``qdformer``: QDFormer (Li et al., CVPR 2024; `icf.model.qdformer`) — product-quantised audio decomposition,
global-to-local calibration and set-prediction masks, on the same shards as ICF (frames, masks, mel).

``icf train --method qdformer --dataset s4|ms3|avss --preset tiny|paper-r50|paper-pvt [--ablate quant,avsr,local,decompose]``.
Presets (`presets`, spec §2.4): the paper's AdamW (lr 1e-4, backbone ×0.5, weight decay 5e-4, batch 4) with a ×0.1
step at epoch 11 of 13 (S4/MS3) or 14 of 16 (AVSS); R2VOS's transformer sizes (4 encoder / 4 decoder layers, d 256,
FFN 2048, 8 heads, dropout 0.1); K = 128 codes, N = 5 tokens, aux losses on. ``paper-pvt`` stands in PVT-v2-b2
(25 M parameters) for the paper's Swin-T (28 M). ``tiny``: the project's tiny backbone and audio CNN, d 48, N 3,
K 16, one ASD layer, three decoder layers (one round over the levels), aux losses on, lr 1e-3.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from icf.config import ModelConfig, TrainConfig
from icf.methods.base import MethodSpec, check_choices, check_positive_ints
from icf.model.qdformer import COMPONENTS, QDFormer
from icf.model.vq import INITS

AVSR_ACTS = ("none", "sigmoid")


@dataclass(frozen=True)
class QDFormerOptions:
    """Options (``--set method.KEY=VALUE``).

    Attributes:
        codebook_size: K, codewords of the shared codebook (Eq. 2; the paper: K ≈ |Y|).
        num_tokens: N, semantic tokens = prototypes = decoder queries per frame.
        asd_layers: layers of the global and the local audio semantic decoder (Eq. 4, 6).
        mask_dim: D_m, channels of F^out (Eq. 7).
        dyn_channels, dyn_layers: width and depth of the dynamic mask convolution (CondInst: 8, 3).
        lambda_quant, lambda_com: λ_quant (Eq. 8) and λ_com (Eq. 9) (R2VOS: 0.5, 0.25).
        aux_loss: the set loss on every decoder layer, not only the last.
        cls_weight, l1_weight, giou_weight, mask_weight, dice_weight: λ of Eq. 10 (R2VOS: 2, 5, 2, 2, 5).
        bg_threshold: AVSS inference: background unless max_k S_k exceeds it.
        avsr_act: ``"none"`` (Eq. 5 as written) or ``"sigmoid"`` on the filters w_i.
        vq_init: ``"normal"`` (N(0, 1) codebook, R2VOS) or ``"first_batch"`` (codes start at the first batch's tokens).
        vq_restart: move a code no global token selected for this many training batches onto one of the next
            batch's tokens (`icf.model.vq`; against codebook collapse, measured); 0 = never (plain VQ; the paper is
            silent on dead codes).
    """

    codebook_size: int = 128
    num_tokens: int = 5
    asd_layers: int = 2
    mask_dim: int = 8
    dyn_channels: int = 8
    dyn_layers: int = 3
    lambda_quant: float = 0.5
    lambda_com: float = 0.25
    aux_loss: bool = True
    cls_weight: float = 2.0
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    mask_weight: float = 2.0
    dice_weight: float = 5.0
    bg_threshold: float = 0.5
    avsr_act: str = "none"
    vq_init: str = "normal"
    vq_restart: int = 20

    def __post_init__(self) -> None:
        check_positive_ints("qdformer", self, ("codebook_size", "num_tokens", "asd_layers", "mask_dim", "dyn_channels",
                                               "dyn_layers"))
        check_positive_ints("qdformer", self, ("vq_restart",), minimum=0)
        check_choices("qdformer", self, {"avsr_act": AVSR_ACTS, "vq_init": INITS})
        if not 0.0 < self.bg_threshold < 1.0:
            raise ValueError(f"method qdformer: bg_threshold must lie in (0, 1), got {self.bg_threshold}")


# dataset → (epochs, the epoch of the ×0.1 step) [paper §4]
PAPER_EPOCHS = {"s4": (13, 11), "ms3": (13, 11), "avss": (16, 14)}
PAPER_MODEL = dict(d_model=256, num_heads=8, ffn_dim=2048, enc_layers=4, dec_layers=4, dropout=0.1)  # R2VOS opts.py


def presets(name: str, model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig, dict]:
    """The project's preset ``name`` for the dataset (``model``, ``train``) → QDFormer's (module docstring)."""
    if name == "tiny":
        model = dataclasses.replace(model, dec_layers=3)  # one round over the three levels
        options = dict(num_tokens=3, codebook_size=16, asd_layers=1, mask_dim=8, aux_loss=True)
        return model, train, options
    if name not in ("paper-r50", "paper-pvt"):
        raise ValueError(f"method qdformer: unknown preset {name!r}")
    backbone = "resnet50" if name == "paper-r50" else "pvt_v2_b2"
    model = dataclasses.replace(model, backbone=backbone, **PAPER_MODEL)
    epochs, drop = PAPER_EPOCHS[model.dataset]
    train = dataclasses.replace(train, lr=1e-4, backbone_lr_mult=0.5, weight_decay=5e-4, batch_size=4, epochs=epochs,
                                schedule="step", milestones=(drop,), gamma=0.1, warmup_steps=0)
    return model, train, {"codebook_size": 128, "num_tokens": 5, "asd_layers": 2, "mask_dim": 8, "aux_loss": True}


def build(cfg: ModelConfig, options: QDFormerOptions, _res: object) -> QDFormer:
    return QDFormer(cfg, options)


METHOD = MethodSpec(
    name="qdformer",
    summary="QDFormer (Li et al. 2024): quantised audio decomposition + set-prediction masks",
    options=QDFormerOptions,
    components=COMPONENTS,
    requires=frozenset({"frames", "masks", "gt", "valid", "mel"}),
    audio_keys=("mel",),
    build=build,
    presets=presets,
)
