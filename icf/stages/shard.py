"""Stage ``shard``: everything the trainer reads, as deterministic WebDataset tars + ``shards.json``.

Per unit (parallel, cached like any stage) each ok clip becomes its tar members (`icf.data.shard_format`),
kept as bytes: frames resized as the official loaders do (the descriptor's ``train_crop``: AVSS train short
side to S then centre crop; otherwise S×S; bilinear, fixed JPEG quality), masks nearest, only frames with GT,
the cached arrays of the mel and extract stages, and ``meta.json`` (``finish`` adds ``order``, the clip's row
in the manifest, i.e. its CSV position — the shards hold clips in id order, but the official S4/MS3 F groups
the test clips into batches of 4 in CSV order, so evaluation needs it).

``finish`` packs those members into ``WORK/<dataset>/shards/<split>/{dataset}-{split}-{NNNNNN}.tar``
(units in id order, clips by uid inside a unit, members sorted, mtime 0, uid/gid 0, mode 0644, GNU tar;
a new shard starts when the next clip would pass the target size), copies the extract stage's text bank
beside them, and the bank stage's ``audio_bank.npz`` when it wrote one (DDESeg's semantic memory), and writes
``WORK/<dataset>/shards.json`` last, atomically: it names the text bank, the audio bank (``"audio_bank"``, or
null) and the Batch keys every sample provides (``"members"``, checked against a method's ``requires`` before
training). Same inputs → same bytes.
Clips that failed here or upstream are left out (they are in the ledger with their reasons).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from icf.clitools import UserError
from icf.config import MIN_IMAGE_SIZE
from icf.data.datasets import load_info
from icf.data.io import read_mask, read_rgb
from icf.data.shard_format import ARRAYS, encode_clip, image_bytes, sample_key
from icf.data.sample import Sample
from icf.pipeline.plan import SPLIT_ORDER
from icf.pipeline.stage import FinishContext, Stage, option
from icf.pipeline.store import (
    Output, atomic_write, atomic_write_json, read_json, read_outputs, sweep_temp_files, temp_path,
)

MEMBERS = ("frames", "masks", "gt", "valid", "labels", *ARRAYS)  # the Batch keys a sample of these shards provides
AUDIO_BANK = "shards/audio_bank.npz"


def fit(img: Image.Image, size: int, crop: bool, resample: Image.Resampling) -> Image.Image:
    """Resize to ``size``×``size``; with ``crop`` scale the short side to ``size`` and centre-crop instead."""
    if not crop:
        return img.resize((size, size), resample)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.resize((nw, nh), resample).crop((left, top, left + size, top + size))


def manifest_order(path: Path) -> dict[str, int]:
    """uid → its row index in the manifest (CSV order; the first row of a uid — later duplicates fail at index).

    Added to ``meta.json`` at ``finish`` rather than in ``process_one`` (a Sample does not know its row), so
    the cached unit outputs stay as they are; the shard key already depends on the manifest's content.
    """
    order: dict[str, int] = {}
    for i, uid in enumerate(pq.read_table(path, columns=["uid"]).column("uid").to_pylist()):
        order.setdefault(uid, i)
    return order


class _TarWriter:
    """Writes one split's shards: fixed tar metadata, a new file past ``target`` bytes, atomic renames."""

    def __init__(self, folder: Path, prefix: str, target: int) -> None:
        self.folder, self.prefix, self.target = folder, prefix, target
        self.entries: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        folder.mkdir(parents=True, exist_ok=True)
        sweep_temp_files(folder)  # half-written shards of a killed run

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        if self._tar is not None and self._size + size > self.target:
            self._close()
        if self._tar is None:
            self._open()
        for name in sorted(members):
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(members[name]))
        self._size += size
        self._count += 1

    def _open(self) -> None:
        self._name = f"{self.prefix}-{len(self.entries):06d}.tar"
        self._tmp = temp_path(self.folder / self._name)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.GNU_FORMAT)
        self._size = self._count = 0

    def _close(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        final = self.folder / self._name
        os.replace(self._tmp, final)
        digest = hashlib.sha256()
        with final.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        self.entries.append({"name": self._name, "nsamples": self._count, "filesize": final.stat().st_size,
                             "sha256": digest.hexdigest()})

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard, delete stale shards of this split from older runs, return the entries."""
        if self._tar is not None:
            self._close()
        keep = {e["name"] for e in self.entries}
        for stale in self.folder.glob(f"{self.prefix}-*.tar"):
            if stale.name not in keep:
                stale.unlink()
        return self.entries


class ShardStage(Stage):
    """WebDataset tar shards per split and the shards.json index the trainer reads."""

    name = "shard"
    version = "3"  # 2: meta.json carries ``order`` (CSV position); 3: clap_latent, audio bank, members
    needs = ("mel", "extract")
    wants = ("bank",)  # DDESeg's memory: copied beside the shards when the bank stage has run

    @dataclass(frozen=True)
    class Config:
        image_size: int = option(224, "Frames and masks are stored at S×S.")
        jpeg_quality: int = option(90, "JPEG quality of the stored frames.")
        shard_mb: int = option(256, "Target shard size (MB).")

        def __post_init__(self) -> None:
            """``ValueError`` naming the flag for a setting that cannot give shards."""
            if self.image_size < MIN_IMAGE_SIZE:
                raise ValueError(f"--image-size must be at least {MIN_IMAGE_SIZE} pixels, got {self.image_size}")
            if not 1 <= self.jpeg_quality <= 100:
                raise ValueError(f"--jpeg-quality must lie in 1..100, got {self.jpeg_quality}")
            if self.shard_mb < 1:
                raise ValueError(f"--shard-mb must be at least 1, got {self.shard_mb}")

    def process_one(self, s: Sample, upstream: Mapping[str, Mapping[str, Output]]) -> dict[str, Output]:
        """The tar members of one clip (`icf.data.shard_format.encode_clip`; ``ValueError`` naming the file on
        bad media)."""
        info = load_info(s.dataset)
        crop, size = info.crops(s.split), self.cfg.image_size
        frames: list[bytes] = []
        masks: dict[int, bytes] = {}
        for t, (frame_path, mask_path) in enumerate(zip(s.frame_paths, s.mask_paths)):
            frame = read_rgb(frame_path)
            frames.append(image_bytes(fit(Image.fromarray(frame), size, crop, Image.Resampling.BILINEAR), "JPEG",
                                      self.cfg.jpeg_quality))
            if not s.gt_frames[t]:
                continue
            mask = read_mask(mask_path, s.dataset)
            if mask.shape != frame.shape[:2]:
                raise ValueError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but frame "
                                 f"{frame_path} is {frame.shape[1]}x{frame.shape[0]}")
            masks[t] = image_bytes(fit(Image.fromarray(mask, "L"), size, crop, Image.Resampling.NEAREST), "PNG")
        arrays = {name: upstream["mel"][name] if name in upstream["mel"] else upstream["extract"][name] for name in ARRAYS}
        try:
            labels = [info.class_id(c) for c in s.classes]
        except KeyError as err:
            raise ValueError(f"{s.uid}: {err.args[0]}") from None
        meta = {"uid": s.uid, "dataset": s.dataset, "split": s.split, "subset": s.subset, "n_frames": s.n_frames,
                "classes": list(s.classes), "labels": labels}
        return encode_clip(frames, masks, arrays, meta)

    def _write_split(
        self, ctx: FinishContext, split: str, units: Iterable[int], order: Mapping[str, int]
    ) -> list[dict[str, Any]]:
        folder = ctx.dataset_dir / "shards" / split
        writer = _TarWriter(folder, f"{ctx.dataset}-{split}", self.cfg.shard_mb * 1_000_000)
        for unit_id in units:
            outputs = read_outputs(ctx.stage_dir / f"unit-{unit_id:05d}.out.parquet")
            for uid in sorted(outputs):
                members = dict(outputs[uid])
                meta = json.loads(members["meta.json"])
                meta["order"] = order[uid]
                members["meta.json"] = json.dumps(meta, sort_keys=True).encode()
                writer.add(sample_key(uid), members)
        return [{"url": f"shards/{split}/{e['name']}", "nsamples": e["nsamples"], "filesize": e["filesize"],
                 "sha256": e["sha256"]} for e in writer.close()]

    @classmethod
    def finish_problem(cls, dataset_dir: Path, cache_key: str) -> str | None:
        """Whether ``shards.json``, the text bank and every tar are this key's, as written (sizes checked)."""
        index_path = dataset_dir / "shards.json"
        try:
            index = read_json(index_path)
        except UserError as err:
            return str(err)
        if not isinstance(index, dict):
            return f"{index_path}: missing file"
        if index.get("cache_key") != cache_key:
            return f"{index_path}: written by shard key {index.get('cache_key')}, not {cache_key}"
        try:
            files = [(dataset_dir / index["text_bank"], None)]
            files += [(dataset_dir / index["audio_bank"], None)] if index.get("audio_bank") else []
            files += [(dataset_dir / e["url"], int(e["filesize"])) for v in index["splits"].values() for e in v]
        except (KeyError, TypeError, ValueError) as err:
            return f"{index_path}: malformed ({type(err).__name__}: {err})"
        for path, size in files:
            if not path.is_file():
                return f"{path}: missing file"
            if size is not None and path.stat().st_size != size:
                return f"{path}: {path.stat().st_size} bytes, {index_path.name} says {size}"
        return None

    def finish(self, ctx: FinishContext) -> dict[str, Any]:
        """Pack the units into tar shards per split; write the text bank copy and ``shards.json``."""
        info = load_info(ctx.dataset)
        by_split: dict[str, list[int]] = {}
        for unit_id, (split, _) in sorted(ctx.units.items()):
            by_split.setdefault(split, []).append(unit_id)
        order = manifest_order(ctx.dataset_dir / "manifest.parquet")
        # rows with an unknown split failed at index, so only the real splits can hold clips
        splits = {split: self._write_split(ctx, split, by_split[split], order) for split in SPLIT_ORDER if split in by_split}
        extract = read_json(ctx.upstream_dirs["extract"] / "finish.json")["result"]
        bank = "shards/text_bank.npz"
        atomic_write(ctx.dataset_dir / bank, (ctx.upstream_dirs["extract"] / extract["text_bank"]).read_bytes())
        audio_bank = self._copy_audio_bank(ctx)
        index = {
            "dataset": ctx.dataset,
            "cache_key": ctx.cache_key,
            "image_size": self.cfg.image_size,
            "num_classes": info.num_classes,
            "classes": list(info.classes),
            "encoders": extract["encoders"],
            "text_bank": bank,
            "audio_bank": audio_bank,
            "members": sorted(MEMBERS),
            "splits": splits,
        }
        atomic_write_json(ctx.dataset_dir / "shards.json", index)
        return {"shards": sum(len(v) for v in splits.values()), "samples": sum(e["nsamples"] for v in splits.values() for e in v)}

    @staticmethod
    def _copy_audio_bank(ctx: FinishContext) -> str | None:
        """Copy the bank stage's ``audio_bank.npz`` to ``shards/`` → its path in ``shards.json``, or None when the
        bank stage did not run or wrote none (MS3 without ``--bank-from``); a stale copy from an earlier run is removed."""
        target = ctx.dataset_dir / AUDIO_BANK
        result = read_json(ctx.upstream_dirs["bank"] / "finish.json")["result"] if "bank" in ctx.upstream_dirs else {}
        if not result.get("audio_bank"):
            target.unlink(missing_ok=True)
            return None
        atomic_write(target, (ctx.upstream_dirs["bank"] / result["audio_bank"]).read_bytes())
        return AUDIO_BANK
