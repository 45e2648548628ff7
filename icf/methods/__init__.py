"""The method registry. A module of this package that defines ``METHOD = MethodSpec(...)`` is a method: it is
found here, selectable with ``icf train --method NAME`` and recorded in ``run.json`` (same rule as "a module of
``icf/stages`` that defines a Stage is a stage"). Adding a method takes one more file.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

from icf.config import ModelConfig, TrainConfig
from icf.methods.base import MethodSpec

if TYPE_CHECKING:
    from icf.data.shards import ShardSet

# the stage that makes each shard member a method may require (the shard stage then ships it)
MADE_BY = {"mel": "mel", "clip": "extract", "vclip": "extract", "vclip_seg": "extract", "clap": "extract",
           "clap_clip": "extract", "clap_latent": "extract", "audio_bank": "bank"}


@cache
def registry() -> dict[str, MethodSpec]:
    """Every method by name."""
    found: dict[str, MethodSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        spec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(spec, MethodSpec):
            found[spec.name] = spec
    return found


def get(name: str) -> MethodSpec:
    """The method called ``name``; ``ValueError`` listing the known ones otherwise."""
    methods = registry()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; expected one of {sorted(methods)}")
    return methods[name]


def validate(cfg: ModelConfig, train: TrainConfig | None = None) -> object:
    """Check ``cfg`` (and ``train``, when given) against its method (known method, ``ablate`` ⊆ its components,
    options, batches of GT frames only for a frame-level method) → parsed options."""
    spec = get(cfg.method)
    if train is not None and train.batch_unit == "gt_frames" and not spec.frame_level:
        raise ValueError(f"method {spec.name} is temporal (it reads a clip's frames together), so it cannot train on "
                         "train.batch_unit=gt_frames (batches of single frames); use train.batch_unit=clips")
    unknown = cfg.ablate - spec.components
    if unknown:
        allowed = sorted(spec.components) or "nothing"
        raise ValueError(f"method {spec.name}: unknown ablate component(s) {sorted(unknown)}; it can ablate {allowed}")
    return spec.parse_options(cfg.options)


def preflight(cfg: ModelConfig, shards: ShardSet) -> str | None:
    """The method's training-time check of the workspace (`MethodSpec.preflight`): one line, or None."""
    spec = get(cfg.method)
    return spec.preflight(cfg, validate(cfg), shards) if spec.preflight is not None else None


def requirements_problem(spec: MethodSpec, shards_path: str, dataset: str, missing: list[str]) -> str | None:
    """One line naming what ``spec.requires`` misses in the shards and the stage that makes it, or None."""
    if not missing:
        return None
    stages = sorted({MADE_BY.get(m, "shard") for m in missing})
    line = (f"{shards_path}: method {spec.name} needs {', '.join(missing)}, which these shards lack; run "
            f"`icf stage {' / '.join(stages)} --dataset {dataset}` then `icf stage shard` (or `icf stage all`)")
    if "audio_bank" in missing and dataset == "ms3":
        from icf.model.memory import MS3_REFUSAL

        line += f"; {MS3_REFUSAL}"
    return line


__all__ = ["MethodSpec", "get", "preflight", "registry", "requirements_problem", "validate"]
