"""Model and training configuration: dataclasses, the three presets, and overrides (``key=value`` strings or
the tables of a TOML file), applied by ``dataclasses.replace`` so every value is validated where it lands.

Presets (ARCHITECTURE.md, faithfulness table):

* ``paper-r50`` / ``paper-pvt`` — the paper's setting: 224×224 frames, ResNet-50 or PVT-v2-b5 backbone,
  VGGish audio encoder, d = 256, AdamW lr 1e-4, batch 8, 60 epochs, and every loss weight from the
  supplement's Table 1 (λ_z 0.8, λ_ortho 1, λ_bce = λ_dice = λ_focal = 1, λ_cf 0.2, λ_CDCL 0.2,
  λ_v↔a 0.4, λ_a↔l 0.3, λ_v↔l 0.3, k^t 15, k^c 8, s^d = 200).
* ``paper-swin-t`` — ``paper-r50`` with timm's Swin-Tiny (``swin_tiny_patch4_window7_224``): QDFormer's headline
  backbone (its Table 1); not a backbone of the ICF paper.
* ``tiny`` — the same architecture shrunk so it trains in minutes on 2 CPU cores: 64 px frames, a
  one-block-per-stage ResNet with narrow channels, a small CNN on the log-Mel instead of VGGish, d = 48,
  k^t = 3, k^c = 2, 10 reverse diffusion steps.

Overrides: ``key=value`` strings (``model.d_model=64``, ``train.lr=3e-4``, ``method.segmenter=tpavi`` or, when
the name is unique, ``d_model=64``) whose values are TOML literals, or an overrides file (``icf train --config
FILE``) with ``[model]``, ``[train]`` and ``[method]`` tables.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icf.data.datasets import load_info
from icf.data.sample import DATASETS

PRESETS = ("tiny", "paper-r50", "paper-pvt", "paper-swin-t")
SCHEDULES = ("poly", "cosine", "constant", "step")
# `train.select_metric`: the validation metrics a best checkpoint may be chosen on (higher is better; keys of
# `icf.eval.metrics`); "auto" = the method's official one (`icf.train.select.selection_metric`)
SELECT_METRICS = ("auto", "J", "F", "JF", "J_present", "F_present", "J_dh", "F_dh", "JF_dh", "F_boundary", "JF_boundary")
AUGMENTS = ("none", "ddeseg")  # train.augment: icf.augment.frames
BATCH_UNITS = ("clips", "gt_frames")  # train.batch_unit: icf.data.frame_stream


_CHOICES = {
    "text_mode": ("tower", "bank"),
    "audio_encoder": ("vggish", "cnn"),
    "text_injection": ("auto", "xattn", "none"),
    "sc_detach": ("auto", "always", "never"),
    "text_distribution": ("frames", "point"),
    "cdcl_visual": ("pre_relu", "post_relu"),
    "cdcl_visual_pool": ("mean", "mask"),
    "text_negatives": ("counterfactual", "counterfactual+batch"),
}


@dataclass
class ModelConfig:
    """Every hyper-parameter of :class:`icf.model.ICF` (architecture, MIT, SC, CDCL, loss weights).

    ``num_classes`` is 1 for the binary subsets (S4, MS3: one mask logit) and 71 for AVSS (class logits incl.
    background). ``frames`` is T (5 or 10); ``segment_div`` is 2 for S4/MS3 and 4 for AVSS (supplement §3
    note 1: segment windows of ⌈T/2⌉ or ⌈T/4⌉ frames).
    """

    dataset: str = "s4"
    method: str = "icf"  # a module of icf/methods (icf.methods.get)
    options: dict[str, Any] = field(default_factory=dict)  # the method's options (validated by its dataclass)
    num_classes: int = 1
    frames: int = 5
    image_size: int = 224
    # --- baseline segmenter
    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    backbone_weights: str | None = None
    audio_encoder: str = "vggish"  # "vggish" (icf.encoders.vggish.VGGish) | "cnn" (small CNN, tiny preset)
    audio_weights: str | None = None
    freeze_audio: bool = True  # keep loaded VGGish weights fixed (ignored when weights are random)
    audio_channels: tuple[int, ...] = (32, 64, 128)  # widths of the small CNN ("cnn" encoder)
    d_model: int = 256
    num_heads: int = 8
    ffn_dim: int = 1024
    enc_layers: int = 6  # MSDeformAttn pixel-decoder layers
    dec_layers: int = 6  # bidirectional query-decoder layers
    num_points: int = 4  # sampling points per head and level in MSDeformAttn
    num_queries: int = 100  # learnable queries
    num_audio_queries: int = 16  # audio-conditioned queries per frame
    dropout: float = 0.0
    pixel_classifier: bool = True  # add a 1×1 per-pixel classifier to the query-mask head (icf.model.decoder)
    # --- MIT (Eq. 1-5)
    k_t: int = 15  # soft prompts per level (supplement Table 1; note 2 says 30)
    n_ctx: int = 4  # pseudo-word tokens per soft prompt
    text_mode: str = "tower"  # "tower" (conditional soft prompts through frozen text towers) | "bank" (cached text bank)
    mit_tau: float = 0.1  # Eq. 1 temperature
    select_tau: float = 0.07  # Eq. 3 matching temperature (and the bank-mode selection softmax)
    lambda_mit: float = 0.2  # weight of Eq. 3's matching objective (not in the paper's Table 1)
    mit_detach_visual: bool = True  # the segmenter's descriptors enter MIT's queries detached (Eq. 3 never changes F^v)
    text_injection: str = "auto"  # "auto" (xattn when MIT is on and CDCL off) | "xattn" | "none"  (§4.2)
    segment_div: int = 2
    # --- SC (Eq. 6-12)
    k_c: int = 8  # Top-K counterfactuals kept (Eq. 12); 2·k_c candidates are generated
    cf_start_step: int = 200  # s^d: diffusion step t* where orthogonalisation intervenes
    diffusion_train_steps: int = 1000
    cf_steps: int = 10  # DDIM steps from t* back to 0
    alpha_range: tuple[float, float] = (0.7, 0.8)  # α_k ~ U[lo, hi) (§4.2 "α^o = [0.7, 0.8)")
    eps_hidden: int = 512  # ε-network width
    cf_degree_floor: float = 0.8  # c = α·(floor + (1 − floor)·m·s) ∈ [floor·α, α)
    sc_unit_variance: bool = True  # diffuse √d·ẑ (unit per-dimension variance) instead of the unit vector
    sc_detach: str = "auto"  # "auto" (detach z, v from L_cf when CDCL is on) | "always" | "never"
    # --- CDCL (Eq. 13-17)
    tau: float = 0.1  # contrastive temperature (logits = −D/τ)
    theta: float = 0.8  # cosine threshold on ℓ^a for the positives of L_v↔a
    va_centre: bool = True  # threshold the batch-centred anchor (else every ℓ^a pair passes θ)
    text_distribution: str = "frames"  # Eq. 17's text Gaussian: "frames" (per-frame texts) | "point" (εI)
    gamma: float = 0.1  # entropy weight γ in Eq. 15
    cov_eps: float = 1e-4  # ε of the Σ + εI regulariser (and the text Gaussians' covariance)
    entropy_per_dim: bool = True  # use H/d in Eq. 15 (d-independent scale)
    # --- CDCL signal (issue 24; ARCHITECTURE.md faithfulness table, measured)
    cdcl_visual: str = "pre_relu"  # F^v tap: the per-pixel embedding "pre_relu" (signed) | "post_relu" (positive orthant)
    cdcl_visual_pool: str = "mean"  # F^v per frame: "mean" over all pixels | "mask": weighted by the predicted (detached) foreground
    text_tau: float = 0.5  # Eq. 17's own temperature (L_v↔l, L_a↔l; was τ = 0.1: saturated by step 5); τ stays Eq. 16's
    text_negatives: str = "counterfactual+batch"  # Eq. 17's negatives: ℓ^cf plus the other clips' texts | "counterfactual" (paper)
    grad_share_every: int = 25  # log each loss term's gradient share at the segmenter every N training steps (0: never)
    # --- losses (Eq. 10, 11, 18, 19; supplement Table 1)
    lambda_bce: float = 1.0
    lambda_dice: float = 1.0
    lambda_focal: float = 1.0
    focal_gamma: float = 2.0
    focal_alpha: float = 0.25
    lambda_cf: float = 0.2
    lambda_cdcl: float = 0.2
    lambda_va: float = 0.4
    lambda_vl: float = 0.3
    lambda_al: float = 0.3
    lambda_z: float = 0.8
    lambda_ortho: float = 1.0
    ablate: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.ablate = frozenset(self.ablate)
        self.audio_channels = tuple(self.audio_channels)
        self.alpha_range = tuple(self.alpha_range)
        self.options = dict(self.options)
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        if not 0.0 <= self.cf_degree_floor <= 1.0:
            raise ValueError(f"cf_degree_floor must lie in [0, 1], not {self.cf_degree_floor}")
        if not self.text_tau > 0:
            raise ValueError(f"text_tau must be above 0, not {self.text_tau}")
        if isinstance(self.grad_share_every, bool) or not isinstance(self.grad_share_every, int) or self.grad_share_every < 0:
            raise ValueError(f"grad_share_every must be an integer >= 0, not {self.grad_share_every!r}")
        if not 0 < self.cf_start_step <= self.diffusion_train_steps:
            raise ValueError("cf_start_step must lie in (0, diffusion_train_steps]")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")

    def uses(self, component: str) -> bool:
        """Whether ``component`` (mit | sc | cdcl) is on. SC needs MIT's z (paper §4.2: "The SC cannot work
        independently of the MIT"), so ablating MIT also switches SC off."""
        if component == "sc":
            return "sc" not in self.ablate and "mit" not in self.ablate
        return component not in self.ablate

    @property
    def binary(self) -> bool:
        """True for S4/MS3 (one sigmoid mask channel), False for AVSS (softmax over classes)."""
        return self.num_classes == 1


