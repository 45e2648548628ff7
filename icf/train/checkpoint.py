"""Run checkpoints: ``checkpoint.pt`` resumes a run exactly (trainable weights, optimiser, scheduler, RNG states,
data position); ``best.pt`` holds the weights of the best validation epoch; an imported run holds weights only.

Only the trainable parameters and buffers are stored (the frozen text towers are rebuilt from the encoder spec in
``shards.json``). A checkpoint holds tensors and plain data alone (RNG states as tensors and lists) and is read
with ``torch.load(weights_only=True)``, so opening a run folder from elsewhere never runs code stored in it; a
checkpoint written before this rule (NumPy RNG state inside) still loads, allowing only NumPy's array
reconstruction. Every file is written to a per-writer temporary name (host, pid, random suffix: `icf.pipeline.store.temp_path`) and renamed, so a killed run
never leaves a half-written checkpoint behind and two writers never share a temporary file.
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
from icf.pipeline.store import temp_path

CHECKPOINT = "checkpoint.pt"  # latest: resumes the run
BEST = "best.pt"  # weights of the best validation epoch (``run.json``'s ``best`` says which)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when present) CUDA RNG states, as tensors and plain lists only."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state` (also reads the tuple form of checkpoints written before it)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss"])
    if isinstance(npy, dict):
        npy = (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of parameters that require grad, plus every buffer."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in keep}


def write(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to the writer's temporary name, then rename onto ``path``; the temp file goes on failure."""
    tmp = temp_path(path)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int, position: dict[str, int]) -> None:
    """The resumable checkpoint, written atomically."""
    write(path, {
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "step": step,
        "position": position,
    })


def save_weights(path: Path, state: dict[str, torch.Tensor], step: int, **info: Any) -> None:
    """A weights-only checkpoint (``best.pt``, an imported run's ``checkpoint.pt``): ``{"model", "step", **info}``,
    ``info`` being plain data (numbers, strings, lists, dicts)."""
    write(path, {"model": state, "step": step, **info})


_LEGACY_NUMPY = [np.ndarray, np.dtype, np.core.multiarray._reconstruct, type(np.dtype(np.uint32))]


def load(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only`` unpickling; ``UserError`` naming the file when it is missing, damaged
    or holds anything but tensors and plain data (a crafted file never runs code)."""
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or refused files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            reason = "it holds objects other than tensors and plain data; refused, as loading it could run code"
        raise UserError(f"{path}: unreadable checkpoint ({reason})") from None


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load trainable weights; every trainable parameter must be present (frozen towers are not stored)."""
    missing = {n for n, p in model.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise UserError(f"{path}: checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}); wrong config?")
    try:
        model.load_state_dict(state, strict=False)
    except (ValueError, RuntimeError) as err:  # a module refusing its saved state; a tensor of another shape
        raise UserError(f"{path}: {str(err).strip().splitlines()[0]}") from None
