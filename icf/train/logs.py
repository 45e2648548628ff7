"""What a run logs while it trains: ``metrics.jsonl`` (one JSON object per step), ``loss.png`` and the
progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from icf.clitools import console

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    with (run / METRICS_FILE).open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_losses(run: Path) -> Path:
    """``loss.png``: total and segmentation loss per step (raw and a 20-step moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run) if "total" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("total", "seg"):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if not pts:
            continue
        steps, values = zip(*pts)
        line = ax.plot(steps, values, alpha=0.3, lw=1)[0]
        w = min(20, len(values))
        smooth = np.convolve(values, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color=line.get_color(), lw=2, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.name)
    ax.legend()
    fig.tight_layout()
    path = run / LOSS_PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def trim_metrics(run: Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` records after ``step`` (those of steps an interrupted run took after its
    last checkpoint), so a resumed run logs each step once."""
    records = read_metrics(run)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        tmp = run / f"{METRICS_FILE}.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(run / METRICS_FILE)


def progress_bar(enabled: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not enabled,
    )
