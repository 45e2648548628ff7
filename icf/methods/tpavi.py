"""``tpavi``: the official AVSBench baseline (Zhou et al., ECCV 2022; `icf.model.tpavi`), alone or under ICF
(``icf train --method icf --set method.segmenter=tpavi``, the paper's Table 3).

Presets (`presets`): ``paper-r50`` / ``paper-pvt`` take the official recipe (``avs_scripts/*/train.py`` and
``train.sh`` of OpenNLPLab/AVSBench): ``torch.optim.Adam(model.parameters(), 1e-4)`` — AdamW with weight decay 0,
one learning rate for every parameter (backbone included), no schedule (constant), batch 4, 15 epochs (S4; the
train.py default), 30 (MS3) or 60 (AVSS), fp32, no gradient clipping, VGGish frozen (``FREEZE_AUDIO_EXTRACTOR``).
``tiny`` keeps the project's tiny settings.

Released checkpoints (`OFFICIAL`, ``icf import --method tpavi``): the ``Pred_endecoder`` state dict the official
``train.py`` saves (``torch.save(model.module.state_dict(), …)``: ``S4_pvt_best.pth``, ``MS3_resnet_best.pth``,
``AVSS_pvt_miou_best.pth`` …) maps one to one onto `TPAVISegmenter` with ``audio_path=official`` and ``window=5``
by the table `OFFICIAL_KEYS`; B2_ResNet's never-run second branch and the stage-4 fusion block's unused residual
unit are dropped.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from icf.config import ModelConfig, TrainConfig
from icf.methods.base import segmenter_method
from icf.methods.official import KeyRow, KeyTable, OfficialFormat
from icf.model.tpavi import STAGES, WINDOW, TPAVISegmenter, check_options


@dataclass(frozen=True)
class TPAVIOptions:
    """Options (``--set method.KEY=VALUE``).

    Attributes:
        tpavi_stages: 0-based backbone stages with a TPAVI block (official ``--tpavi_stages 0 1 2 3``).
        loss: ``"official"`` (S4: BCE; MS3: BCE + 0.5·AVM; AVSS: CE + 0.5·AVM) or ``"eq18"`` (the project's loss).
            Only the plain ``tpavi`` method uses it: under ICF the loss is ICF's Eq. 19.
        avm_weight: λ_1 of the AVM audio–visual matching term; unset: the official value of the dataset.
        audio_path: ``"official"`` (the raw VGGish embedding into each block's ``align``) or ``"projected"`` (the
            project's d-wide audio feature, VGGish + linear + LayerNorm).
        window: frames per TPAVI attention window (official 5 on every subset; ≥ T attends over the whole clip).
    """

    tpavi_stages: tuple[int, ...] = STAGES
    loss: str = "official"
    avm_weight: float | None = None
    audio_path: str = "official"
    window: int = WINDOW

    def __post_init__(self) -> None:
        check_options(tuple(self.tpavi_stages), self.loss, self.audio_path, self.window)


def make(cfg: ModelConfig, options: TPAVIOptions) -> TPAVISegmenter:
    return TPAVISegmenter(cfg, stages=tuple(options.tpavi_stages), loss=options.loss, avm_weight=options.avm_weight,
                          audio_path=options.audio_path, window=options.window)


PAPER_EPOCHS = {"s4": 15, "ms3": 30, "avss": 60}  # train.py default (S4); --max_epoches in ms3 / avss train.sh


# the official train.py loops validate after 0-based epoch e when e >= start_eval_epoch and e % eval_interval == 0
# and test the best-val-mIoU weights (icf.train.select): S4/MS3 every epoch; AVSS train.sh --start_eval_epoch 15
# --eval_interval 2
OFFICIAL_VALIDATION = {"s4": {"val_every": 1, "val_start_epoch": 0}, "ms3": {"val_every": 1, "val_start_epoch": 0},
                       "avss": {"val_every": 2, "val_start_epoch": 15}}


def presets(name: str, model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig, dict]:
    """The official AVSBench recipe on ``paper-r50`` / ``paper-pvt`` (module docstring); ``tiny`` unchanged."""
    if name == "tiny":
        return model, train, {}
    if name not in ("paper-r50", "paper-pvt"):
        raise ValueError(f"method tpavi: unknown preset {name!r}")
    official = dataclasses.replace(
        train, lr=1e-4, weight_decay=0.0, schedule="constant", warmup_steps=0, backbone_lr_mult=1.0, batch_size=4,
        epochs=PAPER_EPOCHS[model.dataset], amp=False, grad_clip=0.0, **OFFICIAL_VALIDATION[model.dataset])
    return dataclasses.replace(model, freeze_audio=True), official, {}


# The official Pred_endecoder (avs_scripts/*/model/{ResNet,PVT}_AVSModel.py, TPAVI.py) → TPAVISegmenter.
OFFICIAL_KEYS = KeyTable((
    # ResNet-50 (B2_ResNet; torchvision names, its second branch never runs)
    KeyRow("resnet.conv1.{rest}", "backbone.body.conv1.{rest}"),
    KeyRow("resnet.bn1.{rest}", "backbone.body.bn1.{rest}"),
    KeyRow("resnet.layer1.{rest}", "backbone.body.layer1.{rest}"),
    KeyRow("resnet.layer2.{rest}", "backbone.body.layer2.{rest}"),
    KeyRow("resnet.layer3_1.{rest}", "backbone.body.layer3.{rest}"),
    KeyRow("resnet.layer4_1.{rest}", "backbone.body.layer4.{rest}"),
    KeyRow("resnet.layer3_2.{rest}", None),
    KeyRow("resnet.layer4_2.{rest}", None),
    # PVT-v2 (pvt_v2_b5.pth layout → timm's features_only names; the renaming of timm's pvt_v2 checkpoint filter)
    KeyRow("encoder_backbone.patch_embed1.{rest}", "backbone.body.patch_embed.{rest}"),
    KeyRow("encoder_backbone.patch_embed{s}.{rest}", "backbone.body.stages_{s}.downsample.{rest}"),
    KeyRow("encoder_backbone.block{s}.{i}.mlp.dwconv.dwconv.{rest}", "backbone.body.stages_{s}.blocks.{i}.mlp.dwconv.{rest}"),
    KeyRow("encoder_backbone.block{s}.{i}.{rest}", "backbone.body.stages_{s}.blocks.{i}.{rest}"),
    KeyRow("encoder_backbone.norm{s}.{rest}", "backbone.body.stages_{s}.norm.{rest}"),
    # neck: Classifier_Module conv1..conv4
    KeyRow("conv{s}.conv2d_list.{i}.{rest}", "neck.{s}.convs.{i}.{rest}"),
    # TPAVI blocks tpavi_b1..tpavi_b4 (Conv3d 1×1×1 → Conv2d 1×1 / linear)
    KeyRow("tpavi_b{s}.align_channel.{rest}", "tpavi.{s}.align.{rest}"),
    KeyRow("tpavi_b{s}.theta.{rest}", "tpavi.{s}.theta.{rest}", conv3d=True),
    KeyRow("tpavi_b{s}.g.{rest}", "tpavi.{s}.g.{rest}", conv3d=True),
    KeyRow("tpavi_b{s}.phi.{rest}", "tpavi.{s}.phi.{rest}", conv3d=True),
    KeyRow("tpavi_b{s}.W_z.0.{rest}", "tpavi.{s}.w_z.0.{rest}", conv3d=True),
    KeyRow("tpavi_b{s}.W_z.1.{rest}", "tpavi.{s}.w_z.1.{rest}"),
    KeyRow("tpavi_b{s}.norm_layer.{rest}", "tpavi.{s}.norm.{rest}"),
    # decoder: FeatureFusionBlock path4..path1 (path4 never gets a skip) and output_conv
    KeyRow("path4.resConfUnit1.{rest}", None),
    KeyRow("path{s}.resConfUnit1.{rest}", "fusion.{s}.skip.{rest}"),
    KeyRow("path{s}.resConfUnit2.{rest}", "fusion.{s}.out.{rest}"),
    KeyRow("output_conv.0.{rest}", "head.conv1.{rest}"),
    KeyRow("output_conv.2.{rest}", "head.conv2.{rest}"),
    KeyRow("output_conv.4.{rest}", "head.cls.{rest}"),
))


def official_options(state: Mapping[str, Tensor]) -> dict:
    """The options an official file implies: its TPAVI stages (``tpavi_b{s}``), the official audio path and window."""
    stages = sorted({int(m.group(1)) - 1 for k in state if (m := re.match(r"tpavi_b(\d)\.", k))})
    return {"tpavi_stages": stages, "audio_path": "official", "window": WINDOW}


OFFICIAL = OfficialFormat("AVSBench Pred_endecoder state_dict", OFFICIAL_KEYS, official_options)

METHOD = dataclasses.replace(
    segmenter_method("tpavi", "AVSBench TPAVI baseline (Zhou et al. 2022)", TPAVIOptions, make),
    presets=presets, import_official=OFFICIAL)
