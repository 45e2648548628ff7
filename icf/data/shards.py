"""The trainer's reader of the WebDataset shards (``WORK/<dataset>/shards.json`` + tars; Decisions D5).

One epoch is one deterministic stream: the shard order and a WebDataset shuffle buffer are seeded by
``(seed, epoch)`` for training (eval keeps the listed order), the stream is cut into batches of
``batch_size`` samples (training drops the last partial batch), and batch k of the stream is decoded by
DataLoader worker ``(k - start) % workers``. Every worker reads the same raw stream but decodes only its
own batches, and the DataLoader returns worker outputs round-robin, so the batch sequence is identical
for any number of workers — and resuming at ``DataPosition(epoch, batch)`` skips exactly the batches
already consumed without decoding them.

Decoding (`icf.data.shard_format.decode_sample`) turns one tar sample into tensors; :func:`collate` pads clips to the
dataset's T (10 for AVSS, 5 otherwise) with ``valid`` False on padding, resizes frames (bilinear,
antialiased) and masks (nearest) to the model's image size when the shard's differs, normalises frames
with the ImageNet statistics, and stacks everything into the Batch of ARCHITECTURE.md (plus ``uid`` and
``order``, the clips' CSV positions, which evaluation uses to regroup clips the official way).
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from icf.clitools import UserError
from icf.data.datasets import load_info
from icf.data.shard_check import ShardError, read_checked, rebuild_hint, size_problem
from icf.data.shard_format import ARRAYS, CLIP, FRAME, SEGMENT, decode_sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# what a shards.json without "members" (shard stage v2 and older) provides
LEGACY_MEMBERS = ("clap", "clap_clip", "clip", "frames", "gt", "labels", "masks", "mel", "valid", "vclip", "vclip_seg")


@dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands: ``batch`` batches of epoch ``epoch`` have been consumed."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ShardSet:
    """``shards.json`` of one dataset: where the tars of each split are and what they hold."""

    path: Path
    dataset: str
    image_size: int
    num_classes: int
    classes: tuple[str, ...]
    encoders: dict[str, Any]
    text_bank: Path
    splits: dict[str, list[dict[str, Any]]]
    cache_key: str = ""
    audio_bank: Path | None = None  # DDESeg's semantic memory (`icf.stages.bank`), when the shards ship one
    members: tuple[str, ...] = LEGACY_MEMBERS  # Batch keys every sample provides

    @classmethod
    def load(cls, path: str | Path) -> ShardSet:
        """Read ``shards.json``; ``UserError`` naming the file when it is missing or malformed, and
        :class:`ShardError` when a tar it lists is missing or has another size (its sha256 and sample
        count are checked as it is streamed)."""
        path = Path(path)
        if path.is_dir():
            path = path / "shards.json"
        if not path.is_file():
            raise UserError(f"{path}: shards.json not found (run `icf stage all` for this dataset first)")
        try:
            raw = json.loads(path.read_text())
            base = path.parent
            shards = cls(
                path=path,
                dataset=raw["dataset"],
                image_size=int(raw["image_size"]),
                num_classes=int(raw["num_classes"]),
                classes=tuple(raw["classes"]),
                encoders=dict(raw["encoders"]),
                text_bank=base / raw["text_bank"],
                splits={s: [dict(e, url=str(base / e["url"])) for e in entries] for s, entries in raw["splits"].items()},
                cache_key=str(raw.get("cache_key", "")),
                audio_bank=base / raw["audio_bank"] if raw.get("audio_bank") else None,
                members=tuple(raw.get("members", LEGACY_MEMBERS)),
            )
            problems = [p for entries in shards.splits.values() for p in map(size_problem, entries) if p]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}: malformed shards.json ({type(err).__name__}: {err})") from None
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ShardError(f"{problems[0]}{more}; {rebuild_hint(path.parent)}")
        return shards

    def missing(self, requires: frozenset[str]) -> list[str]:
        """The keys of ``requires`` these shards do not provide (``audio_bank`` counts when they ship one)."""
        provided = set(self.members) | ({"audio_bank"} if self.audio_bank is not None else set())
        return sorted(requires - provided)

    def shard_list(self, split: str) -> list[dict[str, Any]]:
        """The shard entries of ``split``; ``UserError`` when the split has none."""
        entries = self.splits.get(split) or []
        if not entries or sum(int(e["nsamples"]) for e in entries) == 0:
            raise UserError(f"{self.path}: no {split} samples in the shards (splits: {', '.join(self.splits) or 'none'})")
        return entries

    def num_samples(self, split: str) -> int:
        return sum(int(e["nsamples"]) for e in self.shard_list(split))


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 0 of ``x`` to ``length``."""
    if x.shape[0] == length:
        return x
    return torch.cat([x, x.new_zeros(length - x.shape[0], *x.shape[1:])])


