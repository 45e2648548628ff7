"""``icf stage index|<unit stages>|all`` and ``icf status``.

Each unit stage's command is generated from its ``Config`` dataclass (one ``--flag`` per field, help from
the field's ``metadata["help"]``) plus the options every stage shares, so a new stage module gets its
command without touching this file.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.progress import TaskID
from rich.table import Table

from icf.clitools import (
    UserError, WorkOption, check_at_least, console, dataset_option, ensure_writable, out, print_json, resolve_dataset,
    user_errors, work_dir,
)
from icf.pipeline.engine import RunOptions, StageSummary, progress_bar, run_stage
from icf.pipeline.ledger import Workspace
from icf.pipeline.lock import workspace_lock
from icf.pipeline.stage import Stage
from icf.pipeline.store import read_json
from icf.stages import stage_classes
from icf.stages.index import DEFAULT_UNIT_SIZE, IndexSummary, run_index
from icf.workflow.run import pipeline_stages, run_pipeline, upstream_plan

stage_app = typer.Typer(help="Run pipeline stages (each skips what is already done).", no_args_is_help=True)

P = inspect.Parameter


def _opt(name: str, annotation: Any, default: Any, *flags: str, help: str = "") -> P:
    return P(name, P.KEYWORD_ONLY, default=typer.Option(default, *flags, help=help), annotation=annotation)


WORKSPACE_DATASET = "The AVSBench subset (default: the only one in the workspace)."
DATASET = P("dataset", P.KEYWORD_ONLY, default=dataset_option(False, WORKSPACE_DATASET), annotation=str | None)
INDEX_DATASET = P("dataset", P.KEYWORD_ONLY, default=dataset_option(), annotation=str)
WORK = P("work", P.KEYWORD_ONLY, default=WorkOption, annotation=Path | None)
STRICT = _opt("strict", bool, False, "--strict", help="Exit 1 when any sample failed.")
JSON = _opt("json_out", bool, False, "--json", help="Print the summary as JSON on stdout.")
FORCE = _opt("force", bool, False, "--force", help="Recompute even what is done.")
PROGRESS = _opt("progress", bool, True, "--progress/--no-progress", help="Show the progress bar.")
RUN_PARAMS = [
    DATASET,
    WORK,
    _opt("ray_address", str | None, None, "--ray-address",
         help="Join a running cluster: 'auto' or 'ray://host:port' (default: start an embedded local Ray)."),
    _opt("executor", str, "ray", "--executor", help="'ray' or 'local' (in-process, for debugging)."),
    FORCE,
    _opt("only", str | None, None, "--only", help="Comma-separated clip ids: (re)compute only these."),
    _opt("retry_failed", bool, False, "--retry-failed", help="Recompute only the samples that failed before."),
    STRICT,
    _opt("workers", int | None, None, "--workers", help="Actors for model stages (default: one per GPU or CPU)."),
    _opt("batch_size", int | None, None, "--batch-size",
         help="Clips per process() call on a worker (default: the stage's own; 8, extract 256)."),
    PROGRESS,
    JSON,
]
NO_UPSTREAM = _opt("no_upstream", bool, False, "--no-upstream",
                   help="Refuse when an upstream stage is missing or stale instead of running it first.")
INDEX_PARAMS = [
    _opt("root", Path | None, None, "--root", help="Dataset folder holding the subset's metadata CSV."),
    _opt("split", list[str] | None, None, "--split", help="Only this split (repeatable)."),
    _opt("unit_size", int | None, None, "--unit-size",
         help=f"Clips per work unit (default: the manifest's, else {DEFAULT_UNIT_SIZE})."),
]


def option_clash(cls: type[Stage]) -> str | None:
    """Why ``cls`` cannot get a command: a ``Config`` field named like an option every stage command has
    (``--workers``, ``--force``, ``--root``, …), or None."""
    reserved = {p.name for p in RUN_PARAMS + INDEX_PARAMS + [NO_UPSTREAM]}
    clash = sorted(f.name for f in dataclasses.fields(cls.Config) if f.name in reserved)
    if not clash:
        return None
    flags = ", ".join("--" + n.replace("_", "-") for n in clash)
    return (f"stage {cls.name!r} ({cls.__module__}): its Config field(s) {clash} collide with the run option(s) "
            f"{flags} of every stage command; rename them")


def _refusing(message: str, name: str) -> Callable[..., None]:
    """A command that only says why its stage has no command (the rest of the CLI keeps working)."""

    @user_errors
    def command(**_kw: Any) -> None:
        raise UserError(message)

    return _with_signature(command, RUN_PARAMS + INDEX_PARAMS, name, f"(unavailable: {message})")


def _config_params(classes: list[type[Stage]]) -> list[P]:
    """One option per Config field of ``classes`` (a field shared by two stages must agree)."""
    params: dict[str, P] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls.Config)
        for f in dataclasses.fields(cls.Config):
            flag = "--" + f.name.replace("_", "-")
            flags = (f"{flag}/--no-{flag[2:]}",) if hints[f.name] is bool else (flag,)
            param = _opt(f.name, hints[f.name], f.default, *flags, help=f.metadata.get("help", ""))
            if f.name in params and params[f.name].default.default != f.default:
                raise RuntimeError(f"config field {f.name!r} has different defaults in two stages")
            params[f.name] = param
    return list(params.values())


def _with_signature(fn: Callable[..., None], params: list[P], name: str, doc: str) -> Callable[..., None]:
    fn.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    fn.__name__ = name
    fn.__doc__ = doc
    return fn


def _workspace(dataset: str | None, work: Path | None, write: bool = False) -> Workspace:
    """The dataset's workspace (``dataset`` None: the workspace's only one); with ``write``, proven writable
    before anything runs."""
    ws = Workspace(work_dir(work), resolve_dataset(dataset, work))
    if write:
        ensure_writable(ws.root, "--work")
    return ws


# weights flags of the extract stage: a file that is not a torch checkpoint (zip or pickle) or safetensors
WEIGHT_FLAGS = ("clip_weights", "clap_weights")


def _weights_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, or None: by its first bytes (torch zip ``PK``, pickle ``0x80``,
    safetensors: an 8-byte length then ``{``) and, for a zip, whether it holds the ``<name>/data.pkl`` that
    ``torch.save`` writes. Catches a text, image or other zip file before the workers start."""
    if not path.is_file():
        return None  # the stage names missing files itself
    with path.open("rb") as fh:
        head = fh.read(9)
    if head[:1] == b"\x80" or head[8:9] == b"{":
        return None
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"{path}: not a torch checkpoint (unreadable zip: {err})"
        if any(n.count("/") == 1 and n.endswith("/data.pkl") for n in names):
            return None
        return f"{path}: a zip archive but not a torch checkpoint (no <name>/data.pkl inside)"
    return f"{path}: not a torch checkpoint or safetensors file"


