"""Suite-wide settings: never reach a hub, keep Ray quiet, keep torch to the machine's cores."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---------------------------------------------------------------------------------------- shards by hand

import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def write_shard_set(root: Path, clips: Mapping[str, Sequence[dict[str, bytes]]], image_size: int,
                    per_shard: int = 1_000_000, dataset: str = "avss", encoders: dict | None = None,
                    text_bank: str = "text_bank.npz") -> Path:
    """``ROOT/shards/<split>/*.tar`` + ``ROOT/shards.json`` from clips encoded with
    `icf.data.shard_format.encode_clip` (``per_shard`` clips per tar); returns the shards.json path."""
    import webdataset as wds

    from icf.data.datasets import load_info
    from icf.data.shard_format import sample_key

    info = load_info(dataset)
    splits = {}
    for split, members in clips.items():
        (root / "shards" / split).mkdir(parents=True, exist_ok=True)
        entries = []
        for start in range(0, len(members), per_shard):
            url = f"shards/{split}/{dataset}-{split}-{start // per_shard:06d}.tar"
            chunk = members[start : start + per_shard]
            with wds.TarWriter(str(root / url)) as w:
                for m in chunk:
                    w.write({"__key__": sample_key(json.loads(m["meta.json"])["uid"]), **m})
            data = (root / url).read_bytes()
            entries.append({"url": url, "nsamples": len(chunk), "filesize": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = entries
    doc = {"dataset": dataset, "cache_key": "test", "image_size": image_size, "num_classes": info.num_classes,
           "classes": list(info.classes), "encoders": encoders or {}, "text_bank": text_bank, "splits": splits}
    (root / "shards.json").write_text(json.dumps(doc))
    return root / "shards.json"


def avss_clips(split: str, n: int, size: int, dims: Mapping[str, int], seed: int = 0) -> list[dict[str, bytes]]:
    """``n`` AVSS clips (10 and 5 frames alternating) encoded with `encode_clip`: each frame shows one square
    in its class's palette colour on grey, its mask marks the square; embeddings random with ``dims``
    (``clip``, ``vclip``, ``clap``); the log-Mel is noise offset by the label."""
    import numpy as np

    from icf.data.datasets import load_info
    from icf.data.shard_format import encode_clip, image_bytes
    from icf.encoders.videoclip import segment_window, segment_windows

    info, rng = load_info("avss"), np.random.default_rng(seed)
    out = []
    for i in range(n):
        t, label = (10 if i % 2 == 0 else 5), 1 + i % 3
        frames, masks = [], {}
        for f in range(t):
            img, m = np.full((size, size, 3), 40, np.uint8), np.zeros((size, size), np.uint8)
            y, x = rng.integers(0, size // 2, 2)
            img[y : y + size // 3, x : x + size // 3] = info.palette[label]
            m[y : y + size // 3, x : x + size // 3] = label
            frames.append(image_bytes(img, "JPEG", quality=75))
            masks[f] = image_bytes(m, "PNG")
        n_seg = len(segment_windows(t, segment_window(t, info.segment_divisor)))
        arrays = {"mel": rng.standard_normal((t, 96, 64)).astype(np.float16) + label,
                  "clip": rng.standard_normal((t, dims["clip"])).astype(np.float16),
                  "vclip": rng.standard_normal(dims["vclip"]).astype(np.float16),
                  "vclip_seg": rng.standard_normal((n_seg, dims["vclip"])).astype(np.float16),
                  "clap": rng.standard_normal((t, dims["clap"])).astype(np.float16),
                  "clap_clip": rng.standard_normal(dims["clap"]).astype(np.float16)}
        meta = {"uid": f"{split}.{i:03d}", "dataset": "avss", "split": split, "subset": "v2" if t == 10 else "v1m",
                "n_frames": t, "classes": [info.classes[label]], "labels": [label], "order": i}
        out.append(encode_clip(frames, masks, arrays, meta))
    return out


def write_avss_shards(work: Path, n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``WORK/avss/shards.json`` of `avss_clips` with the tiny encoders' dimensions and their prompt text bank."""
    import numpy as np

    from icf.data.datasets import load_info
    from icf.encoders import EncoderSpec, text_bank
    from icf.methods.icf import frozen_towers

    spec = EncoderSpec.tiny()
    towers = frozen_towers(spec, "cpu")
    dims = {"clip": towers.clip.dim, "vclip": towers.videoclip.dim, "clap": towers.clap.dim}
    root = work / "avss"
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "text_bank.npz", **text_bank(towers, load_info("avss").classes))
    clips = {split: avss_clips(split, n, size, dims, seed + k) for k, (split, n) in enumerate((("train", n_train), ("val", n_val)))}
    return write_shard_set(root, clips, size, encoders=spec.to_dict())


@pytest.fixture(scope="session")
def avss_shards() -> Callable[..., Path]:
    """`write_avss_shards`: small AVSS shards for trainer, eval and compare tests."""
    return write_avss_shards


@pytest.fixture(scope="session")
def shard_set_writer() -> Callable[..., Path]:
    """`write_shard_set`: tars + shards.json from clips encoded with `encode_clip`."""
    return write_shard_set


def load_bench(name: str):
    """The script ``bench/<name>.py`` as a module (``bench/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
