"""``icf train --ray-workers`` (finding D6, D12, D13): relative ``--work`` / ``--out`` mean what they mean on the
driver, ``$RAY_ADDRESS`` joins that cluster, and a ``UserError`` on a worker is the command's one ``error:`` line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from icf.cli import app
from icf.train import checkpoint
from icf.train.logs import read_metrics
from test_train_ray import ray_session  # noqa: F401  (the fixture: an in-process Ray with 3 CPUs)

REPO = Path(__file__).resolve().parent.parent
FAST = ["--set", "train.batch_size=2", "--set", "model.image_size=32"]


def test_relative_work_and_out_and_a_worker_user_error(tmp_path: Path, ray_session, avss_shards,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    avss_shards(tmp_path / "w", n_train=4, n_val=2)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["train", "--dataset", "avss", "--work", "w", "--out", "runs/x", "--max-steps", "1",
                                   "--ray-workers", "2", *FAST])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "x"
    assert (run / "run.json").is_file() and (run / checkpoint.CHECKPOINT).is_file()
    assert [r["step"] for r in read_metrics(run)] == [1]
    # 4 clips at batch 4 on 2 workers: fewer than one batch per worker, raised on the workers
    res = CliRunner().invoke(app, ["train", "--dataset", "avss", "--work", "w", "--out", "runs/y", "--max-steps", "1",
                                   "--ray-workers", "2", "--set", "train.batch_size=4", "--set", "model.image_size=32"])
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert res.exit_code == 2 and len(errors) == 1, res.output
    assert "4 train clips, fewer than one batch of 4 per worker" in errors[0]


def test_ray_address_joins_that_cluster_with_relative_paths(tmp_path: Path, ray_session, avss_shards) -> None:
    avss_shards(tmp_path / "w", n_train=4, n_val=2)
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "icf.cli", "train", "--dataset", "avss", "--work", "w", "--out", "runs/z",
                           "--max-steps", "1", "--ray-workers", "2", *FAST],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "runs/z"
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "z")] == [1]
