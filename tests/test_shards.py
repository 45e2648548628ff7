"""The trainer's shard reader on small tars written here in the shard format (Decisions D5)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from icf.clitools import UserError
from icf.data.shards import DataPosition, ShardSet, ShardStream, make_loader

DC, DV, DA = 6, 5, 4


def _png(a: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _sample(i: int, t: int, size: int, gt: list[bool], label: int) -> dict[str, bytes | str]:
    rng = np.random.default_rng(i)
    s: dict[str, bytes | str] = {"__key__": f"clip{i:03d}"}
    for f in range(t):
        s[f"f{f}.jpg"] = _png(np.full((size, size, 3), 10 * i % 250, np.uint8), "JPEG")
        if gt[f]:
            m = np.zeros((size, size), np.uint8)
            m[: size // 2, : size // 2] = label
            s[f"m{f}.png"] = _png(m)
    s["gt.npy"] = _npy(np.array(gt))
    s["mel.npy"] = _npy(np.full((t, 96, 64), i, np.float16))
    s["clip.npy"] = _npy(rng.standard_normal((t, DC)).astype(np.float16))
    s["vclip.npy"] = _npy(np.full(DV, i, np.float16))
    s["vclip_seg.npy"] = _npy(np.ones((-(-t // 4), DV), np.float16))
    s["clap.npy"] = _npy(np.zeros((t, DA), np.float16))
    s["clap_clip.npy"] = _npy(np.zeros(DA, np.float16))
    meta = {"uid": f"clip.{i:03d}", "dataset": "avss", "split": "train", "subset": "v2" if t == 10 else "v1s",
            "n_frames": t, "classes": ["dog"], "labels": [label]}
    if i < 10:  # CSV position (shard stage v2); clip 10 lacks it, as in older shards
        meta["order"] = 100 - i
    s["meta.json"] = json.dumps(meta).encode()
    return s


def write_shards(root: Path, n: int = 11, size: int = 16, per_shard: int = 4) -> Path:
    """``n`` AVSS-like clips (alternating 10 and 5 frames) in shards of ``per_shard`` → shards.json."""
    (root / "shards").mkdir(parents=True)
    entries = []
    for start in range(0, n, per_shard):
        name = f"shards/avss-train-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for i in range(start, min(n, start + per_shard)):
                t = 10 if i % 2 == 0 else 5
                gt = [True] * t if t == 10 else [True] + [False] * 4
                w.write(_sample(i, t, size, gt, label=1 + i % 5))
        data = (root / name).read_bytes()
        entries.append({"url": name, "nsamples": min(n, start + per_shard) - start, "filesize": len(data),
                        "sha256": hashlib.sha256(data).hexdigest()})
    doc = {"dataset": "avss", "cache_key": "k", "image_size": size, "num_classes": 71, "classes": ["background"] * 71,
           "encoders": {}, "text_bank": "text.npz", "splits": {"train": entries, "val": entries}}
    (root / "shards.json").write_text(json.dumps(doc))
    return root / "shards.json"


@pytest.fixture()
def shards(tmp_path: Path) -> ShardSet:
    return ShardSet.load(write_shards(tmp_path))


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
    # each clip's CSV position travels with it (None where meta.json has none)
    assert [b["order"] for b in batches] == [[100, 99, 98, 97], [96, 95, 94, 93], [92, 91, None]]


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
    sample = _sample(0, 5, 8, [True] * 5, 1)
    del sample["mel.npy"]
    with wds.TarWriter(str(broken / "shards/x.tar")) as w:
        w.write(sample)
    doc = json.loads((tmp_path / "shards.json").read_text())
    doc["splits"] = {"val": [{"url": "shards/x.tar", "nsamples": 1}]}
    (broken / "shards.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="clip000.*missing member 'mel.npy'"):
        list(make_loader(ShardStream(ShardSet.load(broken), "val", 1, 8, train=False)))
