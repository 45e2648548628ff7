"""The Python parts of bench/gpu_check.sh run on a CPU at tiny sizes (the script itself needs CUDA)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
from conftest import load_bench

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_check():
    return load_bench("gpu_check")


def test_train_step_check_runs_and_says_ok(gpu_check, capsys):
    assert gpu_check.main(["train", "--preset", "tiny", "--steps", "1", "--batch", "1", "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("OK train tiny batch 1 on cpu (AMP off)") and "steps/s" in line


def test_bare_tower_rates_are_measured_at_the_configured_batches(gpu_check):
    cfg = gpu_check.extract_config("tiny", 8)
    assert (cfg.batch_frames, cfg.batch_windows) == (8, 2)
    clip_fps, clap_wps = gpu_check.bare_rates(cfg, "cpu", reps=1)
    assert math.isfinite(clip_fps) and clip_fps > 0 and math.isfinite(clap_wps) and clap_wps > 0


def test_shell_script_parses_and_refuses_without_cuda():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the script would run its checks")
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHON": __import__("sys").executable})
    assert res.returncode == 2 and "no CUDA device" in res.stderr
