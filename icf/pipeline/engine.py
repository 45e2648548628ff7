"""The driver: plan units, decide what is done, dispatch the rest, show progress, summarise.

``run_stage`` is the one entry point every ``icf stage <name>`` command (and ``icf stage all``) calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from icf.clitools import UserError
from icf.data.sample import Sample
from icf.pipeline.ledger import (
    FAILED, OK, PENDING, SKIPPED, SampleStatus, Workspace, is_done, read_stats, read_status,
)
from icf.pipeline.plan import Unit, cache_key, digest, group_units
from icf.pipeline.runners import make_runner
from icf.pipeline.stage import FinishContext, Stage
from icf.pipeline.store import atomic_write_json, read_json, sweep_temp_files
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
    """What a stage run did; ``line()`` is the one-line summary printed at the end."""

    stage: str
    cache_key: str
    units: int = 0
    units_run: int = 0
    computed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    finish: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return self.counts.get(FAILED, 0)

    def line(self) -> str:
        c = self.counts
        return (
            f"{self.stage} [{self.cache_key}]: {c.get(OK, 0)} ok, {c.get(FAILED, 0)} failed, "
            f"{c.get(SKIPPED, 0)} skipped, {c.get(PENDING, 0)} pending; {self.computed} computed in "
            f"{self.units_run}/{self.units} units, {self.seconds:.1f}s"
        )

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
        }


def manifest_units(ws: Workspace) -> tuple[list[Unit], dict[str, Sample], dict[str, str]]:
    """Units, Samples by uid, and index-stage failures (uid → reason) from the manifest."""
    rows = ws.read_manifest().to_pylist()
    samples, index_failed = {}, {}
    for row in rows:
        if row["status"] == OK:
            samples[row["uid"]] = Sample.from_row(row)
        else:
            index_failed[row["uid"]] = f"index: {row['error']}"
    return group_units(rows), samples, index_failed


def stage_key(ws: Workspace, stage: Stage, upstream_keys: Mapping[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """This stage's cache key and the upstream keys it was derived from.

    Upstream keys come from ``upstream_keys`` (``icf stage all`` passes the keys it just computed) or else
    from each upstream stage's latest run.
    """
    ups = {"index": ws.index_key()}
    for name in stage.needs:
        if upstream_keys and name in upstream_keys:
            ups[name] = upstream_keys[name]
            continue
        current = ws.current(name)
        if current is None:
            raise UserError(f"stage {stage.name!r} needs {name!r}; run `icf stage {name} --dataset {ws.dataset}` first")
        ups[name] = current["cache_key"]
    return cache_key(stage.name, stage.version, stage.config(), ups), ups


def _upstream_skips(ws: Workspace, stage: Stage, ups: Mapping[str, str], units: list[Unit]) -> dict[str, str]:
    """uid → reason for every sample an upstream stage did not produce; refuses incomplete upstreams."""
    skips: dict[str, str] = {}
    for name in stage.needs:
        folder = ws.stage_dir(name, ups[name])
        not_done = [u.id for u in units if (read_stats(folder, u) or {"pending": 1})["pending"]]
        if not_done:
            raise UserError(
                f"stage {name!r} is not complete for {ws.dataset!r} ({len(not_done)} units pending, e.g. "
                f"unit {not_done[0]}); run `icf stage {name} --dataset {ws.dataset}` first"
            )
        for unit in units:
            for uid, st in read_status(folder, unit).items():
                if st.status != OK and uid not in skips:
                    skips[uid] = f"{name}: {st.error}" if st.status == FAILED else st.error or name
    return skips


def _todo(unit: Unit, reuse: bool, opts: RunOptions, status: Mapping[str, SampleStatus]) -> tuple[str, ...]:
    """The uids of ``unit`` to compute now: --only's, all (forced or nothing reusable), or the pending
    ones plus, with --retry-failed, the failed ones."""
    if opts.only is not None:
        return tuple(u for u in unit.uids if u in opts.only)
    if opts.force or not reuse:
        return unit.uids
    redo = {PENDING} | ({FAILED} if opts.retry_failed else set())
    return tuple(u for u in unit.uids if u not in status or status[u].status in redo)


def plan_jobs(ws: Workspace, stage: Stage, key: str, ups: Mapping[str, str], opts: RunOptions) -> tuple[list[Unit], list[UnitJob]]:
    """All units of the dataset, and a job for each unit that has something to compute."""
    units, samples, index_failed = manifest_units(ws)
    unknown = sorted((opts.only or set()) - {u for unit in units for u in unit.uids})
    if unknown:
        raise UserError(f"--only: {len(unknown)} clip ids are not in the {ws.dataset} manifest: {', '.join(unknown[:5])}")
    skips = {**_upstream_skips(ws, stage, ups, units), **index_failed}
    folder = ws.stage_dir(stage.name, key)
    upstream_dirs = {name: ws.stage_dir(name, ups[name]) for name in stage.needs}
    jobs = []
    for unit in units:
        if opts.only is not None and not set(unit.uids) & opts.only:
            continue
        inputs = digest(sorted((u, skips.get(u)) for u in unit.uids))
        prev = read_stats(folder, unit)
        reuse = bool(prev) and prev["cache_key"] == key and prev["inputs"] == inputs
        status = read_status(folder, unit) if reuse else {}
        todo = _todo(unit, reuse, opts, status)
        if not todo and is_done(prev, key, inputs):
            continue
        jobs.append(
            UnitJob(
                unit=unit,
                samples=tuple(samples[u] for u in unit.uids if u in samples),
                stage_dir=folder,
                cache_key=key,
                inputs=inputs,
                skipped={u: skips[u] for u in unit.uids if u in skips},
                todo=todo,
                reuse=reuse,
                upstream_dirs=upstream_dirs,
                batch_size=opts.batch_size or stage.clips_per_call,
                extra_stats=stage.stats(),
            )
        )
    return units, jobs


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
        for uid in unit.uids:
            st = status.get(uid)
            name = st.status if st else PENDING
            summary.counts[name] = summary.counts.get(name, 0) + 1
            if name == FAILED:
                summary.failures.append((uid, st.error or ""))
        ok_units[unit.id] = (unit.split, tuple(u for u in unit.uids if status.get(u) and status[u].status == OK))
    return ok_units


def _finish(ws: Workspace, stage: Stage, key: str, ups: Mapping[str, str], ok_units: dict, force: bool) -> dict[str, Any]:
    """Run ``stage.finish`` unless its marker names the same key and the same set of ok samples."""
    folder = ws.stage_dir(stage.name, key)
    signature = digest(sorted(ok_units.items()))
    marker = folder / "finish.json"
    prev = read_json(marker)
    if prev and not force and prev["cache_key"] == key and prev["units"] == signature:
        return prev["result"]
    ctx = FinishContext(
        dataset=ws.dataset,
        dataset_dir=ws.root,
        stage_dir=folder,
        cache_key=key,
        upstream_dirs={n: ws.stage_dir(n, ups[n]) for n in stage.needs},
        units=ok_units,
    )
    result = stage.finish(ctx)
    atomic_write_json(marker, {"cache_key": key, "units": signature, "result": result})
    return result


def run_stage(
    ws: Workspace,
    stage: Stage,
    opts: RunOptions,
    console: Console,
    upstream_keys: Mapping[str, str] | None = None,
) -> StageSummary:
    """Bring ``stage`` up to date for ``ws.dataset``: compute what is not done, skip what is."""
    t0 = time.perf_counter()
    key, ups = stage_key(ws, stage, upstream_keys)
    folder = ws.stage_dir(stage.name, key)
    sweep_temp_files(folder)
    ws.set_current(stage.name, {"cache_key": key, "version": stage.version, "config": stage.config(), "upstream": ups})
    units, jobs = plan_jobs(ws, stage, key, ups, opts)
    for notice in stage.notices():
        console.print(f"[bold red]WARNING[/] {notice}", highlight=False)
    summary = StageSummary(stage.name, key, units=len(units), units_run=len(jobs))
    total = sum(job.n_compute for job in jobs)
    with progress_bar(console, opts.progress and total > 0) as progress:
        bar = progress.add_task(f"{ws.dataset} {stage.name}", total=total)
        for report in make_runner(opts.executor, opts.workers, opts.ray_address).run(stage, jobs):
            summary.computed += report.computed
            progress.advance(bar, report.computed)
    ok_units = _tally(folder, units, summary)
    if summary.counts.get(PENDING, 0) == 0 and type(stage).finish is not Stage.finish:
        summary.finish = _finish(ws, stage, key, ups, ok_units, opts.force)
    summary.seconds = time.perf_counter() - t0
    return summary