def _check_config(kw: dict[str, Any]) -> None:
    """Options shared by every run command (before any work): sizes at least 1, weights files readable."""
    check_at_least("--batch-size", kw.get("batch_size"), 1)
    check_at_least("--workers", kw.get("workers"), 1)
    check_at_least("--unit-size", kw.get("unit_size"), 1)
    for name in WEIGHT_FLAGS:
        if kw.get(name):
            problem = _weights_problem(Path(kw[name]).expanduser())
            if problem:
                raise UserError(f"--{name.replace('_', '-')} {problem}")


def _options(kw: dict[str, Any]) -> RunOptions:
    if kw["executor"] not in ("ray", "local"):
        raise UserError(f"--executor must be 'ray' or 'local', not {kw['executor']!r}")
    _check_config(kw)
    only = frozenset(u.strip() for u in kw["only"].split(",") if u.strip()) if kw["only"] else None
    return RunOptions(
        executor=kw["executor"], ray_address=kw["ray_address"], force=kw["force"], only=only,
        retry_failed=kw["retry_failed"], workers=kw["workers"], batch_size=kw["batch_size"], progress=kw["progress"],
    )


def _config(cls: type[Stage], kw: dict[str, Any]) -> Any:
    """The stage's ``Config`` from the flags; a ``Config`` that rejects a value is a ``UserError``."""
    names = {f.name for f in dataclasses.fields(cls.Config)}
    try:
        return cls.Config(**{k: v for k, v in kw.items() if k in names})
    except ValueError as err:
        raise UserError(str(err)) from None


