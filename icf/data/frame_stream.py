"""Batches of ground-truth frames (``train.batch_unit=gt_frames``): the frame-level training unit of DDESeg's
official loader, whose dataset is one CSV row per frame and whose batch is 50 of them [code:
dataload/data_load_aug_avss.py; README ``-train_b 50``].

`FrameStream` is a `ShardStream` whose items are frames, not clips: the epoch's clip stream (shard order and clip
shuffle buffer seeded by ``(seed, epoch)``, as for clips) is expanded into each clip's frames with GT, in order, and
passed through a second seeded shuffle buffer of ``shuffle_buffer`` frames so that a batch mixes frames of many
clips (an S4 clip has one GT frame in train, an AVSS v2 clip ten; the buffer holds the raw clips its frames
reference, so it is not made T times larger). Every GT frame of the split comes once per epoch;
training drops the last partial batch. Batch k is decoded by worker ``(k - start) % workers`` and resuming at
``DataPosition(epoch, batch)`` skips the consumed batches, exactly as for clips (`ShardStream`); only the frames of
a worker's own batches are decoded (one JPEG and one PNG each).

A frame becomes a one-frame clip (`frame_sample`): its frame and mask, ``gt = [True]``, row t of every ``frame``
array, and the clip's ``clip`` and ``segment`` arrays unchanged; ``meta`` gains ``frame`` = t. So a Batch of frames
is ``(B, 1, …)``; it suits frame-level models (DDESeg), not temporal ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import webdataset as wds

from icf.data.io import npy_bytes, npy_load
from icf.data.shard_format import ARRAYS, FRAME, decode_sample
from icf.data.shards import ShardStream

FrameRef = tuple[dict[str, Any], int]  # (raw tar sample of a clip, frame index t)


def gt_frames(raw: dict[str, Any]) -> list[int]:
    """Indices of the frames with GT of a raw clip sample (its ``gt.npy``), without decoding images."""
    return [int(t) for t in np.flatnonzero(npy_load(raw["gt.npy"]))]


def frame_sample(raw: dict[str, Any], t: int) -> dict[str, Any]:
    """Frame ``t`` of a raw clip sample as a raw one-frame sample (`decode_sample` reads it; module docstring)."""
    meta = {**json.loads(raw["meta.json"]), "n_frames": 1, "frame": t}
    out = {"__key__": f"{raw.get('__key__', '?')}/f{t}", "__url__": raw.get("__url__", "?"),
           "meta.json": json.dumps(meta, sort_keys=True).encode(), "gt.npy": npy_bytes(np.ones(1, dtype=bool)),
           "f0.jpg": raw[f"f{t}.jpg"], "m0.png": raw[f"m{t}.png"]}
    for name, kind in ARRAYS.items():
        member = f"{name}.npy"
        if member in raw:
            out[member] = npy_bytes(npy_load(raw[member])[t:t + 1]) if kind == FRAME else raw[member]
    return out


class FrameStream(ShardStream):
    """One epoch of the GT frames of a split as batches of ``batch_size`` frames (module docstring); the same
    arguments as `ShardStream` (``limit`` counts clips)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.t_max = 1
        self._n_frames: int | None = None

    def num_samples(self) -> int:
        """GT frames of the split (counted once, from the ``gt.npy`` members, without decoding images)."""
        if self._n_frames is None:
            clips = ShardStream(self.shards, self.split, 1, self.image_size, train=False, limit=self.limit)
            self._n_frames = sum(len(gt_frames(raw)) for raw in clips._raw_stream())
        return self._n_frames

    def _raw_stream(self) -> Iterator[FrameRef]:
        refs = ((raw, t) for raw in super()._raw_stream() for t in gt_frames(raw))
        if not self.train:
            yield from refs
            return
        seed = (self.seed * 1_000_003 + self.epoch) * 2 + 1  # not the clip buffer's seed
        yield from wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=seed)(refs)

    def _decode(self, ref: FrameRef) -> dict[str, Any]:
        return decode_sample(frame_sample(*ref))
