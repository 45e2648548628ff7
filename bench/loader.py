"""Loader throughput: clips/s through the trainer's shard reader ÷ clips/s reading the same clips from the raw
dataset tree (decode the frames and GT masks, read the WAV, compute the VGGish log-Mel), side by side.

    python bench/loader.py --work WORK --root DATA [--dataset avss] [--split train] [--image-size 64]

WORK must hold staged shards of DATA (``icf stage all``); without both, a small synthetic AVSS set is
generated and staged in a temporary folder first (about two minutes). Both paths produce tensors at the
same image size; the shard path also delivers the cached CLIP/VideoCLIP/CLAP embeddings, which the raw
path does not compute at all (see bench/train_step.py for what computing them costs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from icf.data.adapters import load_samples  # noqa: E402
from icf.data.io import read_mask, read_rgb, read_wav  # noqa: E402
from icf.data.shards import ShardSet, ShardStream, make_loader, resize_square  # noqa: E402
from icf.stages.mel import MelStage  # noqa: E402


def shard_rate(shards: ShardSet, split: str, image_size: int, workers: int) -> tuple[int, float]:
    stream = ShardStream(shards, split, batch_size=4, image_size=image_size, train=False)
    t0, n = time.perf_counter(), 0
    for batch in make_loader(stream, workers):
        n += len(batch["uid"])
    return n, n / (time.perf_counter() - t0)


def raw_rate(dataset: str, root: Path, split: str, image_size: int, uids: set[str]) -> tuple[int, float]:
    mel = MelStage()
    mel.setup()
    samples = [s for s in load_samples(dataset, root, [split]) if s.uid in uids]
    t0 = time.perf_counter()
    for s in samples:
        frames = torch.from_numpy(np.stack([read_rgb(p) for p in s.frame_paths])).permute(0, 3, 1, 2)
        resize_square(frames, image_size, nearest=False)
        masks = [torch.from_numpy(read_mask(p, dataset).astype(np.int64)) for p in s.mask_paths if p]
        if masks:
            resize_square(torch.stack(masks)[:, None], image_size, nearest=True)
        mel.patches(mel.log_mel(read_wav(s.audio_path)), s.n_frames)
    return len(samples), len(samples) / (time.perf_counter() - t0)


def synthetic(tmp: Path, clips: int, size: int) -> tuple[Path, Path]:
    root, work = tmp / "AVSS", tmp / "work"
    icf = [sys.executable, "-m", "icf.cli"]
    subprocess.run([*icf, "synth", "--layout", "avss", "--out", str(root), "--clips", str(clips), "--size", str(size)], check=True)
    subprocess.run([*icf, "stage", "all", "--dataset", "avss", "--root", str(root), "--work", str(work), "--encoders", "tiny",
                    "--image-size", str(size), "--executor", "local"], check=True)
    return work, root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--dataset", default="avss")
    ap.add_argument("--split", default="train")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--clips", type=int, default=48, help="synthetic clips when --work/--root are not given")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work, root = (args.work, args.root) if args.work and args.root else synthetic(Path(tmp), args.clips, args.image_size)
        shards = ShardSet.load(work / args.dataset / "shards.json")
        uids = set()
        for batch in make_loader(ShardStream(shards, args.split, 4, args.image_size, train=False)):
            uids.update(batch["uid"])
        shard_rate(shards, args.split, args.image_size, args.workers)  # warm the page cache for both
        raw_rate(args.dataset, root, args.split, args.image_size, uids)
        n_s, r_s = shard_rate(shards, args.split, args.image_size, args.workers)
        n_r, r_r = raw_rate(args.dataset, root, args.split, args.image_size, uids)
    print(f"shards: {n_s} clips, {r_s:.1f} clips/s (workers={args.workers})")
    print(f"raw   : {n_r} clips, {r_r:.1f} clips/s (frames + masks + wav + log-Mel)")
    print(f"ratio shards/raw: {r_s / r_r:.2f}x")


if __name__ == "__main__":
    main()
