"""The driver: plan units, decide what is done, dispatch the rest, show progress, summarise.

``run_stage`` is the one entry point every ``icf stage <name>`` command (and ``icf stage all``) calls.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from icf.clitools import UserError
from icf.data.io import healed
from icf.data.sample import Sample
from icf.pipeline.ledger import (
    FAILED, OK, PENDING, SKIPPED, SampleStatus, Workspace, count_unit, is_done, read_stats, read_status, unit_problem,
)
from icf.pipeline.plan import Unit, cache_key, digest, group_units
from icf.pipeline.restarts import phrase
from icf.pipeline.runners import make_runner
from icf.pipeline.stage import FinishContext, Stage
from icf.pipeline.store import CorruptFile, atomic_write_json, read_json, sweep_temp_files
from icf.pipeline.worker import UnitJob


@dataclass(frozen=True)
class RunOptions:
    """How to run a stage (none of these change outputs, so none enter the cache key)."""

    executor: str = "ray"
    ray_address: str | None = None
    force: bool = False
    only: frozenset[str] | None = None
    retry_failed: bool = False
    workers: int | None = None
    batch_size: int | None = None  # clips per process() call; None: the stage's clips_per_call
    progress: bool = True


@dataclass
class StageSummary:
    """What a stage run did; ``line()`` is the one-line summary printed at the end.

    ``restarts`` (`icf.pipeline.restarts.Restart` dicts) are the Ray workers that died while the stage ran,
    with their causes; ``resent`` counts the units Ray resent meanwhile (each is in ``computed`` once).
    """

    stage: str
    cache_key: str
    units: int = 0
    units_run: int = 0
    computed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    finish: dict[str, Any] = field(default_factory=dict)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    resent: int = 0

    @property
    def failed(self) -> int:
        return self.counts.get(FAILED, 0)

    def line(self) -> str:
        c = self.counts
        return (
            f"{self.stage} [{self.cache_key}]: {c.get(OK, 0)} ok, {c.get(FAILED, 0)} failed, "
            f"{c.get(SKIPPED, 0)} skipped, {c.get(PENDING, 0)} pending; {self.computed} computed in "
            f"{self.units_run}/{self.units} units, {self.seconds:.1f}s"
        ) + (f"; {phrase(self.restarts, self.resent)}" if self.restarts else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "cache_key": self.cache_key,
            "units": self.units,
            "units_run": self.units_run,
            "computed": self.computed,
            "counts": self.counts,
            "failures": [{"uid": u, "error": e} for u, e in self.failures],
            "seconds": round(self.seconds, 3),
            "finish": self.finish,
            "restarts": self.restarts,
            "units_resent": self.resent,
        }


@dataclass(frozen=True)
class ManifestView:
    """What every stage reads from the manifest.

    Attributes:
        units: the work units (each uid once: a later duplicate row of a uid failed at index and is only
            in the manifest, never in a unit).
        samples: uid → Sample of every ok row.
        index_failed: uid → reason, for uids whose (first) row failed at index.
        rows: uid → the row's digest (its fields and its files' size and mtime): the per-clip input
            signature, so a clip whose files changed is recomputed alone.
        order: digest of the uids in manifest (CSV) order.
    """

    units: list[Unit]
    samples: dict[str, Sample]
    index_failed: dict[str, str]
    rows: dict[str, str]
    order: str


def manifest_units(ws: Workspace) -> ManifestView:
    """The manifest as units, Samples, index failures and per-row digests (first row of each uid)."""
    rows = ws.read_manifest().to_pylist()
    first: dict[str, dict] = {}
    for row in rows:
        first.setdefault(row["uid"], row)
    samples, index_failed = {}, {}
    for uid, row in first.items():
        if row["status"] == OK:
            samples[uid] = Sample.from_row(row)
        else:
            index_failed[uid] = f"index: {row['error']}"
    digests = {uid: row.get("digest") or digest(row) for uid, row in first.items()}
    return ManifestView(group_units(first.values()), samples, index_failed, digests, digest([r["uid"] for r in rows]))


def refuse(ws: Workspace, stages: Iterable[Stage]) -> None:
    """``UserError`` when a stage's config cannot run on ``ws.dataset`` (`Stage.refusal`), before any work."""
    for stage in stages:
        reason = stage.refusal(ws.dataset)
        if reason:
            raise UserError(reason)


