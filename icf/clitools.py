"""The bottom floor of every command module: `UserError` and the one decorator that turns it into one
``error:`` line and exit 2 (`user_errors`), the shared options (``--work``, ``--dataset``), the consoles and the
one JSON printer."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from icf.data.sample import DATASETS

console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 120)  # tables stay readable when piped or logged


class UserError(Exception):
    """A mistake in the user's input (bad path, unknown name, malformed file): one line, exit 2."""


F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Every command runs under this: a :class:`UserError`, or a filesystem failure mid-run (disk full,
    read-only folder), becomes ``error: ...`` on one line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            fail(str(err))
        except OSError as err:
            fail(os_error_line(err))

    return wrapper  # type: ignore[return-value]


def print_json(doc: Any) -> None:
    """``doc`` as one line of strict JSON on stdout (keys sorted; NaN and ±inf, which JSON lacks, as null)."""

    def strict(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): strict(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [strict(v) for v in x]
        return x

    print(json.dumps(strict(doc), sort_keys=True, allow_nan=False, default=str))


DATASET_CHOICES = "|".join(DATASETS)


def dataset_option(required: bool = True, help: str = "The AVSBench subset.", names: tuple[str, ...] = ()) -> Any:
    """The one ``--dataset`` option: its choices show in ``--help``; `check_dataset` validates the value
    (`resolve_dataset` when it is optional: left out, the workspace's only dataset)."""
    return typer.Option(... if required else None, "--dataset", *names, metavar=f"[{DATASET_CHOICES}]", help=help)


def workspace_datasets(work: Path | None) -> list[str]:
    """The datasets that have a manifest in the workspace folder (``icf stage index`` ran for them)."""
    root = work_dir(work)
    return [d for d in DATASETS if (root / d / "manifest.parquet").is_file()]


def resolve_dataset(dataset: str | None, work: Path | None) -> str:
    """``--dataset`` as given (validated), or, when left out, the one dataset the workspace holds; ``UserError``
    listing them when it holds none or several."""
    if dataset is not None:
        return check_dataset(dataset)
    held = workspace_datasets(work)
    if len(held) == 1:
        return held[0]
    where = work_dir(work)
    if not held:
        raise UserError(f"--dataset is required: {where} holds no dataset yet ({DATASET_CHOICES})")
    raise UserError(f"--dataset is required: {where} holds {', '.join(held)}")


def check_dataset(dataset: str) -> str:
    """``dataset`` when it is an AVSBench subset; `UserError` listing the choices otherwise."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return dataset


def default_work() -> Path:
    """The workspace folder: ``$ICF_WORK`` or ``./icf-work``."""
    return Path(os.environ.get("ICF_WORK", "icf-work"))


WorkOption = typer.Option(
    None, "--work", help="Workspace folder for every generated artefact (env ICF_WORK, default ./icf-work)."
)


def work_dir(work: Path | None) -> Path:
    """Resolve the ``--work`` option (None → env / default)."""
    return (work if work is not None else default_work()).expanduser()


def check_at_least(flag: str, value: float | None, minimum: float) -> None:
    """``UserError`` unless ``value`` (when given) is a finite number ``>= minimum``."""
    if value is not None and not (value >= minimum and value == value and value != float("inf")):
        raise UserError(f"{flag} must be at least {minimum}, got {value}")


def ensure_writable(folder: Path, flag: str) -> None:
    """Create ``folder`` (and parents) and prove a file can be written in it; ``UserError`` naming ``flag``
    otherwise (read-only filesystem, no permission, disk full), before any heavy work starts."""
    probe = folder / f".icf-write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as err:
        raise UserError(f"{flag} {folder}: cannot write there ({err.strerror or err})") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def os_error_line(err: OSError) -> str:
    """One line for a filesystem failure mid-run (disk full, read-only, permission)."""
    where = f"{err.filename}: " if err.filename else ""
    reason = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[-1]
    return f"{where}{reason} (what was finished is kept; fix this and rerun)"


def one_line(message: str) -> str:
    """A ``UserError`` re-raised from a DataLoader worker carries the worker's traceback in its message;
    keep only the original message (the traceback's last line, without the exception's name)."""
    lines = message.strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in message:
        return lines[-1].split(": ", 1)[-1]
    return message


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on one line and exit with ``code`` (no traceback)."""
    console.print(f"[bold red]error:[/] {one_line(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
