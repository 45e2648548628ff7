"""Command-line output of the eval commands: metric tables, or JSON through `icf.clitools.print_json`."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from icf.clitools import out, print_json

COUNTS = ("n_frames", "n_padded", "skipped")
COLUMNS = ("J", "F", "JF", "F_boundary", "JF_boundary", "J_present", "F_present", "FDR", "J_dh", "F_dh", "JF_dh",
           "FPR_frame", "FPR_pixel", "HM", "n_frames", "n_padded", "skipped")


DATASET_HARD = ("J_dh", "F_dh", "JF_dh")  # DDESeg's protocol (icf.eval.metrics.DatasetHardMetrics)


def metrics_table(rows: dict[str, dict[str, Any]], title: str = "", columns: tuple[str, ...] = COLUMNS) -> Table:
    """A table with one row per named result and a column per key of ``columns`` present; fractions are printed
    ×100 like the papers."""
    present = [c for c in columns if any(c in r for r in rows.values())]
    table = Table(title=title or None)
    table.add_column("setting")
    for col in present:
        table.add_column(col + ("" if col in COUNTS else " ×100"), justify="right")
    for name, r in rows.items():
        cells = []
        for col in present:
            v = r.get(col)
            cells.append("" if v is None else str(v) if col in COUNTS else f"{100 * v:.2f}")
        table.add_row(name, *cells)
    return table


def print_results(rows: dict[str, dict[str, Any]], as_json: bool, title: str = "") -> None:
    """Print ``rows`` as a table, or as JSON on stdout: the single result when there is one, else all by name."""
    if as_json:
        print_json(next(iter(rows.values())) if len(rows) == 1 else rows)
    else:
        out.print(metrics_table(rows, title))
