"""The newcomer's path (issue 22): stage commands bring their upstream stages up to date as ``make`` does, the bank
is optional for the shards, and ``--dataset`` may be left out when the workspace holds one dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icf.cli import app
from icf.data.synth import synthesize
from icf.pipeline.ledger import Workspace
from icf.stages import stage_classes
from icf.workflow.run import upstream_plan

LOCAL = ["--executor", "local", "--no-progress"]


def icf(*args: str) -> str:
    """Run ``icf ARGS`` in-process; assert exit 0; return what it printed."""
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-clip synthetic AVSS tree and a workspace where only the index has run."""
    base = tmp_path_factory.mktemp("newcomer")
    synthesize("avss", base / "data", clips=6, seed=1, size=32)
    icf("stage", "index", "--dataset", "avss", "--root", str(base / "data"), "--work", str(base / "work"), "--no-progress")
    return base / "data", base / "work"


def test_the_readme_workflow_works_as_typed(indexed, tmp_path):
    """index → extract → shard (no --dataset, mel run on the way, no bank) → train (no --dataset)."""
    data, work = indexed
    work = tmp_path / "work"
    icf("stage", "index", "--dataset", "avss", "--root", str(data), "--work", str(work), "--no-progress")
    icf("stage", "extract", "--dataset", "avss", "--work", str(work), "--encoders", "tiny", *LOCAL)
    said = icf("stage", "shard", "--work", str(work), "--image-size", "32", *LOCAL)
    assert "upstream: mel (not run)" in said and "bank" not in said.split("upstream:")[1].splitlines()[0]
    index = json.loads((work / "avss" / "shards.json").read_text())
    assert index["audio_bank"] is None and sum(e["nsamples"] for e in index["splits"]["train"]) > 0
    assert Workspace(work, "avss").current("bank") is None  # only DDESeg needs it: not built on the way
    run = icf("train", "--preset", "tiny", "--max-steps", "1", "--work", str(work), "--out", str(tmp_path / "run"))
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and "run" in run
    again = icf("stage", "shard", "--work", str(work), "--image-size", "32", *LOCAL)
    assert "upstream:" not in again  # everything up to date: nothing runs before it


def test_no_upstream_keeps_the_refusal(indexed, tmp_path):
    data, _ = indexed
    work = tmp_path / "work"
    icf("stage", "index", "--dataset", "avss", "--root", str(data), "--work", str(work), "--no-progress")
    res = CliRunner().invoke(app, ["stage", "shard", "--work", str(work), "--no-upstream", *LOCAL])
    assert res.exit_code == 2 and "needs 'mel'" in res.output and "Traceback" not in res.output


def test_an_upstream_stage_reruns_with_the_options_of_its_last_run(indexed, tmp_path):
    """A stale upstream is brought up to date with its recorded config (here extract's tiny towers), not defaults."""
    data, _ = indexed
    work = tmp_path / "work"
    icf("stage", "index", "--dataset", "avss", "--root", str(data), "--work", str(work), "--no-progress")
    icf("stage", "extract", "--work", str(work), "--encoders", "tiny", *LOCAL)
    ws = Workspace(work, "avss")
    key = ws.current_key("extract")
    icf("stage", "index", "--dataset", "avss", "--root", str(data), "--work", str(work), "--unit-size", "2",
        "--no-progress")  # a new index key: extract is stale now
    plan = upstream_plan(ws, "shard")
    assert [(s.name, state) for s, state in plan] == [("extract", "stale"), ("mel", "not run")] or \
        [(s.name, state) for s, state in plan] == [("mel", "not run"), ("extract", "stale")]
    extract = next(s for s, _ in plan if s.name == "extract")
    assert extract.cfg.encoders == "tiny"
    icf("stage", "shard", "--work", str(work), "--image-size", "32", *LOCAL)
    assert ws.current_key("extract") != key and ws.current("extract")["options"]["encoders"] == "tiny"


def test_a_built_bank_is_brought_up_to_date_and_copied(indexed, tmp_path):
    """The bank is optional, not ignored: once built, the shards carry it and a stale bank is rebuilt first."""
    data, _ = indexed
    work = tmp_path / "work"
    icf("stage", "index", "--dataset", "avss", "--root", str(data), "--work", str(work), "--no-progress")
    icf("stage", "extract", "--work", str(work), "--encoders", "tiny", *LOCAL)
    icf("stage", "bank", "--work", str(work), "--bank-clusters", "1", "--bank-per-cluster", "1", *LOCAL)
    icf("stage", "shard", "--work", str(work), "--image-size", "32", *LOCAL)
    assert json.loads((work / "avss" / "shards.json").read_text())["audio_bank"] == "shards/audio_bank.npz"
    icf("stage", "index", "--dataset", "avss", "--root", str(data), "--work", str(work), "--unit-size", "2", "--no-progress")
    names = [s.name for s, _ in upstream_plan(Workspace(work, "avss"), "shard")]
    assert names == [n for n in stage_classes() if n in {"mel", "extract", "bank"}]


def test_dataset_may_be_left_out_only_when_the_workspace_holds_one(tmp_path):
    work = str(tmp_path / "work")
    res = CliRunner().invoke(app, ["status", "--work", work])
    assert res.exit_code == 2 and "--dataset is required" in res.output and "holds no dataset" in res.output
    for dataset in ("s4", "avss"):
        synthesize(dataset, tmp_path / dataset, clips=2, seed=0, size=32)
        icf("stage", "index", "--dataset", dataset, "--root", str(tmp_path / dataset), "--work", work, "--no-progress")
    for command in (["status"], ["stage", "mel", *LOCAL], ["train", "--max-steps", "0"]):
        res = CliRunner().invoke(app, [*command, "--work", work])
        assert res.exit_code == 2 and "--dataset is required" in res.output, res.output
        assert {"s4", "avss"} <= set(res.output.split("holds ")[1].split()[0:2][0].split(",") + res.output.split("holds ")[1].replace(",", " ").split()), res.output
    assert '"dataset": "s4"' in icf("status", "--work", work, "--dataset", "s4", "--json")


def test_a_slow_stage_on_a_cpu_says_so_once_with_an_estimate_and_the_fast_flag(indexed, tmp_path):
    import io

    from rich.console import Console

    from icf.pipeline.engine import RunOptions, run_stage
    from icf.stages.extract import ExtractStage
    from icf.stages.mel import MelStage

    assert ExtractStage(ExtractStage.Config(encoders="tiny")).cpu_hint() is None
    assert "--encoders tiny" in ExtractStage(ExtractStage.Config()).cpu_hint()  # the default, full-size towers

    class SlowMel(MelStage):
        def cpu_hint(self) -> str | None:
            return "mel is slow here; --fast makes it quick"

    data, _ = indexed
    work = tmp_path / "work"
    icf("stage", "index", "--dataset", "avss", "--root", str(data), "--work", str(work), "--unit-size", "2",
        "--no-progress")
    said = io.StringIO()
    run_stage(Workspace(work, "avss"), SlowMel(), RunOptions(executor="local", progress=False),
              Console(file=said, width=400))
    notes = [line for line in said.getvalue().splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--fast makes it quick" in notes[0] and "6 clips take about" in notes[0], said.getvalue()
