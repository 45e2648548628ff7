"""``icf demo``: synthetic AVSS → semantic towers → every pipeline stage → train the tiny preset → evaluate → pictures.

One command, a few minutes on two CPU cores. ``icf towers`` first trains tiny CLIP/CLAP towers on the
synthetic train split (so the frozen embeddings know the classes, as pretrained towers would); the
pipeline then extracts with them. Training runs a fixed number of steps (``--steps``); an optional
``--minutes`` cap stops it earlier, and the table title then says how many of the planned steps ran.

The evaluation table compares the trained model on the validation clips with two controls that do not
listen (see :mod:`icf.eval.baselines`): the same model with the audio of another clip, and the oracle
"segment every visible object". A model that uses the audio beats both. The J/F columns are the official
71-class means; ``J_present``/``F_present`` average over the classes present in the split (Decisions D3), the
readable numbers on 8-class synthetic data.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from icf.clitools import WorkOption, console, out, user_errors, work_dir

LAYOUT = "avss"
TOWER_EPOCHS = 5  # measured: val zero-shot objects 1.00, single-source seconds 0.95 on 200 clips


def _icf(*args: str) -> None:
    """Run another subsystem's command (``icf synth``, ``icf stage all``) as a child process."""
    cmd = [sys.executable, "-m", "icf.cli", *args]
    console.print(f"[bold]$[/] icf {' '.join(args)}")
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise typer.Exit(done.returncode)


def semantic_towers(root: Path, work: Path, seed: int, epochs: int = TOWER_EPOCHS) -> Path:
    """``icf towers`` on the synthetic tree (cached); prints its summary, returns the EncoderSpec JSON."""
    from icf.towers.cli import _progress, progress_hook
    from icf.towers.train import TowersConfig, train_towers

    console.print(f"[bold]$[/] icf towers --dataset {LAYOUT} --root {root} --work {work} --epochs {epochs} --seed {seed}")
    with _progress() as bar:
        result = train_towers(TowersConfig(LAYOUT, str(root.resolve()), epochs=epochs, seed=seed), work, progress_hook(bar))
    out.print(result.summary(), highlight=False, soft_wrap=True)
    return result.spec_path


class Clock:
    """Wall seconds per phase, in the order the phases ran: ``with clock("towers"): ...``; ``line()`` for the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.t0 = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        """``"total 512 s (synth 4 s · towers 140 s · …)"``."""
        parts = " · ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items())
        return f"total {time.perf_counter() - self.t0:.0f} s ({parts})"


def prepare_data(work: Path, clips: int, size: int, seed: int, executor: str = "ray", towers: bool = True,
                 tower_epochs: int = TOWER_EPOCHS, clock: Clock | None = None) -> Path:
    """Synthesize the AVSS tree (once), train its towers (or use random ones) and stage it (all cached)."""
    clock = clock or Clock()
    root = work / "demo-data" / "AVSS"
    with clock("synth"):
        if not (root / "metadata.csv").is_file():
            _icf("synth", "--layout", LAYOUT, "--out", str(root), "--clips", str(clips), "--size", str(size), "--seed", str(seed))
    with clock("towers"):
        encoders = str(semantic_towers(root, work, seed, tower_epochs)) if towers else "tiny"
    with clock("stages"):
        _icf("stage", "all", "--dataset", LAYOUT, "--root", str(root), "--work", str(work), "--encoders", encoders,
             "--image-size", str(size), "--executor", executor)
    return root


def evaluate_run(run: Path, clips: int, seed: int, size: int, split: str = "val") -> dict[str, dict[str, Any]]:
    """The trained model, the model with shuffled audio, and the visible-objects oracle on ``split``, in this order;
    the model rows are named by the run's method (``"icf tiny"``, ``"icf tiny, shuffled audio"``)."""
    from icf.eval.baselines import visible_objects
    from icf.eval.evaluate import Perturbation, evaluate, model_predictor
    from icf.train.run import load_trained

    model, shards, _, cfg, _ = load_trained(run)
    device = next(model.parameters()).device
    oracle = visible_objects(LAYOUT, clips, seed, 8, size, shards.image_size, cfg.image_size)
    label = f"{cfg.method} tiny"
    return {
        label: evaluate(model_predictor(model), shards, split, cfg.image_size, device=device),
        f"{label}, shuffled audio": evaluate(model_predictor(model), shards, split, cfg.image_size,
                                             perturbation=Perturbation(shuffle_audio=True), device=device),
        "every visible object (oracle)": evaluate(oracle, shards, split, cfg.image_size),
    }


