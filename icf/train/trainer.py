"""The training loop: shards in, checkpoints + ``metrics.jsonl`` + ``loss.png`` out.

Read top to bottom: a run folder and its config, seeds, the shard stream, the model (trainable parts +
frozen text towers rebuilt from the encoder spec of ``shards.json``), AdamW with a warm-up + poly/cosine/step
schedule over ``epochs × batches per epoch`` steps, then the loop. ``max_steps`` only stops early; it never
changes the schedule, so a run stopped at step 3 and resumed to step 6 takes the same 6 steps as one
uninterrupted run (same batches, same learning rates, same random draws).

The model comes from the method registry (`icf.methods`, ``--method``). A run folder holds ``run.json``
(dataset, method, preset, shards path, both configs), ``checkpoint.pt`` (latest),
``metrics.jsonl`` (one JSON object per step) and ``loss.png``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from icf.clitools import UserError, console
from icf import methods
from icf.config import ModelConfig, TrainConfig, apply_overrides, model_from_dict, preset, to_dict
from icf.data.shards import DataPosition, ShardSet, ShardStream, make_loader
from icf.eval.negatives import training_negatives
from icf.methods.base import Resources
from icf.model.segmenter import SegModel
from icf.train import checkpoint

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class RunSpec:
    """What ``icf train`` was asked to do."""

    dataset: str
    preset: str
    work: Path
    out: Path
    method: str = "icf"
    epochs: int | None = None
    max_steps: int | None = None
    ablate: frozenset[str] = frozenset()
    seed: int = 0
    workers: int = 0
    overrides: list[str] = field(default_factory=list)
    checkpoint_every: int = 50
    time_limit_s: float | None = None  # stop (and checkpoint) after the step that passes this wall time


# ----------------------------------------------------------------------------- configuration


def build_configs(spec: RunSpec) -> tuple[ModelConfig, TrainConfig]:
    """Project preset → the method's preset (`MethodSpec.presets`) → ``key=value`` overrides → the command-line
    switches (ablate, epochs, max steps, seed), validated against the method (`icf.methods.validate`)."""
    try:
        model_cfg, train_cfg = preset(spec.preset, spec.dataset)
        model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, [f'model.method="{spec.method}"'])
        model_cfg, train_cfg = methods.get(model_cfg.method).preset(spec.preset, model_cfg, train_cfg)
        extra = [f"model.ablate={json.dumps(sorted(spec.ablate))}", f"train.seed={spec.seed}"]
        if spec.epochs is not None:
            extra.append(f"train.epochs={spec.epochs}")
        if spec.max_steps is not None:
            extra.append(f"train.max_steps={spec.max_steps}")
        model_cfg, train_cfg = apply_overrides(model_cfg, train_cfg, list(spec.overrides) + extra)
        methods.validate(model_cfg)
        return model_cfg, train_cfg
    except ValueError as err:
        raise UserError(str(err)) from None


def shards_path(work: Path, dataset: str) -> Path:
    """``WORK/<dataset>/shards.json``."""
    return work / dataset / "shards.json"


def write_run_file(run: Path, spec: RunSpec, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    run.mkdir(parents=True, exist_ok=True)
    doc = {
        "dataset": spec.dataset,
        "method": model_cfg.method,
        "preset": spec.preset,
        "shards": str(shards_path(spec.work, spec.dataset).resolve()),
        "checkpoint_every": spec.checkpoint_every,
        **to_dict(model_cfg, train_cfg),
    }
    (run / RUN_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))


def read_run_file(run: Path) -> tuple[dict[str, Any], ModelConfig, TrainConfig]:
    """``run.json`` → (the document, ModelConfig, TrainConfig); ``UserError`` when absent or malformed.

    A run written before the method registry has no ``method``: it is an ``icf`` run."""
    path = run / RUN_FILE
    if not path.is_file():
        raise UserError(f"{path}: not a training run (no {RUN_FILE})")
    try:
        doc = json.loads(path.read_text())
        model_cfg = model_from_dict(doc["model"])
        methods.validate(model_cfg)
        train_cfg = TrainConfig(**doc["train"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: malformed run file ({err})") from None
    return doc, model_cfg, train_cfg


# ----------------------------------------------------------------------------- model and optimiser


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(model_cfg: ModelConfig, shards: ShardSet, device: torch.device) -> SegModel:
    """The model of ``model_cfg.method`` (`icf.methods`), given the shards' encoder spec and text bank."""
    if model_cfg.dataset != shards.dataset:
        raise UserError(f"{shards.path}: shards hold {shards.dataset}, the config is for {model_cfg.dataset}")
    method = methods.get(model_cfg.method)
    bank = None
    if shards.text_bank.is_file():
        with np.load(shards.text_bank) as npz:
            bank = {k: npz[k] for k in npz.files}
    elif "clip" in method.requires:
        raise UserError(f"{shards.text_bank}: text bank not found (named by {shards.path})")
    try:
        model = method.build(model_cfg, methods.validate(model_cfg), Resources(shards.encoders, bank, device))
    except ValueError as err:
        raise UserError(f"{shards.path}: {err}") from None
    return model.to(device)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model.parameter_groups`` (the backbone at ``lr · backbone_lr_mult``); with
    ``decay_norms=False`` each group is split so that 1-D parameters (norm scales, biases) get no weight decay."""
    groups = [g for g in model.parameter_groups(cfg) if g["params"]]
    if not cfg.decay_norms:
        split = []
        for g in groups:
            flat = [p for p in g["params"] if p.ndim <= 1]
            split += [{**g, "params": [p for p in g["params"] if p.ndim > 1]}, {**g, "params": flat, "weight_decay": 0.0}]
        groups = [g for g in split if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``: linear warm-up, then poly (power 0.9) or
    cosine from 1 to ``min_lr_ratio``, constant, or step (× ``gamma`` at each epoch of ``milestones``, an epoch
    being ``total / epochs`` steps)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        per_epoch = total / cfg.epochs
        return cfg.gamma ** sum(step >= m * per_epoch for m in cfg.milestones)
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "poly":
        decay = (1.0 - progress) ** 0.9
    elif cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise UserError(f"unknown schedule {cfg.schedule!r}; expected poly, cosine, constant or step")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def autocast(device: torch.device, cfg: TrainConfig) -> torch.autocast:
    """bf16 autocast on CUDA when ``amp`` is set; a disabled context elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda")


