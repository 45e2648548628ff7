"""Opening a shared run folder runs no code (finding D10): a crafted checkpoint or text bank whose unpickling
would run a payload is one ``error:`` line and exit 2 at every entry point, and the payload never runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from icf.cli import app
from icf.train import checkpoint
from test_run_binding import _clone, trained  # noqa: F401  (the fixture: a one-step run on tiny AVSS shards)


class Payload:
    """Unpickling this object runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _commands(run: Path, tmp: Path) -> list[list[str]]:
    return [["eval", "--run", str(run), "--split", "val"],
            ["predict", "--run", str(run), "--out", str(tmp / "viz"), "--limit", "1"],
            ["compare", str(run), "--split", "val"],
            ["train", "--resume", str(run), "--max-steps", "2"]]


def _refused(args: list[str], marker: Path, expect: str) -> None:
    res = CliRunner().invoke(app, args)
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1 and expect in errors[0], (args, res.output)
    assert "Traceback" not in res.output
    assert not marker.exists(), f"{args[0]} ran the payload"


@pytest.mark.parametrize("name", [checkpoint.CHECKPOINT, checkpoint.BEST])
def test_a_crafted_checkpoint_is_refused_at_every_entry_point_and_never_runs(trained: Path, tmp_path: Path, name: str) -> None:
    run, _ = _clone(trained, tmp_path)
    marker = tmp_path / "pwned"
    payload = checkpoint.load(run / checkpoint.CHECKPOINT)
    payload["evil"] = Payload(marker)
    torch.save(payload, run / name)
    for args in _commands(run, tmp_path):
        if name == checkpoint.BEST and args[0] == "train":
            continue  # --resume reads checkpoint.pt, never best.pt
        _refused(args, marker, f"{run / name}: unreadable checkpoint (it holds objects other than tensors")


def test_a_crafted_text_bank_is_refused_and_never_runs(trained: Path, tmp_path: Path) -> None:
    run, shards_json = _clone(trained, tmp_path)
    marker = tmp_path / "pwned"
    bank = shards_json.parent / "text_bank.npz"
    with np.load(bank) as npz:
        arrays = {k: npz[k] for k in npz.files}
    np.savez(bank, **arrays, evil=np.array([Payload(marker)], dtype=object))  # an object array is a pickle
    for args in _commands(run, tmp_path):
        _refused(args, marker, f"{bank}: unreadable text bank")
