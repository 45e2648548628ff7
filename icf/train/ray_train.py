"""Multi-worker training with Ray Train (``TorchTrainer``, DistributedDataParallel; gloo on CPU, NCCL on GPU).

Every worker runs the same loop as :func:`icf.train.trainer.train` with its :class:`Dist` rank: the model is
wrapped by ``ray.train.torch.prepare_model`` (DDP), each optimiser step consumes ``world`` consecutive batches
of the epoch's stream (one per rank), and rank 0 writes the run folder (run.json, checkpoints, metrics).
Checkpoints are those of the single-process trainer, so ``--resume`` works the same way.

Every path is resolved on the driver (``--work``, ``--out``, ``--config``), and each worker runs in the driver's
working folder when it exists there (Ray starts workers in its own session folder), so relative paths, in
``--set`` values too, mean what they mean to the user (finding D6). Without ``--ray-address`` (or
``$RAY_ADDRESS``) Ray is a fresh embedded instance, never a cluster that happens to run on the machine; with one,
the cluster is joined as the stage runners join it (`icf.pipeline.runners.connect`). A ``UserError`` raised on a
worker reaches the command line as its one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from icf.clitools import UserError
from icf.train.run import RunSpec
from icf.train.select import Validator, registered_validator
from icf.train.trainer import Dist, train

ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "RAY_AUTH_MODE", "TOKENIZERS_PARALLELISM")


def _spec_to_config(spec: RunSpec, resume: bool, validate: Validator | None = None) -> dict[str, Any]:
    """The workers' copy of ``spec``, every path made absolute here on the driver, and the driver's folder."""
    raw = dataclasses.asdict(spec)
    raw.update(work=str(spec.work.expanduser().resolve()), out=str(spec.out.expanduser().resolve()),
               config=str(spec.config.expanduser().resolve()) if spec.config is not None else None,
               ablate=sorted(spec.ablate))
    return {"spec": raw, "resume": resume, "validate": validate, "cwd": os.getcwd()}


def _user_error(err: BaseException) -> UserError | None:
    """The `UserError` a worker raised, found inside Ray's wrappers (`WorkerGroupError.worker_failures`, a task
    error's ``cause``, chained exceptions), or None."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None


def _worker_loop(config: dict[str, Any]) -> None:
    """Body of every Ray Train worker."""
    import ray.train
    import ray.train.torch

    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])
    raw = dict(config["spec"])
    spec = RunSpec(**{**raw, "work": Path(raw["work"]), "out": Path(raw["out"]), "ablate": frozenset(raw["ablate"]),
                      "config": Path(raw["config"]) if raw["config"] else None})
    ctx = ray.train.get_context()

    def wrap(model):
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    train(spec, resume=config["resume"], dist=Dist(rank=ctx.get_world_rank(), world=ctx.get_world_size(), wrap=wrap),
          validate=config.get("validate"))
    ray.train.report({"done": 1})


def train_ray(spec: RunSpec, num_workers: int, resume: bool = False, address: str | None = None,
              validate: Validator | None = None) -> Path:
    """Train ``spec`` on ``num_workers`` Ray Train workers (the cluster at ``address``, else ``$RAY_ADDRESS``, or a
    fresh embedded Ray); rank 0 validates with ``validate`` (default: the registered validator, when there is one)."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from icf.pipeline.runners import connect

    if not ray.is_initialized():
        if address or os.environ.get("RAY_ADDRESS"):
            connect(address)
        else:  # address="local": a fresh instance, never a `ray start` cluster on this machine
            env = {k: os.environ[k] for k in ENV if k in os.environ}
            ray.init(address="local", num_cpus=max(num_workers + 1, os.cpu_count() or 1),
                     runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=True)
    use_gpu = torch.cuda.is_available()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config=_spec_to_config(spec, resume, validate or registered_validator()),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ray-train", storage_path=str((spec.out / "ray").resolve())),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps a worker's exception in its own types
        cause = _user_error(err)
        if cause is None:
            raise
        raise UserError(str(cause)) from None
    return spec.out
