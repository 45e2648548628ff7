"""`MethodSpec`: what a method declares to the registry (`icf.methods`).

The models themselves subclass `icf.model.segmenter.SegModel` (forward → logits; loss; predict; parameter
groups); a method whose model is a `Segmenter` also offers ``segmenter`` so that ICF can attach to it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from icf.config import ModelConfig, TrainConfig
from icf.model.segmenter import Segmenter, SegModel


@dataclass(frozen=True)
class Resources:
    """What a method may load besides its config: the frozen-tower spec and text bank named by ``shards.json``."""

    encoders: Mapping[str, Any] | None = None  # EncoderSpec as a dict
    text_bank: Mapping[str, Any] | None = None  # level → (K, D) prompt embeddings
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


def segmenter_method(name: str, summary: str, options: type, make: Callable[[ModelConfig, Any], Segmenter],
                     requires: frozenset[str] = frozenset({"frames", "masks", "gt", "valid", "mel"})) -> MethodSpec:
    """The spec of a plain segmenter method (no components; reads frames, masks and mel)."""
    return MethodSpec(
        name=name, summary=summary, options=options, components=frozenset(), requires=requires, audio_keys=("mel",),
        build=lambda cfg, opts, _res: make(cfg, opts), segmenter=make,
    )
