"""The ``icf`` command line: a thin typer app.

Each subsystem registers its own commands (``register(app)``) so this file stays a table of contents:
``icf synth`` (data), ``icf stage ...``, ``icf status`` and ``icf verify`` (workflow), ``icf train`` and
``icf import`` (train),
``icf eval`` / ``icf score`` / ``icf predict`` (eval), ``icf demo``.
"""

from __future__ import annotations

import os

# Never reach a model hub: every checkpoint comes from a local path.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import typer  # noqa: E402

from icf import __version__  # noqa: E402

app = typer.Typer(
    name="icf",
    help="Staged offline pipeline and trainer for audio-visual segmentation (ICF, Zha et al. 2025).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit(0)


def _register_all() -> None:
    from icf.data import cli as data_cli
    from icf.eval import cli as eval_cli
    from icf.workflow import cli as workflow_cli
    from icf.towers import cli as towers_cli
    from icf.train import cli as train_cli
    from icf.train import importer
    from icf import demo

    for module in (data_cli, workflow_cli, towers_cli, train_cli, importer, eval_cli, demo):
        module.register(app)


_register_all()


def main() -> None:
    """Console entry point (every command turns a user error into one line and exit 2: `icf.clitools.user_errors`)."""
    app()


if __name__ == "__main__":
    main()
