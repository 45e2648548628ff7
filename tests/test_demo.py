"""`icf demo` end to end at a small scale: synth → stage all → train → eval with both controls → pictures."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from icf.cli import app


def test_demo_small(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--work", str(tmp_path), "--clips", "16", "--size", "32", "--minutes", "0.1",
                                   "--epochs", "1", "--executor", "local"],
                                env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for row in ("ICF tiny", "ICF tiny, shuffled audio", "every visible object (oracle)"):
        assert row in res.output
    run = next((tmp_path / "runs").glob("demo-*"))
    assert (run / "loss.png").is_file() and (run / "checkpoint.pt").is_file()
    assert len(list((run / "viz").glob("*.png"))) >= 1
    assert (tmp_path / "avss" / "shards.json").is_file()
