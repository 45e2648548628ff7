"""Pipeline benchmark against the physical limit: ratios measured side by side in one run, on synthetic clips.

    python bench/pipeline.py [--quick] [--clips 48] [--layout s4] [--size 64] [--encoders tiny]
                             [--scale 500,2000] [--mel-scale 8000] [--skip-scale]

(a) steady-state extract clips/s through the engine (runner + worker + ledger files; local executor and Ray
    with one actor; start-up, i.e. Ray, actor and tower loading, reported separately) ÷ a bare loop that
    feeds the same towers at their best batch size: its clips/s is 1 / (decode s/clip + frames/clip · best
    CLIP s/frame + windows/clip · best CLAP s/window), every term measured here with torch on one thread,
    as an engine worker runs; "forward only" leaves the decode term out (the limit with decode overlapped);
(b) 2 Ray actors ÷ 1 actor, steady-state clips/s;
(c) `icf stage all --executor local` (tiny towers) at each --scale size, and index → mel at --mel-scale
    (shard needs extract, so 8,000 clips through the towers would not fit a CPU benchmark): wall time, time
    per clip and peak RSS, each in a fresh process; per-clip cost and RSS should stay flat in N.
Steady state: units finish at t_1 ≤ … ≤ t_n; with w workers the rate is the clips of units w+1…n over
t_n − t_w, and start-up is t_w minus the time the first w units (in parallel) take at that rate.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from icf.data.synth import synthesize  # noqa: E402
from icf.pipeline.engine import RunOptions, manifest_units, plan_jobs, stage_key  # noqa: E402
from icf.pipeline.ledger import Workspace  # noqa: E402
from icf.pipeline.runners import make_runner  # noqa: E402
from icf.stages.extract import ExtractStage  # noqa: E402
from icf.stages.index import run_index  # noqa: E402
from icf.workflow.run import run_pipeline  # noqa: E402
from icf.stages.mel import MelStage  # noqa: E402

QUIET = Console(file=open(os.devnull, "w"))
CLIP_BATCHES = (8, 32, 128, 256)
CLAP_BATCHES = (4, 16, 64)


def staged(tmp: Path, name: str, layout: str, root: Path, unit_size: int) -> Workspace:
    """A fresh workspace with index and mel done (extract's upstream)."""
    ws = Workspace(tmp / name, layout)
    run_pipeline(ws, [MelStage()], RunOptions(executor="local", progress=False), QUIET,
                 index=lambda: run_index(ws, root, None, unit_size))
    return ws


def engine_rate(ws: Workspace, cfg: ExtractStage.Config, executor: str, workers: int) -> tuple[float, float, int]:
    """(steady clips/s, start-up s, clips) of extract through the engine's runner and worker."""
    stage = ExtractStage(cfg)
    key, ups = stage_key(ws, stage, None)
    _, jobs = plan_jobs(ws, stage, key, ups, RunOptions(executor=executor, workers=workers, progress=False))
    t0 = time.perf_counter()
    done = [(time.perf_counter() - t0, r.computed) for r in make_runner(executor, workers).run(stage, jobs)]
    w = min(workers, len(done) - 1)
    rate = sum(n for _, n in done[w:]) / (done[-1][0] - done[w - 1][0]) if w else sum(n for _, n in done) / done[-1][0]
    startup = done[w - 1][0] - sum(n for _, n in done[:w]) / rate if w else 0.0  # w units ran in parallel
    return rate, max(startup, 0.0), sum(n for _, n in done)


def best_per_row(encode, rows: torch.Tensor, sizes: Sequence[int]) -> tuple[float, int]:
    """(seconds per row, batch size) of ``encode`` at its fastest batch size among ``sizes``."""
    results = []
    for size in sizes:
        x = rows[:size] if len(rows) >= size else rows.repeat((size + len(rows) - 1) // len(rows), *[1] * (rows.ndim - 1))[:size]
        encode(x)  # warm
        t0, reps = time.perf_counter(), max(1, 64 // size)
        for _ in range(reps):
            encode(x)
        results.append(((time.perf_counter() - t0) / (reps * size), size))
    return min(results)


def bare_limit(ws: Workspace, cfg: ExtractStage.Config, clips: int) -> dict[str, float]:
    """Per-clip costs of the bare work: decode (the stage's own reader code, no threads) and the towers' best batches."""
    torch.set_num_threads(1)
    stage = ExtractStage(cfg)
    stage.setup()
    samples = list(manifest_units(ws)[1].values())[:clips]
    t0 = time.perf_counter()
    decoded = [stage.decode(s) for s in samples]
    decode = (time.perf_counter() - t0) / len(samples)
    frames = torch.cat([d.frames for d in decoded])
    windows = torch.cat([d.windows for d in decoded])
    clip_row, clip_b = best_per_row(stage.enc.clip.encode_preprocessed, frames, CLIP_BATCHES)
    clap_row, clap_b = best_per_row(stage.enc.clap.encode_prepared, windows, CLAP_BATCHES)
    per_clip_fwd = len(frames) / len(samples) * clip_row + len(windows) / len(samples) * clap_row
    return {"decode": decode, "forward": per_clip_fwd, "clip_row": clip_row, "clap_row": clap_row,
            "clip_batch": clip_b, "clap_batch": clap_b, "frames": len(frames) / len(samples),
            "windows": len(windows) / len(samples)}


def measured_run(commands: list[list[str]]) -> tuple[float, float]:
    """(wall s, peak RSS MB) of running ``commands`` one after another, each in a fresh process."""
    t0 = time.perf_counter()
    for cmd in commands:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def scale_probe(kind: str, layout: str, clips: int, size: int, encoders: str, tmp: Path) -> tuple[float, float]:
    """(s, peak MB) of ``stage all`` (kind 'all') or ``stage index`` + ``stage mel`` (kind 'mel') on ``clips`` clips,
    measured in a child process so the RSS is that run's alone."""
    root, work = tmp / f"{kind}{clips}-data", tmp / f"{kind}{clips}-work"
    synthesize(layout, root, clips=clips, seed=0, size=size)
    icf = [sys.executable, "-m", "icf.cli", "stage"]
    common = ["--dataset", layout, "--work", str(work), "--executor", "local", "--no-progress"]
    if kind == "all":
        cmds = [[*icf, "all", *common, "--root", str(root), "--encoders", encoders, "--image-size", str(size)]]
    else:
        cmds = [[*icf, "index", "--dataset", layout, "--work", str(work), "--root", str(root)], [*icf, "mel", *common]]
    probe = ("import json, sys; sys.path.insert(0, sys.argv[1]); from bench.pipeline import measured_run; "
             "print(json.dumps(measured_run(json.loads(sys.argv[2]))))")
    import json

    repo = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", probe, repo, json.dumps(cmds)], capture_output=True, text=True, check=True)
    seconds, mb = json.loads(out.stdout.strip().splitlines()[-1])
    return seconds, mb


def report_scale(label: str, runs: list[tuple[int, float, float]]) -> None:
    (n0, t0, m0) = runs[0]
    for n, t, mb in runs:
        print(f"  {label:<22} {n:6d} clips {t:8.1f} s  {1000 * t / n:7.1f} ms/clip  peak RSS {mb:7.0f} MB")
    for n, t, mb in runs[1:]:
        print(f"  {label}: {n}/{n0} clips: cost per clip ratio {(t / n) / (t0 / n0):.2f}, peak RSS ratio {mb / m0:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: 16 clips for (a)/(b), 24/96 and 192 for (c)")
    ap.add_argument("--clips", type=int, default=48)
    ap.add_argument("--layout", default="s4")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--encoders", default="tiny")
    ap.add_argument("--unit-size", type=int, default=8)
    ap.add_argument("--scale", default="500,2000", help="clip counts for `stage all`")
    ap.add_argument("--mel-scale", type=int, default=8000, help="clips for index → mel")
    ap.add_argument("--skip-scale", action="store_true", help="leave out (c)")
    args = ap.parse_args()
    if args.quick:
        args.clips, args.unit_size, args.scale, args.mel_scale = 16, 4, "24,96", 192
    cfg = ExtractStage.Config(encoders=args.encoders)
    import ray

    import icf.encoders.clap  # noqa: F401  (warm the heavy imports outside every timer)
    import icf.encoders.clip  # noqa: F401

    print(f"{args.clips} {args.layout} clips at {args.size}px, encoders={args.encoders}, unit size {args.unit_size}, "
          f"batch {cfg.batch_frames} frames / {cfg.batch_windows} windows, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        root = tmp / "data"
        synthesize(args.layout, root, clips=args.clips, seed=0, size=args.size)
        bare = bare_limit(staged(tmp, "bare", args.layout, root, args.unit_size), cfg, min(args.clips, 16))
        local, local_start, n = engine_rate(staged(tmp, "local", args.layout, root, args.unit_size), cfg, "local", 1)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        ray1, ray1_start, _ = engine_rate(staged(tmp, "ray1", args.layout, root, args.unit_size), cfg, "ray", 1)
        ray2, ray2_start, _ = engine_rate(staged(tmp, "ray2", args.layout, root, args.unit_size), cfg, "ray", 2)
        ray.shutdown()
        limit = 1 / (bare["decode"] + bare["forward"])
        fwd_limit = 1 / bare["forward"]
        print(f"  bare: decode {1000 * bare['decode']:.1f} ms/clip; CLIP {1000 * bare['clip_row']:.2f} ms/frame at batch "
              f"{bare['clip_batch']}, CLAP {1000 * bare['clap_row']:.1f} ms/window at batch {bare['clap_batch']}; "
              f"{bare['frames']:.1f} frames + {bare['windows']:.1f} windows per clip")
        print(f"  bare loop at best batch  {limit:7.2f} clips/s   (forward only {fwd_limit:.2f} clips/s)")
        for label, rate, start in (("engine, local", local, local_start), ("engine, Ray 1 actor", ray1, ray1_start),
                                   ("engine, Ray 2 actors", ray2, ray2_start)):
            print(f"  {label:<24} {rate:7.2f} clips/s steady, start-up {start:5.1f} s ({n} clips)")
        print(f"(a) engine ÷ bare loop (steady state): local {local / limit:.2f}, Ray 1 actor {ray1 / limit:.2f}; "
              f"÷ forward only: local {local / fwd_limit:.2f}, Ray 1 actor {ray1 / fwd_limit:.2f}")
        print(f"(b) 2 Ray actors ÷ 1 actor (steady state): {ray2 / ray1:.2f}")
        if args.skip_scale:
            return
        print("(c) fresh processes, --executor local, tiny towers:")
        sizes = [int(x) for x in args.scale.split(",")]
        report_scale("stage all", [(c, *scale_probe("all", args.layout, c, args.size, args.encoders, tmp)) for c in sizes])
        small = max(1, args.mel_scale // 4)
        report_scale("index → mel", [(c, *scale_probe("mel", args.layout, c, args.size, args.encoders, tmp))
                                     for c in (small, args.mel_scale)])


if __name__ == "__main__":
    main()
