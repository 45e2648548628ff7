"""``icf demo``: synthetic AVSS → every pipeline stage → train the tiny preset → evaluate → pictures.

One command, about ten minutes on two CPU cores. The evaluation table compares the trained model on the
validation clips with two controls that do not listen (see :mod:`icf.eval.baselines`): the same model
with the audio of another clip, and the oracle "segment every visible object". A model that uses the
audio beats both. The J/F columns are the official 71-class means; ``J_present``/``F_present`` average
over the classes present in the split (SPEC §6), the readable numbers on 8-class synthetic data.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import typer

from icf.clitools import WorkOption, console, out, work_dir
from icf.eval.report import user_errors

LAYOUT = "avss"


def _icf(*args: str) -> None:
    """Run another subsystem's command (``icf synth``, ``icf stage all``) as a child process."""
    cmd = [sys.executable, "-m", "icf.cli", *args]
    console.print(f"[bold]$[/] icf {' '.join(args)}")
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0:
        raise typer.Exit(done.returncode)


def prepare_data(work: Path, clips: int, size: int, seed: int, executor: str = "ray") -> Path:
    """Synthesize the AVSS tree (once) and stage it (cached: reruns skip what is done)."""
    root = work / "demo-data" / "AVSS"
    if not (root / "metadata.csv").is_file():
        _icf("synth", "--layout", LAYOUT, "--out", str(root), "--clips", str(clips), "--size", str(size), "--seed", str(seed))
    _icf("stage", "all", "--dataset", LAYOUT, "--root", str(root), "--work", str(work), "--encoders", "tiny",
         "--image-size", str(size), "--executor", executor)
    return root


def evaluate_run(run: Path, clips: int, seed: int, size: int, split: str = "val") -> dict[str, dict[str, Any]]:
    """The trained model, the model with shuffled audio, and the visible-objects oracle on ``split``."""
    from icf.eval.baselines import visible_objects
    from icf.eval.evaluate import Perturbation, evaluate, model_predictor
    from icf.train.trainer import load_trained

    model, shards, _, cfg, _ = load_trained(run)
    device = next(model.parameters()).device
    oracle = visible_objects(LAYOUT, clips, seed, 8, size, shards.image_size, cfg.image_size)
    return {
        "ICF tiny": evaluate(model_predictor(model), shards, split, cfg.image_size, device=device),
        "ICF tiny, shuffled audio": evaluate(model_predictor(model), shards, split, cfg.image_size,
                                             perturbation=Perturbation(shuffle_audio=True), device=device),
        "every visible object (oracle)": evaluate(oracle, shards, split, cfg.image_size),
    }


@user_errors
def demo(
    work: Path | None = WorkOption,
    clips: int = typer.Option(200, "--clips", help="Synthetic AVSS clips (shared among splits and subsets)."),
    minutes: float = typer.Option(6.0, "--minutes", help="Training time budget in minutes."),
    epochs: int = typer.Option(12, "--epochs", help="Epochs of the learning-rate schedule (training stops at --minutes)."),
    size: int = typer.Option(64, "--size", help="Frame side of the synthetic data and the shards."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data and of training."),
    executor: str = typer.Option("ray", "--executor", help="Pipeline executor: ray (embedded local Ray) or local."),
) -> None:
    """synth → stage all (tiny encoders) → train tiny → eval (with two controls) → predict."""
    from icf.eval.report import metrics_table
    from icf.eval.visualize import write_panels
    from icf.train.trainer import RunSpec, load_trained, train

    root = work_dir(work)
    t0 = time.time()
    prepare_data(root, clips, size, seed, executor)
    run = root / "runs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    train(RunSpec(dataset=LAYOUT, preset="tiny", work=root, out=run, epochs=epochs, seed=seed, time_limit_s=minutes * 60))
    rows = evaluate_run(run, clips, seed, size)
    model, shards, _, cfg, _ = load_trained(run)
    panels = write_panels(model, shards, "val", cfg, run / "viz", limit=8)
    out.print(metrics_table(rows, title=f"AVSS synthetic, val split ({rows['ICF tiny']['n_frames']} frames)"))
    out.print(f"run: {run}\nloss curve: {run / 'loss.png'}\npictures: {run / 'viz'} ({len(panels)} panels)")
    out.print(f"total time {time.time() - t0:.0f} s")


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the root app."""
    app.command("demo")(demo)
