"""icf compare: the metrics icf eval gives per run, grouped by configuration with mean ± std over seeds."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icf.cli import app
from icf.clitools import UserError
from icf.eval.compare import SETTINGS, EvalSetting, configuration, mean_std, parse_setting, settings_from_options
from icf.train.run import RunSpec
from icf.train.trainer import train
from test_train import FAST

METRICS = ("J", "F", "J_present", "F_present", "FDR")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> list[Path]:
    work = tmp_path_factory.mktemp("work")
    avss_shards(work, n_train=4, n_val=3)
    spec = lambda out, seed, ablate=frozenset(): RunSpec(  # noqa: E731
        dataset="avss", preset="tiny", work=work, out=work / "runs" / out, epochs=1, max_steps=2, overrides=FAST,
        seed=seed, ablate=ablate)
    return [train(spec("a", 7)), train(spec("b", 8)), train(spec("c", 7, frozenset({"cdcl"})))]


def _eval_json(run: Path, *extra: str) -> dict:
    res = CliRunner().invoke(app, ["eval", "--run", str(run), "--split", "val", "--json", *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


def test_compare_gives_icf_eval_metrics_and_seed_statistics(runs: list[Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["compare", *map(str, runs), "--split", "val", "--snr-db", "0", "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert doc["settings"] == ["clean", "snr 0 dB"]
    for entry, run in zip(doc["runs"], runs):
        for label, extra in (("clean", ()), ("snr 0 dB", ("--snr-db", "0"))):
            expected = _eval_json(run, *extra)
            for m in METRICS:
                assert entry["results"][label][m] == pytest.approx(expected[m], abs=1e-12), (run.name, label, m)
    groups = {g["name"]: g for g in doc["groups"]}
    assert set(groups) == {"icf tiny", "icf tiny −cdcl"}
    base = groups["icf tiny"]
    assert sorted(base["seeds"]) == [7, 8] and base["steps"] == [2, 2] and base["planned_steps"] == 2
    for m in METRICS:
        a, b = (doc["runs"][i]["results"]["clean"][m] for i in (0, 1))
        stat = base["settings"]["clean"][m]
        assert stat["mean"] == pytest.approx((a + b) / 2) and stat["std"] == pytest.approx(abs(a - b) / math.sqrt(2))
    assert groups["icf tiny −cdcl"]["settings"]["clean"]["J"]["std"] == 0.0
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert len(rows) == 2 * 2 and float(rows[0]["J_mean"]) == pytest.approx(base["settings"]["clean"]["J"]["mean"], abs=1e-6)
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert json.loads((tmp_path / "compare.json").read_text())["groups"] == doc["groups"]


def test_table_shows_the_method_column_when_run_json_names_one(runs: list[Path], tmp_path: Path) -> None:
    run = tmp_path / "with-method"
    shutil.copytree(runs[0], run)
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**doc, "method": "icf-toy"}))
    res = CliRunner().invoke(app, ["compare", str(run), str(runs[1]), "--split", "val"], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    header = next(line for line in res.output.splitlines() if "group" in line)
    assert "method" in header and "icf-toy" in res.output
    old = []  # runs written before the registry name no method: no column
    for i in (0, 1):
        old.append(tmp_path / f"old{i}")
        shutil.copytree(runs[i], old[-1])
        doc = json.loads((old[-1] / "run.json").read_text())
        doc.pop("method")
        doc["model"].pop("method")
        (old[-1] / "run.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["compare", *map(str, old), "--split", "val"], env={"COLUMNS": "250"})
    header = next(line for line in res.output.splitlines() if "group" in line)
    assert res.exit_code == 0 and "method" not in header


def test_groups_ignore_only_the_seed() -> None:
    a = {"model": {"ablate": []}, "train": {"seed": 1, "lr": 1e-3}, "checkpoint_every": 5}
    assert configuration(a) == configuration({**a, "train": {"seed": 2, "lr": 1e-3}, "checkpoint_every": 9})
    assert configuration(a) != configuration({**a, "train": {"seed": 1, "lr": 2e-3}})
    assert configuration(a) != configuration({**a, "method": "x"})


def test_a_run_written_before_a_config_field_existed_groups_with_newer_runs(runs: list[Path], tmp_path: Path) -> None:
    """A run.json without a field added later (here ``cdcl_visual_pool``, whose default keeps the old behaviour)
    is the same configuration as a newer run that records the default: one group, both seeds."""
    older = tmp_path / "older"
    shutil.copytree(runs[1], older)
    doc = json.loads((older / "run.json").read_text())
    assert doc["model"].pop("cdcl_visual_pool") == "mean"
    (older / "run.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(app, ["compare", str(runs[0]), str(older), "--split", "val", "--json"])
    assert res.exit_code == 0, res.output
    groups = json.loads(res.output.strip().splitlines()[-1])["groups"]
    assert [(g["name"], sorted(g["seeds"])) for g in groups] == [("icf tiny", [7, 8])]


def test_settings_registry_parses_values_and_takes_new_entries() -> None:
    labels = [s.label for s in settings_from_options(["10,0", "-10"], ["0.25"], [])]
    assert labels == ["clean", "snr 10 dB", "snr 0 dB", "snr -10 dB", "frame-mix 0.25"]
    with pytest.raises(UserError, match="unknown setting"):
        parse_setting("nope")
    with pytest.raises(UserError, match="needs a value"):
        parse_setting("snr")
    SETTINGS["constant"] = lambda _v: EvalSetting("constant", lambda *a: {"J": 0.5})
    try:
        assert parse_setting("constant").run(None, None, "val", 32, "cpu") == {"J": 0.5}
    finally:
        del SETTINGS["constant"]


def test_mean_std_skips_missing_values() -> None:
    assert mean_std([0.2, None, float("nan"), 0.4]) == pytest.approx({"mean": 0.3, "std": math.sqrt(0.02), "n": 2})
    assert mean_std([])["n"] == 0


def test_compare_negative_settings_give_icf_eval_false_positive_rates(runs: list[Path]) -> None:
    res = CliRunner().invoke(app, ["compare", str(runs[0]), "--split", "val", "--negative", "silence,noise", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert doc["settings"] == ["clean", "negative: silence", "negative: noise"]
    assert {"FPR_frame", "FPR_pixel", "HM"} <= set(doc["metrics"])
    expected = _eval_json(runs[0], "--negative", "silence", "--negative", "noise")
    for kind in ("silence", "noise"):
        got = doc["runs"][0]["results"][f"negative: {kind}"]
        for m in ("FPR_frame", "FPR_pixel", "HM"):
            assert got[m] == pytest.approx(expected[kind][m], abs=1e-12), (kind, m)