def _report(ws: Workspace, summaries: list[StageSummary | IndexSummary], json_out: bool, strict: bool) -> None:
    """One summary line per stage (stderr), ``--json``: one object on stdout; ``--strict``: exit 1 on failures."""
    for s in summaries:
        console.print(s.line(), markup=False, highlight=False, soft_wrap=True)
    failed = sorted({uid for s in summaries for uid, _ in s.failures})
    if json_out:
        doc = summaries[0].to_dict() if len(summaries) == 1 else {
            "dataset": ws.dataset, "stages": [s.to_dict() for s in summaries], "failed_clips": len(failed)}
        print_json(doc)
    if failed:
        console.print(f"[yellow]{len(failed)} clips failed[/]; reasons: `icf status --dataset {ws.dataset} "
                      f"--work {ws.work} --failed`", highlight=False, soft_wrap=True)
    if strict and failed:
        raise typer.Exit(1)


def _stage_command(cls: type[Stage]) -> Callable[..., None]:
    @user_errors
    def command(**kw: Any) -> None:
        opts, stage = _options(kw), cls(_config(cls, kw))
        ws = _workspace(kw["dataset"], kw["work"], write=True)
        summaries: list[StageSummary | IndexSummary] = []
        with workspace_lock(ws.root):
            before = [] if kw["no_upstream"] else upstream_plan(ws, cls.name)
            if before:
                why = ", ".join(f"{up.name} ({state})" for up, state in before)
                console.print(f"[bold]upstream[/]: {why} first, with the options of its last run "
                              "(--no-upstream refuses instead)", highlight=False, soft_wrap=True)
            try:
                run_pipeline(ws, [up for up, _ in before] + [stage], opts, console, summaries=summaries)
            except (UserError, OSError):
                for done in summaries:
                    console.print(done.line(), markup=False, highlight=False, soft_wrap=True)
                raise
        _report(ws, summaries, kw["json_out"], kw["strict"])

    params = RUN_PARAMS + [NO_UPSTREAM] + _config_params([cls])
    return _with_signature(command, params, cls.name, (cls.__doc__ or "").split("\n")[0])


def _index(ws: Workspace, root: Path, kw: dict[str, Any]) -> IndexSummary:
    """Run the index stage with a progress bar over the clips whose files it checks (none when up to date)."""
    progress = progress_bar(console, kw["progress"])
    bars: list[TaskID] = []

    def advance(done: int, total: int) -> None:
        if not bars:
            progress.start()
            bars.append(progress.add_task(f"{ws.dataset} index", total=total))
        progress.update(bars[0], completed=done)

    try:
        return run_index(ws, root, kw["split"], kw["unit_size"], kw["force"], progress=advance)
    finally:
        if bars:
            progress.stop()


@user_errors
def index_command(**kw: Any) -> None:
    _check_config(kw)
    ws = _workspace(kw["dataset"], kw["work"], write=True)
    if kw["root"] is None:
        raise UserError("--root is required: the folder holding the dataset's metadata CSV")
    with workspace_lock(ws.root):
        summary = _index(ws, kw["root"], kw)
    _report(ws, [summary], kw["json_out"], kw["strict"])


@user_errors
def all_command(**kw: Any) -> None:
    opts = _options(kw)
    stages = pipeline_stages({name: _config(cls, kw) for name, cls in stage_classes().items()})
    ws = _workspace(kw["dataset"], kw["work"], write=True)
    root = kw["root"] or _manifest_root(ws)
    if not root:
        raise UserError("--root is required the first time: the folder holding the dataset's metadata CSV")
    summaries: list[StageSummary | IndexSummary] = []
    with workspace_lock(ws.root):
        try:
            run_pipeline(ws, stages, opts, console, index=lambda: _index(ws, root, kw), summaries=summaries)
        except (UserError, OSError):
            for done in summaries:  # what finished before the error stays done: say so
                console.print(done.line(), markup=False, highlight=False, soft_wrap=True)
            raise
    _report(ws, summaries, kw["json_out"], kw["strict"])


