"""Where everything lives in the workspace, and the per-unit ledger.

Layout::

    WORK/<dataset>/manifest.parquet             one row per clip (+ status, error, unit)
    WORK/<dataset>/manifest.stats.json          the index stage's key, config and counts
    WORK/<dataset>/<stage>/current.json         key + config of the stage's latest run (for ``icf status``)
    WORK/<dataset>/<stage>/<key>/unit-XXXXX.out.parquet     outputs of the unit's ok samples
    WORK/<dataset>/<stage>/<key>/unit-XXXXX.status.parquet  every sample: uid, status, error, duration_s
    WORK/<dataset>/<stage>/<key>/unit-XXXXX.stats.json      written last: the unit is done iff it names
                                                            the current key and input signature and has
                                                            no pending sample
    WORK/<dataset>/<stage>/<key>/finish.json    the stage's dataset-level step is done (when it has one)

Sample statuses: ``ok``; ``failed`` (this stage could not process it; ``error`` names the file and
reason); ``skipped`` (an upstream stage failed it); ``pending`` (not computed yet, e.g. after ``--only``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from icf.clitools import UserError
from icf.pipeline.plan import Unit
from icf.pipeline.store import (
    CorruptFile, Output, atomic_write_json, atomic_write_parquet, parquet_problem, read_json, read_parquet, write_outputs,
)

OK, FAILED, SKIPPED, PENDING = "ok", "failed", "skipped", "pending"
STATUS_SCHEMA = pa.schema(
    [("uid", pa.string()), ("status", pa.string()), ("error", pa.string()), ("duration_s", pa.float64())]
)


@dataclass(frozen=True)
class SampleStatus:
    status: str
    error: str | None = None
    duration_s: float = 0.0


@dataclass(frozen=True)
class Workspace:
    """Paths of one dataset inside the workspace folder."""

    work: Path
    dataset: str

    @property
    def root(self) -> Path:
        return self.work / self.dataset

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def manifest_stats(self) -> Path:
        return self.root / "manifest.stats.json"

    def stage_root(self, stage: str) -> Path:
        return self.root / stage

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def current(self, stage: str) -> dict[str, Any] | None:
        """The key and config of the stage's latest run, or None if it never ran (or its record is corrupt:
        the next run of the stage rewrites it)."""
        try:
            return read_json(self.stage_root(stage) / "current.json")
        except CorruptFile:
            return None

    def current_key(self, name: str) -> str | None:
        """The latest cache key of stage ``name`` of this dataset, or, for ``"<dataset>/<stage>"`` (a borrowed
        output, `Stage.borrowed_keys`), of that stage of another dataset in the same workspace folder; None
        when it has not run."""
        dataset, _, stage = name.rpartition("/")
        ws = Workspace(self.work, dataset) if dataset else self
        return (ws.current(stage) or {}).get("cache_key")

    def set_current(self, stage: str, info: dict[str, Any]) -> None:
        """Record the stage's latest key and config (unchanged → not rewritten)."""
        if self.current(stage) != info:
            atomic_write_json(self.stage_root(stage) / "current.json", info)

    def no_manifest(self) -> UserError:
        """The one-line error for a dataset whose index stage has not run (or whose manifest is gone)."""
        return UserError(f"no manifest for {self.dataset!r} in {self.root}; run `icf stage index --dataset "
                         f"{self.dataset} --root DATA --work {self.work}` first")

    def read_manifest(self) -> pa.Table:
        """The manifest table; a one-line error when the index stage has not run."""
        stats = read_json(self.manifest_stats)
        if stats is None or not self.manifest.exists():
            raise self.no_manifest()
        try:
            return read_parquet(self.manifest)
        except CorruptFile as err:
            raise CorruptFile(f"{err}; `icf stage index --dataset {self.dataset} --root DATA --work {self.work}` "
                              "rebuilds it") from None

    def index_key(self) -> str:
        stats = read_json(self.manifest_stats)
        if stats is None:
            raise UserError(f"no manifest for {self.dataset!r} in {self.root}; run `icf stage index` first")
        return str(stats["cache_key"])


