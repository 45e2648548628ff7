"""Ray Train DDP: two CPU workers (gloo) train a few steps and rank 0 writes the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icf.train import checkpoint
from icf.train.ray_train import train_ray
from icf.train.logs import read_metrics
from icf.train.run import RunSpec


@pytest.fixture(scope="module")
def ray_session():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)  # never a running cluster
    yield ray
    if started:
        ray.shutdown()


def test_two_cpu_workers(tmp_path: Path, ray_session, avss_shards) -> None:
    avss_shards(tmp_path, n_train=8, n_val=2)
    spec = RunSpec(dataset="avss", preset="tiny", work=tmp_path, out=tmp_path / "runs" / "ddp", epochs=1, max_steps=2,
                   overrides=["train.batch_size=2", "model.image_size=32"], seed=1, checkpoint_every=1)
    run = train_ray(spec, num_workers=2)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2]  # rank 0 alone logs
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in records)
    state = checkpoint.load(run / checkpoint.CHECKPOINT)
    # 8 clips / batch 2 = 4 stream batches per epoch; 2 workers → 2 steps per epoch; 2 steps end the epoch
    assert state["step"] == 2 and state["position"] == {"epoch": 1, "batch": 0}
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped model is saved
