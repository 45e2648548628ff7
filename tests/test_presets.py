"""Each method's presets are its authors' recipe: one table row per (method, preset, dataset) with the values the
resolved configs must hold (`icf.train.trainer.build_configs`: project preset → method preset; no overrides).

Keys are ``model.X`` / ``train.X`` (ModelConfig / TrainConfig fields) and ``method.X`` (the method's options with
their defaults filled in). Sources: ICF §4 and supplement Table 1 (the project's decisions beyond them are rows of
ARCHITECTURE.md's ICF table); QDFormer §4 and R2VOS ``opts.py`` / ``models/referformer.py``; TPAVI the official
AVSBench ``train.py`` / ``train.sh``; DDESeg ``configs/ddeseg.yaml`` and ``train.py``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from icf import methods
from icf.config import PRESETS
from icf.data.sample import DATASETS
from icf.train.run import RunSpec
from icf.train.trainer import build_configs

# ---- the dataset's own fields (`icf.data.datasets`) ---------------------------------------------------------
S4 = {"model.num_classes": 1, "model.frames": 5, "model.segment_div": 2}
MS3 = {"model.num_classes": 1, "model.frames": 5, "model.segment_div": 2}
AVSS = {"model.num_classes": 71, "model.frames": 10, "model.segment_div": 4}

# ---- ICF (Zha et al. 2025) ------------------------------------------------------------------------------------
# §4: 224², AdamW lr 1e-4, batch 8, 60 epochs, d 256, VGGish; supplement Table 1: every loss weight, k^t 15, k^c 8,
# s^d 200. Then the project's decisions the paper does not state (ARCHITECTURE.md, ICF table, "unstated optimiser
# settings"): weight decay 1e-4, poly decay, backbone lr ×0.1, clipping 1.0, bf16 autocast, λ_mit 0.2.
ICF_PAPER = {
    "model.image_size": 224, "model.audio_encoder": "vggish", "model.freeze_audio": True, "model.d_model": 256,
    "model.lambda_z": 0.8, "model.lambda_ortho": 1.0, "model.lambda_bce": 1.0, "model.lambda_dice": 1.0,
    "model.lambda_focal": 1.0, "model.lambda_cf": 0.2, "model.lambda_cdcl": 0.2, "model.lambda_va": 0.4,
    "model.lambda_vl": 0.3, "model.lambda_al": 0.3, "model.k_t": 15, "model.k_c": 8, "model.cf_start_step": 200,
    "model.alpha_range": (0.7, 0.8), "model.lambda_mit": 0.2,
    "train.lr": 1e-4, "train.batch_size": 8, "train.epochs": 60,
    "train.weight_decay": 1e-4, "train.schedule": "poly", "train.warmup_steps": 0, "train.backbone_lr_mult": 0.1,
    "train.grad_clip": 1.0, "train.amp": True,
    "method.segmenter": "bidir",
}
ICF_TINY = {
    "model.image_size": 64, "model.backbone": "resnet18", "model.audio_encoder": "cnn", "model.d_model": 48,
    "model.dec_layers": 3, "model.k_t": 3, "model.k_c": 2, "model.lambda_mit": 0.2,
    "train.lr": 1e-3, "train.batch_size": 4, "train.epochs": 30, "train.weight_decay": 1e-4, "train.schedule": "poly",
    "train.grad_clip": 1.0,
}
R50, PVT_B5, SWIN_T = ({"model.backbone": b} for b in ("resnet50", "pvt_v2_b5", "swin_tiny_patch4_window7_224"))

# ---- QDFormer (Li et al. 2024) ----------------------------------------------------------------------------------
# §4: AdamW lr 1e-4, backbone ×0.5, weight decay 5e-4, batch 4, ×0.1 at the 11th of 13 (S4/MS3) / 14th of 16 (AVSS)
# epoch, K 128, N 5, eval at 224. R2VOS opts.py: 4 + 4 transformer layers, d 256, FFN 2048, 8 heads, dropout 0.1,
# --mask_dim 256, --dynamic_mask_channels 8, 3 controller layers, aux losses, --clip_max_norm 0.1, loss weights
# cls 2 / L1 5 / GIoU 2 / mask 2 / dice 5, VQ_loss_coef 0.5, commitment 0.25; fp32; plain VQ (no restart).
QD_PAPER = {
    "model.image_size": 224, "model.d_model": 256, "model.num_heads": 8, "model.ffn_dim": 2048,
    "model.enc_layers": 4, "model.dec_layers": 4, "model.dropout": 0.1,
    "train.lr": 1e-4, "train.backbone_lr_mult": 0.5, "train.weight_decay": 5e-4, "train.batch_size": 4,
    "train.schedule": "step", "train.gamma": 0.1, "train.warmup_steps": 0, "train.grad_clip": 0.1, "train.amp": False,
    "method.codebook_size": 128, "method.num_tokens": 5, "method.asd_layers": 2, "method.mask_dim": 256,
    "method.dyn_channels": 8, "method.dyn_layers": 3, "method.aux_loss": True, "method.lambda_quant": 0.5,
    "method.lambda_com": 0.25, "method.cls_weight": 2.0, "method.l1_weight": 5.0, "method.giou_weight": 2.0,
    "method.mask_weight": 2.0, "method.dice_weight": 5.0, "method.vq_restart": 0, "method.vq_init": "normal",
}
QD_13 = {"train.epochs": 13, "train.milestones": (11,)}  # S4, MS3
QD_16 = {"train.epochs": 16, "train.milestones": (14,)}  # AVSS
QD_R50, QD_SWIN, QD_PVT = ({"model.backbone": b} for b in ("resnet50", "swin_tiny_patch4_window7_224", "pvt_v2_b2"))
# tiny: the project's tiny architecture (64 px, d 48), N 3, K 16, one ASD layer, 3 decoder layers, D_m 8, restart 20
QD_TINY = {
    "model.image_size": 64, "model.backbone": "resnet18", "model.d_model": 48, "model.dec_layers": 3,
    "train.lr": 1e-3, "train.batch_size": 4, "train.epochs": 30, "train.grad_clip": 1.0,
    "method.num_tokens": 3, "method.codebook_size": 16, "method.asd_layers": 1, "method.mask_dim": 8,
    "method.aux_loss": True, "method.vq_restart": 20,
}

# ---- TPAVI (AVSBench, Zhou et al. 2022) ------------------------------------------------------------------------
# avs_scripts/*/train.py: torch.optim.Adam(model.parameters(), lr 1e-4): no weight decay, one lr, no scheduler, no
# clipping, fp32; batch 4; epochs 15 (S4 train.py default), 30 (avs_ms3/train.sh), 60 (avss/train.sh); VGGish frozen;
# the raw 128-d VGGish embedding into TPAVI's align, 5-frame windows (pre_reshape_for_tpavi).
TPAVI_PAPER = {
    "model.image_size": 224, "model.audio_encoder": "vggish", "model.freeze_audio": True, "train.lr": 1e-4,
    "train.weight_decay": 0.0, "train.schedule": "constant", "train.backbone_lr_mult": 1.0, "train.batch_size": 4,
    "train.amp": False, "train.grad_clip": 0.0, "train.warmup_steps": 0,
    "method.audio_path": "official", "method.window": 5,
}
TPAVI_EPOCHS = {"s4": {"train.epochs": 15}, "ms3": {"train.epochs": 30}, "avss": {"train.epochs": 60}}

# ---- DDESeg (Liu et al. 2025) -------------------------------------------------------------------------------------
# configs/ddeseg.yaml + train.py: AdamW 1e-4, wd 0.05 but none on 1-D parameters, one lr, cosine to 4e-5, 150 epochs,
# a 2-epoch linear warm-up, batches of 50 GT frames, drop-path 0.1, no clipping, fp32, its crop/jitter/flip; the
# released code's forms (variant=code) and the AVSS memory for S4/MS3.
DDESEG_PAPER = {
    "model.image_size": 224, "train.lr": 1e-4, "train.weight_decay": 0.05, "train.decay_norms": False,
    "train.backbone_lr_mult": 1.0, "train.schedule": "cosine", "train.min_lr_ratio": 0.4, "train.epochs": 150,
    "train.warmup_epochs": 2, "train.warmup_steps": 0, "train.batch_size": 50, "train.batch_unit": "gt_frames",
    "train.augment": "ddeseg", "train.grad_clip": 0.0, "train.amp": False,
    "model.backbone_kwargs": {"drop_path_rate": 0.1}, "method.variant": "code", "method.memory": "avss",
}

ROWS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("icf", "paper-r50", "s4", {**ICF_PAPER, **R50, **S4}),
    ("icf", "paper-r50", "ms3", {**ICF_PAPER, **R50, **MS3}),
    ("icf", "paper-r50", "avss", {**ICF_PAPER, **R50, **AVSS}),
    ("icf", "paper-pvt", "s4", {**ICF_PAPER, **PVT_B5, **S4}),
    ("icf", "paper-pvt", "ms3", {**ICF_PAPER, **PVT_B5, **MS3}),
    ("icf", "paper-pvt", "avss", {**ICF_PAPER, **PVT_B5, **AVSS}),
    ("icf", "paper-swin-t", "s4", {**ICF_PAPER, **SWIN_T, **S4}),  # not an ICF paper backbone: ICF's recipe on Swin-T
    ("icf", "paper-swin-t", "ms3", {**ICF_PAPER, **SWIN_T, **MS3}),
    ("icf", "paper-swin-t", "avss", {**ICF_PAPER, **SWIN_T, **AVSS}),
    ("icf", "tiny", "s4", {**ICF_TINY, **S4}),
    ("icf", "tiny", "ms3", {**ICF_TINY, **MS3}),
    ("icf", "tiny", "avss", {**ICF_TINY, **AVSS}),
    ("qdformer", "paper-r50", "s4", {**QD_PAPER, **QD_R50, **QD_13, **S4}),
    ("qdformer", "paper-r50", "ms3", {**QD_PAPER, **QD_R50, **QD_13, **MS3}),
    ("qdformer", "paper-r50", "avss", {**QD_PAPER, **QD_R50, **QD_16, **AVSS}),
    ("qdformer", "paper-swin-t", "s4", {**QD_PAPER, **QD_SWIN, **QD_13, **S4}),
    ("qdformer", "paper-swin-t", "ms3", {**QD_PAPER, **QD_SWIN, **QD_13, **MS3}),
    ("qdformer", "paper-swin-t", "avss", {**QD_PAPER, **QD_SWIN, **QD_16, **AVSS}),
    ("qdformer", "paper-pvt", "s4", {**QD_PAPER, **QD_PVT, **QD_13, **S4}),
    ("qdformer", "paper-pvt", "ms3", {**QD_PAPER, **QD_PVT, **QD_13, **MS3}),
    ("qdformer", "paper-pvt", "avss", {**QD_PAPER, **QD_PVT, **QD_16, **AVSS}),
    ("qdformer", "tiny", "s4", {**QD_TINY, **S4}),
    ("qdformer", "tiny", "ms3", {**QD_TINY, **MS3}),
    ("qdformer", "tiny", "avss", {**QD_TINY, **AVSS}),
    ("tpavi", "paper-r50", "s4", {**TPAVI_PAPER, **R50, **TPAVI_EPOCHS["s4"], **S4}),
    ("tpavi", "paper-r50", "ms3", {**TPAVI_PAPER, **R50, **TPAVI_EPOCHS["ms3"], **MS3}),
    ("tpavi", "paper-r50", "avss", {**TPAVI_PAPER, **R50, **TPAVI_EPOCHS["avss"], **AVSS}),
    ("tpavi", "paper-pvt", "s4", {**TPAVI_PAPER, **PVT_B5, **TPAVI_EPOCHS["s4"], **S4}),
    ("tpavi", "paper-pvt", "ms3", {**TPAVI_PAPER, **PVT_B5, **TPAVI_EPOCHS["ms3"], **MS3}),
    ("tpavi", "paper-pvt", "avss", {**TPAVI_PAPER, **PVT_B5, **TPAVI_EPOCHS["avss"], **AVSS}),
    ("ddeseg", "paper-r50", "s4", {**DDESEG_PAPER, **R50, **S4}),
    ("ddeseg", "paper-r50", "ms3", {**DDESEG_PAPER, **R50, **MS3}),
    ("ddeseg", "paper-r50", "avss", {**DDESEG_PAPER, **R50, **AVSS}),
    ("ddeseg", "paper-pvt", "s4", {**DDESEG_PAPER, **PVT_B5, **S4}),
    ("ddeseg", "paper-pvt", "ms3", {**DDESEG_PAPER, **PVT_B5, **MS3}),
    ("ddeseg", "paper-pvt", "avss", {**DDESEG_PAPER, **PVT_B5, **AVSS}),
]


def resolved(method: str, preset: str, dataset: str) -> dict[str, Any]:
    """Every field of the resolved configs as ``section.name`` → value (method options with defaults filled)."""
    model, train = build_configs(RunSpec(dataset=dataset, preset=preset, work=Path("."), out=Path("."), method=method))
    options = methods.get(method).parse_options(model.options)
    out = {f"model.{k}": v for k, v in vars(model).items()}
    out.update({f"train.{k}": v for k, v in vars(train).items()})
    out.update({f"method.{k}": v for k, v in vars(options).items()})
    return out


@pytest.mark.parametrize(("method", "preset", "dataset", "expected"), ROWS, ids=[":".join(r[:3]) for r in ROWS])
def test_preset_resolves_to_the_recipe(method: str, preset: str, dataset: str, expected: dict[str, Any]) -> None:
    got = resolved(method, preset, dataset)
    unknown = sorted(set(expected) - set(got))
    assert not unknown, f"not a config field: {unknown}"
    wrong = {key: (got[key], want) for key, want in expected.items() if got[key] != want}
    assert not wrong, f"{method} {preset} {dataset}: (resolved, recipe) {wrong}"


@pytest.mark.parametrize("method", ["icf", "qdformer"])
def test_every_preset_of_icf_and_qdformer_has_a_row(method: str) -> None:
    """A preset added later needs its recipe row here."""
    rows = {(p, d) for m, p, d, _ in ROWS if m == method}
    assert rows == set(itertools.product(PRESETS, DATASETS))


def test_a_method_refuses_a_preset_it_has_no_backbone_for() -> None:
    """DDESeg's authors use PVT-v2 (and the paper a ResNet-50 row): ``paper-swin-t`` is refused, not silently R50."""
    from icf.clitools import UserError

    with pytest.raises(UserError, match="ddeseg has no paper-swin-t preset"):
        resolved("ddeseg", "paper-swin-t", "avss")


@pytest.mark.parametrize("method", sorted(methods.registry()))
def test_batches_of_single_gt_frames_only_for_a_frame_level_method(method: str) -> None:
    """``train.batch_unit=gt_frames`` makes every clip a one-frame clip: fine for DDESeg (frame-level, its authors'
    unit), wrong for a temporal model, which is refused by name instead of training on T=1 clips."""
    from icf.clitools import UserError

    spec = RunSpec(dataset="avss", preset="tiny", work=Path("."), out=Path("."), method=method,
                   overrides=["train.batch_unit=gt_frames"])
    if methods.get(method).frame_level:
        assert build_configs(spec)[1].batch_unit == "gt_frames"
    else:
        with pytest.raises(UserError, match=f"method {method} is temporal"):
            build_configs(spec)
