"""Multi-worker training with Ray Train (``TorchTrainer``, DistributedDataParallel; gloo on CPU, NCCL on GPU).

Every worker runs the same loop as :func:`icf.train.trainer.train` with its :class:`Dist` rank: the model is
wrapped by ``ray.train.torch.prepare_model`` (DDP), each optimiser step consumes ``world`` consecutive batches
of the epoch's stream (one per rank), and rank 0 writes the run folder (run.json, checkpoints, metrics).
Checkpoints are those of the single-process trainer, so ``--resume`` works the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from icf.train.run import RunSpec
from icf.train.select import Validator, registered_validator
from icf.train.trainer import Dist, train

ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM")


def _spec_to_config(spec: RunSpec, resume: bool, validate: Validator | None = None) -> dict[str, Any]:
    raw = dataclasses.asdict(spec)
    raw.update(work=str(spec.work), out=str(spec.out), ablate=sorted(spec.ablate))
    return {"spec": raw, "resume": resume, "validate": validate}


def _worker_loop(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    raw = dict(config["spec"])
    spec = RunSpec(**{**raw, "work": Path(raw["work"]), "out": Path(raw["out"]), "ablate": frozenset(raw["ablate"])})
    ctx = ray.train.get_context()

    def wrap(model):
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    train(spec, resume=config["resume"], dist=Dist(rank=ctx.get_world_rank(), world=ctx.get_world_size(), wrap=wrap),
          validate=config.get("validate"))
    ray.train.report({"done": 1})


def train_ray(spec: RunSpec, num_workers: int, resume: bool = False, address: str | None = None,
              validate: Validator | None = None) -> Path:
    """Train ``spec`` on ``num_workers`` Ray Train workers (an embedded local Ray unless ``address``); rank 0
    validates with ``validate`` (default: the registered validator, when there is one)."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        env = {k: os.environ[k] for k in ENV if k in os.environ}
        kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "include_dashboard": False, "log_to_driver": True}
        if address is None:
            kwargs["num_cpus"] = max(num_workers + 1, os.cpu_count() or 1)
        ray.init(address=address, **kwargs)
    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=_spec_to_config(spec, resume, validate or registered_validator()),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ray-train", storage_path=str((spec.out / "ray").resolve())),
    )
    trainer.fit()
    return spec.out
