"""What the frozen towers are (`EncoderSpec`) and the shared rules for building them.

The spec is JSON-serialisable; the extract stage records it and the trainer rebuilds the *text*
towers from it. Weights come only from local files; without a file a tower is randomly initialised
from ``seed`` inside a forked RNG, so two builds in two processes give identical parameters.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icf.clitools import UserError

log = logging.getLogger("icf.encoders")

TINY_CLIP = "icf-tiny-clip"
TINY_CLAP = "icf-tiny-htsat"


class EncoderWeightsError(UserError):
    """A weights file (or text-model folder) is missing, unreadable or does not fit the architecture."""


class RandomWeightsWarning(UserWarning):
    """A foundation tower runs with random weights: its embeddings carry no pretrained semantics."""


@dataclass(frozen=True)
class EncoderSpec:
    """The frozen foundation towers of one pipeline run.

    ``*_weights`` are local checkpoint paths or ``None`` (seeded random init). ``clap_text_dir`` is a
    local folder holding a RoBERTa ``config.json`` + tokenizer files, needed when ``clap_tmodel`` is
    ``roberta`` (the LAION checkpoints' text tower).
    """

    clip_model: str = "ViT-B-32"
    clip_weights: str | None = None
    clap_amodel: str = "HTSAT-tiny"
    clap_tmodel: str = "roberta"
    clap_weights: str | None = None
    clap_text_dir: str | None = None
    seed: int = 0

    @classmethod
    def tiny(cls, seed: int = 0) -> EncoderSpec:
        """The tiny registered configs (random init) used by tests and the demo."""
        return cls(clip_model=TINY_CLIP, clap_amodel=TINY_CLAP, clap_tmodel="transformer", seed=seed)

    def weights_summary(self) -> dict[str, str]:
        """``{"clip": path | "random", "clap": path | "random"}`` for stats files and logs."""
        return {"clip": self.clip_weights or "random", "clap": self.clap_weights or "random"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderSpec:
        """Inverse of `to_dict`; unknown keys or wrong types raise `UserError`."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"encoder spec: unknown keys {unknown} (known: {sorted(known)})")
        for key, value in data.items():
            if key == "seed":
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif key.endswith(("_weights", "_dir")):
                ok = value is None or isinstance(value, str)
            else:
                ok = isinstance(value, str)
            if not ok:
                raise UserError(f"encoder spec: {key}={value!r} has the wrong type")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncoderSpec:
        return cls.from_dict(json.loads(text))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU RNG seeded to ``seed``, leaving the caller's RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and ``requires_grad=False`` on every parameter (the towers are never trained)."""
    module.eval()
    module.requires_grad_(False)
    return module


def warn_random(tower: str, seed: int) -> None:
    """Say loudly (log + `RandomWeightsWarning`) that ``tower`` runs with random weights."""
    message = (
        f"{tower}: no weights file given, using RANDOM initialisation (seed {seed}); "
        "its embeddings carry no pretrained semantics"
    )
    log.warning(message)
    warnings.warn(message, RandomWeightsWarning, stacklevel=3)


def weights_file(path: str | Path, tower: str) -> Path:
    """Check that ``path`` is an existing file; `EncoderWeightsError` naming it otherwise."""
    p = Path(path).expanduser()
    if not p.is_file():
        reason = "is a directory, not a file" if p.is_dir() else "does not exist"
        raise EncoderWeightsError(f"{tower} weights {p}: {reason}")
    return p


def read_checkpoint(path: str | Path, tower: str) -> dict[str, torch.Tensor]:
    """Load a state dict from a local checkpoint with ``weights_only`` unpickling.

    Accepts a bare state dict or a training checkpoint holding it under ``state_dict`` (the LAION
    layout); strips the ``module.`` prefix that DataParallel/DDP training leaves on every key. Numpy
    scalars, which training checkpoints often carry in their metadata, are allow-listed.
    """
    p = weights_file(path, tower)
    try:
        ckpt = _torch_load(p)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        reason = f"cannot be read as a torch checkpoint ({first_line(err)})"
        raise EncoderWeightsError(f"{tower} weights {p}: {reason}") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise EncoderWeightsError(f"{tower} weights {p}: holds no state dict of tensors")
    bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise EncoderWeightsError(f"{tower} weights {p}: key {bad!r} holds a {type(state[bad]).__name__}, not a tensor")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal styling torch puts in its unpickling errors


def first_line(err: BaseException) -> str:
    """The first line of an exception's message without terminal escape codes (its type name when empty)."""
    text = ANSI.sub("", str(err)).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _torch_load(path: Path) -> Any:
    import numpy as np

    numpy_globals = [np.dtype, np.core.multiarray.scalar, *(type(np.dtype(c)) for c in "?bhilqBHILQefdg")]
    with torch.serialization.safe_globals(numpy_globals):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, tower: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line `EncoderWeightsError` on any mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} keys (e.g. {keys[:3]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong))
            if keys
        ]
        raise EncoderWeightsError(f"{tower} weights {path}: do not fit the architecture: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def register_config(name: str, config: dict, known: Callable[[], list[str]], add: Callable[[Path], None]) -> None:
    """Register ``config`` under ``name`` in a library's model-config registry (once per process).

    open_clip and laion-clap only register configs from JSON files (``add_model_config(path)``, read at once
    into their in-memory registry), so the config is written to a temporary folder that is removed afterwards.
    """
    if name in known():
        return
    with tempfile.TemporaryDirectory(prefix="icf-model-configs-") as folder:
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        add(path)
