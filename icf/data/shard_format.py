"""The shard format (Decisions D5): the one home of what a clip is inside the WebDataset tars.

Members of one clip (sample key `sample_key(uid)`):

* ``f{t}.jpg`` frame t, ``m{t}.png`` its GT mask (uint8 class ids or 0/1; only frames with GT), ``gt.npy``
  which frames have GT, ``meta.json`` (uid, dataset, split, subset, n_frames, classes, labels, order);
* one ``{name}.npy`` per entry of `ARRAYS`, by its kind: ``frame`` arrays have one row per frame ``(T, …)``
  and are padded along T in a batch, ``clip`` arrays are one vector per clip ``(D,)``, ``segment`` arrays one row
  per segment window ``(S, D)``, padded along S.

`encode_clip` (the shard stage) and `decode_sample` (the trainer's reader) are the two directions; adding a
cached feature costs its stage plus one line in `ARRAYS`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from icf.data.io import npy_bytes, npy_load

FRAME, CLIP, SEGMENT = "frame", "clip", "segment"
ARRAYS: dict[str, str] = {  # shard member name → kind
    "mel": FRAME,  # (T, 96, 64) log-Mel patches
    "clip": FRAME,  # (T, Dc) CLIP frame embeddings
    "clap": FRAME,  # (T, Da) CLAP per-second embeddings
    "vclip": CLIP,  # (Dv,) VideoCLIP clip embedding
    "clap_clip": CLIP,  # (Da,) CLAP whole-clip embedding
    "vclip_seg": SEGMENT,  # (S, Dv) VideoCLIP segment embeddings
    "clap_latent": FRAME,  # (T, D_h) CLAP's HTSAT embedding before its projection (DDESeg's audio feature)
}
OPTIONAL = frozenset({"clap_latent"})  # arrays that shards of older stage versions lack (in a Batch when all clips have them)
AUDIO_KEYS = ("mel", "clap", "clap_clip", "clap_latent")  # batch keys that carry audio: a robustness setting changes all of them
FRAME_KEYS = ("frames", "masks", "gt", "clip")  # per-frame batch keys that frame mixing swaps between clips


def sample_key(uid: str) -> str:
    """WebDataset key of a clip in the tar shards: the uid with dots replaced (the key ends at the first dot)."""
    return uid.replace(".", "_")


def image_bytes(image: Image.Image | np.ndarray, fmt: str, quality: int = 90) -> bytes:
    """An RGB frame (``JPEG``) or a single-channel mask (``PNG``) as file bytes."""
    img = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def encode_clip(frames: Sequence[bytes], masks: Mapping[int, bytes], arrays: Mapping[str, np.ndarray],
                meta: Mapping[str, Any]) -> dict[str, bytes]:
    """The tar members of one clip: JPEG ``frames`` (T), PNG ``masks`` of the frames with GT (frame → bytes),
    the `ARRAYS` (``frame`` arrays with T rows) and ``meta`` (``n_frames`` = T).

    Raises ``ValueError`` naming the clip for a missing or unknown array or a frame array of another length."""
    t, uid = len(frames), meta.get("uid", "?")
    if meta.get("n_frames") != t:
        raise ValueError(f"{uid}: meta says {meta.get('n_frames')} frames, {t} given")
    if not set(ARRAYS) - OPTIONAL <= set(arrays) <= set(ARRAYS):
        raise ValueError(f"{uid}: arrays {sorted(arrays)}, the shard format has {sorted(ARRAYS)} ({sorted(OPTIONAL)} optional)")
    for name, kind in ARRAYS.items():
        if kind == FRAME and name in arrays and arrays[name].shape[0] != t:
            raise ValueError(f"{uid}: {name} has {arrays[name].shape[0]} rows for {t} frames")
    out = {f"f{i}.jpg": data for i, data in enumerate(frames)}
    out.update({f"m{i}.png": data for i, data in masks.items()})
    out["gt.npy"] = npy_bytes(np.array([i in masks for i in range(t)], dtype=bool))
    out.update({f"{name}.npy": npy_bytes(arrays[name]) for name in ARRAYS if name in arrays})
    out["meta.json"] = json.dumps(dict(meta), sort_keys=True).encode()
    return out


def _rgb(data: bytes) -> torch.Tensor:
    """JPEG/PNG bytes → ``(3, h, w)`` uint8."""
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


def _index_map(data: bytes) -> torch.Tensor:
    """Single-channel PNG bytes (class ids or 0/1, mode ``L``/``P``) → ``(h, w)`` int64, values as stored."""
    img = Image.open(io.BytesIO(data))
    if img.mode not in ("L", "P"):
        raise ValueError(f"mask PNG must be single-channel (mode L or P), found mode {img.mode}")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).astype(np.int64))


def decode_sample(raw: Mapping[str, Any]) -> dict[str, Any]:
    """One raw tar sample (member suffix → bytes) → tensors of one clip (T = its own frame count).

    Returns ``frames (T, 3, h, w) uint8``, ``masks (T, h, w) int64`` (zeros where no GT), ``gt (T,) bool``,
    every `ARRAYS` entry as float32 (``mel (T, 96, 64)``, ``clip (T, Dc)``, ``clap (T, Da)``, ``vclip (Dv,)``,
    ``clap_clip (Da,)``, ``vclip_seg (S, Dv)``, ``clap_latent (T, D_h)`` when the sample has it) and ``meta``;
    ``ValueError`` naming the sample and member.
    """
    key = raw.get("__key__", "?")
    try:
        meta = json.loads(raw["meta.json"])
        t = int(meta["n_frames"])
        gt = torch.from_numpy(npy_load(raw["gt.npy"]).astype(bool))
        frames = torch.stack([_rgb(raw[f"f{i}.jpg"]) for i in range(t)])
        masks = torch.zeros(t, *frames.shape[-2:], dtype=torch.int64)
        for i in range(t):
            if gt[i]:
                masks[i] = _index_map(raw[f"m{i}.png"])
        out = {"frames": frames, "masks": masks, "gt": gt, "meta": meta}
        for name in ARRAYS:
            if name not in OPTIONAL or f"{name}.npy" in raw:
                out[name] = torch.from_numpy(npy_load(raw[f"{name}.npy"]).astype(np.float32))
        return out
    except KeyError as err:
        raise ValueError(f"shard sample {key} ({raw.get('__url__', '?')}): missing member {err}") from None
