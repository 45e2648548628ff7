"""Loader throughput: does the trainer's shard reader keep a training step fed? Side by side in one run:

* shards: clips/s through ``make_loader`` (``--workers`` DataLoader workers, the preset's batch and image size),
* raw: clips/s reading the same clips from the raw dataset tree (frames, GT masks, WAV, VGGish log-Mel),
* step: clips/s of the preset's training step on cached embeddings (bench/train_step.py, S4-shaped, T = 5),

    python bench/loader.py [--preset paper-r50] [--workers 8] [--work WORK --root DATA] [--dataset s4] [--steps 2]

WORK must hold staged shards of DATA (``icf stage all``); without both, a small synthetic set is generated
and staged (tiny towers, the preset's image size) in a temporary folder first. ``--steps 0`` leaves out the
step. The shard path also delivers the cached CLIP/VideoCLIP/CLAP embeddings, which the raw path does not
compute at all (see bench/train_step.py for what computing them costs).
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
from icf.config import preset  # noqa: E402
from icf.stages.mel import MelStage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import timed_steps  # noqa: E402


def shard_rate(shards: ShardSet, split: str, image_size: int, workers: int, batch: int) -> tuple[int, float, float]:
    """(clips, clips/s including the workers' start-up, steady clips/s after the first ``workers`` batches)."""
    stream = ShardStream(shards, split, batch_size=batch, image_size=image_size, train=False)
    t0, done = time.perf_counter(), []
    for b in make_loader(stream, workers):
        done.append((time.perf_counter() - t0, len(b["uid"])))
    n = sum(c for _, c in done)
    w = min(max(workers, 1), len(done) - 1)
    steady = sum(c for _, c in done[w:]) / (done[-1][0] - done[w - 1][0]) if w > 0 else float("nan")
    return n, n / done[-1][0], steady


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


def synthetic(tmp: Path, dataset: str, clips: int, size: int) -> tuple[Path, Path]:
    root, work = tmp / "data", tmp / "work"
    icf = [sys.executable, "-m", "icf.cli"]
    subprocess.run([*icf, "synth", "--layout", dataset, "--out", str(root), "--clips", str(clips), "--size", str(size)], check=True)
    subprocess.run([*icf, "stage", "all", "--dataset", dataset, "--root", str(root), "--work", str(work), "--encoders", "tiny",
                    "--image-size", str(size), "--executor", "local", "--no-progress"], check=True)
    return work, root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper-r50", help="batch and image size of this preset (train/step sizes)")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--root", type=Path)
    ap.add_argument("--dataset", default="s4")
    ap.add_argument("--split", default="train")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2, help="timed training steps (0: leave the step out)")
    ap.add_argument("--step-batch", type=int, help="batch of the timed step (default: the preset's; the paper "
                    "preset's 8 needs about 14 GB of RAM on a CPU)")
    ap.add_argument("--clips", type=int, default=64, help="synthetic clips when --work/--root are not given")
    args = ap.parse_args()
    model_cfg, train_cfg = preset(args.preset, args.dataset)
    size, batch = model_cfg.image_size, train_cfg.batch_size
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work, root = (args.work, args.root) if args.work and args.root else synthetic(Path(tmp), args.dataset, args.clips, size)
        shards = ShardSet.load(work / args.dataset / "shards.json")
        uids = set()
        for b in make_loader(ShardStream(shards, args.split, batch, size, train=False)):
            uids.update(b["uid"])
        shard_rate(shards, args.split, size, args.workers, batch)  # warm the page cache for both
        raw_rate(args.dataset, root, args.split, size, uids)
        n_s, r_s, steady = shard_rate(shards, args.split, size, args.workers, batch)
        n_r, r_r = raw_rate(args.dataset, root, args.split, size, uids)
    print(f"{args.preset}: batch {batch}, {size}px, {args.dataset} {args.split}, {os.cpu_count()} CPUs")
    print(f"shards: {n_s} clips, {r_s:.1f} clips/s with the workers' start-up, {steady:.1f} clips/s steady "
          f"(workers={args.workers})")
    print(f"raw   : {n_r} clips, {r_r:.1f} clips/s (frames + masks + wav + log-Mel, one process)")
    print(f"ratio shards/raw: {r_s / r_r:.2f}x")
    if args.steps:
        torch.set_num_threads(os.cpu_count() or 1)  # the trainer's step uses every core
        b = args.step_batch or batch
        step_s, _ = timed_steps("tiny" if args.preset == "tiny" else "paper", args.steps, b, online=False)
        step_rate = b / step_s
        print(f"step  : {step_rate:.2f} clips/s ({step_s:.2f} s per step of {b}, cached embeddings, "
              f"{torch.get_num_threads()} threads)")
        print(f"ratio loader/step: {r_s / step_rate:.1f}x with start-up, {steady / step_rate:.1f}x steady "
              f"({'loader keeps up' if min(r_s, steady) >= step_rate else 'LOADER IS SLOWER'})")


if __name__ == "__main__":
    main()
