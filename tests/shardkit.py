"""Helpers for the trainer tests: small AVSS-format shards with the tiny encoders' dimensions.

Embeddings are random (the trainer only needs their shapes); frames show one coloured square per clip
whose class is the clip's label, so the segmentation part is learnable.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from icf.data.manifests import load_info
from icf.encoders import EncoderSpec, text_bank
from icf.train.trainer import frozen_towers
from icf.encoders.videoclip import segment_window, segment_windows


def _enc(a: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, a)
    else:
        Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def write_avss_shards(work: Path, n_train: int = 8, n_val: int = 4, size: int = 32, seed: int = 0) -> Path:
    """``WORK/avss/shards.json`` + one tar per split; returns the shards.json path."""
    info = load_info("avss")
    spec = EncoderSpec.tiny()
    encoders = frozen_towers(spec, "cpu")
    dims = {"clip": encoders.clip.dim, "vclip": encoders.videoclip.dim, "clap": encoders.clap.dim}
    root = work / "avss"
    (root / "shards").mkdir(parents=True, exist_ok=True)
    np.savez(root / "text_bank.npz", **text_bank(encoders, info.classes))
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        url = f"shards/avss-{split}-000000.tar"
        with wds.TarWriter(str(root / url)) as w:
            for i in range(n):
                t = 10 if i % 2 == 0 else 5
                label = 1 + i % 3
                s = {"__key__": f"{split}{i:03d}"}
                for f in range(t):
                    img = np.full((size, size, 3), 40, np.uint8)
                    m = np.zeros((size, size), np.uint8)
                    y, x = rng.integers(0, size // 2, 2)
                    img[y : y + size // 3, x : x + size // 3] = info.palette[label]
                    m[y : y + size // 3, x : x + size // 3] = label
                    s[f"f{f}.jpg"], s[f"m{f}.png"] = _enc(img, "JPEG"), _enc(m, "PNG")
                s["gt.npy"] = _enc(np.ones(t, bool), "npy")
                s["mel.npy"] = _enc(rng.standard_normal((t, 96, 64)).astype(np.float16) + label, "npy")
                s["clip.npy"] = _enc(rng.standard_normal((t, dims["clip"])).astype(np.float16), "npy")
                s["vclip.npy"] = _enc(rng.standard_normal(dims["vclip"]).astype(np.float16), "npy")
                n_seg = len(segment_windows(t, segment_window(t, 4)))
                s["vclip_seg.npy"] = _enc(rng.standard_normal((n_seg, dims["vclip"])).astype(np.float16), "npy")
                s["clap.npy"] = _enc(rng.standard_normal((t, dims["clap"])).astype(np.float16), "npy")
                s["clap_clip.npy"] = _enc(rng.standard_normal(dims["clap"]).astype(np.float16), "npy")
                meta = {"uid": f"{split}.{i:03d}", "dataset": "avss", "split": split, "subset": "v2" if t == 10 else "v1m",
                        "n_frames": t, "classes": [info.classes[label]], "labels": [label]}
                s["meta.json"] = json.dumps(meta).encode()
                w.write(s)
        splits[split] = [{"url": url, "nsamples": n, "filesize": (root / url).stat().st_size, "sha256": ""}]
    doc = {"dataset": "avss", "cache_key": "test", "image_size": size, "num_classes": info.num_classes,
           "classes": list(info.classes), "encoders": spec.to_dict(), "text_bank": "text_bank.npz", "splits": splits}
    (root / "shards.json").write_text(json.dumps(doc))
    return root / "shards.json"
