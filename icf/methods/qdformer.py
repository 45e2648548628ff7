"""``qdformer``: QDFormer (Li et al., CVPR 2024; `icf.model.qdformer`) — product-quantised audio decomposition,
global-to-local calibration and set-prediction masks, on the same shards as ICF (frames, masks, mel).

``icf train --method qdformer --dataset s4|ms3|avss --preset tiny|paper-r50|paper-swin-t|paper-pvt
[--ablate quant,avsr,local,decompose]``. Presets (`presets`, spec §2.4): the paper's AdamW (lr 1e-4, backbone ×0.5,
weight decay 5e-4, batch 4) with a ×0.1 step at epoch 11 of 13 (S4/MS3) or 14 of 16 (AVSS); R2VOS's transformer
sizes (4 encoder / 4 decoder layers, d 256, FFN 2048, 8 heads, dropout 0.1), gradient clipping 0.1, fp32 and
D_m = 256 (`--mask_dim`); K = 128 codes, N = 5 tokens, aux losses on, plain VQ (no dead-code restart).
``paper-r50`` and ``paper-swin-t`` are the paper's Table 1 backbones (ResNet-50, Swin-Tiny: the headline rows);
``paper-pvt`` uses PVT-v2-b2 (25 M parameters), a size-matched extra. ``tiny``: the project's tiny backbone and audio
CNN, d 48, N 3, K 16, one ASD layer, three decoder layers (one round over the levels), aux losses on, D_m 8, dead-code
restart after 20 batches, lr 1e-3.
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
        vq_restart: re-seed a code no global token selected for this many training batches from the buffer of
            recent tokens (`icf.model.vq`, k-means++ seeding; against codebook collapse, measured on tiny); 0 = never
            (plain VQ: the paper and R2VOS have no restart; the paper presets set 0, tiny keeps 20).
        vq_buffer: how many recent global tokens (several batches) the restart re-seeds from.
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
    vq_buffer: int = 256

    def __post_init__(self) -> None:
        check_positive_ints("qdformer", self, ("codebook_size", "num_tokens", "asd_layers", "mask_dim", "dyn_channels",
                                               "dyn_layers", "vq_buffer"))
        check_positive_ints("qdformer", self, ("vq_restart",), minimum=0)
        check_choices("qdformer", self, {"avsr_act": AVSR_ACTS, "vq_init": INITS})
        if not 0.0 < self.bg_threshold < 1.0:
            raise ValueError(f"method qdformer: bg_threshold must lie in (0, 1), got {self.bg_threshold}")


# dataset → (epochs, the epoch of the ×0.1 step) [paper §4]
PAPER_EPOCHS = {"s4": (13, 11), "ms3": (13, 11), "avss": (16, 14)}
PAPER_MODEL = dict(d_model=256, num_heads=8, ffn_dim=2048, enc_layers=4, dec_layers=4, dropout=0.1)  # R2VOS opts.py
PAPER_BACKBONES = {"paper-r50": "resnet50", "paper-swin-t": "swin_tiny_patch4_window7_224", "paper-pvt": "pvt_v2_b2"}
# R2VOS opts.py: --mask_dim 256 (F^out = the dynamic conv's input), no restart, and the paper's K and N
PAPER_OPTIONS = {"codebook_size": 128, "num_tokens": 5, "asd_layers": 2, "mask_dim": 256, "aux_loss": True,
                 "vq_restart": 0}


def presets(name: str, model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig, dict]:
    """The project's preset ``name`` for the dataset (``model``, ``train``) → QDFormer's (module docstring)."""
    if name == "tiny":
        model = dataclasses.replace(model, dec_layers=3)  # one round over the three levels
        options = dict(num_tokens=3, codebook_size=16, asd_layers=1, mask_dim=8, aux_loss=True)
        return model, train, options
    if name not in PAPER_BACKBONES:
        raise ValueError(f"method qdformer: unknown preset {name!r}; expected tiny or one of {', '.join(PAPER_BACKBONES)}")
    model = dataclasses.replace(model, backbone=PAPER_BACKBONES[name], image_size=224, **PAPER_MODEL)
    epochs, drop = PAPER_EPOCHS[model.dataset]
    # R2VOS: --clip_max_norm 0.1, fp32 (no autocast)
    train = dataclasses.replace(train, lr=1e-4, backbone_lr_mult=0.5, weight_decay=5e-4, batch_size=4, epochs=epochs,
                                schedule="step", milestones=(drop,), gamma=0.1, warmup_steps=0, grad_clip=0.1,
                                amp=False)
    return model, train, dict(PAPER_OPTIONS)


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