def stage_key(ws: Workspace, stage: Stage, upstream_keys: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """This stage's cache key and the upstream keys it was derived from.

    Upstream keys come from ``upstream_keys`` (``icf stage all`` passes the keys it just computed) or else
    from each upstream stage's latest run; an optional upstream (``Stage.wants``) joins only when it has run
    (or ``upstream_keys`` has it); the keys of other datasets' outputs the stage copies
    (`Stage.borrowed_keys`) join them.
    """
    ups: dict[str, str | None] = {"index": ws.index_key(), **stage.borrowed_keys(ws.work)}
    built = lambda name: bool(upstream_keys and name in upstream_keys) or ws.current(name) is not None  # noqa: E731
    for name in stage.reads(built):
        if upstream_keys and name in upstream_keys:
            ups[name] = upstream_keys[name]
            continue
        current = ws.current(name)
        if current is None:
            raise UserError(f"stage {stage.name!r} needs {name!r}; run `icf stage {name} --dataset {ws.dataset}` first")
        ups[name] = current["cache_key"]
    return cache_key(stage.name, stage.version, stage.config(), ups), ups


def unit_rows(unit: Unit, rows: Mapping[str, str]) -> dict[str, str]:
    """uid → row digest of the unit's clips."""
    return {u: rows[u] for u in unit.uids}


def _upstream_skips(ws: Workspace, stage: Stage, ups: Mapping[str, str], view: ManifestView) -> dict[str, str]:
    """uid → reason for every sample an upstream stage did not produce; refuses an upstream that is
    incomplete, corrupt or out of date (computed from other versions of the clips' files)."""
    skips: dict[str, str] = {}
    for name in read_stages(stage, ups):
        folder = ws.stage_dir(name, ups[name])
        run = f"run `icf stage {name} --dataset {ws.dataset} --work {ws.work}` (with its earlier options) first"
        for unit in view.units:
            stats = read_stats(folder, unit)
            if not stats or stats["pending"]:
                raise UserError(f"stage {name!r} is not complete for {ws.dataset!r} (e.g. unit {unit.id}); {run}")
            problem = unit_problem(folder, unit)
            if problem:
                raise UserError(f"stage {name!r} has a damaged unit ({problem}); {run}: it recomputes that unit")
            if stats.get("uid_rows") != unit_rows(unit, view.rows):
                raise UserError(f"stage {name!r} is out of date for unit {unit.id} (clip files changed since it ran); {run}")
            for uid, st in read_status(folder, unit).items():
                if st.status != OK and uid not in skips:
                    skips[uid] = f"{name}: {st.error}" if st.status == FAILED else st.error or name
    return skips


def read_stages(stage: Stage, ups: Mapping[str, Any]) -> tuple[str, ...]:
    """The upstream stages a run with upstream keys ``ups`` reads (`Stage.reads`: needs, and the wants it has)."""
    return stage.reads(lambda name: name in ups)


def input_signatures(unit: Unit, rows: Mapping[str, str], skips: Mapping[str, str]) -> dict[str, str]:
    """uid → signature of what its result depends on: its manifest row (files included) and whether an
    upstream stage (or the index) failed it and why."""
    return {u: digest([rows[u], skips.get(u)]) for u in unit.uids}


def healed_failures(status: Mapping[str, SampleStatus], samples: Mapping[str, Sample]) -> set[str]:
    """The uids this stage failed because a file was missing or unreadable whose file now checks out
    (`icf.data.io.healed`): the failure may have been transient (their input signature is unchanged when
    the file came back as it was), so they are computed again."""
    return {u for u, st in status.items() if st.status == FAILED and u in samples and healed(samples[u], st.error)}


def _todo(unit: Unit, reuse: bool, opts: RunOptions, status: Mapping[str, SampleStatus],
          changed: set[str]) -> tuple[str, ...]:
    """The uids of ``unit`` to compute now: --only's, all (forced or nothing reusable), or the pending and
    changed (or healed) ones plus, with --retry-failed, the failed ones."""
    if opts.only is not None:
        return tuple(u for u in unit.uids if u in opts.only)
    if opts.force or not reuse:
        return unit.uids
    redo = {PENDING} | ({FAILED} if opts.retry_failed else set())
    return tuple(u for u in unit.uids if u in changed or u not in status or status[u].status in redo)


def plan_jobs(ws: Workspace, stage: Stage, key: str, ups: Mapping[str, str], opts: RunOptions) -> tuple[ManifestView, list[UnitJob]]:
    """The manifest view, and a job for each unit that has something to compute.

    A unit's previous files are reused only when they name this key and every one of them is readable; a
    damaged unit is recomputed whole, without reading the damaged file.
    """
    view = manifest_units(ws)
    unknown = sorted((opts.only or set()) - {u for unit in view.units for u in unit.uids})
    if unknown:
        raise UserError(f"--only: {len(unknown)} clip ids are not in the {ws.dataset} manifest: {', '.join(unknown[:5])}")
    skips = {**_upstream_skips(ws, stage, ups, view), **view.index_failed}
    folder = ws.stage_dir(stage.name, key)
    upstream_dirs = {name: ws.stage_dir(name, ups[name]) for name in read_stages(stage, ups)}
    jobs = []
    for unit in view.units:
        if opts.only is not None and not set(unit.uids) & opts.only:
            continue
        sigs = input_signatures(unit, view.rows, skips)
        inputs = digest(sorted(sigs.items()))
        prev = read_stats(folder, unit)
        reuse = bool(prev) and prev["cache_key"] == key and unit_problem(folder, unit) is None
        status = read_status(folder, unit) if reuse else {}
        kept = dict(prev.get("uid_inputs") or {}) if reuse else {}
        changed = {u for u in unit.uids if kept.get(u) != sigs[u]} | healed_failures(status, view.samples)
        todo = _todo(unit, reuse, opts, status, changed)
        if not todo and is_done(prev, key, inputs):
            continue
        if set(todo) >= set(unit.uids):
            reuse, kept = False, {}  # everything is recomputed: never read the old files
        jobs.append(
            UnitJob(
                unit=unit,
                samples=tuple(view.samples[u] for u in unit.uids if u in view.samples),
                stage_dir=folder,
                cache_key=key,
                uid_inputs=sigs,
                kept_inputs={u: kept[u] for u in unit.uids if u in kept and u not in todo},
                rows=unit_rows(unit, view.rows),
                kept_rows={u: r for u, r in (prev.get("uid_rows") or {}).items() if u in kept and u not in todo} if reuse else {},
                skipped={u: skips[u] for u in unit.uids if u in skips},
                todo=todo,
                reuse=reuse,
                upstream_dirs=upstream_dirs,
                batch_size=opts.batch_size or stage.clips_per_call,
                extra_stats=stage.stats(),
            )
        )
    return view, jobs


def progress_bar(console: Console, enabled: bool) -> Progress:
    """The bar every stage shows: description, bar, done/total clips, elapsed time and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("clips"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _tally(folder: Path, units: Iterable[Unit], summary: StageSummary) -> dict[int, tuple[str, tuple[str, ...]]]:
    """Fill the summary's counts and failures from the ledger; return unit → (split, ok uids)."""
    ok_units = {}
    for unit in units:
        status = read_status(folder, unit)
        count_unit(status, unit.uids, summary.counts, summary.failures)
        ok_units[unit.id] = (unit.split, tuple(u for u in unit.uids if status.get(u) and status[u].status == OK))
    return ok_units


def finish_signature(folder: Path, view: ManifestView, ok_units: Mapping[int, Any]) -> str:
    """What a stage's dataset-level step depends on: which clips are ok in each unit, each unit's input
    signature (so a recomputed clip re-runs it) and the manifest order."""
    inputs = [(unit.id, (read_stats(folder, unit) or {}).get("inputs")) for unit in view.units]
    return digest([sorted(ok_units.items()), inputs, view.order])


def _finish(ws: Workspace, stage: Stage, key: str, ups: Mapping[str, str], ok_units: dict, signature: str,
            force: bool) -> dict[str, Any]:
    """Run ``stage.finish`` unless its marker names the same key and signature and its outputs are intact
    (a deleted ``shards.json`` or tar, or one another key wrote, makes it run again)."""
    folder = ws.stage_dir(stage.name, key)
    marker = folder / "finish.json"
    try:
        prev = read_json(marker)
    except CorruptFile:
        prev = None
    if (prev and not force and prev.get("cache_key") == key and prev.get("units") == signature
            and stage.finish_problem(ws.root, key) is None):
        return prev["result"]
    ctx = FinishContext(
        dataset=ws.dataset,
        dataset_dir=ws.root,
        stage_dir=folder,
        cache_key=key,
        upstream_dirs={n: ws.stage_dir(n, ups[n]) for n in read_stages(stage, ups)},
        units=ok_units,
    )
    result = stage.finish(ctx)
    atomic_write_json(marker, {"cache_key": key, "units": signature, "result": result})
    return result


def gpu_available() -> bool:
    """Whether the stage's workers have a GPU: this machine's, or the Ray cluster's when one is connected."""
    import torch

    if torch.cuda.is_available():
        return True
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def _duration(seconds: float) -> str:
    """``seconds`` as ``"40 s"``, ``"12 min"`` or ``"3.5 h"``."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def run_stage(
    ws: Workspace,
    stage: Stage,
    opts: RunOptions,
    console: Console,
    upstream_keys: Mapping[str, str] | None = None,
) -> StageSummary:
    """Bring ``stage`` up to date for ``ws.dataset``: compute what is not done, skip what is."""
    t0 = time.perf_counter()
    refuse(ws, [stage])
    key, ups = stage_key(ws, stage, upstream_keys)
    folder = ws.stage_dir(stage.name, key)
    sweep_temp_files(folder)
    ws.set_current(stage.name, {"cache_key": key, "version": stage.version, "config": stage.config(), "upstream": ups,
                                "options": dataclasses.asdict(stage.cfg)})
    view, jobs = plan_jobs(ws, stage, key, ups, opts)
    units = view.units
    for notice in stage.notices():
        console.print(f"[bold red]WARNING[/] {notice}", highlight=False)
    summary = StageSummary(stage.name, key, units=len(units), units_run=len(jobs))
    total = sum(job.n_compute for job in jobs)
    hint, started = stage.cpu_hint(), time.perf_counter()
    runner = make_runner(opts.executor, opts.workers, opts.ray_address)
    with progress_bar(console, opts.progress and total > 0) as progress:
        bar = progress.add_task(f"{ws.dataset} {stage.name}", total=total)
        for report in runner.run(stage, jobs):
            if hint and summary.computed == 0 and report.computed and not gpu_available():
                pace = (time.perf_counter() - started) / report.computed
                progress.console.print(f"[yellow]note:[/] {hint}; at the first unit's pace ({pace:.1f} s a clip) "
                                       f"the {total} clips take about {_duration(pace * total)}", highlight=False)
            summary.computed += report.computed
            progress.advance(bar, report.computed)
    summary.restarts = [r.to_dict() for r in getattr(runner, "restarts", ())]
    summary.resent = getattr(runner, "resent", 0)
    ok_units = _tally(folder, units, summary)
    if summary.counts.get(PENDING, 0) == 0 and type(stage).finish is not Stage.finish:
        summary.finish = _finish(ws, stage, key, ups, ok_units, finish_signature(folder, view, ok_units), opts.force)
    summary.seconds = time.perf_counter() - t0
    return summary
