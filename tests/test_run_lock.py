"""One trainer per run folder (finding D7) and ``--resume`` refusing the options it would ignore (finding D2).

A trainer holds an exclusive lock on ``RUN/.lock``: a second ``train --resume`` or ``train --out`` on the busy run
refuses in one line naming the holder's pid and host; default run names never collide (the folder is created
exclusively, a suffix picks the next free name)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icf.cli import app
from icf.train.logs import read_metrics
from icf.train.run import RunSpec, run_lock
from icf.train.trainer import train
from test_train import FAST

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> Path:
    root = tmp_path_factory.mktemp("work")
    avss_shards(root, n_train=4, n_val=2)  # 2 steps per epoch at batch 2
    return root


def _train(work: Path, out: Path, max_steps: int, epochs: int = 1) -> Path:
    return train(RunSpec(dataset="avss", preset="tiny", work=work, out=out, epochs=epochs, max_steps=max_steps,
                         overrides=FAST, seed=1))


def _error_line(res) -> str:
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_a_busy_run_refuses_a_second_trainer_naming_the_holder(work: Path, tmp_path: Path) -> None:
    run = _train(work, tmp_path / "run", max_steps=1, epochs=50)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-m", "icf.cli", "train", "--resume", str(run), "--max-steps", "100"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while f"pid {holder.pid} " not in ((run / ".lock").read_text() if (run / ".lock").exists() else ""):
            assert holder.poll() is None and time.time() < deadline, holder.stderr.read() if holder.poll() else "timeout"
            time.sleep(0.1)
        for args in (["train", "--resume", str(run), "--max-steps", "3"],
                     ["train", "--dataset", "avss", "--work", str(work), "--out", str(run), "--max-steps", "1"]):
            line = _error_line(CliRunner().invoke(app, args))
            assert f"another trainer is using this run (pid {holder.pid} on {socket.gethostname()}" in line, line
    finally:
        holder.terminate()  # SIGTERM: the trainer checkpoints and stops
        holder.wait(timeout=240)
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == list(range(1, len(steps) + 1))  # one trainer's steps, each once


def test_out_refuses_a_folder_another_trainer_is_creating(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "race"
    with run_lock(out):  # a trainer that has started on --out but not written run.json yet
        line = _error_line(CliRunner().invoke(app, ["train", "--dataset", "avss", "--work", str(work), "--out", str(out),
                                                    "--max-steps", "1", "--set", FAST[0], "--set", FAST[1]]))
    assert f"pid {os.getpid()} on {socket.gethostname()}" in line
    assert not (out / "run.json").exists()


def test_default_run_names_started_in_the_same_second_do_not_collide(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import icf.train.cli

    monkeypatch.setattr(icf.train.cli.time, "strftime", lambda fmt, *a: "20260101-000000")
    for seed in ("0", "1"):
        res = CliRunner().invoke(app, ["train", "--dataset", "avss", "--work", str(work), "--max-steps", "1",
                                       "--seed", seed, "--set", FAST[0], "--set", FAST[1]])
        assert res.exit_code == 0, res.output
    runs = sorted((work / "runs").glob("avss-icf-tiny-20260101-000000*"))
    assert [r.name for r in runs] == ["avss-icf-tiny-20260101-000000", "avss-icf-tiny-20260101-000000-2"]
    assert [json.loads((r / "run.json").read_text())["train"]["seed"] for r in runs] == [0, 1]
    assert [[m["step"] for m in read_metrics(r)] for r in runs] == [[1], [1]]


def test_resume_refuses_the_options_it_would_ignore(work: Path, tmp_path: Path) -> None:
    run = _train(work, tmp_path / "run", max_steps=1, epochs=2)
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--max-steps", "2", "--set", "train.lr=100", "--seed", "7",
                                   "--epochs", "3", "--ablate", "mit", "--method", "bidir", "--preset", "paper-pvt",
                                   "--checkpoint-every", "1", "--dataset", "s4", "--work", str(tmp_path)])
    line = _error_line(res)
    for flag in ("--set", "--seed", "--epochs", "--ablate", "--method", "--preset", "--checkpoint-every",
                 "--dataset (the run is avss)", "--work (the run reads"):
        assert flag in line, (flag, line)
    assert [r["step"] for r in read_metrics(run)] == [1]  # nothing ran
    # --max-steps extends the run; --dataset and --work naming the run's own are accepted
    res = CliRunner().invoke(app, ["train", "--resume", str(run), "--max-steps", "2", "--dataset", "avss", "--work", str(work)])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
