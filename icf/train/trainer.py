"""The training loop: shards in, checkpoints + ``metrics.jsonl`` + ``loss.png`` out.

Read top to bottom: the configs (project preset → method preset → overrides), the run folder, seeds, the
shard stream, the model of the run's method (`icf.train.run.build_model`), AdamW with a warm-up +
poly/cosine/step schedule over ``epochs × batches per epoch`` steps, then the epoch loop. ``max_steps`` only
stops early; it never changes the schedule, so a run stopped at step 3 and resumed to step 6 takes the same
6 steps as one uninterrupted run (same batches, same learning rates, same random draws).

Run-folder I/O and `load_trained` live in `icf.train.run`, the step log and plots in `icf.train.logs`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icf import methods
from icf.clitools import UserError, console
from icf.config import ModelConfig, TrainConfig, apply_overrides, apply_values, preset, read_overrides
from icf.data.frame_stream import FrameStream
from icf.data.shards import DataPosition, ShardSet, ShardStream, make_loader
from icf.augment.frames import clip_transform
from icf.augment.negatives import training_negatives
from icf.train import checkpoint, select
from icf.train.binding import check_shards, shard_binding
from icf.train.host_memory import keep_freed_memory
from icf.train.logs import METRICS_FILE, append_metrics, plot_losses, progress_bar, trim_metrics
from icf.train.run import RUN_FILE, RunSpec, build_model, pick_device, read_run_file, seed_everything, shards_path, write_run_file


# ----------------------------------------------------------------------------- configuration


def build_configs(spec: RunSpec) -> tuple[ModelConfig, TrainConfig]:
    """Project preset → the method's preset (`MethodSpec.presets`) → the ``--config`` file → ``--set`` overrides →
    the command-line switches (ablate, epochs, max steps, seed), validated against the method."""
    try:
        model_cfg, train_cfg = preset(spec.preset, spec.dataset)
        model_cfg = dataclasses.replace(model_cfg, method=spec.method)
        model_cfg, train_cfg = methods.get(spec.method).preset(spec.preset, model_cfg, train_cfg)
        if spec.config is not None:
            model_cfg, train_cfg = apply_values(model_cfg, train_cfg, read_overrides(spec.config))
        model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, list(spec.overrides))
        switches = {"seed": spec.seed, "epochs": spec.epochs, "max_steps": spec.max_steps}
        model_cfg = dataclasses.replace(model_cfg, ablate=frozenset(spec.ablate))
        train_cfg = dataclasses.replace(train_cfg, **{k: v for k, v in switches.items() if v is not None})
        methods.validate(model_cfg, train_cfg)
        return model_cfg, train_cfg
    except ValueError as err:
        raise UserError(str(err)) from None


# ----------------------------------------------------------------------------- model and optimiser


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model.parameter_groups`` (the backbone at ``lr · backbone_lr_mult``); with
    ``decay_norms=False`` each group is split so that 1-D parameters (norm scales, biases) get no weight decay.
    ``fused``: one kernel per group over all its tensors, instead of the CPU default's Python loop over ~250 tensors
    (``foreach`` was 3x slower than fused on the tiny preset); the same update up to float rounding."""
    groups = [g for g in model.parameter_groups(cfg) if g["params"]]
    if not cfg.decay_norms:
        split = []
        for g in groups:
            flat = [p for p in g["params"] if p.ndim <= 1]
            split += [{**g, "params": [p for p in g["params"] if p.ndim > 1]}, {**g, "params": flat, "weight_decay": 0.0}]
        groups = [g for g in split if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


DECAYS: dict[str, Callable[[float], float]] = {  # decay over the run's progress in [0, 1] (after warm-up)
    "poly": lambda p: (1.0 - p) ** 0.9,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
}


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total`` (``cfg.schedule`` is validated by
    TrainConfig): linear warm-up, then constant, step (× ``gamma`` at each epoch of ``milestones``, an epoch
    being ``total / epochs`` steps), or poly (power 0.9) / cosine from 1 down to ``min_lr_ratio``. The warm-up
    lasts ``warmup_steps``, or ``warmup_epochs`` epochs."""
    warmup = cfg.warmup(total // cfg.epochs)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= m * total / cfg.epochs for m in cfg.milestones)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * DECAYS[cfg.schedule](progress)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, cfg: TrainConfig) -> torch.autocast:
    """bf16 autocast on CUDA when ``amp`` is set; a disabled context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")


def train_step(model: nn.Module, loss_of: Any, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: Any, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """One optimisation step; returns every scalar loss term, the gradient norm and the learning rate.
    On the CPU the process first keeps freed memory for the next step (`keep_freed_memory`, once)."""
    if device.type == "cpu":
        keep_freed_memory()
    model.train()
    with autocast(device, cfg):
        out = model(batch)
        losses = loss_of(out, batch)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
    optimizer.step()
    lr = max(g["lr"] for g in optimizer.param_groups)
    scheduler.step()
    record = {k: float(v.detach()) for k, v in losses.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    return {**record, "grad_norm": float(grad_norm), "lr": lr}


# ----------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run (Ray Train): ``rank`` of ``world``, and how to wrap the
    model (``DistributedDataParallel``). Rank 0 alone writes the run folder."""

    rank: int = 0
    world: int = 1
    wrap: Callable[[nn.Module], nn.Module] | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


RUN_MARKERS = (RUN_FILE, METRICS_FILE, checkpoint.CHECKPOINT)


class StopRequest:
    """SIGINT / SIGTERM while training: the first one asks the loop to checkpoint and stop after the
    current step (``signal`` is then the signal's number); a second one interrupts at once. Installed only
    in the main thread (Python delivers signals there); the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        console.print(f"[yellow]signal {signum}: saving a checkpoint after this step, then stopping "
                      "(again to stop at once)[/]", highlight=False)

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_exc: Any) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def exit(self) -> None:
        """Leave as the signal would have: KeyboardInterrupt for SIGINT (exit 130), exit 143 for SIGTERM."""
        import signal

        if self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self.signal or 0))


def save_checkpoint(path: Path, *args: Any) -> None:
    """``checkpoint.save`` with a full or read-only disk as a one-line ``UserError`` (the previous
    checkpoint stays intact and the half-written temp file is removed)."""
    try:
        checkpoint.save(path, *args)
    except (OSError, RuntimeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise UserError(f"{path}: cannot write the checkpoint ({reason}; disk full?); the previous "
                        "checkpoint is intact, free space and --resume") from None


def train(spec: RunSpec, resume: bool = False, dist: Dist = Dist(), validate: select.Validator | None = None) -> Path:
    """Train (or, with ``resume``, continue the run in ``spec.out``) and return the run folder.

    A new run refuses a folder that already holds one (``run.json``, ``metrics.jsonl`` or a checkpoint);
    SIGINT / SIGTERM save a checkpoint after the current step and stop; ``max_steps`` 0 takes no step.
    With ``train.val_every`` > 0, rank 0 validates at the ends of epochs and keeps ``best.pt`` (`icf.train.select`;
    ``validate`` defaults to the registered one).
    """
    run = spec.out
    if resume:
        doc, model_cfg, train_cfg = read_run_file(run)
        if "imported" in doc:
            raise UserError(f"{run}: imported from {doc['imported'].get('from')} (weights only, no optimiser state): "
                            "it cannot be resumed; evaluate it, or train a new run")
        if spec.max_steps is not None:
            train_cfg.max_steps = spec.max_steps
        shards = ShardSet.load(doc["shards"])
        check_shards(run, doc, shards, action="resume")
        every = int(doc.get("checkpoint_every", spec.checkpoint_every))
    else:
        if dist.main and any((run / name).exists() for name in RUN_MARKERS):
            raise UserError(f"{run}: already holds a run (use --resume {run} to continue it, or another --out)")
        model_cfg, train_cfg = build_configs(spec)
        shards = ShardSet.load(shards_path(spec.work, spec.dataset))
        if problem := methods.preflight(model_cfg, shards):
            raise UserError(f"{shards.path}: {problem}")
        if dist.main:
            write_run_file(run, spec, model_cfg, train_cfg, data=shard_binding(shards))
        every = spec.checkpoint_every
    seed_everything(train_cfg.seed)
    device = pick_device()

    # data: one step consumes `world` consecutive batches of the epoch's stream (one per rank)
    unit = FrameStream if train_cfg.batch_unit == "gt_frames" else ShardStream  # batches of GT frames or of clips
    stream = unit(shards, "train", train_cfg.batch_size, model_cfg.image_size, train=True, seed=train_cfg.seed,
                  rank=dist.rank, world=dist.world, transform=clip_transform(train_cfg.augment))
    loader = make_loader(stream, spec.workers)
    steps_per_epoch = len(stream) // dist.world
    if steps_per_epoch == 0:
        raise UserError(f"{shards.path}: {stream.num_samples()} train {train_cfg.batch_unit.replace('_', ' ')}, fewer than "
                        f"one batch of {train_cfg.batch_size} per worker")
    total = train_cfg.epochs * steps_per_epoch
    stop = total if train_cfg.max_steps is None else min(total, train_cfg.max_steps)

    # model, optimiser, schedule (over the whole run, whatever max_steps says)
    model = build_model(model_cfg, shards, device)
    optimizer = make_optimizer(model, train_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, train_cfg))
    step, position = 0, DataPosition()
    ckpt_path = run / checkpoint.CHECKPOINT
    if resume:
        state = checkpoint.load(ckpt_path)
        checkpoint.load_model_state(model, state["model"], ckpt_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        step, position = state["step"], DataPosition(**state["position"])
        if dist.main:
            trim_metrics(run, step)
    net = dist.wrap(model) if dist.wrap is not None else model
    negatives = training_negatives(train_cfg, shards, device)  # identity unless train.negative_fraction > 0
    selection = select.start(run, train_cfg, model_cfg.method, shards, model_cfg.image_size, device, validate) \
        if dist.main else None

    if dist.main:
        console.print(f"[bold]run[/] {run}  device {device.type}  workers {dist.world}  {steps_per_epoch} steps/epoch  steps {step}→{stop}")
    t0 = time.time()
    with progress_bar(enabled=dist.main) as bar, StopRequest() as stop_request:
        task = bar.add_task("train", total=stop, completed=step, loss=float("nan"))
        for epoch in range(position.epoch, train_cfg.epochs):
            if step >= stop:
                break
            stream.set_position(epoch, position.batch * dist.world)
            for batch in itertools.islice(loader, steps_per_epoch - position.batch):
                record = train_step(net, model.loss, to_device(negatives(batch, step), device), optimizer, scheduler,
                                    train_cfg, device)
                step += 1
                done = position.batch + 1  # batches of this epoch done; the checkpoint keeps the next position
                position = DataPosition(epoch + 1, 0) if done == steps_per_epoch else DataPosition(epoch, done)
                if stop_request.signal or (spec.time_limit_s is not None and time.time() - t0 >= spec.time_limit_s):
                    stop = step
                if dist.main:
                    append_metrics(run, {"step": step, "epoch": position.epoch, "time": round(time.time() - t0, 3), **record})
                    bar.update(task, completed=step, loss=record["total"])
                    validated = selection is not None and position.batch == 0 and selection.after_epoch(model, step, position.epoch)
                    if step % every == 0 or step == stop or validated:
                        save_checkpoint(ckpt_path, model, optimizer, scheduler, step, position.to_dict())
                if step >= stop:
                    break
    if dist.main:
        plot_losses(run)
    if stop_request.signal is not None:
        stop_request.exit()
    return run


