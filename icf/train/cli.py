"""``icf train``: train a preset on a dataset's shards (single process, or Ray Train with ``--ray-workers``)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from icf.clitools import (
    UserError, WorkOption, check_at_least, check_dataset, dataset_option, ensure_writable, resolve_dataset, user_errors,
    work_dir,
)


# options a --resume run takes from its run.json: giving one would be silently ignored, so it is refused
RESUME_IGNORES = {"method": "--method", "preset_name": "--preset", "epochs": "--epochs", "ablate": "--ablate",
                  "seed": "--seed", "set_": "--set", "config": "--config", "checkpoint_every": "--checkpoint-every",
                  "val_every": "--val-every"}


def given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (or by its environment variable)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def check_resume_options(ctx: typer.Context, resume: Path, dataset: str | None, work: Path | None) -> None:
    """``UserError`` naming every option a ``--resume`` would ignore (finding D2): the run keeps the configs, seed,
    dataset and shards of its run.json; ``--max-steps`` (which extends the run), ``--loader-workers`` and the Ray
    options apply. ``--dataset`` and ``--work`` are accepted when they name the run's own."""
    from icf.train.run import read_run_file, shards_path

    ignored = [flag for name, flag in RESUME_IGNORES.items() if given(ctx, name)]
    doc = read_run_file(resume)[0]
    if dataset is not None and dataset != doc["dataset"]:
        ignored.append(f"--dataset (the run is {doc['dataset']})")
    if work is not None and shards_path(work_dir(work), doc["dataset"]).resolve() != Path(doc["shards"]):
        ignored.append(f"--work (the run reads {doc['shards']})")
    if ignored:
        raise UserError(f"{', '.join(ignored)} {'applies' if len(ignored) == 1 else 'apply'} to a new run; --resume "
                        f"continues {resume} with the options in its run.json (drop them, or start a new run with --out; "
                        "--max-steps extends a run)")


def new_run_folder(base: Path) -> Path:
    """``base``, or ``base-2``, ``base-3``, … : the first that did not exist, created here (``mkdir`` is exclusive,
    so two trainers started in the same second get two folders)."""
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
        except OSError:
            return path  # unwritable: `ensure_writable` names the problem
    raise UserError(f"{base}: 10000 runs of this name exist; pass --out")


@user_errors
def train_command(
    ctx: typer.Context,
    dataset: str | None = dataset_option(
        required=False, help="The AVSBench subset (default: the workspace's only one; a --resume run knows its own)."),
    method: str = typer.Option("icf", "--method", help="A registered method: icf | bidir | tpavi | … (icf/methods)."),
    preset_name: str = typer.Option("tiny", "--preset", help="tiny | paper-r50 | paper-pvt"),
    work: Path | None = WorkOption,
    out: Path | None = typer.Option(None, "--out", help="Run folder (default WORK/runs/<dataset>-<method>-<preset>-<time>, -2, -3, … when taken)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many steps (the schedule is unchanged)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: the preset's); sets the schedule length."),
    ablate: str = typer.Option("", "--ablate", help="Switch the method's components off (icf: comma list of mit, sc, cdcl)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue this run folder from its checkpoint."),
    loader_workers: int = typer.Option(0, "--loader-workers", help="DataLoader worker processes (per trainer)."),
    ray_workers: int = typer.Option(0, "--ray-workers", help="Train with Ray Train DDP on this many workers."),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="With --ray-workers: the Ray cluster to join (auto, HOST:PORT); default an embedded one."),
    seed: int = typer.Option(0, "--seed", help="Seed of initialisation, data order and every random draw."),
    config: Path | None = typer.Option(
        None, "--config", help="TOML file of overrides: [model], [train] and [method] tables (before --set)."),
    set_: list[str] = typer.Option([], "--set", help="Override key=value (train.lr=3e-4, method.segmenter=tpavi); repeatable."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Save a checkpoint every N steps."),
    val_every: int | None = typer.Option(
        None, "--val-every", help="Validate on the val split every N epochs (train.val_every; from train.val_start_epoch) "
        "and keep the best checkpoint as best.pt; 0 = never."),
) -> None:
    """Train a method on the shards of WORK/<dataset>/shards.json; writes checkpoints, metrics.jsonl and loss.png."""
    from icf.train.run import RunSpec, run_lock
    from icf.train.trainer import train

    if resume is None:
        dataset = resolve_dataset(dataset, work)  # left out: the workspace's only dataset
    elif dataset is not None:
        check_dataset(dataset)
    if ray_address is not None and not ray_workers:
        raise UserError("--ray-address needs --ray-workers N (the number of Ray Train workers)")
    check_at_least("--max-steps", max_steps, 0)
    check_at_least("--epochs", epochs, 1)
    check_at_least("--checkpoint-every", checkpoint_every, 1)
    check_at_least("--loader-workers", loader_workers, 0)
    check_at_least("--ray-workers", ray_workers, 0)
    check_at_least("--val-every", val_every, 0)
    if resume is not None and not resume.is_dir():
        raise UserError(f"{resume}: not a training run (no such folder)")
    if resume is not None and out is not None and out.resolve() != resume.resolve():
        raise UserError("--out and --resume name different folders; --resume continues the run in its own folder")
    if resume is not None:
        check_resume_options(ctx, resume, dataset, work)
    root = work_dir(work)
    run = resume or out or new_run_folder(root / "runs" / f"{dataset}-{method}-{preset_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    ensure_writable(run, "--resume" if resume else "--out")
    spec = RunSpec(
        dataset=dataset or "", preset=preset_name, method=method, work=root, out=run, epochs=epochs, max_steps=max_steps,
        ablate=frozenset(a.strip() for a in ablate.split(",") if a.strip()), seed=seed, workers=loader_workers,
        overrides=[*set_, *([f"train.val_every={val_every}"] if val_every is not None else [])],
        checkpoint_every=checkpoint_every, config=config,
    )
    with run_lock(run):
        if ray_workers:
            from icf.train.ray_train import train_ray

            run = train_ray(spec, ray_workers, resume=resume is not None, address=ray_address)
        else:
            run = train(spec, resume=resume is not None)
    typer.echo(str(run))


def register(app: typer.Typer) -> None:
    """Add ``train`` to the root app."""
    app.command("train")(train_command)