def _manifest_root(ws: Workspace) -> Path | None:
    """The root the manifest was last built from (so `stage all` may omit --root on reruns)."""
    try:
        stats = read_json(ws.manifest_stats)
    except UserError:  # a corrupt stats file: --root must be given again (the index then rebuilds it)
        return None
    return Path(stats["config"]["root"]) if stats else None


@user_errors
def status(
    dataset: str | None = dataset_option(False, WORKSPACE_DATASET),
    work: Path | None = WorkOption,
    failed: bool = typer.Option(False, "--failed", help="List every failed sample with its reason."),
    json_out: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
) -> None:
    """Per stage: state, units done / pending, samples ok / failed / skipped, and (with --failed) the reasons."""
    from icf.workflow.status import dataset_status, not_done

    ws = _workspace(dataset, work)
    entries = dataset_status(ws)
    if json_out:
        print_json({"dataset": ws.dataset, "stages": entries})
        return
    table = Table("stage", "state", "key", "units", "ok", "failed", "skipped", "pending", title=f"{ws.dataset} in {ws.root}")
    for e in entries:
        c = e["counts"]
        units = "-" if e["units_pending"] is None else f"{e['units_done']}/{e['units_done'] + e['units_pending']}"
        table.add_row(e["stage"], e["state"], e["cache_key"] or "-", units,
                      *(str(c[k]) if k in c else "-" for k in ("ok", "failed", "skipped", "pending")))
    out.print(table)
    for e in entries:
        for problem in e.get("problems", []):
            out.print(f"damaged {e['stage']}: {problem}", highlight=False, soft_wrap=True)
    todo = not_done(entries)
    if todo:
        out.print(f"not done: {', '.join(todo)}; `icf stage all --dataset {ws.dataset} --work {ws.work}` (with the "
                  "options of your earlier runs) brings them up to date", highlight=False, soft_wrap=True)
    n_failed = sum(len(e["failures"]) for e in entries)
    if failed:
        for e in entries:
            for f in e["failures"]:
                out.print(f"{e['stage']}\t{f['uid']}\t{f['error']}", highlight=False, soft_wrap=True)
    elif n_failed:
        out.print(f"{n_failed} failures recorded; --failed lists them with their reasons", highlight=False)


@user_errors
def verify(
    dataset: str | None = dataset_option(False, WORKSPACE_DATASET),
    work: Path | None = WorkOption,
    json_out: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
) -> None:
    """Read every cache file of the dataset in full (units, manifest, shards against shards.json); exit 1
    and name each damaged file when any is. `icf stage all` repairs what it reports."""
    from icf.workflow.verify import verify_dataset

    ws = _workspace(dataset, work)
    report = verify_dataset(ws)
    if json_out:
        print_json({"dataset": ws.dataset, "checked": report.checked, "problems": report.problems})
    else:
        for problem in report.problems:
            out.print(f"damaged: {problem}", highlight=False, soft_wrap=True)
        verdict = f"{len(report.problems)} damaged" if report.problems else "all intact"
        out.print(f"{ws.dataset}: {report.checked} files checked, {verdict}", highlight=False)
    if report.problems:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add ``icf stage ...`` and ``icf status`` to the root app."""
    classes = list(stage_classes().values())
    clashes = {cls.name: option_clash(cls) for cls in classes}
    stage_app.command("index")(_with_signature(
        index_command, [INDEX_DATASET, WORK, *INDEX_PARAMS, FORCE, STRICT, PROGRESS, JSON], "index",
        "Scan the dataset folder into WORK/<dataset>/manifest.parquet (one row per clip, ok/failed)."))
    for cls in classes:
        message = clashes[cls.name]
        stage_app.command(cls.name)(_refusing(message, cls.name) if message else _stage_command(cls))
    broken = next((m for m in clashes.values() if m), None)
    stage_app.command("all")(_refusing(broken, "all") if broken else _with_signature(
        all_command, RUN_PARAMS + INDEX_PARAMS + _config_params(classes), "all",
        "index, then every stage in order, skipping what is done."))
    app.add_typer(stage_app, name="stage")
    app.command("status")(status)
    app.command("verify")(verify)
