"""Commands of this subsystem (filled in by its owner)."""

import typer


def register(app: typer.Typer) -> None:
    """Add this subsystem's commands to the root app."""
