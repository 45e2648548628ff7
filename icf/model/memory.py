"""DDESeg's semantic memory (§3.1 step 1) as model buffers, loaded from the bank stage's ``audio_bank.npz``.

Buffers (persistent: a checkpoint carries the bank it was trained with): ``centers`` μ (C, D_a) (Eq. 2),
``reps`` X (C, M, D_a) (Eq. 3–4), ``class_ids`` (C,). The sha256 of the npz is kept as extra state; loading
a checkpoint whose bank differs from the one the model was built with is refused (`set_extra_state`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

SOURCES = ("clap_latent", "clap")  # the cached audio keys a bank can be built from (the model reads the same key)
MS3_REFUSAL = ("ms3 names no classes, so it has no bank of its own: run `icf stage bank --dataset ms3 "
               "--bank-from s4` (or avss; a dataset whose bank stage ran with the same encoders)")


class BankMismatch(ValueError):
    """A checkpoint was trained with another audio bank than the one the model was built from."""


class SemanticMemory(nn.Module):
    """μ ``(C, D_a)``, X ``(C, M, D_a)`` and the class ids of a bank; ``source`` names its audio key."""

    def __init__(self, centers: Tensor, reps: Tensor, class_ids: Tensor, source: str, digest: str = ""):
        super().__init__()
        if centers.ndim != 2 or reps.ndim != 3 or reps.shape[0] != centers.shape[0] or reps.shape[2] != centers.shape[1]:
            raise ValueError(f"audio bank: centers (C, D) and reps (C, M, D) expected, got {tuple(centers.shape)}, {tuple(reps.shape)}")
        self.register_buffer("centers", centers.float())
        self.register_buffer("reps", reps.float())
        self.register_buffer("class_ids", class_ids.long())
        self.source, self.digest = source, digest

    @classmethod
    def load(cls, path: str | Path) -> SemanticMemory:
        """The memory in ``audio_bank.npz`` (``ValueError`` naming the file when it is not a bank)."""
        path = Path(path)
        data = path.read_bytes()
        try:
            with np.load(path) as npz:
                return cls(torch.from_numpy(npz["centers"]), torch.from_numpy(npz["reps"]),
                           torch.from_numpy(npz["class_ids"]), str(npz["source"]), hashlib.sha256(data).hexdigest())
        except (KeyError, OSError, ValueError) as err:
            raise ValueError(f"{path}: not an audio bank ({err})") from None

    @property
    def dim(self) -> int:
        return int(self.centers.shape[1])

    def class_centres(self, variant: str) -> Tensor:
        """μ used by retrieval: the bank's centres (paper, Eq. 2) or the mean of its rows (official code)."""
        return self.centers if variant == "paper" else self.reps.mean(1)

    def get_extra_state(self) -> Any:
        return {"digest": self.digest}

    def set_extra_state(self, state: Any) -> None:
        theirs = (state or {}).get("digest", "")
        if theirs and self.digest and theirs != self.digest:
            raise BankMismatch(f"the checkpoint was trained with audio bank {theirs[:12]}, the shards hold {self.digest[:12]}; "
                               "evaluate on the shards it was trained on, or retrain")
