"""Checkpoints that resume a run exactly: trainable weights, optimiser, scheduler, RNG states, data position.

Only the trainable parameters and buffers are stored (the frozen text towers are rebuilt from the
encoder spec in ``shards.json``); the file is written to a temporary name and renamed, so a killed run
never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from icf.clitools import UserError

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of parameters that require grad, plus every buffer."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keep}


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, position: dict[str, int]) -> None:
    """Write ``path`` atomically (temp file + rename)."""
    payload = {
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "step": step,
        "position": position,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint; ``UserError`` naming the file when it is missing or unreadable."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many types for damaged files
        raise UserError(f"{path}: unreadable checkpoint ({err})") from None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load trainable weights; every trainable parameter must be present (frozen towers are not stored)."""
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); wrong config?")
    try:
        model.load_state_dict(state, strict=False)
    except ValueError as err:  # a module refusing its saved state, e.g. DDESeg's memory trained with another bank
        raise UserError(f"{path}: {err}") from None
