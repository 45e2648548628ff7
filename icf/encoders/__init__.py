"""Frozen foundation encoders (CLIP, VideoCLIP substitute, CLAP, VGGish); weights only from local files.

Importing this package is cheap: open_clip and laion-clap load only when a tower is built.

The prompt templates of ICF §3.2 live here, in one place: the extract stage's text banks use them,
and MIT's soft prompts splice pseudo-words into the same sentences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from icf.encoders.spec import EncoderSpec, EncoderWeightsError, RandomWeightsWarning

if TYPE_CHECKING:
    from icf.encoders.clap import ClapEncoder
    from icf.encoders.clip import ClipEncoder
    from icf.encoders.videoclip import VideoClipEncoder

__all__ = [
    "PROMPT_TEMPLATES",
    "TEXT_TOWERS",
    "EncoderSpec",
    "EncoderWeightsError",
    "Encoders",
    "RandomWeightsWarning",
    "class_phrase",
    "in_batches",
    "load",
    "prompt_slots",
    "prompts",
    "text_bank",
]

# Prompt per text level (ICF §3.2); "{}" is the class phrase (or, in MIT, the pseudo-words).
PROMPT_TEMPLATES: dict[str, str] = {
    "video": "A video of {}.",
    "segment": "A segment of {}.",
    "frame": "A frame of {}.",
    "audio": "An audio of {}.",
}
# Which tower encodes each level's text.
TEXT_TOWERS: dict[str, str] = {"video": "videoclip", "segment": "videoclip", "frame": "clip", "audio": "clap"}


@dataclass
class Encoders:
    """The towers built from one `EncoderSpec`."""

    spec: EncoderSpec
    clip: ClipEncoder
    videoclip: VideoClipEncoder
    clap: ClapEncoder

    def tower(self, level: str) -> ClipEncoder | VideoClipEncoder | ClapEncoder:
        """The text tower of a prompt level (``video``, ``segment``, ``frame``, ``audio``)."""
        return getattr(self, TEXT_TOWERS[level])


def in_batches(
    encode: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: int, dim: int, device: torch.device
) -> torch.Tensor:
    """``encode`` over consecutive chunks of at most ``size`` rows of ``x (N, ...)``, concatenated: ``(N, dim)``.

    An empty ``x`` gives ``(0, dim)`` on ``device`` without calling ``encode``.
    """
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    out = [encode(x[i : i + size]) for i in range(0, len(x), size)]
    return torch.cat(out) if out else torch.empty(0, dim, device=device)


def load(spec: EncoderSpec, device: str = "cpu") -> Encoders:
    """Build every tower of ``spec`` (nothing is cached between calls)."""
    from icf.encoders.clap import ClapEncoder
    from icf.encoders.clip import ClipEncoder
    from icf.encoders.videoclip import VideoClipEncoder

    clip = ClipEncoder(spec.clip_model, weights=spec.clip_weights, seed=spec.seed, device=device)
    clap = ClapEncoder(
        spec.clap_amodel, spec.clap_tmodel, weights=spec.clap_weights, seed=spec.seed,
        text_dir=spec.clap_text_dir, device=device,
    )
    return Encoders(spec=spec, clip=clip, videoclip=VideoClipEncoder(clip), clap=clap)


def class_phrase(name: str) -> str:
    """A class name as it goes into a prompt: ``-`` and ``_`` become spaces (``male_speech`` → ``male speech``)."""
    return " ".join(name.replace("-", " ").replace("_", " ").split())


def prompts(level: str, class_names: Sequence[str]) -> list[str]:
    """The level's template filled with each class phrase."""
    return [PROMPT_TEMPLATES[level].format(class_phrase(n)) for n in class_names]


class TextTower(Protocol):
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor: ...


def prompt_slots(tower: TextTower, level: str, n_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the level's template with ``n_slots`` pseudo-word slots in place of the class.

    Returns ``ids (1, L)`` and the slot positions ``(n_slots,)``: the positions whose id changes
    when the placeholder word changes. MIT overwrites the token embeddings at those positions with
    its learnable soft prompts and runs ``tower.encode_text_embeddings(embeds, ids)``.
    """
    filled = [PROMPT_TEMPLATES[level].format(" ".join([word] * n_slots)) for word in ("X", "Y")]
    ids = tower.tokenize(filled)
    positions = (ids[0] != ids[1]).nonzero().flatten()
    if len(positions) != n_slots:
        raise ValueError(f"{level} template: {n_slots} slots tokenise to {len(positions)} differing positions")
    return ids[:1], positions


def text_bank(encoders: Encoders, class_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Prompt embeddings per level: ``{level: (K, D_level) float32}``, rows in ``class_names`` order."""
    return {
        level: encoders.tower(level).encode_text(prompts(level, class_names)).float().cpu().numpy()
        for level in PROMPT_TEMPLATES
    }
