"""Tiny ICF training step: this tree's code ÷ an older commit's, on the same batch and thread count, interleaved.

    python bench/train_speed.py [--base 94f36f4] [--steps 8] [--threads 1] [--batch 4] [--equal-to REV]

The old code is ``git archive <base> icf manifests`` unpacked into a temporary folder. Two worker processes (one per code
tree, both ``torch.set_num_threads(--threads)``) build the same model from the same seed — the ``tiny`` preset on
AVSS with the tiny CLIP/CLAP towers — and the same synthetic AVSS-shaped batch (a 10-frame v2 clip, a padded
5-frame v1s clip with GT on frame 0 only, a 5-frame v1m clip, …), then take training steps (`train_step`: forward,
Eq. 19 loss, backward, clipping, AdamW) in turns old, new, old, new…, so machine load falls on both alike. It
prints the median seconds per step of each and their ratio, and the largest difference between the two trees'
loss terms at the first step and over all steps (the same seed, batch and RNG draws: equal up to float rounding
where both trees hold the same model; after the first step the weights differ by the rounding of the updates,
which training amplifies — float32 AdamW at lr 1e-3: 1e-6 at the first step, 1e-3 by the fifth).

Idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE`` unless set): on a shared machine a spinning thread waits
for its descheduled sibling at every parallel region, which made both trees ~30x slower at 2 threads.

``--base`` defaults to the last commit before the step speed-ups (issue 24); any other commit or branch works.
The model has changed since then (CDCL's defaults, merged in c3d0485), so this tree's losses differ from the
base's; ``--equal-to REV`` runs a third, untimed worker on REV (a commit with this tree's model, e.g. where
the speed-ups branched off) and compares the losses with that one instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

BASELINE = "94f36f4"  # the commit before the tiny-step speed-ups (issue 24)
REPO = Path(__file__).resolve().parents[1]
MARK = "@@bench "  # prefix of the workers' answers (libraries may print to stdout too)


# ----------------------------------------------------------------------------- worker (runs in either tree)


def make_batch(cfg, dims: dict[str, int], b: int, seed: int = 0) -> dict:
    """A synthetic AVSS-shaped training batch: clip i has 10 frames (v2, GT everywhere) when i % 4 is 0 or 2,
    5 real frames with GT on frame 0 only (v1s train) when i % 4 == 1, 5 frames with GT everywhere (v1m) else."""
    import torch

    from icf.encoders.videoclip import segment_window, segment_windows

    g = torch.Generator().manual_seed(seed)
    t, s = cfg.frames, cfg.image_size
    valid = torch.ones(b, t, dtype=torch.bool)
    gt = torch.ones(b, t, dtype=torch.bool)
    valid[1::2, 5:] = False
    gt[1::2, 5:] = False
    gt[1::4, 1:] = False
    n_seg = len(segment_windows(t, segment_window(t, cfg.segment_div)))
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {"frames": rand(b, t, 3, s, s), "masks": torch.randint(0, 8, (b, t, s, s), generator=g), "gt": gt, "valid": valid,
            "mel": rand(b, t, 96, 64), "labels": torch.zeros(b, cfg.num_classes), "uid": [str(i) for i in range(b)],
            "clip": rand(b, t, dims["clip"]), "vclip": rand(b, dims["clip"]), "vclip_seg": rand(b, n_seg, dims["clip"]),
            "clap": rand(b, t, dims["clap"]), "clap_clip": rand(b, dims["clap"])}


def worker(threads: int, batch_size: int) -> None:
    """Build the model and batch, then answer each ``step`` line on stdin with one JSON line (seconds, losses)."""
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    from icf.config import preset
    from icf.data.datasets import load_info
    from icf.encoders import EncoderSpec, load, text_bank
    from icf.model import ICF
    from icf.model.bidir import BidirSegmenter
    from icf.train.trainer import make_optimizer, train_step

    torch.manual_seed(0)
    cfg, train_cfg = preset("tiny", "avss")
    enc = load(EncoderSpec.tiny())
    model = ICF(BidirSegmenter(cfg), enc, text_bank(enc, list(load_info("avss").classes)[:8]))
    optimizer = make_optimizer(model, train_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    dims = {"clip": enc.clip.encode_text(["a"]).shape[-1], "clap": enc.clap.encode_text(["a"]).shape[-1]}
    batch = make_batch(cfg, dims, batch_size)
    torch.manual_seed(1)  # the steps' own draws (SC noise, dropout) start from the same state in both trees
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        record = train_step(model, model.loss, batch, optimizer, scheduler, train_cfg, torch.device("cpu"))
        print(MARK + json.dumps({"seconds": time.perf_counter() - t0, "record": record}), flush=True)


# ----------------------------------------------------------------------------- driver


def unpack(rev: str, into: Path) -> Path:
    """``git archive rev icf manifests`` unpacked (icf/descriptors links to manifests) under ``into``; returns that folder (the old tree's import root)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", rev, "icf", "manifests"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(into, filter="data")
    return into


def start(tree: Path, threads: int, batch: int) -> subprocess.Popen:
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", "--threads", str(threads), "--batch", str(batch)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tree)
    assert read(proc)["ready"]
    return proc


def read(proc: subprocess.Popen) -> dict:
    """The worker's next answer, skipping anything else it printed."""
    for line in proc.stdout:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"bench worker exited with {proc.wait()}")


def step(proc: subprocess.Popen) -> dict:
    proc.stdin.write("step\n")
    proc.stdin.flush()
    return read(proc)


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=BASELINE, help="the old code's commit or branch")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per tree (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--equal-to", metavar="REV", help="compare the losses with REV's (untimed) instead of the base's")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.threads, args.batch)
    reference = "old" if args.equal_to is None else "ref"
    with tempfile.TemporaryDirectory() as tmp:
        procs = {"old": start(unpack(args.base, Path(tmp, "old")), args.threads, args.batch), "new": start(REPO, args.threads, args.batch)}
        if args.equal_to is not None:
            procs["ref"] = start(unpack(args.equal_to, Path(tmp, "ref")), args.threads, args.batch)
        times: dict[str, list[float]] = {"old": [], "new": []}
        diffs = []  # per step: the largest relative difference of the logged values
        for i in range(args.steps + 1):  # step 0 warms up (allocator, first calls)
            out = {name: step(proc) for name, proc in procs.items()}  # old, then new (then the untimed reference)
            diffs.append(max(abs(out[reference]["record"][k] - v) / max(1.0, abs(v))
                             for k, v in out["new"]["record"].items() if k in out[reference]["record"] and k != "lr"))
            if i:
                for name in times:
                    times[name].append(out[name]["seconds"])
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    old, new = float(np.median(times["old"])), float(np.median(times["new"]))
    print(f"tiny ICF step, AVSS batch {args.batch}, {args.threads} thread(s), {args.steps} interleaved steps each: "
          f"{args.base} {old:.3f} s, this tree {new:.3f} s (medians), speed-up {old / new:.2f}x; "
          f"largest relative difference of the logged losses / grad norm from {args.equal_to or args.base}'s: first step "
          f"{diffs[0]:.1e} (same weights), over all {len(diffs)} steps {max(diffs):.1e} (rounding differences grow as training "
          f"moves the weights apart)")


if __name__ == "__main__":
    main()
