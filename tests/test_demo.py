"""`icf demo` end to end at a small scale: synth → towers → stage all → train → eval with both controls → pictures."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from icf.cli import app
from icf.demo import Clock, steps_note


def test_demo_small(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["demo", "--work", str(tmp_path), "--clips", "16", "--size", "32", "--steps", "2",
                                   "--tower-epochs", "1", "--executor", "local"],
                                env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for row in ("icf tiny", "icf tiny, shuffled audio", "every visible object (oracle)"):
        assert row in res.output
    assert "semantic towers, 2 steps" in res.output and "towers (trained" in res.output
    timing = next(line for line in res.output.splitlines() if line.startswith("total "))
    for phase in ("synth", "towers", "stages", "train", "eval"):  # where the demo's minutes went
        assert f"{phase} " in timing, timing
    run = next((tmp_path / "runs").glob("demo-*"))
    assert (run / "loss.png").is_file() and (run / "checkpoint.pt").is_file()
    assert len(list((run / "viz").glob("*.png"))) >= 1
    shards = json.loads((tmp_path / "avss" / "shards.json").read_text())
    assert shards["encoders"]["clip_weights"] and shards["encoders"]["clap_weights"]  # the towers, not random


def test_steps_note_says_when_training_stopped_early(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    assert steps_note(tmp_path, 3) == "3 steps"
    assert steps_note(tmp_path, 10) == "3 of 10 planned steps (stopped by --minutes)"


def test_clock_adds_up_phases_in_order() -> None:
    clock = Clock()
    for phase in ("a", "b", "a"):
        with clock(phase):
            pass
    assert list(clock.seconds) == ["a", "b"] and all(v >= 0 for v in clock.seconds.values())
    assert clock.line().startswith("total ") and "(a 0 s · b 0 s)" in clock.line()