def resize_square(x: torch.Tensor, size: int, nearest: bool) -> torch.Tensor:
    """Resize ``(T, C, h, w)`` to ``(T, C, size, size)`` (nearest for masks, antialiased bilinear otherwise)."""
    if x.shape[-2:] == (size, size):
        return x
    if nearest:
        return F.interpolate(x.float(), size=(size, size), mode="nearest-exact").to(x.dtype)
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def label_vector(meta: dict[str, Any], num_classes: int) -> torch.Tensor:
    """Multi-hot ``(K,)`` float32 of the sounding class ids in ``meta['labels']``."""
    v = torch.zeros(num_classes)
    v[list(meta.get("labels", []))] = 1.0
    return v


def collate(clips: list[dict[str, Any]], t_max: int, image_size: int, num_classes: int) -> dict[str, Any]:
    """Decoded clips → the Batch of ARCHITECTURE.md, every clip padded to ``t_max`` frames. An array member is
    in the batch when every clip has it."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    present = {k: kind for k, kind in ARRAYS.items() if all(k in c for c in clips)}  # optional arrays: all or none
    per_frame = [k for k, kind in present.items() if kind == FRAME]
    per_segment = [k for k, kind in present.items() if kind == SEGMENT]
    s_max = {k: max(c[k].shape[0] for c in clips) for k in per_segment}
    batch: dict[str, list] = {k: [] for k in ("frames", "masks", "gt", "valid", *per_frame, *per_segment)}
    for c in clips:
        t = c["frames"].shape[0]
        frames = (resize_square(c["frames"], image_size, nearest=False) / 255.0 - mean) / std
        masks = resize_square(c["masks"][:, None], image_size, nearest=True)[:, 0]
        batch["frames"].append(_pad(frames, t_max))
        batch["masks"].append(_pad(masks, t_max))
        batch["gt"].append(_pad(c["gt"], t_max))
        batch["valid"].append(_pad(torch.ones(t, dtype=torch.bool), t_max))
        for k in per_frame:
            batch[k].append(_pad(c[k], t_max))
        for k in per_segment:
            batch[k].append(_pad(c[k], s_max[k]))
    out: dict[str, Any] = {k: torch.stack(v) for k, v in batch.items()}
    for k in (k for k, kind in present.items() if kind == CLIP):
        out[k] = torch.stack([c[k] for c in clips])
    out["labels"] = torch.stack([label_vector(c["meta"], num_classes) for c in clips])
    out["uid"] = [c["meta"]["uid"] for c in clips]
    out["order"] = [int(c["meta"]["order"]) for c in clips]  # CSV position: the official S4/MS3 F batches in CSV order
    return out


ClipTransform = Callable[[dict[str, Any], int], dict[str, Any]]  # (decoded clip, seed) → clip (training augmentation)


class ShardStream(IterableDataset):
    """One epoch of one split as batches (see the module docstring for the determinism contract).

    With ``world`` > 1 (distributed training) rank r keeps the stream batches k with
    ``(k - start) % world == r``: one optimiser step consumes ``world`` consecutive batches. ``transform`` (training
    augmentation, `icf.augment.frames`) maps each decoded clip, before `collate`, with the seed `item_seed`.
    """

    def __init__(
        self,
        shards: ShardSet,
        split: str,
        batch_size: int,
        image_size: int,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 256,
        limit: int | None = None,
        rank: int = 0,
        world: int = 1,
        transform: ClipTransform | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.split, self.batch_size = shards, split, batch_size
        self.image_size, self.train, self.seed = image_size, train, seed
        self.shuffle_buffer, self.limit = shuffle_buffer, limit
        self.rank, self.world = rank, world
        self.t_max = load_info(shards.dataset).max_frames
        self.epoch, self.start = 0, 0
        self.transform = transform

    def set_position(self, epoch: int, start_batch: int) -> None:
        """Make the next iteration produce epoch ``epoch`` from batch ``start_batch`` on."""
        self.epoch, self.start = epoch, start_batch

    def num_samples(self) -> int:
        n = self.shards.num_samples(self.split)
        return min(n, self.limit) if self.limit is not None else n

    def __len__(self) -> int:
        """Batches per epoch (training drops a last partial batch)."""
        n = self.num_samples()
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def _raw_stream(self) -> Iterator[dict[str, Any]]:
        entries = list(self.shards.shard_list(self.split))
        stages: list[Any] = []
        if self.train:
            epoch_seed = self.seed * 1_000_003 + self.epoch
            random.Random(epoch_seed).shuffle(entries)
            stages = [wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=epoch_seed)]

        def samples() -> Iterator[dict[str, Any]]:  # every tar checked against shards.json as it is read
            for entry in entries:
                yield from read_checked(entry)

        pipeline = wds.DataPipeline(samples, *stages)
        for i, raw in enumerate(pipeline):
            if self.limit is not None and i >= self.limit:
                return
            yield raw

    def _decode(self, raw: Any) -> dict[str, Any]:
        """One item of `_raw_stream` → one decoded clip (`decode_sample`)."""
        return decode_sample(raw)

    def item_seed(self, pos: int) -> int:
        """The seed of item ``pos`` of this epoch's stream for ``transform``: a function of (seed, epoch, pos) only,
        so the same item gets the same random draw for any number of workers and after a resume."""
        return ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + pos) % 2**63

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n_batches = len(self)
        pending: list[dict[str, Any]] = []
        for pos, raw in enumerate(self._raw_stream()):
            k = pos // self.batch_size
            if k >= n_batches:
                break
            if k < self.start or (k - self.start) % self.world != self.rank:
                continue
            if ((k - self.start) // self.world) % workers != worker:
                continue
            clip = self._decode(raw)
            if self.transform is not None:
                clip = self.transform(clip, self.item_seed(pos))
            pending.append(clip)
            if len(pending) == self.batch_size:
                yield collate(pending, self.t_max, self.image_size, self.shards.num_classes)
                pending = []
        if pending:
            yield collate(pending, self.t_max, self.image_size, self.shards.num_classes)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def make_loader(stream: ShardStream, workers: int = 0) -> DataLoader:
    """A DataLoader over ready-made batches (``batch_size=None``), ``workers`` processes, in order.

    At most one worker per usable CPU: every worker reads the whole raw stream and decodes its own
    batches, so workers beyond the cores only add start-up and re-reading (bench/loader.py: 8 workers on
    2 cores ran at under half the clips/s of 2); the batch sequence is the same for any count.
    The loader's own generator seeds its workers, so creating an iterator never draws from the global
    torch RNG (a resumed run must see the same random numbers as an uninterrupted one).
    """
    return DataLoader(
        stream, batch_size=None, num_workers=min(workers, usable_cpus()), persistent_workers=False,
        generator=torch.Generator().manual_seed(0),
    )
