"""A run is bound to the shards it trained on (finding D1): ``run.json``'s ``data`` records their cache key, tar
digests and encoder spec; eval / predict / compare / ``train --resume`` refuse other shards in one line naming
what changed and the ``icf stage all`` command that rebuilds the old ones, unless ``--allow-other-shards`` (then
the report says so); ``icf compare`` shows each run's dataset and shard key."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icf.cli import app
from icf.train.run import RunSpec
from icf.train.trainer import train
from test_train import FAST


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> Path:
    work = tmp_path_factory.mktemp("work")
    avss_shards(work, n_train=4, n_val=3)
    return train(RunSpec(dataset="avss", preset="tiny", work=work, out=work / "runs" / "r", epochs=2, max_steps=1,
                         overrides=FAST, seed=3))


def _clone(run: Path, tmp: Path) -> tuple[Path, Path]:
    """A copy of the run and of its workspace under ``tmp`` (run.json pointing at the copy): (run, shards.json)."""
    work = Path(json.loads((run / "run.json").read_text())["shards"]).parent.parent
    shutil.copytree(work, tmp / "work", ignore=shutil.ignore_patterns("runs"))
    shutil.copytree(run, tmp / "run")
    shards = tmp / "work" / "avss" / "shards.json"
    doc = json.loads((tmp / "run" / "run.json").read_text())
    (tmp / "run" / "run.json").write_text(json.dumps({**doc, "shards": str(shards)}))
    return tmp / "run", shards


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250"})


def _error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_run_json_records_the_shards_it_trained_on(trained: Path) -> None:
    doc = json.loads((trained / "run.json").read_text())
    shards = json.loads(Path(doc["shards"]).read_text())
    data = doc["data"]
    assert data["shards_key"] == shards["cache_key"] == "test"
    assert data["digests"] == {e["url"]: e["sha256"] for entries in shards["splits"].values() for e in entries}
    assert data["encoders"] == shards["encoders"] and data["encoders"]["clip_model"] == "icf-tiny-clip"


def test_restaged_shards_are_refused_everywhere_unless_allowed(trained: Path, tmp_path: Path, avss_shards) -> None:
    run, shards_json = _clone(trained, tmp_path)
    before = _invoke("eval", "--run", str(run), "--split", "val", "--json")
    assert before.exit_code == 0 and "warning" not in before.output, before.output
    # re-stage: other clips (so other tar bytes), another cache key, another encoder seed
    avss_shards(shards_json.parent.parent, n_train=4, n_val=3, seed=5)
    doc = json.loads(shards_json.read_text())
    shards_json.write_text(json.dumps({**doc, "cache_key": "restaged", "encoders": {**doc["encoders"], "seed": 1}}))
    for args in (["eval", "--run", str(run), "--split", "val"],
                 ["predict", "--run", str(run), "--out", str(tmp_path / "viz"), "--limit", "1"],
                 ["compare", str(run), "--split", "val"],
                 ["train", "--resume", str(run), "--max-steps", "2"]):
        line = _error_line(_invoke(*args))
        assert "shard key test → restaged" in line and "encoders.seed 0 → 1" in line, line
        assert "2 of 2 tars differ" in line and "icf stage all --dataset avss" in line and "--encoders tiny" in line
        assert ("--allow-other-shards" in line) == (args[0] != "train"), line
    assert not (tmp_path / "viz").exists()
    assert json.loads((run / "run.json").read_text())["data"]["shards_key"] == "test"  # the resume changed nothing

    res = _invoke("eval", "--run", str(run), "--split", "val", "--json", "--allow-other-shards")
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "evaluate anyway" in res.output
    assert "shard key test → restaged" in json.loads(res.output.strip().splitlines()[-1])["other_shards"]
    res = _invoke("predict", "--run", str(run), "--out", str(tmp_path / "viz"), "--limit", "1", "--allow-other-shards")
    assert res.exit_code == 0 and "on other shards than it trained on" in res.output, res.output
    res = _invoke("compare", str(run), "--split", "val", "--json", "--allow-other-shards")
    assert res.exit_code == 0, res.output
    entry = json.loads(res.output.strip().splitlines()[-1])["runs"][0]
    assert entry["shards_key"] == "restaged" and "encoders.seed 0 → 1" in entry["other_shards"]


def test_a_run_written_before_the_binding_loads_with_a_warning(trained: Path, tmp_path: Path) -> None:
    run, _ = _clone(trained, tmp_path)
    doc = json.loads((run / "run.json").read_text())
    del doc["data"]
    (run / "run.json").write_text(json.dumps(doc))
    res = _invoke("eval", "--run", str(run), "--split", "val", "--json")
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "does not record the shards it trained on" in warnings[0]


def test_compare_shows_each_runs_dataset_and_shard_key(trained: Path, tmp_path: Path) -> None:
    res = _invoke("compare", str(trained), "--split", "val", "--json", "--out", str(tmp_path))
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert doc["dataset"] == "avss" and doc["groups"][0]["shards_key"] == doc["runs"][0]["shards_key"] == "test"
    row = next(csv.DictReader((tmp_path / "compare.csv").open()))
    assert (row["dataset"], row["shards_key"]) == ("avss", "test")
    table = _invoke("compare", str(trained), "--split", "val")
    assert re.search(r"avss\s+runs.*shards\s+test", table.output, re.S), table.output


def test_the_refusal_names_the_stage_command_that_brings_the_old_shards_back(tmp_path: Path) -> None:
    """End to end on staged data: re-staging with another encoder seed is refused, and the command the message
    names rebuilds shards the run accepts again, with the same numbers."""
    root, work = tmp_path / "data", tmp_path / "work"
    assert _invoke("synth", "--layout", "avss", "--out", str(root), "--clips", "8", "--size", "32", "--seed", "0").exit_code == 0
    stage = ["stage", "all", "--dataset", "avss", "--root", str(root), "--work", str(work), "--encoders", "tiny",
             "--image-size", "32", "--executor", "local", "--no-progress"]
    res = _invoke(*stage)
    assert res.exit_code == 0, res.output
    run = train(RunSpec(dataset="avss", preset="tiny", work=work, out=tmp_path / "run", max_steps=1,
                        overrides=["train.batch_size=2", "model.image_size=32"]))
    first = _invoke("eval", "--run", str(run), "--split", "val", "--json")
    assert first.exit_code == 0, first.output
    res = _invoke(*stage, "--encoder-seed", "1", "--image-size", "48")
    assert res.exit_code == 0, res.output
    line = _error_line(_invoke("eval", "--run", str(run), "--split", "val", "--json"))
    assert "encoders.seed 0 → 1" in line and "shard.image_size 32 → 48" in line, line
    command = re.search(r"`icf (stage all [^`]*)`", line).group(1)
    assert "--encoders tiny" in command and "--image-size 32" in command and "--encoder-seed" not in command
    res = _invoke(*command.split(), "--executor", "local", "--no-progress")
    assert res.exit_code == 0, res.output
    again = _invoke("eval", "--run", str(run), "--split", "val", "--json")
    assert again.exit_code == 0 and "warning" not in again.output, again.output
    assert json.loads(again.output.strip().splitlines()[-1]) == json.loads(first.output.strip().splitlines()[-1])


def test_an_imported_run_is_bound_to_no_shards(trained: Path, capsys: pytest.CaptureFixture) -> None:
    from icf.data.shards import ShardSet
    from icf.train.binding import check_shards

    doc = json.loads((trained / "run.json").read_text())
    shards = ShardSet.load(doc["shards"])
    imported = {k: v for k, v in doc.items() if k != "data"} | {"imported": {"from": "x.pth", "format": "tpavi"}}
    assert check_shards(trained, imported, shards) is None and "warning" not in capsys.readouterr().err
    legacy = {k: v for k, v in doc.items() if k != "data"}
    assert check_shards(trained, legacy, shards) is None and "warning:" in capsys.readouterr().err