@dataclass
class TrainConfig:
    """Optimisation settings read by the trainer (icf/train)."""

    lr: float = 1e-4
    batch_size: int = 8
    epochs: int = 60
    weight_decay: float = 1e-4
    schedule: str = "poly"  # "poly" | "cosine" | "constant" | "step"
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()  # schedule "step": epochs at which the learning rate is multiplied by gamma
    gamma: float = 0.1
    min_lr_ratio: float = 0.0  # poly / cosine decay to lr · min_lr_ratio instead of 0
    decay_norms: bool = True  # False: 1-D parameters (norms, biases) get no weight decay
    backbone_lr_mult: float = 0.1
    grad_clip: float = 1.0
    amp: bool = True  # used only on CUDA
    seed: int = 0
    max_steps: int | None = None  # stop early (tiny runs, smoke tests); 0 = no step
    negative_fraction: float = 0.0  # share of each batch's clips given negative audio + an empty target (icf.augment.negatives)
    # validation on the val split and best-checkpoint selection (icf.train.select); the official rule on the
    # 0-based index e of the epoch just trained: validate when e >= val_start_epoch and e % val_every == 0
    val_every: int = 0  # epochs; 0 = never validate
    val_start_epoch: int = 0
    select_metric: str = "auto"  # one of SELECT_METRICS; auto = the method's official selection metric
    # --- recipe switches a method preset may turn on (DDESeg's official recipe does)
    warmup_epochs: int = 0  # linear warm-up over this many epochs (× batches per epoch); exclusive with warmup_steps
    augment: str = "none"  # training frames/masks: "none" | "ddeseg" (box-constrained crop, colour jitter, flip)
    batch_unit: str = "clips"  # a batch is batch_size "clips", or batch_size "gt_frames" (frames with GT, one per row)

    def __post_init__(self) -> None:
        """``ValueError`` naming the key for a value of the wrong type or range (``train.lr=abc``)."""
        numbers = {"lr": (float, 0.0, False), "weight_decay": (float, 0.0, True), "backbone_lr_mult": (float, 0.0, True),
                   "grad_clip": (float, 0.0, True), "batch_size": (int, 1, True), "epochs": (int, 1, True),
                   "warmup_steps": (int, 0, True), "seed": (int, 0, True), "val_every": (int, 0, True),
                   "val_start_epoch": (int, 0, True)}
        for key, (kind, low, inclusive) in numbers.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ValueError(f"train.{key} must be {'a number' if kind is float else 'an integer'}, got {value!r}")
            if not (value >= low if inclusive else value > low) or value != value or value == float("inf"):
                raise ValueError(f"train.{key} must be {'at least' if inclusive else 'above'} {low}, got {value!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        self.milestones = tuple(self.milestones)  # a run file stores a list
        if not all(isinstance(m, int) and not isinstance(m, bool) and 0 < m for m in self.milestones) \
                or list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError(f"train.milestones must be increasing positive epochs, got {self.milestones!r}")
        if self.schedule == "step" and not self.milestones:
            raise ValueError("train.schedule=step needs train.milestones (epochs at which the lr drops)")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"train.gamma must lie in (0, 1], got {self.gamma!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"train.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
                                           or self.max_steps < 0):
            raise ValueError(f"train.max_steps must be an integer >= 0, got {self.max_steps!r}")
        if not 0.0 <= self.negative_fraction < 1.0:
            raise ValueError(f"train.negative_fraction must lie in [0, 1), got {self.negative_fraction}")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"train.select_metric must be one of {', '.join(SELECT_METRICS)}, got {self.select_metric!r}")
        self._check_recipe_switches()

    def _check_recipe_switches(self) -> None:
        """``ValueError`` for a bad ``warmup_epochs``, ``augment`` or ``batch_unit``."""
        if isinstance(self.warmup_epochs, bool) or not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"train.warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")
        if self.warmup_epochs and self.warmup_steps:
            raise ValueError("train.warmup_epochs and train.warmup_steps are both set; give the warm-up one way")
        if self.augment not in AUGMENTS:
            raise ValueError(f"train.augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}")
        if self.batch_unit not in BATCH_UNITS:
            raise ValueError(f"train.batch_unit must be one of {', '.join(BATCH_UNITS)}, got {self.batch_unit!r}")

    def warmup(self, steps_per_epoch: int) -> int:
        """Warm-up steps: ``warmup_steps``, or ``warmup_epochs`` × ``steps_per_epoch``."""
        return self.warmup_steps or self.warmup_epochs * steps_per_epoch


