"""VideoCLIP substitute (Decisions D6): CLIP4Clip-style mean pooling of CLIP frame embeddings.

VideoCLIP (fairseq MMPT) has no installable package. The default video-text model here pools the
cached CLIP frame embeddings over the clip (video level) and over each segment window (segment
level) and uses the CLIP text tower on the text side; a real video-text model replaces it by offering
the same methods as `VideoClipEncoder`.

This module also holds THE segment-window rule of ICF §3.2 (`segment_windows`); MIT imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # keep the window rule importable without loading open_clip
    from icf.encoders.clip import ClipEncoder



def segment_window(n_frames: int, divisor: int) -> int:
    """Window length ⌈T / divisor⌉ (ICF §3.2; divisor 2 for S4/MS3, 4 for AVSS)."""
    if n_frames < 1 or divisor < 1:
        raise ValueError(f"need n_frames >= 1 and divisor >= 1, got {n_frames}, {divisor}")
    return math.ceil(n_frames / divisor)


def segment_windows(n_frames: int, window: int) -> list[list[int]]:
    """Frame indices of the segment windows, earliest window first (ICF §3.2).

    Windows of ``window`` frames slide backward from the last frame; the earliest window, when
    fewer than ``window`` frames remain, is filled with the frames that follow it (those of the
    previous window), so every window holds exactly ``window`` consecutive frames.
    E.g. T=5, window 3 → [[0, 1, 2], [2, 3, 4]]; T=10, window 3 → [[0, 1, 2], [1, 2, 3], [4, 5, 6], [7, 8, 9]].
    """
    if not 1 <= window <= n_frames:
        raise ValueError(f"window must be in [1, n_frames={n_frames}], got {window}")
    ends = range(n_frames, 0, -window)  # exclusive end of each window, latest first
    starts = [max(end - window, 0) for end in ends]
    return [list(range(start, start + window)) for start in reversed(starts)]


class VideoClipEncoder:
    """CLIP4Clip-style video-text model on top of a `ClipEncoder` (mean-pooling variant)."""

    def __init__(self, clip: ClipEncoder):
        self.clip = clip
        self.dim = clip.dim

    def encode_video(self, frame_emb: torch.Tensor) -> torch.Tensor:
        """CLIP frame embeddings ``(T, D)`` → video embedding ``(D,)``: mean over frames, L2-normalised."""
        return F.normalize(frame_emb.float().mean(dim=0), dim=-1)

    def encode_segments(self, frame_emb: torch.Tensor, window: int) -> torch.Tensor:
        """CLIP frame embeddings ``(T, D)`` → segment embeddings ``(S, D)``, one per `segment_windows` window."""
        index = torch.tensor(segment_windows(frame_emb.shape[0], window), device=frame_emb.device)  # (S, window)
        return F.normalize(frame_emb.float()[index].mean(dim=1), dim=-1)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clip.tokenize(texts)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        return self.clip.encode_text(texts)

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(ids)

    def encode_text_embeddings(self, embeds: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text_embeddings(embeds, ids)
