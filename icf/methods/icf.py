"""``icf``: MIT + SC + CDCL (`icf.model.icf.ICF`) attached to a registered segmenter (default ``bidir``).

Options: ``segmenter`` (any method with a segmenter, e.g. ``bidir`` or ``tpavi`` for the paper's Table 3) and that
segmenter's own options, e.g. ``--set method.segmenter=tpavi``. The frozen text towers are rebuilt from the
shards' `EncoderSpec` once per process and device; the text bank comes from the shards.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from icf.config import ModelConfig
from icf.encoders import EncoderSpec, Encoders
from icf.encoders import load as load_encoders
from icf.methods.base import MethodSpec, Resources, strict_options
from icf.model.icf import ICF

COMPONENTS = frozenset({"mit", "sc", "cdcl"})


@dataclass(frozen=True)
class ICFOptions:
    """``segmenter``: the method whose segmenter ICF attaches to; ``segmenter_options``: its options."""

    segmenter: str = "bidir"
    segmenter_options: tuple[tuple[str, Any], ...] = ()


def parse(raw: Mapping[str, Any]) -> ICFOptions:
    """``segmenter`` plus any key of that segmenter's options (validated there)."""
    from icf.methods import get, registry

    name = raw.get("segmenter", ICFOptions.segmenter)
    choices = sorted(n for n, spec in registry().items() if spec.segmenter is not None)
    if name not in registry():
        raise ValueError(f"method.segmenter: unknown segmenter {name!r}; expected one of {choices}")
    seg = get(name)
    if seg.segmenter is None:
        raise ValueError(f"method icf: {name!r} has no segmenter ICF can attach to")
    own = {f.name for f in fields(ICFOptions)} - {"segmenter_options"}
    rest = {k: v for k, v in raw.items() if k not in own}
    strict_options(seg.options, rest, f"icf (segmenter {name})")
    return ICFOptions(segmenter=name, segmenter_options=tuple(sorted(rest.items())))


@functools.lru_cache(maxsize=2)
def frozen_towers(spec: EncoderSpec, device: str) -> Encoders:
    """The frozen text towers of ``spec``, built once per process (they hold no trainable state)."""
    return load_encoders(spec, device=device)


def build(cfg: ModelConfig, options: ICFOptions, res: Resources) -> ICF:
    from icf.methods import get

    seg = get(options.segmenter)
    segmenter = seg.segmenter(cfg, seg.parse_options(dict(options.segmenter_options)))
    needs_towers = cfg.uses("mit") and cfg.text_mode == "tower"
    encoders = None
    if needs_towers:
        if res.encoders is None:
            raise ValueError("ICF with MIT needs the encoder spec of the shards (shards.json 'encoders')")
        encoders = frozen_towers(EncoderSpec.from_dict(res.encoders), str(res.device))
    return ICF(segmenter, encoders, res.text_bank)


METHOD = MethodSpec(
    name="icf",
    summary="ICF (Zha et al. 2025): MIT + SC + CDCL over a segmenter",
    options=ICFOptions,
    components=COMPONENTS,
    requires=frozenset({"frames", "masks", "gt", "valid", "mel", "clip", "vclip", "vclip_seg", "clap", "clap_clip"}),
    audio_keys=("mel", "clap", "clap_clip"),
    build=build,
    parse=parse,
)
