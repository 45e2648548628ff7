"""Stage ``index``: the dataset's CSV and files → ``WORK/<dataset>/manifest.parquet``, one row per CSV row.

:func:`build_manifest`: adapters turn the CSV into Samples, :func:`check_sample` checks each one's metadata
and (cheaply, `icf.data.io.media_errors`) its files, and every row is kept with ``status`` ``ok`` or
``failed`` and an ``error`` that names the file (or CSV line) and the reason. Only problems with the dataset
as a whole (unknown dataset, missing root or CSV, wrong header) raise ``UserError``.

Each row also gets a ``digest``: a hash of its fields and of every file's size and mtime (a cheap ``stat``, no
read). It is the clip's input signature downstream, so editing one clip's files in place recomputes that clip
alone, and a rescan re-checks only the rows whose digest changed or that failed for a missing or unreadable
file (which may have been transient). Rows that would corrupt the output fail here
with a reason: a uid that an earlier row already has (the first row is kept), a uid whose WebDataset key
(`icf.data.shard_format.sample_key`) collides with an earlier row's, a uid or file path that leaves ``root``.

:func:`run_index` adds the ``unit`` column (:func:`icf.pipeline.plan.assign_units`) that fixes every later
stage's units. Its cache key hashes the config alone (dataset, root, splits, unit size); every run re-reads
the CSV and ``stat``s every file; the manifest is rewritten only when something changed. ``force``
re-checks every file. A missing or corrupt manifest or stats file is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from icf.data.adapters import load_rows
from icf.data.io import media_errors, sample_files, unavailable_file
from icf.data.datasets import SPLITS, load_info
from icf.data.sample import Sample
from icf.data.shard_format import sample_key
from icf.pipeline.ledger import Workspace
from icf.pipeline.plan import assign_units, cache_key
from icf.pipeline.store import CorruptFile, atomic_write, atomic_write_json, read_json

VERSION = "2"  # 2: per-row digests; the key is the config's alone
DEFAULT_UNIT_SIZE = 32
MANIFEST_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("subset", pa.string()),
        ("frame_paths", pa.list_(pa.string())),
        ("mask_paths", pa.list_(pa.string())),
        ("gt_frames", pa.list_(pa.bool_())),
        ("audio_path", pa.string()),
        ("classes", pa.list_(pa.string())),
        ("n_frames", pa.int32()),
        ("extra", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("digest", pa.string()),
    ]
)
MAX_ERRORS = 3  # problems listed per row; the rest are counted


def _metadata_errors(sample: Sample) -> list[str]:
    info = load_info(sample.dataset)
    errors = []
    if sample.split not in SPLITS:
        errors.append(f"unknown split {sample.split!r} (expected {', '.join(SPLITS)})")
    for name in sample.classes:
        if name not in info.classes:
            errors.append(f"unknown class {name!r} (not in manifests/{sample.dataset}.toml)")
    return errors


def check_sample(sample: Sample, check_media: bool = True) -> str:
    """Everything wrong with one Sample, as one line (``""`` when it is usable).

    Checks the split and class names against the manifest and, with ``check_media``, that every frame,
    every GT mask (same size as its frame) and the WAV exist and are readable. At most
    ``MAX_ERRORS`` problems are spelled out; each names the file and the reason.
    """
    errors = _metadata_errors(sample)
    if check_media:
        errors += media_errors(sample)
    if len(errors) > MAX_ERRORS:
        errors = errors[:MAX_ERRORS] + [f"and {len(errors) - MAX_ERRORS} more problems"]
    return "; ".join(errors)


def _uid_errors(samples: list[Sample]) -> list[str]:
    """Per row, why its uid cannot be used: an earlier row has it, or an earlier row's uid has the same
    WebDataset key (``abc.1`` and ``abc_1``), or it is a path that climbs out (``..``, absolute)."""
    seen: set[str] = set()
    keys: dict[str, str] = {}
    out = []
    for s in samples:
        parts = s.uid.replace("\\", "/").split("/")
        if not s.uid.strip() or s.uid.startswith("/") or any(p in ("", ".", "..") for p in parts):
            out.append(f"uid {s.uid!r} is not a plain relative name (empty, absolute, or with '.'/'..' parts)")
        elif s.uid in seen:
            out.append(f"duplicate uid {s.uid!r} (an earlier CSV row has it)")
        elif sample_key(s.uid) in keys:
            out.append(f"uid {s.uid!r} collides with the earlier uid {keys[sample_key(s.uid)]!r}: both are the "
                       f"WebDataset key {sample_key(s.uid)!r}")
        else:
            out.append("")
        seen.add(s.uid)
        keys.setdefault(sample_key(s.uid), s.uid)
    return out


def outside_root(sample: Sample, root: Path) -> str:
    """The first of the clip's files whose path leaves ``root`` (``..`` in the CSV), or that is a symlink to a
    file outside it (a dataset tarball could pull any readable file into the shards), as a reason, or ``""``.

    Paths are normalised, and only a file that is itself a symlink is resolved, so a dataset whose folders
    are symlinks still works."""
    base = os.path.normpath(os.path.abspath(root))
    real = os.path.realpath(base)
    for path in sample_files(sample):
        full = os.path.normpath(os.path.abspath(path))
        if os.path.commonpath([base, full]) != base:
            return f"{path}: outside the dataset root {base} (path traversal in the CSV?)"
        if os.path.islink(full):
            target = os.path.realpath(full)
            if os.path.commonpath([real, target]) != real and os.path.commonpath([base, target]) != base:
                return f"{path}: a symlink to {target}, outside the dataset root {base}"
    return ""


def _stat(path: str) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def row_digest(row: Mapping[str, Any], files: Sequence[list[int] | None], problem: str) -> str:
    """The clip's input signature: its manifest fields, its files' size/mtime, and any CSV-level problem."""
    payload = json.dumps([dict(row), list(files), problem], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


Progress = Callable[[int, int], None]
Previous = Mapping[str, Mapping[str, Any]]  # uid → an earlier manifest row (its digest, status and error)


def build_manifest(
    dataset: str,
    root: str | Path,
    splits: Sequence[str] | None = None,
    check_media: bool = True,
    workers: int = 8,
    progress: Progress | None = None,
    previous: Previous | None = None,
) -> pa.Table:
    """The manifest of ``dataset`` under ``root``: one row per CSV row (in CSV order), optionally only
    ``splits``.

    Columns: :meth:`Sample.to_row` fields, ``status`` (``ok`` | ``failed``), ``error`` (``""`` when
    ok) and ``digest``, typed by :data:`MANIFEST_SCHEMA`. Bad rows never raise (a malformed CSV row is a
    failed row with no files); ``UserError`` is raised for an unknown dataset or split, a missing root, a
    missing CSV or one with the wrong columns. Media checks run on a pool of ``workers`` threads (they are
    I/O bound); ``progress(done, total)`` is called as rows are checked. A row whose digest equals its
    ``previous`` row's keeps that row's verdict without re-reading its files, unless that verdict blamed a
    missing or unreadable file (`icf.data.io.unavailable_file`: it may have been transient).
    """
    loaded = load_rows(dataset, root, splits)
    samples = [s for s, _ in loaded]
    rows = [(s, problem or uid_err) for (s, problem), uid_err in zip(loaded, _uid_errors(samples))]
    previous = previous or {}

    def check(item: tuple[Sample, str]) -> tuple[str, str]:
        sample, problem = item
        problem = problem or outside_root(sample, Path(root))
        base = sample.to_row()
        digest = row_digest(base, [] if problem else [_stat(p) for p in sample_files(sample)], problem)
        before = previous.get(sample.uid)
        if before is not None and before.get("digest") == digest and not unavailable_file(sample, before["error"] or ""):
            return digest, before["error"] or ""  # a missing/unreadable verdict is re-checked: it may be transient
        return digest, problem or check_sample(sample, check_media)

    found = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(check, rows):
            found.append(result)
            if progress is not None:
                progress(len(found), len(rows))
    table_rows = []
    for sample, (digest, error) in zip(samples, found):
        table_rows.append({**sample.to_row(), "status": "failed" if error else "ok", "error": error, "digest": digest})
    return pa.Table.from_pylist(table_rows, schema=MANIFEST_SCHEMA)


def write_manifest(table: pa.Table, path: str | Path) -> Path:
    """Write ``table`` as parquet at ``path`` with the shared atomic writer (a killed run never leaves a
    half-written manifest). Returns the path."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write(Path(path), buf.getvalue().to_pybytes())
    return Path(path)


@dataclass(frozen=True)
class IndexSummary:
    cache_key: str
    ok: int
    failed: int
    failures: list[tuple[str, str]]
    rebuilt: bool
    seconds: float
    rechecked: int = 0
    stage = "index"  # named like a StageSummary's stage

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
