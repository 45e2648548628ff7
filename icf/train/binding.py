"""A run's binding to the shards it trained on (finding D1): ``run.json``'s ``data``.

``data`` records the shards' cache key, the sha256 of every tar (url relative to ``shards.json`` → digest, as
``shards.json`` lists them), the encoder spec of the frozen towers, and the configs of the stages that built the
shards (``WORK/<dataset>/<stage>/current.json`` along the shard stage's upstream keys). Evaluating, predicting,
comparing or resuming a run compares that record with what ``shards.json`` holds now: any difference is refused
in one line naming what changed and the ``icf stage all`` options that rebuild the old shards (the stages keep
their outputs per cache key, so that rerun is mostly cache hits), unless the caller allows other shards, in
which case the report says so. A run written before the binding existed loads with a one-line warning.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from icf.clitools import UserError, console
from icf.data.shards import ShardSet

DATA_KEY = "data"
STAGE_ORDER = ("extract", "mel", "bank", "shard")  # stages whose options `restage_command` names, in this order


def stage_configs(shards: ShardSet) -> dict[str, dict[str, Any]]:
    """``{stage: config}`` of the stages that built ``shards``: the shard stage's record when its key is the
    shards' key, then each upstream stage whose recorded key is the one the shard stage was built on (the index,
    and stages borrowed from other datasets, are left out)."""
    from icf.pipeline.ledger import Workspace

    ws = Workspace(shards.path.parent.parent, shards.path.parent.name)
    found: dict[str, dict[str, Any]] = {}
    todo = [("shard", shards.cache_key)]
    while todo:
        name, key = todo.pop()
        if name == "index" or "/" in name or name in found:
            continue
        try:
            record = ws.current(name) or {}
        except UserError:  # an unreadable record: that stage's options stay unknown
            continue
        if record.get("cache_key") != key:
            continue
        found[name] = dict(record.get("config") or {})
        todo += [(n, k) for n, k in (record.get("upstream") or {}).items() if k]
    return found


def shard_binding(shards: ShardSet) -> dict[str, Any]:
    """The ``data`` entry of ``run.json`` for a run trained on ``shards``."""
    digests = {os.path.relpath(e["url"], shards.path.parent): e.get("sha256")
               for entries in shards.splits.values() for e in entries}
    return {"shards_key": shards.cache_key, "digests": digests, "encoders": dict(shards.encoders),
            "stages": stage_configs(shards)}


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b": leaf}``."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for k, v in value.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _diff(name: str, old: Any, new: Any) -> list[str]:
    a, b = _flat(old), _flat(new)
    differ = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [f"{name}.{k} {json.dumps(a.get(k))} → {json.dumps(b.get(k))}" for k in differ]


def changes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the shards a run trained on (``recorded``) and those of ``now`` (both `shard_binding`
    documents), one phrase each; empty when they are the same shards."""
    out = []
    if recorded.get("shards_key") != now["shards_key"]:
        out.append(f"shard key {recorded.get('shards_key')} → {now['shards_key']}")
    out += _diff("encoders", recorded.get("encoders") or {}, now["encoders"])
    old_stages, new_stages = recorded.get("stages") or {}, now["stages"]
    for stage in sorted(set(old_stages) & set(new_stages)):
        old_cfg = {k: v for k, v in old_stages[stage].items() if k != "encoders"}  # the encoder spec is named above
        out += _diff(stage, old_cfg, {k: v for k, v in new_stages[stage].items() if k != "encoders"})
    old_tars, new_tars = recorded.get("digests") or {}, now["digests"]
    differ = sorted(u for u in set(old_tars) | set(new_tars) if old_tars.get(u) != new_tars.get(u))
    if differ:
        out.append(f"{len(differ)} of {len(old_tars)} tars differ (e.g. {differ[0]})")
    return out


def _flag(name: str, value: Any) -> str | None:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return None if value is None else f"{flag} {value}"


def restage_command(recorded: dict[str, Any], shards: ShardSet) -> str:
    """The ``icf stage all`` command that rebuilds the shards of ``recorded`` (its non-default stage options and
    encoder spec)."""
    from icf.encoders import EncoderSpec
    from icf.stages import stage_classes

    flags: list[str] = []
    encoders = dict(recorded.get("encoders") or {})
    seedless = {k: v for k, v in encoders.items() if k != "seed"}
    for preset_flags, spec in ((["--encoders tiny"], EncoderSpec.tiny()), ([], EncoderSpec())):
        if seedless == {k: v for k, v in spec.to_dict().items() if k != "seed"}:
            flags += preset_flags
            if encoders.get("seed", spec.seed) != spec.seed:
                flags.append(f"--encoder-seed {encoders['seed']}")
            break
    else:
        flags.append("--encoders FILE (FILE: a JSON file holding data.encoders of the run's run.json)")
    classes = stage_classes()
    for stage in STAGE_ORDER:
        config = (recorded.get("stages") or {}).get(stage)
        if config is None or stage not in classes:
            continue
        for field in dataclasses.fields(classes[stage].Config):
            value = config.get(field.name, field.default)
            if field.name in config and field.name != "encoders" and value != field.default:
                flags += [f for f in [_flag(field.name, value)] if f]
    work = shards.path.parent.parent
    return " ".join(["icf stage all", f"--dataset {shards.dataset}", f"--work {work}", *flags])


def check_shards(run: Path, doc: dict[str, Any], shards: ShardSet, allow_other_shards: bool = False,
                 action: str = "evaluate") -> str | None:
    """Compare the shards ``run`` trained on (``doc``, its ``run.json``) with ``shards``.

    Returns None when they are the same, when the run was imported (``icf import``: its weights were trained
    elsewhere, on no shards of this workspace), or when the run predates the binding (then a one-line warning is
    printed). Otherwise, with ``allow_other_shards``, returns the note a report carries (also printed as a
    warning); without it raises a one-line ``UserError`` naming what changed and how to get the old shards back
    (``action``: ``evaluate`` offers ``--allow-other-shards``, ``resume`` does not)."""
    recorded = doc.get(DATA_KEY)
    if "imported" in doc and recorded is None:
        return None
    if not isinstance(recorded, dict):
        warn(f"{run / 'run.json'} does not record the shards it trained on (written before icf did); using "
             f"{shards.path} as it is now")
        return None
    changed = changes(recorded, shard_binding(shards))
    if not changed:
        return None
    what = f"{shards.path} changed since {run} trained on it ({'; '.join(changed)})"
    if allow_other_shards:
        note = f"on other shards than it trained on: {'; '.join(changed)}"
        warn(f"{what}; {action} anyway (--allow-other-shards)")
        return note
    escape = ", or pass --allow-other-shards to evaluate anyway" if action == "evaluate" else ""
    raise UserError(f"{what}; rebuild the shards it trained on with `{restage_command(recorded, shards)}`{escape}")


def warn(message: str) -> None:
    """``warning: message`` on one line of stderr."""
    console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