def epochs_for_steps(work: Path, steps: int, dataset: str = LAYOUT, preset_name: str = "tiny") -> int:
    """Epochs whose learning-rate schedule ends at (or just after) ``steps`` steps on the staged train split,
    so a fixed step budget runs the whole schedule."""
    from icf.config import preset
    from icf.data.shards import ShardSet
    from icf.train.run import shards_path

    _, train_cfg = preset(preset_name, dataset)
    per_epoch = max(1, ShardSet.load(shards_path(work, dataset)).num_samples("train") // train_cfg.batch_size)
    return max(1, -(-steps // per_epoch))


def steps_note(run: Path, planned: int) -> str:
    """``"N steps"``, or ``"N of P planned steps (stopped by --minutes)"`` when training stopped early."""
    from icf.eval.compare import steps_done

    done = steps_done(run) or 0
    return f"{done} steps" if done >= planned else f"{done} of {planned} planned steps (stopped by --minutes)"


@user_errors
def demo(
    work: Path | None = WorkOption,
    clips: int = typer.Option(200, "--clips", help="Synthetic AVSS clips (shared among splits and subsets)."),
    steps: int = typer.Option(600, "--steps", help="Training steps (the fixed budget)."),
    minutes: float | None = typer.Option(None, "--minutes", help="Optional cap on training time; the table says if it cut the steps."),
    size: int = typer.Option(64, "--size", help="Frame side of the synthetic data and the shards."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the towers and training."),
    towers: bool = typer.Option(True, "--towers/--random-towers", help="Semantic towers from `icf towers`, or random ones."),
    tower_epochs: int = typer.Option(TOWER_EPOCHS, "--tower-epochs", help="Epochs of `icf towers`."),
    executor: str = typer.Option("ray", "--executor", help="Pipeline executor: ray (embedded local Ray) or local."),
) -> None:
    """synth → towers → stage all → train tiny → eval (with two controls) → predict."""
    from icf.eval.report import COLUMNS, DATASET_HARD, metrics_table
    from icf.eval.visualize import write_panels
    from icf.train.run import RunSpec, load_trained
    from icf.train.trainer import train

    root = work_dir(work)
    clock = Clock()
    prepare_data(root, clips, size, seed, executor, towers, tower_epochs, clock)
    run = root / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    with clock("train"):
        train(RunSpec(dataset=LAYOUT, preset="tiny", work=root, out=run, epochs=epochs_for_steps(root, steps), max_steps=steps,
                      seed=seed, time_limit_s=None if minutes is None else minutes * 60))
    with clock("eval"):
        rows = evaluate_run(run, clips, seed, size)
        model, shards, _, cfg, _ = load_trained(run)
        panels = write_panels(model, shards, "val", cfg, run / "viz", limit=8)
    kind = "semantic" if towers else "random"
    title = f"AVSS synthetic, val split ({next(iter(rows.values()))['n_frames']} frames), {kind} towers, {steps_note(run, steps)}"
    out.print(metrics_table(rows, title=title, columns=tuple(c for c in COLUMNS if c not in DATASET_HARD)))
    out.print(f"run: {run}\nloss curve: {run / 'loss.png'}\npictures: {run / 'viz'} ({len(panels)} panels)")
    out.print(clock.line())


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the root app."""
    app.command("demo")(demo)
