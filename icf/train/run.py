"""A run folder and what reads it: ``run.json`` (dataset, method, preset, shards path, both configs, and under
``data`` the shards it trained on: `icf.train.binding`), the model of a run's method, and `load_trained` (used by
eval, predict, compare and the demo).

A run folder holds ``run.json``, ``checkpoint.pt`` (latest), ``best.pt`` (best on validation, when the run
validated; ``run.json``'s ``best`` names its epoch and value), ``metrics.jsonl`` (one JSON object per step,
`icf.train.logs`) and ``loss.png``.
"""

from __future__ import annotations

import json
import random
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icf import methods
from icf.clitools import UserError
from icf.config import ModelConfig, TrainConfig, configs_from_dict, to_dict
from icf.data.shards import ShardSet
from icf.methods.base import Resources
from icf.model.segmenter import SegModel
from icf.train import checkpoint

RUN_FILE = "run.json"


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
    config: Path | None = None  # an overrides file ([model], [train], [method] tables), applied before `overrides`


def shards_path(work: Path, dataset: str) -> Path:
    """``WORK/<dataset>/shards.json``."""
    return work / dataset / "shards.json"


def write_run_file(run: Path, spec: RunSpec, model_cfg: ModelConfig, train_cfg: TrainConfig, **extra: Any) -> None:
    """``run.json``; ``extra``: further top-level keys (``data``: the shards binding,
    `icf.train.binding.shard_binding`; an imported run's ``imported``)."""
    run.mkdir(parents=True, exist_ok=True)
    doc = {
        "dataset": spec.dataset,
        "method": model_cfg.method,
        "preset": spec.preset,
        "shards": str(shards_path(spec.work, spec.dataset).resolve()),
        "checkpoint_every": spec.checkpoint_every,
        **to_dict(model_cfg, train_cfg),
        **extra,
    }
    (run / RUN_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))


def find_run(run: Path, work: Path | None = None) -> Path:
    """``run`` itself when it is a folder, else the run of that name under ``WORK/runs`` (``--run NAME --work W``)."""
    from icf.clitools import work_dir

    if run.is_dir() or run.is_absolute():
        return run
    named = work_dir(work) / "runs" / run
    return named if named.is_dir() else run


def read_run_file(run: Path) -> tuple[dict[str, Any], ModelConfig, TrainConfig]:
    """``run.json`` → (the document, ModelConfig, TrainConfig); ``UserError`` when absent or malformed.

    A run written before the method registry has no ``method``: it is an ``icf`` run."""
    path = run / RUN_FILE
    if not path.is_file():
        raise UserError(f"{path}: not a training run (no {RUN_FILE})")
    try:
        doc = json.loads(path.read_text())
        model_cfg, train_cfg = configs_from_dict(doc)
        methods.validate(model_cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: malformed run file ({err})") from None
    return doc, model_cfg, train_cfg


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
    problem = methods.requirements_problem(method, str(shards.path), shards.dataset, shards.missing(method.requires))
    if problem:
        raise UserError(problem)
    bank = None
    if shards.text_bank.is_file():
        try:
            with np.load(shards.text_bank, allow_pickle=False) as npz:
                bank = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:  # not an npz; an object array (a pickle) is refused, never loaded
            raise UserError(f"{shards.text_bank}: unreadable text bank ({str(err).strip().splitlines()[0]})") from None
    elif "clip" in method.requires:
        raise UserError(f"{shards.text_bank}: text bank not found (named by {shards.path})")
    try:
        model = method.build(model_cfg, methods.validate(model_cfg),
                             Resources(shards.encoders, bank, audio_bank=shards.audio_bank, device=device))
    except ValueError as err:
        raise UserError(f"{shards.path}: {err}") from None
    return model.to(device)


CHECKPOINT_CHOICES = ("auto", "best", "last")  # `--checkpoint`: auto = best when the run has one, else last


def checkpoint_path(run: Path, which: str = "auto") -> Path:
    """The checkpoint file ``--checkpoint which`` names in ``run``; ``UserError`` when ``best`` is asked of a run
    that never validated."""
    if which not in CHECKPOINT_CHOICES:
        raise UserError(f"--checkpoint must be one of {', '.join(CHECKPOINT_CHOICES)}, not {which!r}")
    best = run / checkpoint.BEST
    if which == "best" and not best.is_file():
        raise UserError(f"{run}: no {checkpoint.BEST} (the run never validated; train with --val-every N, or "
                        "use --checkpoint last)")
    return best if which == "best" or (which == "auto" and best.is_file()) else run / checkpoint.CHECKPOINT


def load_trained(run: Path, device: torch.device | None = None, which: str = "auto", allow_other_shards: bool = False,
                 ) -> tuple[nn.Module, ShardSet, dict[str, Any], ModelConfig, TrainConfig]:
    """A trained run's model (eval mode, the checkpoint ``which`` names: `checkpoint_path`), its shards and configs.

    The returned document is ``run.json`` plus ``"loaded": {"checkpoint": file name, "step": its step}``, so every
    report can say which weights it scored. Shards other than those the run trained on are refused
    (`icf.train.binding.check_shards`) unless ``allow_other_shards``; the document then says what differs under
    ``"other_shards"``."""
    from icf.train.binding import check_shards

    device = device or pick_device()
    doc, model_cfg, train_cfg = read_run_file(run)
    shards = ShardSet.load(doc["shards"])
    other = check_shards(run, doc, shards, allow_other_shards)
    seed_everything(train_cfg.seed)
    model = build_model(model_cfg, shards, device)
    path = checkpoint_path(run, which)
    state = checkpoint.load(path)
    checkpoint.load_model_state(model, state["model"], path)
    doc = {**doc, "loaded": {"checkpoint": path.name, "step": int(state.get("step", 0))},
           **({"other_shards": other} if other else {})}
    return model.eval(), shards, doc, model_cfg, train_cfg


def run_lock(run: Path) -> AbstractContextManager[None]:
    """Hold ``RUN/.lock`` while training into ``run`` (one trainer per run folder); ``UserError`` naming the
    holder's pid and host when another process trains there."""
    from icf.pipeline.lock import folder_lock

    return folder_lock(run, lambda holder: f"{run}: another trainer is using this run ({holder}); wait for it to "
                       "finish, or train into another --out")
