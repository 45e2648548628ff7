"""Work units and cache keys.

Units: the manifest's clips are cut per split into ``ceil(n_split / unit_size)`` buckets by a hash of the
uid; unit ids number the (split, bucket) pairs in a fixed split order. The assignment depends only on the
manifest and the unit size, so unit ids never change on rerun. It is written into the manifest's ``unit``
column by the index stage and every later stage reads it from there, so all stages share the same units
(unit k of ``shard`` reads unit k of ``mel``).

Cache keys: ``sha256(stage name, version, config, upstream keys)``; any change upstream changes every key
downstream, nothing upstream.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SPLIT_ORDER = ("train", "val", "test")
KEY_LENGTH = 16


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same in every process (unlike ``hash()``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def assign_units(uids: Sequence[str], splits: Sequence[str], unit_size: int) -> list[int]:
    """Unit id of each clip: per split, bucket = hash(uid) mod ceil(n_split / unit_size).

    Args:
        uids, splits: one entry per manifest row.
        unit_size: target clips per unit (units hold ``unit_size`` ± a few by the hash's spread).
    Returns:
        one unit id per row; ids are dense within a split and follow ``SPLIT_ORDER`` (unknown splits last,
        alphabetically).
    """
    if unit_size < 1:
        raise ValueError(f"unit_size must be >= 1, got {unit_size}")
    counts: dict[str, int] = {}
    for split in splits:
        counts[split] = counts.get(split, 0) + 1
    order = [s for s in SPLIT_ORDER if s in counts] + sorted(set(counts) - set(SPLIT_ORDER))
    offset, buckets = {}, {}
    next_id = 0
    for split in order:
        buckets[split] = math.ceil(counts[split] / unit_size)
        offset[split] = next_id
        next_id += buckets[split]
    return [offset[s] + stable_hash(u) % buckets[s] for u, s in zip(uids, splits)]


@dataclass(frozen=True)
class Unit:
    """A fixed group of clips processed, cached and retried together."""

    id: int
    split: str
    uids: tuple[str, ...]

    @property
    def stem(self) -> str:
        return f"unit-{self.id:05d}"


def group_units(rows: Iterable[Mapping[str, Any]]) -> list[Unit]:
    """Units from manifest rows (needs ``unit``, ``split``, ``uid``), uids sorted, units by id."""
    members: dict[int, list[str]] = {}
    split_of: dict[int, str] = {}
    for row in rows:
        members.setdefault(int(row["unit"]), []).append(row["uid"])
        split_of[int(row["unit"])] = row["split"]
    return [Unit(i, split_of[i], tuple(sorted(members[i]))) for i in sorted(members)]


def cache_key(name: str, version: str, config: Mapping[str, Any], upstream: Mapping[str, str]) -> str:
    """The folder name of a stage's outputs: a hash of everything that determines them."""
    payload = json.dumps(
        {"stage": name, "version": version, "config": config, "upstream": dict(sorted(upstream.items()))},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LENGTH]


def digest(obj: Any) -> str:
    """Short sha256 of a JSON-able object (input signatures, content fingerprints)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:KEY_LENGTH]
