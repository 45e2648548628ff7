"""`icf.data.frame_stream.FrameStream` (``train.batch_unit=gt_frames``): batches of GT frames, every GT frame once
per epoch, seeded per (seed, epoch), resumable at a DataPosition, the same for any number of workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from icf.config import TrainConfig
from icf.data.frame_stream import FrameStream, gt_frames
from icf.data.shards import DataPosition, ShardSet, ShardStream, make_loader
from test_shards import DC, write_shards

N_GT = 6 * 10 + 5 * 1  # write_shards: 11 clips, even ones 10 frames all with GT, odd ones 5 frames with GT on frame 0


@pytest.fixture()
def shards(tmp_path: Path, shard_set_writer) -> ShardSet:
    return ShardSet.load(write_shards(tmp_path, shard_set_writer))


def stream(shards: ShardSet, batch: int = 7, seed: int = 0, epoch: int = 0, start: int = 0, shuffle_buffer: int = 4,
           **kw) -> FrameStream:
    s = FrameStream(shards, "train", batch_size=batch, image_size=8, train=True, seed=seed, shuffle_buffer=shuffle_buffer, **kw)
    s.set_position(epoch, start)
    return s


def frame_ids(batch: dict) -> list[tuple[str, float]]:
    """(clip uid, first value of the frame's ``clip`` row): the row is random per frame, so it names the frame."""
    return [(u, round(float(v), 4)) for u, v in zip(batch["uid"], batch["clip"][:, 0, 0])]


def all_gt_frames(shards: ShardSet) -> set[tuple[str, float]]:
    """Every GT frame of the train split, named as `frame_ids` names it, read clip by clip."""
    out = set()
    for b in make_loader(ShardStream(shards, "train", batch_size=1, image_size=8, train=False)):
        out |= {(b["uid"][0], round(float(b["clip"][0, t, 0]), 4)) for t in range(b["clip"].shape[1]) if b["gt"][0, t]}
    return out


def test_every_gt_frame_once_per_epoch_in_batches_of_the_asked_size(shards: ShardSet) -> None:
    s = stream(shards)
    assert s.num_samples() == N_GT and len(s) == N_GT // 7
    refs = [(raw["__key__"], t) for raw, t in s._raw_stream()]
    assert len(refs) == N_GT == len(set(refs))  # each GT frame once, before batching
    batches = list(make_loader(s))
    assert len(batches) == N_GT // 7
    for b in batches:  # 7 supervised frames per batch, each a one-frame clip
        assert b["frames"].shape == (7, 1, 3, 8, 8) and b["masks"].shape == (7, 1, 8, 8) and b["clip"].shape == (7, 1, DC)
        assert b["gt"].all() and b["valid"].all()
        assert set(b["masks"].unique().tolist()) > {0}  # the GT mask came along
    seen = sum((frame_ids(b) for b in batches), [])
    everything = all_gt_frames(shards)
    assert len(everything) == N_GT and len(set(seen)) == len(seen) == 7 * (N_GT // 7) and set(seen) <= everything
    # the frame shuffle separates a clip's frames: unshuffled, 65 − 11 = 54 neighbours would share a clip
    keys = [raw["__key__"] for raw, _ in stream(shards, shuffle_buffer=16)._raw_stream()]
    assert sum(a == b for a, b in zip(keys, keys[1:])) < (N_GT - 11) // 2


def test_gt_frames_reads_the_gt_member(shards: ShardSet) -> None:
    raws = list(ShardStream(shards, "train", 1, 8, train=False)._raw_stream())
    assert [len(gt_frames(r)) for r in raws] == [10 if i % 2 == 0 else 1 for i in range(11)]


def test_order_is_seeded_per_epoch_resumable_and_independent_of_workers(shards: ShardSet) -> None:
    def ids(**kw) -> list[list[tuple[str, float]]]:
        return [frame_ids(b) for b in make_loader(stream(shards, batch=5, **{k: v for k, v in kw.items() if k != "workers"}),
                                                  kw.get("workers", 0))]

    full = ids(seed=3, epoch=2)
    assert len(full) == N_GT // 5
    assert full == ids(seed=3, epoch=2)
    assert full != ids(seed=3, epoch=1) and full != ids(seed=4, epoch=2)
    assert ids(seed=3, epoch=2, start=4) == full[4:]  # DataPosition(2, 4): the consumed batches are skipped
    assert ids(seed=3, epoch=2, workers=2) == full
    assert ids(seed=3, epoch=2, start=3, workers=2) == full[3:]


def test_transform_gets_a_seed_of_the_stream_position_only(shards: ShardSet) -> None:
    def record(clip: dict, seed: int) -> dict:
        return {**clip, "frames": torch.full_like(clip["frames"], seed % 251)}

    def values(start: int, workers: int) -> list[float]:
        s = stream(shards, batch=5, seed=1, epoch=0, start=start, transform=record)
        return [float(v) for b in make_loader(s, workers) for v in b["frames"][:, 0, 0, 0, 0]]

    full = values(0, 0)
    assert len(set(full)) > 10  # a new seed per frame
    assert values(2, 2) == full[10:]  # same seeds after a resume, with workers


def test_train_config_switches_are_checked() -> None:
    assert TrainConfig(batch_unit="gt_frames", augment="ddeseg", warmup_epochs=2).warmup(10) == 20
    assert TrainConfig(warmup_steps=7).warmup(10) == 7
    for bad, message in (({"batch_unit": "frames"}, "train.batch_unit must be one of clips, gt_frames"),
                         ({"augment": "flip"}, "train.augment must be one of none, ddeseg"),
                         ({"warmup_epochs": -1}, "train.warmup_epochs must be an integer >= 0"),
                         ({"warmup_epochs": 1.5}, "train.warmup_epochs must be an integer >= 0"),
                         ({"warmup_epochs": 2, "warmup_steps": 5}, "both set")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
