"""`run_pipeline`: index, then every stage in dependency order, each on the keys this run gave its upstream
stages (what ``icf stage all`` does; the tests and the bench call it too); `upstream_plan`: the upstream stages
one ``icf stage <name>`` brings up to date first, as ``make`` does."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console

from icf.pipeline.engine import RunOptions, StageSummary, refuse, run_stage
from icf.pipeline.ledger import Workspace
from icf.pipeline.stage import Stage
from icf.clitools import UserError
from icf.stages import stage_classes
from icf.stages.index import IndexSummary

Summary = StageSummary | IndexSummary


def pipeline_stages(configs: Mapping[str, Any] | None = None) -> list[Stage]:
    """Every unit stage in order, built with ``configs[name]`` (its ``Config``; default config otherwise)."""
    configs = configs or {}
    return [cls(configs.get(name)) for name, cls in stage_classes().items()]


def upstream_plan(ws: Workspace, target: str) -> list[tuple[Stage, str]]:
    """The stages ``icf stage <target>`` runs before itself, in pipeline order, each with why: every stage it
    needs (transitively) that is not ``done``, and each optional one (``Stage.wants``) that has run but is not
    done. Each is built with the config of its latest run (the options it was last run with), else its defaults.
    ``UserError`` when the index has not run (it needs ``--root``)."""
    from icf.workflow.status import DONE, NOT_RUN, dataset_status

    ws.index_key()  # refuses, naming `icf stage index`, before anything runs
    classes = stage_classes()
    states = {e["stage"]: e["state"] for e in dataset_status(ws)}
    wanted: set[str] = set()

    def visit(name: str) -> None:
        cls = classes[name]
        for up in cls.needs + tuple(w for w in cls.wants if states[w] != NOT_RUN):
            if up not in wanted:
                wanted.add(up)
                visit(up)

    visit(target)
    return [(latest_stage(ws, cls), states[name]) for name, cls in classes.items()
            if name in wanted and states[name] != DONE]


def latest_stage(ws: Workspace, cls: type[Stage]) -> Stage:
    """``cls`` with the options its latest run recorded in ``current.json`` (defaults when it never ran)."""
    current = ws.current(cls.name)
    if current is None:
        return cls()
    recorded = current.get("options", current["config"])  # a run before options were recorded: its hashed config
    try:
        return cls(cls.Config(**recorded))
    except (TypeError, ValueError) as err:
        raise UserError(f"stage {cls.name!r}: its last run's options no longer apply ({err}); run "
                        f"`icf stage {cls.name} --dataset {ws.dataset}` with the options you want") from None


@contextmanager
def ray_session() -> Iterator[None]:
    """Stop the embedded Ray (if a stage started one) when the block ends; a run stopped by SIGTERM while on
    Ray exits with 128 + the signal (143), as it does without Ray."""
    from icf.pipeline import runners

    runners.terminated_by = None
    try:
        yield
    except SystemExit:
        if runners.terminated_by is None:
            raise
        raise SystemExit(128 + runners.terminated_by) from None
    finally:
        runners.disconnect()


def run_pipeline(ws: Workspace, stages: Sequence[Stage], opts: RunOptions, console: Console,
                 index: Callable[[], IndexSummary] | None = None, summaries: list[Summary] | None = None) -> list[Summary]:
    """Run ``index`` (when given) then ``stages`` in order and return their summaries.

    Args:
        index: runs the index stage (e.g. ``lambda: run_index(ws, root, None, unit_size)``); None keeps the
            manifest as it is.
        summaries: the list the summaries are appended to as each stage ends, so that a caller whose run
            stops on an error still sees what finished.
    """
    summaries = [] if summaries is None else summaries
    refuse(ws, stages)
    if index is not None:
        summaries.append(index())
    keys: dict[str, str] = {}
    with ray_session():
        for stage in stages:
            summary = run_stage(ws, stage, opts, console, upstream_keys=keys)
            keys[stage.name] = summary.cache_key
            summaries.append(summary)
    return summaries
