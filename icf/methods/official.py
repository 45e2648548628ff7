"""Released checkpoints of a method's authors → icf weights: a readable table of official key → icf key
(`KeyTable`) and what a method declares about its released files (`OfficialFormat`).

A row's two sides are key *templates*: literal text with placeholders

* ``{s}`` — a stage number, written 1-based on the official side (``tpavi_b4``, ``path4``) and 0-based on icf's
  (``tpavi.3``, ``fusion.3``);
* ``{i}`` — an index (block, convolution);
* ``{rest}`` — the rest of the key (a sub-module path and the parameter name), the same on both sides.

The first row whose official template matches a key decides it: its icf key, or nothing (``icf=None``: a tensor
the official model holds but never runs, dropped). ``conv3d`` marks an official Conv3d 1×1×1 weight ``(o, i, 1, 1,
1)`` whose numbers icf holds as a Conv2d 1×1 ``(o, i, 1, 1)`` or a linear map ``(o, i)``. The same table read the
other way (`KeyTable.to_official`) writes icf weights in the official layout (tests build official files so).

Every refusal is a `ValueError` naming the first key that does not fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

_PLACEHOLDERS = {"s": r"(?P<s>\d+)", "i": r"(?P<i>\d+)", "rest": r"(?P<rest>.+)"}


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    return re.compile("".join(re.escape(p) if k % 2 == 0 else _PLACEHOLDERS[p] for k, p in enumerate(parts)))


@dataclass(frozen=True)
class KeyRow:
    """One row of a `KeyTable`: official key template → icf key template (None: dropped)."""

    official: str
    icf: str | None
    conv3d: bool = False
    _patterns: tuple[re.Pattern[str], re.Pattern[str] | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_patterns", (_compile(self.official), _compile(self.icf) if self.icf else None))

    def match(self, key: str, side: str) -> dict[str, str] | None:
        """The placeholder values when ``key`` fits this row's ``side`` (``"official"`` | ``"icf"``), else None."""
        pattern = self._patterns[0 if side == "official" else 1]
        found = pattern.fullmatch(key) if pattern is not None else None
        return found.groupdict() if found else None


def _fill(template: str, values: Mapping[str, str], stage_shift: int) -> str:
    shifted = {**values, **({"s": str(int(values["s"]) + stage_shift)} if "s" in values else {})}
    return template.format(**shifted)


@dataclass(frozen=True)
class KeyTable:
    """Official state dict ↔ icf state dict, by `KeyRow` (module docstring)."""

    rows: tuple[KeyRow, ...]

    def icf_key(self, key: str) -> tuple[str | None, KeyRow] | None:
        """``(icf key or None when dropped, row)`` of an official key; None when no row fits."""
        for row in self.rows:
            values = row.match(key, "official")
            if values is not None:
                return (_fill(row.icf, values, -1) if row.icf else None), row
        return None

    def official_key(self, key: str) -> tuple[str, KeyRow] | None:
        """``(official key, row)`` of an icf key; None when no row writes it."""
        for row in self.rows:
            values = row.match(key, "icf")
            if values is not None:
                return _fill(row.official, values, +1), row
        return None

    def to_icf(self, official: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Official tensors → ``(icf state, dropped official keys)`` holding exactly the keys and shapes of
        ``expected`` (the model's own state). `ValueError` naming the first official key no row fits, that maps
        to a key the model lacks, or whose shape differs, and the first expected key the file lacks."""
        state: dict[str, Tensor] = {}
        dropped: list[str] = []
        for key, value in official.items():
            found = self.icf_key(key)
            if found is None:
                raise ValueError(f"key {key!r} fits no known official key")
            target, row = found
            if target is None:
                dropped.append(key)
                continue
            if target not in expected:
                raise ValueError(f"key {key!r} (icf {target}) does not exist in this model")
            want = tuple(expected[target].shape)
            if row.conv3d and value.ndim == 5 and value.shape[2:] == (1, 1, 1) and tuple(value.shape[:2]) == want[:2]:
                value = value.reshape(want)
            if tuple(value.shape) != want:
                raise ValueError(f"key {key!r} has shape {list(value.shape)}, the model's {target} has {list(want)}")
            state[target] = value.to(expected[target].dtype)
        for target in expected:
            if target not in state:
                back = self.official_key(target)
                if back is None:
                    raise ValueError(f"the model's {target} has no official counterpart (an option the official "
                                     "model does not have?)")
                raise ValueError(f"key {back[0]!r} is missing (icf {target})")
        return state, dropped

    def to_official(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """icf tensors → the official layout (the inverse of `to_icf` on the keys it keeps); `ValueError` for an
        icf key no row writes."""
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            found = self.official_key(key)
            if found is None:
                raise ValueError(f"icf key {key!r} has no official counterpart")
            name, row = found
            out[name] = value.reshape(*value.shape[:2], 1, 1, 1) if row.conv3d and value.ndim >= 2 else value
        return out


@dataclass(frozen=True)
class OfficialFormat:
    """How a method reads the checkpoints its authors release (``icf import``; `MethodSpec.import_official`).

    Attributes:
        name: what the file is, for messages and ``run.json``'s ``imported.format``.
        keys: the official → icf key table.
        options: the method options the file's keys imply (e.g. TPAVI's stages), before ``--set`` overrides.
    """

    name: str
    keys: KeyTable
    options: Callable[[Mapping[str, Tensor]], dict[str, Any]] = lambda _state: {}
