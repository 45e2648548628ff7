"""The trainer's shard reader on small tars written here in the shard format (Decisions D5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from icf.clitools import UserError
from icf.data.io import npy_load
from icf.data.shard_format import encode_clip, image_bytes
from icf.data.shards import DataPosition, ShardSet, ShardStream, make_loader

DC, DV, DA = 6, 5, 4


def _clip(i: int, t: int, size: int, gt: list[bool], label: int) -> dict[str, bytes]:
    """Clip i: frames filled with 10·i, GT masks with ``label`` on the top-left quarter, mel = i, vclip = i."""
    rng = np.random.default_rng(i)
    frames = [image_bytes(np.full((size, size, 3), 10 * i % 250, np.uint8), "JPEG") for _ in range(t)]
    m = np.zeros((size, size), np.uint8)
    m[: size // 2, : size // 2] = label
    masks = {f: image_bytes(m, "PNG") for f in range(t) if gt[f]}
    arrays = {"mel": np.full((t, 96, 64), i, np.float16), "clip": rng.standard_normal((t, DC)).astype(np.float16),
              "vclip": np.full(DV, i, np.float16), "vclip_seg": np.ones((-(-t // 4), DV), np.float16),
              "clap": np.zeros((t, DA), np.float16), "clap_clip": np.zeros(DA, np.float16)}
    meta = {"uid": f"clip.{i:03d}", "dataset": "avss", "split": "train", "subset": "v2" if t == 10 else "v1s",
            "n_frames": t, "classes": ["dog"], "labels": [label], "order": 100 - i}
    return encode_clip(frames, masks, arrays, meta)


def write_shards(root: Path, writer, n: int = 11, size: int = 16, per_shard: int = 4) -> Path:
    """``n`` AVSS-like clips (alternating 10 and 5 frames) in shards of ``per_shard``, in train and val."""
    clips = [_clip(i, 10 if i % 2 == 0 else 5, size, [True] * 10 if i % 2 == 0 else [True] + [False] * 4, 1 + i % 5)
             for i in range(n)]
    return writer(root, {"train": clips, "val": clips}, size, per_shard=per_shard, text_bank="text.npz")


@pytest.fixture()
def shards(tmp_path: Path, shard_set_writer) -> ShardSet:
    return ShardSet.load(write_shards(tmp_path, shard_set_writer))


def _uids(batches) -> list[list[str]]:
    return [b["uid"] for b in batches]


def test_batch_contract(shards: ShardSet) -> None:
    stream = ShardStream(shards, "val", batch_size=4, image_size=8, train=False)
    batches = list(make_loader(stream))
    b = batches[0]
    assert b["frames"].shape == (4, 10, 3, 8, 8) and b["frames"].dtype == torch.float32
    assert b["masks"].shape == (4, 10, 8, 8) and b["masks"].dtype == torch.int64
    assert b["gt"].dtype == torch.bool and b["valid"].dtype == torch.bool
    assert b["mel"].shape == (4, 10, 96, 64) and b["mel"].dtype == torch.float32
    assert b["clip"].shape == (4, 10, DC) and b["clap"].shape == (4, 10, DA)
    assert b["vclip"].shape == (4, DV) and b["clap_clip"].shape == (4, DA) and b["vclip_seg"].shape == (4, 3, DV)
    assert b["labels"].shape == (4, 71) and b["labels"].sum(1).tolist() == [1.0] * 4
    # clip 1 has 5 real frames with GT on frame 0 only; padding is invalid and zero
    assert b["valid"][1].tolist() == [True] * 5 + [False] * 5
    assert b["gt"][1].tolist() == [True] + [False] * 9
    assert float(b["mel"][1, 5:].abs().sum()) == 0 and float(b["mel"][1, 0, 0, 0]) == 1.0
    # masks resized 16 → 8 with nearest: class id 2 on the top-left quarter only, no new ids
    assert set(b["masks"][1, 0].unique().tolist()) == {0, 2} and int((b["masks"][1, 0] == 2).sum()) == 16
    # frames ImageNet-normalised: a grey level g gives (g/255 - mean) / std
    g = 10 / 255  # clip 1 is filled with 10 (JPEG keeps flat images exact)
    assert float(b["frames"][1, 0, 0, 0, 0]) == pytest.approx((g - 0.485) / 0.229, abs=0.02)
    assert b["uid"][:2] == ["clip.000", "clip.001"]
    # eval: every clip once, in shard order, last partial batch kept
    assert sum(_uids(batches), []) == [f"clip.{i:03d}" for i in range(11)]
    assert [len(u) for u in _uids(batches)] == [4, 4, 3]
    # each clip's CSV position travels with it
    assert [b["order"] for b in batches] == [[100, 99, 98, 97], [96, 95, 94, 93], [92, 91, 90]]


def test_train_order_is_seeded_per_epoch(shards: ShardSet) -> None:
    def epoch(seed: int, e: int) -> list[list[str]]:
        stream = ShardStream(shards, "train", batch_size=3, image_size=8, train=True, seed=seed, shuffle_buffer=4)
        stream.set_position(e, 0)
        return _uids(make_loader(stream))

    a = epoch(0, 0)
    assert len(a) == 3 and all(len(u) == 3 for u in a)  # 11 // 3 batches, partial one dropped
    assert a == epoch(0, 0)
    assert a != epoch(0, 1) and a != epoch(1, 0)
    assert len(set(sum(a, []))) == 9  # distinct clips


def test_resume_skips_exactly_and_workers_do_not_change_the_stream(shards: ShardSet) -> None:
    def run(workers: int, pos: DataPosition) -> list[list[str]]:
        stream = ShardStream(shards, "train", batch_size=2, image_size=8, train=True, seed=3, shuffle_buffer=4)
        stream.set_position(pos.epoch, pos.batch)
        return _uids(make_loader(stream, workers))

    full = run(0, DataPosition(2, 0))
    assert len(full) == 5
    assert run(0, DataPosition(2, 3)) == full[3:]
    assert run(2, DataPosition(2, 0)) == full
    assert run(2, DataPosition(2, 1)) == full[1:]


def test_errors(tmp_path: Path, shards: ShardSet) -> None:
    with pytest.raises(UserError, match="shards.json not found"):
        ShardSet.load(tmp_path / "nowhere")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="malformed"):
        ShardSet.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="no test samples"):
        ShardStream(shards, "test", 2, 8, train=False).num_samples()
    broken = tmp_path / "broken"
    (broken / "shards").mkdir(parents=True)
    sample = _clip(0, 5, 8, [True] * 5, 1)
    del sample["mel.npy"]
    with wds.TarWriter(str(broken / "shards/x.tar")) as w:
        w.write({"__key__": "clip000", **sample})
    doc = json.loads((tmp_path / "shards.json").read_text())
    doc["splits"] = {"val": [{"url": "shards/x.tar", "nsamples": 1}]}
    (broken / "shards.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="clip000.*missing member 'mel.npy'"):
        list(make_loader(ShardStream(ShardSet.load(broken), "val", 1, 8, train=False)))


def test_encode_clip_round_trips_through_decode_sample_and_refuses_a_short_array() -> None:
    """The two directions of the shard format agree; a frame array with another length names the clip."""
    from icf.data.shard_format import ARRAYS, OPTIONAL, decode_sample

    members = _clip(3, 5, 8, [True, False, True, False, False], 2)
    assert {m for m in members} == {*(f"f{t}.jpg" for t in range(5)), "m0.png", "m2.png", "gt.npy", "meta.json",
                                    *(f"{name}.npy" for name in ARRAYS if name not in OPTIONAL)}
    clip = decode_sample(members)
    assert clip["gt"].tolist() == [True, False, True, False, False] and clip["meta"]["uid"] == "clip.003"
    assert int((clip["masks"][0] == 2).sum()) == 16 and int(clip["masks"][1].sum()) == 0
    assert clip["mel"].shape == (5, 96, 64) and float(clip["mel"][0, 0, 0]) == 3.0 and clip["vclip"].shape == (DV,)
    assert not OPTIONAL & set(clip)  # an optional array the clip lacks is absent, not zeros
    meta = json.loads(members["meta.json"])
    arrays = {name: npy_load(members[f"{name}.npy"]) for name in ARRAYS if name not in OPTIONAL}
    arrays["clap"] = arrays["clap"][:4]
    with pytest.raises(ValueError, match="clip.003: clap has 4 rows for 5 frames"):
        encode_clip([members[f"f{t}.jpg"] for t in range(5)], {}, arrays, meta)