def unit_path(stage_dir: Path, unit: Unit, kind: str) -> Path:
    """``kind`` is ``out.parquet``, ``status.parquet`` or ``stats.json``."""
    return stage_dir / f"{unit.stem}.{kind}"


def read_stats(stage_dir: Path, unit: Unit) -> dict[str, Any] | None:
    """The unit's stats, or None when it has none or they are corrupt (either way: not done, recompute)."""
    try:
        stats = read_json(unit_path(stage_dir, unit, "stats.json"))
    except CorruptFile:
        return None
    return stats if isinstance(stats, dict) and {"cache_key", "inputs", "pending"} <= set(stats) else None


def read_status(stage_dir: Path, unit: Unit) -> dict[str, SampleStatus]:
    """uid → status of the unit's clips; empty when the table is missing or corrupt."""
    path = unit_path(stage_dir, unit, "status.parquet")
    if not path.exists():
        return {}
    try:
        rows = read_parquet(path).to_pylist()
    except CorruptFile:
        return {}
    return {r["uid"]: SampleStatus(r["status"], r["error"], r["duration_s"]) for r in rows}


def count_unit(status: Mapping[str, SampleStatus], uids: Iterable[str], counts: dict[str, int],
               failures: list[tuple[str, str]]) -> None:
    """Add one unit's clips to ``counts`` by status (a clip without a row is pending) and its failed clips
    with their reasons to ``failures``: the one tally the engine's summary and ``icf status`` share."""
    for uid in uids:
        st = status.get(uid)
        name = st.status if st else PENDING
        counts[name] = counts.get(name, 0) + 1
        if name == FAILED:
            failures.append((uid, st.error or ""))


def unit_problem(stage_dir: Path, unit: Unit) -> str | None:
    """Why a unit whose stats exist cannot be trusted: a missing or corrupt stats, status or output file.

    Returns the first problem (naming the file) or None. Reads the stats file and the parquet footers only.
    """
    stats_path = unit_path(stage_dir, unit, "stats.json")
    try:
        if read_json(stats_path) is None:
            return f"{stats_path}: missing file"
    except CorruptFile as err:
        return str(err)
    for kind in ("status.parquet", "out.parquet"):
        problem = parquet_problem(unit_path(stage_dir, unit, kind))
        if problem:
            return problem
    return None


def is_done(stats: dict[str, Any] | None, key: str, inputs: str) -> bool:
    """A unit counts as done only when its stats name this key and input signature and nothing is pending."""
    return bool(stats) and stats["cache_key"] == key and stats["inputs"] == inputs and stats["pending"] == 0


def write_unit(
    stage_dir: Path,
    unit: Unit,
    outputs: dict[str, dict[str, Output]],
    status: dict[str, SampleStatus],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """Write outputs, then the status table, then the stats file (last, so it marks completion).

    Returns the stats as written (with per-status counts added).
    """
    uids = sorted(status)
    table = pa.Table.from_pydict(
        {
            "uid": uids,
            "status": [status[u].status for u in uids],
            "error": [status[u].error for u in uids],
            "duration_s": [float(status[u].duration_s) for u in uids],
        },
        schema=STATUS_SCHEMA,
    )
    counts = {s: sum(status[u].status == s for u in uids) for s in (OK, FAILED, SKIPPED, PENDING)}
    full = {**stats, **counts, "unit": unit.id, "split": unit.split, "n": len(uids)}
    write_outputs(unit_path(stage_dir, unit, "out.parquet"), outputs)
    atomic_write_parquet(unit_path(stage_dir, unit, "status.parquet"), table)
    atomic_write_json(unit_path(stage_dir, unit, "stats.json"), full)
    return full