def _dataset_fields(dataset: str) -> dict[str, Any]:
    """The model fields a dataset fixes, from its descriptor (`icf.data.datasets`)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    info = load_info(dataset)
    return dict(dataset=dataset, num_classes=info.num_logits, frames=info.max_frames, segment_div=info.segment_divisor)


def preset(name: str, dataset: str) -> tuple[ModelConfig, TrainConfig]:
    """The named preset (``tiny`` | ``paper-r50`` | ``paper-pvt`` | ``paper-swin-t``) for ``dataset`` (``s4`` |
    ``ms3`` | ``avss``)."""
    base = _dataset_fields(dataset)
    if name == "paper-r50":
        return ModelConfig(**base, backbone="resnet50"), TrainConfig()
    if name == "paper-pvt":
        return ModelConfig(**base, backbone="pvt_v2_b5"), TrainConfig()
    if name == "paper-swin-t":
        return ModelConfig(**base, backbone="swin_tiny_patch4_window7_224"), TrainConfig()
    if name == "tiny":
        model = ModelConfig(
            **base,
            image_size=64,
            backbone="resnet18",
            backbone_kwargs={"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 96]},
            audio_encoder="cnn",
            audio_channels=(16, 32, 48),
            d_model=48,
            num_heads=4,
            ffn_dim=96,
            enc_layers=1,
            dec_layers=3,  # one round over the three levels, so the stride-8 pixels (mask features) attend to audio
            num_points=2,
            num_queries=4,
            num_audio_queries=4,
            k_t=3,
            n_ctx=2,
            k_c=2,
            cf_steps=10,
            eps_hidden=64,
        )
        return model, TrainConfig(lr=1e-3, batch_size=4, epochs=30, weight_decay=1e-4, grad_clip=1.0)
    raise ValueError(f"unknown preset {name!r}; expected one of {PRESETS}")


def _coerce(cls: type, key: str, value: Any) -> Any:
    """Turn a TOML value into the field's type (lists → tuples / frozensets where the field wants them)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    if key not in names:
        raise ValueError(f"unknown {cls.__name__} key {key!r}")
    if key == "ablate":
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        return frozenset(value)
    if isinstance(value, list) and key not in ("backbone_kwargs", "options"):
        return tuple(value)
    return value


