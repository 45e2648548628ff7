"""Validation while training and the best checkpoint: checkpoint selection on the val split, never on test.

The official AVSBench ``train.py`` loops validate after the epoch of 0-based index ``e`` when
``e >= start_eval_epoch and e % eval_interval == 0`` (S4/MS3: every epoch; AVSS ``train.sh``: from 15, every 2)
and save the weights whenever the val mIoU beats the best so far (``if miou > max_miou``, strictly). Here
``train.val_start_epoch`` and ``train.val_every`` are those two numbers (``val_every`` 0 = never), and
``train.select_metric`` names the metric (``auto``: :func:`selection_metric`).

Each validation scores the model with the evaluation ``icf eval`` uses (`icf.eval.evaluate.validate`; icf.eval sits
above icf.train, so the trainer is handed it as a :data:`Validator`, and the ``icf`` app registers it as the
default: :func:`set_default_validator`), appends a ``"split": "val"`` record of ``val_<metric>`` values to
``metrics.jsonl``, and on a new best writes the weights to ``best.pt`` (`checkpoint.save_weights`) and
``run.json``'s ``best`` = ``{epoch (epochs trained), step, metric, value, split: "val"}``. A resumed run reads
``best`` back from ``run.json``, so the best survives ``--resume``.

Validation leaves training as it was: the RNG states are saved before and restored after (so are the random draws
of any predictor), the train stream is a separate object whose position is untouched, and the model runs in eval
mode under ``no_grad`` (no batch-norm statistics move; the next training step sets train mode again). A validating
run and its resumed copy therefore take the same steps as a run that never validates.

DDESeg's released ``train.py`` evaluates the *test* split every epoch and keeps its best; icf does not copy that
(README, reproduction table).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icf.clitools import UserError
from icf.config import TrainConfig
from icf.data.datasets import load_info
from icf.data.shards import ShardSet
from icf.pipeline.store import atomic_write_json
from icf.train import checkpoint
from icf.train.logs import append_metrics
from icf.train.run import RUN_FILE

VAL_SPLIT = "val"
# Validator(model, shards, split, image_size, device) → the metrics dict of `icf.eval.evaluate.evaluate`
Validator = Callable[[nn.Module, ShardSet, str, int, torch.device], dict[str, Any]]
# a method's official selection metric when it is not the AVSBench J / mIoU (key "J" for every dataset)
OFFICIAL_SELECTION = {"ddeseg": "J_dh"}  # DDESeg train.py: best epoch by CAVP's dataset-level mIoU
BINARY_ONLY = ("F_boundary", "JF_boundary")  # S4/MS3 keys of icf.eval.metrics
SEMANTIC_ONLY = ("J_present", "F_present")  # AVSS keys

_default: list[Validator] = []


def set_default_validator(validate: Validator) -> None:
    """The validator `train` uses when it is given none (the ``icf`` app registers icf.eval's)."""
    _default[:] = [validate]


def registered_validator() -> Validator | None:
    """The validator the ``icf`` app registered (None when nothing did)."""
    return _default[0] if _default else None


def default_validator() -> Validator:
    """The registered validator; ``UserError`` when nothing registered one."""
    if not _default:
        raise UserError("train.val_every needs the evaluator of icf.eval (pass validate=icf.eval.evaluate.validate "
                        "to train, or run through the icf command)")
    return _default[0]


def selection_metric(cfg: TrainConfig, method: str) -> str:
    """``cfg.select_metric``, with ``auto`` resolved to the method's official one (:data:`OFFICIAL_SELECTION`,
    else ``J``: AVSBench J on S4/MS3, mIoU on AVSS)."""
    return OFFICIAL_SELECTION.get(method, "J") if cfg.select_metric == "auto" else cfg.select_metric


def due(cfg: TrainConfig, epochs_done: int) -> bool:
    """Whether to validate after ``epochs_done`` epochs: the official rule on the 0-based epoch index."""
    e = epochs_done - 1
    return cfg.val_every > 0 and e >= cfg.val_start_epoch and e % cfg.val_every == 0


def read_best(run: Path) -> dict[str, Any] | None:
    """``run.json``'s ``best`` (None when the run has not validated yet)."""
    path = run / RUN_FILE
    return json.loads(path.read_text()).get("best") if path.is_file() else None


def _write_best(run: Path, best: dict[str, Any]) -> None:
    """Set ``run.json``'s ``best``, keeping every other key."""
    path = run / RUN_FILE
    atomic_write_json(path, {**json.loads(path.read_text()), "best": best})


@dataclass
class Selection:
    """The validation state of one run (rank 0 only): what to score, on what, and the best so far."""

    run: Path
    metric: str
    validate: Validator
    shards: ShardSet
    image_size: int
    device: torch.device
    cfg: TrainConfig
    best: dict[str, Any] | None = None

    def after_epoch(self, model: nn.Module, step: int, epochs_done: int) -> bool:
        """Validate when :func:`due`; log, and keep ``best.pt`` on a strictly better value. True when it validated."""
        if not due(self.cfg, epochs_done):
            return False
        rng = checkpoint.rng_state()
        try:
            with torch.no_grad():
                scores = self.validate(model, self.shards, VAL_SPLIT, self.image_size, self.device)
        finally:
            checkpoint.set_rng_state(rng)
        value = float(scores[self.metric])
        numbers = {f"val_{k}": v for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        append_metrics(self.run, {"step": step, "epoch": epochs_done, "split": VAL_SPLIT, "select": self.metric, **numbers})
        if not math.isnan(value) and (self.best is None or value > float(self.best["value"])):
            self.best = {"epoch": epochs_done, "step": step, "metric": self.metric, "value": value, "split": VAL_SPLIT}
            checkpoint.save_weights(self.run / checkpoint.BEST, checkpoint.trainable_state(model), step,
                                    epoch=epochs_done, metric=self.metric, value=value, split=VAL_SPLIT)
            _write_best(self.run, self.best)
        return True


def start(run: Path, cfg: TrainConfig, method: str, shards: ShardSet, image_size: int, device: torch.device,
          validate: Validator | None = None) -> Selection | None:
    """The run's :class:`Selection` (None when ``cfg.val_every`` is 0); the best so far comes from ``run.json``.
    ``UserError`` when the shards have no val split."""
    if cfg.val_every == 0:
        return None
    shards.num_samples(VAL_SPLIT)  # UserError naming shards.json when there is nothing to validate on
    metric = selection_metric(cfg, method)
    binary = load_info(shards.dataset).binary
    if metric in (SEMANTIC_ONLY if binary else BINARY_ONLY):
        raise UserError(f"train.select_metric={metric}: {shards.dataset} validation does not compute it")
    return Selection(run, metric, validate or default_validator(), shards, image_size, device, cfg, read_best(run))
