"""`MethodSpec`: what a method declares to the registry (`icf.methods`).

The models themselves subclass `icf.model.segmenter.SegModel` (forward → logits; loss; predict; parameter
groups); a method whose model is a `Segmenter` also offers ``segmenter`` so that ICF can attach to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from icf.config import ModelConfig, TrainConfig
from icf.methods.official import OfficialFormat
from icf.model.segmenter import Segmenter, SegModel

if TYPE_CHECKING:
    from icf.data.shards import ShardSet


@dataclass(frozen=True)
class Resources:
    """What a method may load besides its config: the frozen-tower spec, text bank and audio bank named by
    ``shards.json``."""

    encoders: Mapping[str, Any] | None = None  # EncoderSpec as a dict
    text_bank: Mapping[str, Any] | None = None  # level → (K, D) prompt embeddings
    audio_bank: Any = None  # path of the shards' audio_bank.npz (DDESeg's semantic memory), or None
    device: torch.device = torch.device("cpu")


@dataclass(frozen=True)
class MethodSpec:
    """A method of the registry.

    Attributes:
        name: the ``--method`` value.
        summary: one line for ``--help`` and tables.
        options: a dataclass of the method's own options (``--set method.KEY=VALUE``).
        components: what ``--ablate`` may switch off.
        requires: Batch keys the model reads (shard members; checked before training).
        audio_keys: Batch keys that carry audio (robustness settings must change all of them).
        build: ``(model_cfg, options, resources) -> SegModel``.
        segmenter: ``(model_cfg, options) -> Segmenter`` when the model is a segmenter ICF can attach to.
        parse: raw options dict → options (default: the dataclass, unknown keys refused).
        presets: ``(preset, model_cfg, train_cfg) -> (model_cfg, train_cfg, options)``: the method's own settings
            for a project preset (applied after the project preset, before ``--set`` overrides); None keeps the
            project preset and no default options.
        import_official: how ``icf import`` reads the checkpoints the method's authors release
            (`icf.methods.official.OfficialFormat`), or None when it cannot.
        preflight: ``(model_cfg, options, shards) -> problem or None``: a check of the workspace when a training
            run starts (not at evaluation), e.g. DDESeg's ``method.memory=avss``.
        frame_level: the model treats every frame on its own, so it may train on batches of single GT frames
            (``train.batch_unit=gt_frames``, DDESeg's official unit); a temporal model (attention over a clip's
            frames, clip-level embeddings) refuses them.
    """

    name: str
    summary: str
    options: type
    components: frozenset[str]
    requires: frozenset[str]
    audio_keys: tuple[str, ...]
    build: Callable[[ModelConfig, Any, Resources], SegModel]
    segmenter: Callable[[ModelConfig, Any], Segmenter] | None = None
    parse: Callable[[Mapping[str, Any]], Any] | None = None
    presets: Callable[[str, ModelConfig, TrainConfig], tuple[ModelConfig, TrainConfig, dict[str, Any]]] | None = None
    import_official: OfficialFormat | None = None
    preflight: Callable[[ModelConfig, Any, ShardSet], str | None] | None = None
    frame_level: bool = False

    def preset(self, name: str, model: ModelConfig, train: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
        """The configs of project preset ``name`` with this method's preset applied (its default options under
        any already set)."""
        if self.presets is None:
            return model, train
        model, train, options = self.presets(name, model, train)
        return dataclasses.replace(model, options={**options, **model.options}), train

    def parse_options(self, raw: Mapping[str, Any]) -> Any:
        """Raw ``options`` → the options object; ``ValueError`` naming unknown keys and the valid ones."""
        if self.parse is not None:
            return self.parse(raw)
        return strict_options(self.options, raw, self.name)


def strict_options(cls: type, raw: Mapping[str, Any], method: str) -> Any:
    """``cls(**raw)`` for an options dataclass, refusing unknown keys with the list of valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"method {method}: unknown option(s) {unknown}; valid: {names or 'none'}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**values)


def check_choices(method: str, options: Any, choices: Mapping[str, Sequence[str]]) -> None:
    """``ValueError`` for the first option ``key`` of ``choices`` whose value is not one of ``choices[key]``:
    ``method M: KEY must be one of A, B, got 'x'``."""
    for key, allowed in choices.items():
        value = getattr(options, key)
        if value not in allowed:
            raise ValueError(f"method {method}: {key} must be one of {', '.join(allowed)}, got {value!r}")


def check_positive_ints(method: str, options: Any, keys: Iterable[str], minimum: int = 1) -> None:
    """``ValueError`` for the first option of ``keys`` that is not an integer ≥ ``minimum`` (a bool is not an
    integer): ``method M: KEY must be an integer, got V`` or ``method M: KEY must be at least MIN, got V``."""
    for key in keys:
        value = getattr(options, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"method {method}: {key} must be an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"method {method}: {key} must be at least {minimum}, got {value}")


def check_positive(method: str, options: Any, keys: Iterable[str]) -> None:
    """``ValueError`` ``method M: KEY must be positive, got V`` for the first option of ``keys`` not > 0
    (NaN included)."""
    for key in keys:
        value = getattr(options, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"method {method}: {key} must be positive, got {value}")


def segmenter_method(name: str, summary: str, options: type, make: Callable[[ModelConfig, Any], Segmenter],
                     requires: frozenset[str] = frozenset({"frames", "masks", "gt", "valid", "mel"})) -> MethodSpec:
    """The spec of a plain segmenter method (no components; reads frames, masks and mel)."""
    return MethodSpec(
        name=name, summary=summary, options=options, components=frozenset(), requires=requires, audio_keys=("mel",),
        build=lambda cfg, opts, _res: make(cfg, opts), segmenter=make,
    )
