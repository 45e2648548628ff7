"""``icf status``: per stage, its state, units done / pending and samples ok / failed / skipped / pending,
read from the ledger alone (no stage code runs, nothing is written).

A stage's state is ``done`` (every unit of its latest key finished, for the clips' current files, and its
dataset-level outputs on disk as it wrote them), ``incomplete`` (some units still pending or computed from
older versions of the clips' files, e.g. a killed run or ``--only``, or clips that failed for a missing or
unreadable file that checks out now: their failure says so), ``damaged`` (a unit file or a
dataset-level output is truncated, corrupt or missing: ``problems`` names each; the next run of the stage
repairs it), ``stale`` (its latest run was built on upstream keys, or keys of another dataset's outputs it
copied, that have changed since, or on a stage that is stale itself: rerun it) or ``not run``.
"""

from __future__ import annotations

from typing import Any

from icf.data.io import healed
from icf.data.sample import Sample
from icf.pipeline.engine import healed_failures, manifest_units, unit_rows
from icf.pipeline.ledger import (
    FAILED, OK, PENDING, SKIPPED, Workspace, count_unit, read_stats, read_status, unit_path, unit_problem,
)
from icf.pipeline.stage import Stage
from icf.pipeline.store import CorruptFile, read_json
from icf.stages import stage_classes

DONE, INCOMPLETE, STALE, NOT_RUN, DAMAGED = "done", "incomplete", "stale", "not run", "damaged"


HEALED = " (the file is readable again: the next run retries this clip)"


def _row_healed(row: dict[str, Any]) -> bool:
    """Whether a failed manifest row blamed a missing or unreadable file that now checks out."""
    try:
        return healed(Sample.from_row(row), row["error"])
    except (ValueError, TypeError, KeyError):  # a malformed CSV row names no files
        return False


def _index_status(ws: Workspace) -> dict[str, Any]:
    stats = read_json(ws.manifest_stats) or {}
    rows = ws.read_manifest().to_pylist()
    return {
        "stage": "index",
        "state": DONE,
        "cache_key": stats.get("cache_key"),
        "units_done": None,
        "units_pending": None,
        "counts": {OK: sum(r["status"] == OK for r in rows), FAILED: sum(r["status"] != OK for r in rows)},
        "failures": [{"uid": r["uid"], "error": r["error"] + (HEALED if _row_healed(r) else "")}
                     for r in rows if r["status"] != OK],
    }


def _is_stale(ws: Workspace, current: dict[str, Any], stale: set[str]) -> bool:
    """Whether the run recorded in ``current`` used an index, upstream or borrowed key that is no longer the
    latest, or an upstream stage that is itself stale (in ``stale``)."""
    latest = {"index": ws.index_key()}
    for name in current["upstream"]:
        if name != "index":
            latest[name] = ws.current_key(name)
    return latest != current["upstream"] or bool(stale & set(current["upstream"]))


def _has_finish(name: str) -> bool:
    """Whether the stage has a dataset-level ``finish`` step (then it is done only once that ran)."""
    return stage_classes()[name].finish is not Stage.finish


def _finish_problem(ws: Workspace, name: str, key: str) -> str | None:
    """Why the stage's dataset-level step is not done for ``key`` (None when it has none or it is done)."""
    cls = stage_classes()[name]
    if not _has_finish(name):
        return None
    marker = ws.stage_dir(name, key) / "finish.json"
    try:
        if (read_json(marker) or {}).get("cache_key") != key:
            return f"{marker}: the dataset-level step has not run"
    except CorruptFile as err:
        return str(err)
    return cls.finish_problem(ws.root, key)


def _stage_status(ws: Workspace, name: str, stale: set[str]) -> dict[str, Any]:
    current = ws.current(name)
    entry: dict[str, Any] = {"stage": name, "state": NOT_RUN, "cache_key": None, "units_done": 0,
                             "units_pending": None, "counts": {}, "failures": [], "problems": []}
    if current is None:
        return entry
    view = manifest_units(ws)
    folder = ws.stage_dir(name, current["cache_key"])
    counts = {OK: 0, FAILED: 0, SKIPPED: 0, PENDING: 0}
    failures: list[tuple[str, str]] = []
    back: set[str] = set()  # failed for a file that is readable again: the next run retries them
    done = 0
    for unit in view.units:
        stats = read_stats(folder, unit)
        problem = unit_problem(folder, unit) if unit_path(folder, unit, "stats.json").exists() else None
        if problem:
            entry["problems"].append(problem)
        status = read_status(folder, unit)
        healed_now = healed_failures(status, view.samples)
        back |= healed_now
        done += (bool(stats) and not problem and stats["pending"] == 0 and not healed_now
                 and stats.get("uid_rows") == unit_rows(unit, view.rows))
        count_unit(status, unit.uids, counts, failures)
    finish_problem = _finish_problem(ws, name, current["cache_key"])
    if finish_problem and done == len(view.units):
        entry["problems"].append(finish_problem)
    state = (STALE if _is_stale(ws, current, stale) else DAMAGED if entry["problems"]
             else DONE if done == len(view.units) and not finish_problem else INCOMPLETE)
    entry.update(state=state, cache_key=current["cache_key"], units_done=done, units_pending=len(view.units) - done,
                 counts=counts, failures=[{"uid": uid, "error": error + (HEALED if uid in back else "")}
                                         for uid, error in failures])
    return entry


def dataset_status(ws: Workspace) -> list[dict[str, Any]]:
    """One entry per stage (index first): state, key, units done/pending, sample counts, failures with reasons."""
    entries, stale = [_index_status(ws)], set()
    for name in stage_classes():  # pipeline order: a stage after a stale one is stale too
        entries.append(_stage_status(ws, name, stale))
        if entries[-1]["state"] == STALE:
            stale.add(name)
    return entries


def not_done(entries: list[dict[str, Any]]) -> list[str]:
    """Names of the stages that are not done, in pipeline order."""
    return [e["stage"] for e in entries if e["state"] != DONE]
