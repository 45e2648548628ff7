"""``icf towers``: train (or find cached) semantic tiny CLIP + CLAP towers for a labelled dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from icf.clitools import WorkOption, console, dataset_option, out, print_json, user_errors, work_dir


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"), console=console,
    )


def progress_hook(bar: Progress) -> Callable[[str, int], Callable[[float | None], None]]:
    """A `train_towers` progress hook drawing one bar per phase (the loss on training bars)."""

    def hook(description: str, total: int) -> Callable[[float | None], None]:
        task = bar.add_task(description, total=total, loss="")

        def tick(loss: float | None = None) -> None:
            bar.update(task, advance=1, loss="" if loss is None else f"loss {loss:.3f}")

        return tick

    return hook


@user_errors
def towers(
    dataset: str = dataset_option(help="avss | s4 (datasets whose masks/CSV name classes)."),
    root: Path = typer.Option(..., "--root", help="Dataset root (the folder holding the metadata CSV)."),
    work: Path | None = WorkOption,
    epochs: int = typer.Option(30, "--epochs", help="Passes over the train split's crops / seconds (each tower)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initialisation, shuffling and augmentation."),
    batch_size: int = typer.Option(32, "--batch-size", help="Crops / seconds per step."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW peak learning rate."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Train tiny CLIP (object crops ↔ prompts) and CLAP (audio seconds ↔ "An audio of [X]") on the train
    split; print zero-shot accuracy on val; write native checkpoints + an EncoderSpec JSON for
    `icf stage extract --encoders`."""
    from icf.data.adapters import check_root
    from icf.towers.train import TowersConfig, train_towers

    cfg = TowersConfig(dataset=dataset, root=str(check_root(root)), epochs=epochs, seed=seed, batch_size=batch_size, lr=lr)
    with _progress() as bar:
        result = train_towers(cfg, work_dir(work), progress_hook(bar))
    if json_out:
        print_json(result.to_dict())
    else:
        out.print(result.summary(), highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``towers`` to the root app."""
    app.command("towers")(towers)
