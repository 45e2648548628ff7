"""``icf status``: per stage, units done / pending and samples ok / failed / skipped, from the ledger alone."""

from __future__ import annotations

from typing import Any

from icf.pipeline.engine import manifest_units
from icf.pipeline.ledger import FAILED, OK, PENDING, SKIPPED, Workspace, read_stats, read_status
from icf.pipeline.store import read_json
from icf.stages import stage_classes


def _index_status(ws: Workspace) -> dict[str, Any]:
    stats = read_json(ws.manifest_stats) or {}
    rows = ws.read_manifest().select(["uid", "status", "error"]).to_pylist()
    return {
        "stage": "index",
        "cache_key": stats.get("cache_key"),
        "units_done": None,
        "units_pending": None,
        "counts": {OK: sum(r["status"] == OK for r in rows), FAILED: sum(r["status"] != OK for r in rows)},
        "failures": [{"uid": r["uid"], "error": r["error"]} for r in rows if r["status"] != OK],
    }


def _stage_status(ws: Workspace, name: str) -> dict[str, Any]:
    current = ws.current(name)
    entry: dict[str, Any] = {"stage": name, "cache_key": None, "units_done": 0, "units_pending": None,
                             "counts": {}, "failures": []}
    if current is None:
        return entry
    units, _, _ = manifest_units(ws)
    folder = ws.stage_dir(name, current["cache_key"])
    counts = {OK: 0, FAILED: 0, SKIPPED: 0, PENDING: 0}
    done = 0
    for unit in units:
        stats = read_stats(folder, unit)
        done += bool(stats) and stats["pending"] == 0
        status = read_status(folder, unit)
        for uid in unit.uids:
            st = status.get(uid)
            counts[st.status if st else PENDING] += 1
            if st and st.status == FAILED:
                entry["failures"].append({"uid": uid, "error": st.error})
    entry.update(cache_key=current["cache_key"], units_done=done, units_pending=len(units) - done, counts=counts)
    return entry


def dataset_status(ws: Workspace) -> list[dict[str, Any]]:
    """One entry per stage (index first): key, units done/pending, sample counts, failures with reasons."""
    return [_index_status(ws)] + [_stage_status(ws, name) for name in stage_classes()]
