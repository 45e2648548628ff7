"""The one record every adapter produces and every stage consumes.

A :class:`Sample` describes one clip of an AVSBench subset exactly as it lies on disk: where its frames,
masks and audio are, which frames carry ground truth, and which classes sound in it. The index stage
writes one manifest row per Sample (``Sample.to_row``); later stages rebuild Samples from those rows
(``Sample.from_row``), so the manifest is the only thing that links the raw tree to the cache.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("s4", "ms3", "avss")


@dataclass(frozen=True)
class Sample:
    """One clip.

    Attributes:
        uid: clip id, unique within the dataset (S4 ``name``, MS3 ``video_id``, AVSS ``uid``).
        dataset: ``s4`` | ``ms3`` | ``avss``.
        split: ``train`` | ``val`` | ``test``.
        subset: AVSS ``v1s`` | ``v1m`` | ``v2``; for S4/MS3 the dataset name.
        frame_paths: absolute paths of the T frames, in temporal order (len == n_frames).
        mask_paths: per frame, the absolute GT mask path, or ``""`` where the frame has no GT.
            For AVSS this is the ``labels_semantic`` class-index PNG (``labels_rgb`` when the clip has
            only those).
        gt_frames: per frame, whether that frame has ground truth (the official loaders' flags).
        audio_path: absolute path of the clip's WAV.
        classes: names of the sounding classes (AVSS ``a_obj`` tokens, S4 ``category``; empty for MS3,
            whose CSV names no classes).
        n_frames: T (5 for S4/MS3/AVSS v1s/v1m, 10 for AVSS v2).
        extra: subset-specific CSV fields kept verbatim (e.g. S4 ``start``, AVSS ``vid``).
    """

    uid: str
    dataset: str
    split: str
    subset: str
    frame_paths: tuple[str, ...]
    mask_paths: tuple[str, ...]
    gt_frames: tuple[bool, ...]
    audio_path: str
    classes: tuple[str, ...]
    n_frames: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {DATASETS}")
        if not (len(self.frame_paths) == len(self.mask_paths) == len(self.gt_frames) == self.n_frames):
            raise ValueError(
                f"{self.uid}: frame_paths/mask_paths/gt_frames must all have n_frames={self.n_frames} entries"
            )

    def to_row(self) -> dict[str, Any]:
        """Flat manifest row (lists stay lists, ``extra`` becomes a JSON string)."""
        row = dataclasses.asdict(self)
        for key in ("frame_paths", "mask_paths", "gt_frames", "classes"):
            row[key] = list(row[key])
        row["extra"] = json.dumps(self.extra, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Sample":
        """Inverse of :meth:`to_row`; ignores manifest-only columns such as ``status`` and ``error``."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in row.items() if k in names}
        for key in ("frame_paths", "mask_paths", "gt_frames", "classes"):
            kw[key] = tuple(kw[key])
        extra = kw.get("extra") or "{}"
        kw["extra"] = json.loads(extra) if isinstance(extra, str) else dict(extra)
        kw["n_frames"] = int(kw["n_frames"])
        return cls(**kw)
