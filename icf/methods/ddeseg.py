"""``ddeseg``: DDESeg (Liu et al., CVPR 2025; `icf.model.ddeseg`) over the bank stage's semantic memory.

Reads the cached per-second audio feature (``clap_latent`` by default, or ``clap``) and the shards'
``audio_bank.npz`` (`icf stage bank`), whose source must be the same key. Components for ``--ablate``:
``deri`` (one token, F_a: Table 3's baseline), ``disc`` (no step 3), ``dem`` (S ≡ 1).

Presets (`presets`): ``paper-pvt`` = pvt_v2_b5 + ``clap_latent``; ``paper-r50`` = resnet50 (fusion after each
stage). Both take the released code's forms (``variant=code``: on PVT the stride-2 first patch embedding) and its
recipe [code: configs/ddeseg.yaml, runner.py, README, train.py]: AdamW lr 1e-4, weight decay 0.05 but none on 1-D
parameters, one learning rate (no backbone multiplier), a 2-epoch linear warm-up then cosine decay to 0.4·lr,
150 epochs, batches of 50 ground-truth frames (``train.batch_unit=gt_frames``), the official augmentation
(``train.augment=ddeseg``), drop-path 0.1, no gradient clipping, fp32; on S4/MS3 the AVSS bank as memory
(``method.memory=avss``, `memory_problem`). ``--set method.variant=paper`` gives the paper's forms. ``tiny`` = the
project's tiny resnet with E 32, K 3, K_v 3 and 2 heads, AdamW at a constant 3e-3, clip batches, no augmentation
(pair it with ``icf stage bank --bank-clusters 2 --bank-per-cluster 2``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from icf.config import ModelConfig, TrainConfig
from icf.data.shards import ShardSet
from icf.methods.base import MethodSpec, Resources, check_choices, check_positive, check_positive_ints
from icf.model.ddeseg import DDESeg, DEM_CENTRES, DEM_SCHEMES, VARIANTS
from icf.model.memory import SOURCES, SemanticMemory
from icf.model.staged import FIRST_STRIDES

COMPONENTS = frozenset({"deri", "disc", "dem"})
MEMORIES = ("shards", "avss")


@dataclass(frozen=True)
class DDESegOptions:
    """Options (``--set method.KEY=VALUE``; spec §3.5 for the values).

    Attributes:
        variant: ``paper`` (default; the ``paper-*`` presets set ``code``) or ``code`` (the official code's forms,
            spec §3.4).
        first_stride: the backbone's first stride, 2 or 4 (None: 2 for ``code`` on a PVT, as the official backbone,
            else 4; `icf.model.ddeseg.first_stride`).
        memory: ``shards`` (the bank the shards ship) or ``avss`` (S4/MS3: training refuses unless the shards ship
            the AVSS workspace's 71-class bank, as the official code; `memory_problem`).
        source: the Batch key of F_a: ``clap_latent`` or ``clap`` (must be the bank's source).
        tokens: K derived tokens (5). visual_centres: K_v (5). tau: Eq. 13's τ (1.0).
        embed: SegFormer head width E (768). mlp_ratio: audio projection ratio (4). heads: DEM/fusion heads (8).
        dem_scheme: Table 4 ``none | fc | ca | sk | gs`` (gs). dem_centres: ``oc`` (Eq. 14) or ``oTv``.
        w_ce, w_dice, w_iou: Eq. 18's weights (5, 5, 2). dropout: head Dropout2d (0.1).
    """

    variant: str = "paper"
    first_stride: int | None = None
    memory: str = "shards"
    source: str = "clap_latent"
    tokens: int = 5
    visual_centres: int = 5
    tau: float = 1.0
    embed: int = 768
    mlp_ratio: int = 4
    heads: int = 8
    dem_scheme: str = "gs"
    dem_centres: str = "oc"
    w_ce: float = 5.0
    w_dice: float = 5.0
    w_iou: float = 2.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        check_choices("ddeseg", self, {"variant": VARIANTS, "source": SOURCES, "dem_scheme": DEM_SCHEMES,
                                       "dem_centres": DEM_CENTRES, "memory": MEMORIES})
        stride = self.first_stride
        if stride is not None and (isinstance(stride, bool) or stride not in FIRST_STRIDES or not isinstance(stride, int)):
            raise ValueError(f"method ddeseg: first_stride must be one of {', '.join(map(str, FIRST_STRIDES))}, got {stride!r}")
        check_positive_ints("ddeseg", self, ("tokens", "visual_centres", "embed", "mlp_ratio", "heads"))
        check_positive("ddeseg", self, ("tau",))


def presets(name: str, model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig, dict]:
    """DDESeg's settings on top of project preset ``name`` (module docstring)."""
    if name == "tiny":  # lr 3e-3 constant: calibrated on the 4-clip overfit gate (1e-3 poly: train J_present 0.24)
        tiny = dataclasses.replace(train, lr=3e-3, schedule="constant", backbone_lr_mult=1.0, decay_norms=False)
        return model, tiny, {"embed": 32, "tokens": 3, "visual_centres": 3, "heads": 2}
    backbones = {"paper-pvt": "pvt_v2_b5", "paper-r50": "resnet50"}
    if name not in backbones:
        raise ValueError(f"method ddeseg has no {name} preset (DDESeg's backbones: paper-pvt, paper-r50; tiny)")
    backbone = backbones[name]
    official = dataclasses.replace(train, lr=1e-4, weight_decay=0.05, decay_norms=False, backbone_lr_mult=1.0,
                                   schedule="cosine", min_lr_ratio=0.4, epochs=150, warmup_steps=0, warmup_epochs=2,
                                   batch_size=50, batch_unit="gt_frames", augment="ddeseg", grad_clip=0.0, amp=False)
    kwargs = {**model.backbone_kwargs, "drop_path_rate": 0.1}
    model = dataclasses.replace(model, backbone=backbone, image_size=224, backbone_kwargs=kwargs)
    return model, official, {"variant": "code", "memory": "avss"}


def memory_problem(cfg: ModelConfig, options: DDESegOptions, shards: ShardSet) -> str | None:
    """``method.memory=avss`` on S4/MS3 (checked when a run starts): the shards must ship the AVSS workspace's bank,
    byte for byte (so the same source and encoders), as the official code reads the AVSS bank for v1s/v1m
    [code: models/DDESeg.py]; one line naming the commands, or None. A missing bank is left to the requirements
    check (it names the bank stage)."""
    if options.memory != "avss" or cfg.dataset == "avss" or shards.audio_bank is None:
        return None
    work = shards.path.parent.parent
    fix = (f"run `icf stage all --dataset avss --work {work}` with the same --encoders, then `icf stage bank "
           f"--dataset {cfg.dataset} --bank-from avss` and `icf stage shard --dataset {cfg.dataset}`; or train on "
           f"the shards' own bank with --set method.memory=shards")
    lender = work / "avss" / "shards.json"
    try:
        name = json.loads(lender.read_text()).get("audio_bank")
    except (OSError, ValueError):
        return f"method.memory=avss (the official S4/MS3 memory) needs the AVSS bank, and {lender} is unreadable; {fix}"
    if not name or not (lender.parent / name).is_file():
        return f"method.memory=avss (the official S4/MS3 memory) needs the AVSS bank, and {lender} ships none; {fix}"
    if sha256(shards.audio_bank) != sha256(lender.parent / name):
        return (f"method.memory=avss (the official S4/MS3 memory): {shards.audio_bank} is not the AVSS bank "
                f"{lender.parent / name}; {fix}")
    return None


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(cfg: ModelConfig, options: DDESegOptions, res: Resources) -> DDESeg:
    """The model over the shards' audio bank (``ValueError`` when it is absent or of another source)."""
    if res.audio_bank is None:
        raise ValueError("DDESeg needs the shards' audio bank (run `icf stage bank` then `icf stage shard`)")
    memory = SemanticMemory.load(res.audio_bank)
    if memory.source != options.source:
        raise ValueError(f"the audio bank is built from {memory.source}, the model reads {options.source} "
                         f"(--set method.source={memory.source}, or rebuild with --bank-source {options.source})")
    return DDESeg(cfg, options, memory)


METHOD = MethodSpec(
    name="ddeseg",
    summary="DDESeg (Liu et al. 2025): dynamic derivation and elimination over a per-class audio memory",
    options=DDESegOptions,
    components=COMPONENTS,
    requires=frozenset({"frames", "masks", "gt", "valid", "clap_latent", "audio_bank"}),
    audio_keys=("clap_latent", "clap"),
    build=build,
    presets=presets,
    preflight=memory_problem,
    frame_level=True,
)
