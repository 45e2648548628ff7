"""Stage ``index``: the dataset's CSV and files → ``WORK/<dataset>/manifest.parquet``.

Wraps :func:`icf.data.index.build_manifest` (one row per CSV row, ``status`` ok/failed with a reason) and
adds the ``unit`` column (:func:`icf.pipeline.plan.assign_units`) that fixes every later stage's units.
Its cache key hashes the config alone (dataset, root, splits, unit size); the content is in each row's
``digest`` (fields + files' size and mtime), which downstream stages use as the clip's input signature,
so a clip whose files changed is recomputed alone and the others keep their results.

Every run re-reads the CSV and ``stat``s every file (cheap); rows whose digest is unchanged keep their
verdict, the others are re-checked; the manifest is rewritten only when something changed. ``force``
re-checks every file. A missing or corrupt manifest or stats file is rebuilt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from icf.data.index import Progress, build_manifest, write_manifest
from icf.pipeline.ledger import Workspace
from icf.pipeline.plan import assign_units, cache_key
from icf.pipeline.store import CorruptFile, atomic_write_json, read_json

VERSION = "2"  # 2: per-row digests; the key is the config's alone
DEFAULT_UNIT_SIZE = 32


@dataclass(frozen=True)
class IndexSummary:
    cache_key: str
    ok: int
    failed: int
    failures: list[tuple[str, str]]
    rebuilt: bool
    seconds: float
    rechecked: int = 0

    def line(self) -> str:
        done = f"built ({self.rechecked} rows checked)" if self.rebuilt else "up to date (--force re-checks every file)"
        return f"index [{self.cache_key}]: {self.ok} ok, {self.failed} failed; manifest {done}, {self.seconds:.1f}s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": "index",
            "cache_key": self.cache_key,
            "counts": {"ok": self.ok, "failed": self.failed},
            "failures": [{"uid": u, "error": e} for u, e in self.failures],
            "rebuilt": self.rebuilt,
            "rechecked": self.rechecked,
            "seconds": round(self.seconds, 3),
        }


def with_units(table: pa.Table, unit_size: int) -> pa.Table:
    """The manifest plus its ``unit`` column (int32)."""
    units = assign_units(table.column("uid").to_pylist(), table.column("split").to_pylist(), unit_size)
    return table.append_column("unit", pa.array(units, pa.int32()))


def _failures(table: pa.Table) -> list[tuple[str, str]]:
    return [(r["uid"], r["error"]) for r in table.select(["uid", "status", "error"]).to_pylist() if r["status"] != "ok"]


def _previous(ws: Workspace, config_key: str) -> tuple[dict[str, Any] | None, pa.Table | None]:
    """The stats and manifest of the last index run with this config; (None, None) when there is none or
    either file is corrupt (the run then rebuilds them)."""
    try:
        stats = read_json(ws.manifest_stats)
        if not stats or stats.get("config_key") != config_key or not ws.manifest.exists():
            return stats if isinstance(stats, dict) else None, None
        return stats, ws.read_manifest()
    except CorruptFile:
        return None, None


def run_index(
    ws: Workspace,
    root: Path,
    splits: list[str] | None,
    unit_size: int | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> IndexSummary:
    """Build (or keep) the manifest of ``ws.dataset`` under ``root``; raises ``UserError`` for a bad root/CSV.

    ``unit_size`` None keeps the existing manifest's unit size (else ``DEFAULT_UNIT_SIZE``);
    ``progress(done, total)`` follows the file checks.
    """
    t0 = time.perf_counter()
    try:
        old_stats = read_json(ws.manifest_stats)
    except CorruptFile:
        old_stats = None
    if unit_size is None:
        unit_size = (old_stats or {}).get("config", {}).get("unit_size", DEFAULT_UNIT_SIZE)
    config = {
        "dataset": ws.dataset,
        "root": str(Path(root).expanduser().resolve()),
        "splits": sorted(splits) if splits else None,
        "unit_size": unit_size,
    }
    key = cache_key("index", VERSION, config, {})
    stats, before = _previous(ws, key)
    previous: dict[str, dict] = {}
    for row in [] if before is None or force else before.select(["uid", "digest", "error"]).to_pylist():
        previous.setdefault(row["uid"], row)  # the first row of a uid (later duplicates failed)
    table = with_units(build_manifest(ws.dataset, root, splits, progress=progress, previous=previous), unit_size)
    failures = _failures(table)
    ok = table.num_rows - len(failures)
    if stats and before is not None and before.equals(table):
        return IndexSummary(key, ok, len(failures), failures, False, time.perf_counter() - t0)
    old = {r["uid"]: r["digest"] for r in (before.select(["uid", "digest"]).to_pylist() if before is not None else [])}
    rechecked = sum(old.get(u) != d for u, d in zip(table.column("uid").to_pylist(), table.column("digest").to_pylist()))
    ws.manifest_stats.unlink(missing_ok=True)  # a run killed before the new stats land must rebuild
    write_manifest(table, ws.manifest)
    atomic_write_json(
        ws.manifest_stats,
        {"stage": "index", "cache_key": key, "config_key": key, "config": config, "ok": ok, "failed": len(failures)},
    )
    return IndexSummary(key, ok, len(failures), failures, True, time.perf_counter() - t0,
                        len(table) if force else rechecked)