def train_step(model: nn.Module, loss_of: Any, batch: dict[str, Any], optimizer: torch.optim.Optimizer,
               scheduler: Any, cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """One optimisation step; returns every scalar loss term, the gradient norm and the learning rate."""
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


# ----------------------------------------------------------------------------- logging


def append_metrics(run: Path, record: dict[str, Any]) -> None:
    with (run / METRICS_FILE).open("a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_losses(run: Path) -> Path:
    """``loss.png``: total and segmentation loss per step (raw and a 20-step moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(run) if "total" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("total", "seg"):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if not pts:
            continue
        steps, values = zip(*pts)
        line = ax.plot(steps, values, alpha=0.3, lw=1)[0]
        w = min(20, len(values))
        smooth = np.convolve(values, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, color=line.get_color(), lw=2, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run.name)
    ax.legend()
    fig.tight_layout()
    path = run / LOSS_PLOT
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _progress(enabled: bool = True):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, disable=not enabled,
    )


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


def trim_metrics(run: Path, step: int) -> None:
    """Drop the ``metrics.jsonl`` records after ``step`` (those of steps an interrupted run took after its
    last checkpoint), so a resumed run logs each step once."""
    records = read_metrics(run)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        tmp = run / f"{METRICS_FILE}.tmp"
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        tmp.replace(run / METRICS_FILE)


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
        path.with_suffix(".tmp").unlink(missing_ok=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0]
        raise UserError(f"{path}: cannot write the checkpoint ({reason}; disk full?); the previous "
                        "checkpoint is intact, free space and --resume") from None


def train(spec: RunSpec, resume: bool = False, dist: Dist = Dist()) -> Path:
    """Train (or, with ``resume``, continue the run in ``spec.out``) and return the run folder.

    A new run refuses a folder that already holds one (``run.json``, ``metrics.jsonl`` or a checkpoint);
    SIGINT / SIGTERM save a checkpoint after the current step and stop; ``max_steps`` 0 takes no step.
    """
    run = spec.out
    if resume:
        doc, model_cfg, train_cfg = read_run_file(run)
        if spec.max_steps is not None:
            train_cfg.max_steps = spec.max_steps
        shards = ShardSet.load(doc["shards"])
        every = int(doc.get("checkpoint_every", spec.checkpoint_every))
    else:
        if dist.main and any((run / name).exists() for name in RUN_MARKERS):
            raise UserError(f"{run}: already holds a run (use --resume {run} to continue it, or another --out)")
        model_cfg, train_cfg = build_configs(spec)
        shards = ShardSet.load(shards_path(spec.work, spec.dataset))
        if dist.main:
            write_run_file(run, spec, model_cfg, train_cfg)
        every = spec.checkpoint_every
    seed_everything(train_cfg.seed)
    device = pick_device()

    # data: one step consumes `world` consecutive batches of the epoch's stream (one per rank)
    stream = ShardStream(shards, "train", train_cfg.batch_size, model_cfg.image_size, train=True, seed=train_cfg.seed,
                         rank=dist.rank, world=dist.world)
    loader = make_loader(stream, spec.workers)
    steps_per_epoch = len(stream) // dist.world
    if steps_per_epoch == 0:
        raise UserError(f"{shards.path}: {stream.num_samples()} train clips, fewer than one batch of {train_cfg.batch_size} per worker")
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

    if dist.main:
        console.print(f"[bold]run[/] {run}  device {device.type}  workers {dist.world}  {steps_per_epoch} steps/epoch  steps {step}→{stop}")
    negatives = training_negatives(train_cfg, shards, device)  # identity unless train.negative_fraction > 0
    t0 = time.time()
    with _progress(enabled=dist.main) as bar, StopRequest() as stop_request:
        task = bar.add_task("train", total=stop, completed=step, loss=float("nan"))
        while step < stop and stop_request.signal is None:
            stream.set_position(position.epoch, position.batch * dist.world)
            for batch in loader:
                batch = negatives(batch, step)
                record = train_step(net, model.loss, to_device(batch, device), optimizer, scheduler, train_cfg, device)
                step += 1
                nxt = position.batch + 1
                position = DataPosition(position.epoch + 1, 0) if nxt == steps_per_epoch else DataPosition(position.epoch, nxt)
                if (spec.time_limit_s is not None and time.time() - t0 >= spec.time_limit_s) or stop_request.signal:
                    stop = step
                if dist.main:
                    append_metrics(run, {"step": step, "epoch": position.epoch, "time": round(time.time() - t0, 3), **record})
                    bar.update(task, completed=step, loss=record["total"])
                    if step % every == 0 or step == stop:
                        save_checkpoint(ckpt_path, model, optimizer, scheduler, step, position.to_dict())
                if step >= stop or position.batch == 0:
                    break
    if dist.main:
        plot_losses(run)
    if stop_request.signal is not None:
        stop_request.exit()
    return run


def load_trained(run: Path, device: torch.device | None = None) -> tuple[nn.Module, ShardSet, dict[str, Any], ModelConfig, TrainConfig]:
    """A trained run's model (eval mode, latest checkpoint), its shards and configs."""
    device = device or pick_device()
    doc, model_cfg, train_cfg = read_run_file(run)
    shards = ShardSet.load(doc["shards"])
    seed_everything(train_cfg.seed)
    model = build_model(model_cfg, shards, device)
    path = run / checkpoint.CHECKPOINT
    checkpoint.load_model_state(model, checkpoint.load(path)["model"], path)
    return model.eval(), shards, doc, model_cfg, train_cfg
