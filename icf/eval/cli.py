"""``icf score`` (official metrics on PNG predictions), ``icf eval`` and ``icf predict`` (trained runs)."""

from __future__ import annotations

from pathlib import Path

import typer

from icf.eval.report import user_errors

FModeOption = typer.Option("official", "--f-mode", help="F aggregation: official (batches of 4 clips) or dataset.")
JsonOption = typer.Option(False, "--json", help="Print one JSON object instead of a table.")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    from icf.clitools import UserError

    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@user_errors
def score(
    dataset: str = typer.Option(..., "--dataset", help="s4 | ms3 | avss"),
    root: Path = typer.Option(..., "--root", help="Dataset root (the folder holding the metadata CSV)."),
    pred: Path = typer.Option(..., "--pred", help="Prediction PNGs at PRED/<GT mask path relative to ROOT>."),
    split: str = typer.Option("test", "--split", help="train | val | test"),
    f_mode: str = FModeOption,
    resize: bool = typer.Option(False, "--resize", help="Resize predictions whose size differs from the mask."),
    as_json: bool = JsonOption,
) -> None:
    """Official AVSBench metrics (J, F, FDR; AVSS mIoU) of any method's PNG predictions."""
    from icf.eval.metrics import F_MODES
    from icf.eval.report import print_results
    from icf.eval.score import score_predictions

    _check_choice("--f-mode", f_mode, F_MODES)
    result = score_predictions(dataset, root, pred, split, f_mode, resize)
    print_results({f"{dataset} {split}": result}, as_json, title=f"{pred}")


def register(app: typer.Typer) -> None:
    """Add ``score``, ``eval`` and ``predict`` to the root app."""
    app.command("score")(score)
