"""Stage ``index``: the dataset's CSV and files → ``WORK/<dataset>/manifest.parquet``.

Wraps :func:`icf.data.index.build_manifest` (one row per CSV row, ``status`` ok/failed with a reason) and
adds the ``unit`` column (:func:`icf.pipeline.plan.assign_units`) that fixes every later stage's units.
Its cache key hashes the config (dataset, root, splits, unit size) *and* the manifest's content, so a
rescan that finds different files gives every downstream stage a new key. It is skipped when the
manifest was built with the same config, unless ``force``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from icf.data.index import Progress, build_manifest, write_manifest
from icf.pipeline.ledger import Workspace
from icf.pipeline.plan import assign_units, cache_key, digest
from icf.pipeline.store import atomic_write_json, read_json

VERSION = "1"
DEFAULT_UNIT_SIZE = 32


@dataclass(frozen=True)
class IndexSummary:
    cache_key: str
    ok: int
    failed: int
    failures: list[tuple[str, str]]
    rebuilt: bool
    seconds: float

    def line(self) -> str:
        done = "built" if self.rebuilt else "up to date (--force rescans the files)"
        return f"index [{self.cache_key}]: {self.ok} ok, {self.failed} failed; manifest {done}, {self.seconds:.1f}s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": "index",
            "cache_key": self.cache_key,
            "counts": {"ok": self.ok, "failed": self.failed},
            "failures": [{"uid": u, "error": e} for u, e in self.failures],
            "rebuilt": self.rebuilt,
            "seconds": round(self.seconds, 3),
        }


def with_units(table: pa.Table, unit_size: int) -> pa.Table:
    """The manifest plus its ``unit`` column (int32)."""
    units = assign_units(table.column("uid").to_pylist(), table.column("split").to_pylist(), unit_size)
    return table.append_column("unit", pa.array(units, pa.int32()))


def _failures(table: pa.Table) -> list[tuple[str, str]]:
    return [(r["uid"], r["error"]) for r in table.select(["uid", "status", "error"]).to_pylist() if r["status"] != "ok"]


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
    stats = read_json(ws.manifest_stats)
    if unit_size is None:
        unit_size = stats["config"]["unit_size"] if stats else DEFAULT_UNIT_SIZE
    config = {
        "dataset": ws.dataset,
        "root": str(Path(root).expanduser().resolve()),
        "splits": sorted(splits) if splits else None,
        "unit_size": unit_size,
    }
    config_key = cache_key("index", VERSION, config, {})
    if stats and not force and stats["config_key"] == config_key and ws.manifest.exists():
        failures = _failures(ws.read_manifest())
        return IndexSummary(stats["cache_key"], stats["ok"], stats["failed"], failures, False, time.perf_counter() - t0)
    table = with_units(build_manifest(ws.dataset, root, splits, progress=progress), unit_size)
    ws.manifest_stats.unlink(missing_ok=True)  # a run killed before the new stats land must rebuild
    write_manifest(table, ws.manifest)
    failures = _failures(table)
    key = digest({"config": config_key, "content": digest(table.to_pylist())})
    ok = table.num_rows - len(failures)
    atomic_write_json(
        ws.manifest_stats,
        {"stage": "index", "cache_key": key, "config_key": config_key, "config": config, "ok": ok, "failed": len(failures)},
    )
    return IndexSummary(key, ok, len(failures), failures, True, time.perf_counter() - t0)