def _parse_value(text: str) -> Any:
    """A ``key=value`` right-hand side as TOML (``64``, ``1e-3``, ``true``, ``[1,2]``, ``"x"``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


SECTIONS = ("model", "train", "method")
MIN_IMAGE_SIZE = 16  # the smallest frame the shard stage writes (``icf stage shard --image-size``)


def apply_values(model: ModelConfig, train: TrainConfig, values: dict[str, dict[str, Any]]) -> tuple[ModelConfig, TrainConfig]:
    """Typed overrides by section (``{"model": {...}, "train": {...}, "method": {...}}``; method options are
    checked by ``icf.methods.validate``) applied with ``dataclasses.replace``. ``ValueError`` for a field the
    dataset fixes (``num_classes``, ``frames``, ``segment_div``) set to another value, and for an
    ``image_size`` below ``MIN_IMAGE_SIZE``."""
    unknown = set(values) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {', '.join(SECTIONS)}")
    m_updates = {k: _coerce(ModelConfig, k, v) for k, v in values.get("model", {}).items()}
    t_updates = {k: _coerce(TrainConfig, k, v) for k, v in values.get("train", {}).items()}
    fixed = _dataset_fields(m_updates.get("dataset", model.dataset))
    for key in sorted(set(m_updates) & set(fixed) - {"dataset"}):
        if m_updates[key] != fixed[key]:
            raise ValueError(f"model.{key} is fixed by the dataset ({fixed['dataset']}: {fixed[key]}), got {m_updates[key]!r}")
    size = m_updates.get("image_size", model.image_size)
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"model.image_size must be an integer of at least {MIN_IMAGE_SIZE} pixels, got {size!r}")
    if values.get("method"):
        m_updates["options"] = {**model.options, **m_updates.get("options", {}), **values["method"]}
    return dataclasses.replace(model, **m_updates), dataclasses.replace(train, **t_updates)


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """``key=value`` strings → values by section. Keys are ``model.X``, ``train.X``, ``method.X`` or a bare ``X``
    that names one field of ModelConfig or TrainConfig; values are TOML literals (bare words are strings)."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, text = (s.strip() for s in item.split("=", 1))
        section, _, name = key.rpartition(".")
        if not section:
            if name in model_fields and name in train_fields:
                raise ValueError(f"override key {name!r} is ambiguous; write model.{name} or train.{name}")
            section = "model" if name in model_fields else "train" if name in train_fields else ""
        if section not in SECTIONS:
            raise ValueError(f"unknown config key {key!r}")
        values.setdefault(section, {})[name] = _parse_value(text)
    return values


