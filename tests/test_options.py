"""Every option is checked where it is parsed (findings F9, F13, F14): a bad value is one `error: …` line
and exit 2, before any heavy work starts, and leaves nothing behind."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from icf.cli import app


@pytest.fixture
def where(tmp_path):
    """A text file (a 'weights file' that is no checkpoint, and a path no folder can be made under)."""
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    return tmp_path, text


def cases(tmp, text):
    """(command line, what the error line must say)."""
    w = ["--work", str(tmp / "w")]
    stage = ["--dataset", "avss", *w]
    run = str(tmp / "run")
    return [
        (["stage", "all", *stage, "--root", str(tmp), "--batch-size", "0"], "--batch-size must be at least 1"),
        (["stage", "mel", *stage, "--batch-size", "-1"], "--batch-size must be at least 1"),
        (["stage", "extract", *stage, "--workers", "-1"], "--workers must be at least 1"),
        (["stage", "extract", *stage, "--workers", "0"], "--workers must be at least 1"),
        (["stage", "index", *stage, "--root", str(tmp), "--unit-size", "0"], "--unit-size must be at least 1"),
        (["stage", "all", *stage, "--root", str(tmp), "--unit-size", "-4"], "--unit-size must be at least 1"),
        (["stage", "mel", *stage, "--n-mels", "0"], "--n-mels must be positive"),
        (["stage", "mel", *stage, "--hop-s", "0"], "--hop-s must be positive"),
        (["stage", "all", *stage, "--root", str(tmp), "--f-max", "9000"], "--f-max <= sample_rate/2"),
        (["stage", "shard", *stage, "--image-size", "8"], "--image-size must be at least 16"),
        (["stage", "extract", *stage, "--clip-weights", str(text)], "not a torch checkpoint"),
        (["stage", "all", "--dataset", "avss", "--work", str(text / "w"), "--root", str(tmp)], "cannot write there"),
        (["stage", "index", "--dataset", "avss", "--work", str(text / "w"), "--root", str(tmp)], "cannot write there"),
        (["synth", "--layout", "s4", "--out", str(text / "d"), "--clips", "2"], "cannot write there"),
        (["synth", "--layout", "s4", "--out", str(tmp / "d"), "--snr-db", "nan"], "--snr-db must be a finite"),
        (["eval", "--run", run, "--snr-db", "nan"], "--snr-db must be a finite number"),
        (["eval", "--run", run, "--snr-db", "-inf"], "--snr-db must be a finite number"),
        (["eval", "--run", run, "--frame-mix", "2"], "--frame-mix must be a fraction in [0, 1]"),
        (["eval", "--run", run, "--limit", "0"], "--limit must be at least 1"),
        (["eval", "--run", run, "--limit", "-1"], "--limit must be at least 1"),
        (["predict", "--run", run, "--out", str(text)], "exists and is not a folder"),
        (["predict", "--run", run, "--out", str(tmp / "p"), "--limit", "0"], "--limit must be at least 1"),
        (["train", "--dataset", "avss", *w, "--out", run, "--set", "train.lr=abc"], "train.lr must be a number"),
        (["train", "--dataset", "avss", *w, "--out", run, "--set", "train.batch_size=0"], "train.batch_size must be at least 1"),
        (["train", "--dataset", "avss", *w, "--out", run, "--set", "train.schedule=linear"], "train.schedule must be"),
        (["train", "--dataset", "avss", *w, "--out", run, "--max-steps", "-1"], "--max-steps must be at least 0"),
        (["train", "--dataset", "avss", *w, "--out", run, "--checkpoint-every", "0"], "--checkpoint-every must be at least 1"),
        (["train", "--dataset", "avss", *w, "--out", str(text / "run")], "cannot write there"),
        (["train", "--dataset", "foo", *w], "unknown dataset 'foo'; expected one of s4, ms3, avss"),
        (["train", *w], "--dataset is required"),
        (["train", "--resume", str(tmp / "norun"), "--max-steps", "2"], "not a training run"),
    ]


def test_every_bad_option_is_one_error_line_and_exit_2(where):
    tmp, text = where
    runner = CliRunner()
    for argv, expected in cases(tmp, text):
        res = runner.invoke(app, argv)
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert res.exit_code == 2, (argv, res.output)
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (argv, res.output)
    assert not (tmp / "run" / "run.json").exists()  # a rejected config leaves no run file behind
    assert not (tmp / "w").exists() or not any((tmp / "w").rglob("*.parquet"))


def test_train_config_rejects_wrong_types_and_ranges():
    from icf.config import TrainConfig

    assert TrainConfig(lr=1, max_steps=0).max_steps == 0  # an int learning rate and zero steps are fine
    for bad in ({"lr": "abc"}, {"lr": 0.0}, {"batch_size": 0}, {"batch_size": 2.5}, {"epochs": 0},
                {"warmup_steps": -1}, {"grad_clip": float("nan")}, {"max_steps": -1}, {"schedule": "linear"}):
        with pytest.raises(ValueError, match=f"train.{next(iter(bad))}"):
            TrainConfig(**bad)
