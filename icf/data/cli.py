"""``icf synth``: write a synthetic AVSBench-format dataset (see :mod:`icf.data.synth`)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import typer

from icf.clitools import (
    UserError, WorkOption, check_dataset, dataset_option, ensure_writable, out, print_json, user_errors, work_dir,
)
from icf.data.datasets import object_vocabulary
from icf.data.synth import synthesize


@user_errors
def synth(
    dataset: str = dataset_option(help="The AVSBench layout to write.", names=("--layout",)),
    out_dir: Path | None = typer.Option(
        None, "--out", help="Dataset root to create (must not exist or be empty; default WORK/synth-<dataset>)."),
    work: Path | None = WorkOption,
    clips: int = typer.Option(64, "--clips", help="Number of clips, shared among splits (and AVSS subsets)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same bytes."),
    size: int = typer.Option(224, "--size", help="Frame side in pixels."),
    snr_db: float = typer.Option(20.0, "--snr-db", help="Background noise level below one source, in dB."),
    classes: int = typer.Option(8, "--classes", help="How many classes of the layout's vocabulary appear."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Write a synthetic dataset in the exact on-disk layout of AVSBench S4, MS3 or AVSS."""
    check_dataset(dataset)
    out_dir = out_dir if out_dir is not None else work_dir(work) / f"synth-{dataset}"
    if clips < 1:
        raise UserError(f"--clips must be at least 1, got {clips}")
    if size < 16:
        raise UserError(f"--size must be at least 16 pixels, got {size}")
    n_vocab = len(object_vocabulary(dataset))
    if not 2 <= classes <= n_vocab:
        raise UserError(f"--classes must be between 2 and {n_vocab} for {dataset}, got {classes}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: output folder exists and is not empty")
    if snr_db != snr_db or abs(snr_db) == float("inf"):
        raise UserError(f"--snr-db must be a finite number, got {snr_db}")
    start = time.perf_counter()
    ensure_writable(out_dir, "--out")
    plans = synthesize(dataset, out_dir, clips, seed=seed, size=size, snr_db=snr_db, classes=classes)
    seconds = time.perf_counter() - start
    counts = Counter((p.subset, p.split) for p in plans)
    parts = ", ".join(f"{sub}/{split} {n}" for (sub, split), n in sorted(counts.items()))
    if json_out:
        print_json({"dataset": dataset, "out": str(out_dir), "clips": len(plans), "seconds": round(seconds, 3),
                    "counts": {f"{sub}/{split}": n for (sub, split), n in sorted(counts.items())}})
    else:
        out.print(f"wrote {len(plans)} {dataset} clips to {out_dir} in {seconds:.1f} s ({parts})", highlight=False,
                  soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``icf synth`` to the root app."""
    app.command("synth")(synth)