def apply_overrides(model: ModelConfig, train: TrainConfig, overrides: list[str]) -> tuple[ModelConfig, TrainConfig]:
    """`parse_overrides` then `apply_values`."""
    return apply_values(model, train, parse_overrides(overrides))


def read_overrides(path: str | Path) -> dict[str, dict[str, Any]]:
    """An overrides file: TOML with ``[model]``, ``[train]`` and ``[method]`` tables; ``ValueError`` naming the file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ValueError(f"{path}: cannot read config ({err})") from None
    bad = [k for k, v in doc.items() if k not in SECTIONS or not isinstance(v, dict)]
    if bad:
        raise ValueError(f"{path}: unknown top-level key(s) {bad}; a config file holds only [model], [train] and "
                         "[method] tables (preset and dataset come from the command line)")
    return doc


RETIRED_MODEL_KEYS = frozenset({"hard_top1", "mit_pool"})  # read from older run files, ignored


def model_from_dict(doc: dict[str, Any]) -> ModelConfig:
    """`ModelConfig` from its `to_dict` form (lists → tuples; keys retired since the run was written are dropped)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(doc) - fields - RETIRED_MODEL_KEYS
    if unknown:
        raise ValueError(f"unknown model key(s) {sorted(unknown)}")
    keep = {"ablate", "backbone_kwargs", "options"}
    return ModelConfig(**{k: (tuple(v) if isinstance(v, list) and k not in keep else v) for k, v in doc.items() if k in fields})


def configs_from_dict(doc: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Both configs from their `to_dict` form (``{"model": ..., "train": ...}``, e.g. a ``run.json``)."""
    return model_from_dict(doc["model"]), TrainConfig(**doc["train"])


def to_dict(model: ModelConfig, train: TrainConfig) -> dict[str, Any]:
    """JSON/TOML-friendly view of both configs (sets → sorted lists, tuples → lists), for checkpoints and logs."""

    def plain(cfg: Any) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            out[f.name] = sorted(v) if isinstance(v, frozenset) else list(v) if isinstance(v, tuple) else v
        return out

    return {"model": plain(model), "train": plain(train)}
