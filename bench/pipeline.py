"""Pipeline engine benchmark: ratios measured side by side in one run, on the same synthetic clips.

    python bench/pipeline.py [--clips 16] [--layout s4] [--size 96] [--encoders tiny]

(a) extract throughput through the engine (local executor, and Ray with one worker) ÷ a bare in-process
    loop over the same encoders and the same per-clip code (engine overhead: planning, ledger, parquet);
(b) extract with 2 Ray workers ÷ 1 worker (clips/s);
(c) a no-op rerun of index → mel → extract → shard ÷ the first run (wall time);
(d) peak RSS of a whole local `icf stage all` at N and 4N clips.
Times include building the encoders, in the engine and in the bare loop alike; the one-time imports of
open_clip / laion-clap are done in this process before any timer starts (new Ray workers still pay them:
that is part of what (a) and (b) measure for Ray).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from rich.console import Console  # noqa: E402

from icf.data.synth import synthesize  # noqa: E402
from icf.pipeline.engine import RunOptions, run_stage  # noqa: E402
from icf.pipeline.engine import manifest_units  # noqa: E402
from icf.pipeline.ledger import Workspace  # noqa: E402
from icf.stages import stage_classes  # noqa: E402
from icf.stages.extract import ExtractStage  # noqa: E402
from icf.stages.index import run_index  # noqa: E402

QUIET = Console(file=open(os.devnull, "w"))


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def fresh_ws(tmp: Path, name: str, layout: str, root: Path, unit_size: int) -> Workspace:
    ws = Workspace(tmp / name, layout)
    run_index(ws, root, None, unit_size)
    return ws


def bare_loop(ws: Workspace, cfg: ExtractStage.Config) -> int:
    """The same encoders and per-clip code as the stage, in a plain loop: no planner, ledger or files."""
    import torch

    torch.set_num_threads(1)  # as the engine's workers run
    stage = ExtractStage(cfg)
    stage.setup()
    _, samples, _ = manifest_units(ws)
    for s in samples.values():
        stage.embed(s)
    return len(samples)


def run_extract(ws: Workspace, cfg: ExtractStage.Config, executor: str, workers: int | None = None) -> int:
    summary = run_stage(ws, ExtractStage(cfg), RunOptions(executor=executor, workers=workers, progress=False), QUIET)
    return summary.computed


def run_all(ws: Workspace, cfg: ExtractStage.Config, executor: str) -> int:
    keys: dict[str, str] = {}
    computed = 0
    for name, cls in stage_classes().items():
        s = run_stage(ws, cls(cfg if name == "extract" else None), RunOptions(executor=executor, progress=False), QUIET, keys)
        keys[name], computed = s.cache_key, computed + s.computed
    return computed


def peak_rss_mb(layout: str, root: Path, work: Path, encoders: str) -> float:
    """Peak RSS of a separate `icf stage all --executor local` process (whole pipeline in one process)."""
    cmd = [sys.executable, "-m", "icf.cli", "stage", "all", "--dataset", layout, "--root", str(root), "--work", str(work),
           "--encoders", encoders, "--executor", "local", "--no-progress"]
    probe = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stderr=subprocess.DEVNULL); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=32)
    ap.add_argument("--layout", default="s4")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--encoders", default="tiny")
    ap.add_argument("--unit-size", type=int, default=4)
    args = ap.parse_args()
    cfg = ExtractStage.Config(encoders=args.encoders)
    import ray

    import icf.encoders.clap  # noqa: F401  (warm the heavy imports outside every timer)
    import icf.encoders.clip  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        root = tmp / "data"
        synthesize(args.layout, root, clips=args.clips, seed=0, size=args.size)

        def ws(name: str) -> Workspace:
            w = fresh_ws(tmp, name, args.layout, root, args.unit_size)
            run_stage(w, stage_classes()["mel"](), RunOptions(executor="local", progress=False), QUIET)
            return w

        # alternate bare / engine twice and keep the best of each, so neither gets the warm-up advantage
        bare, local = [], []
        for i in range(2):
            bare.append(timed(lambda: bare_loop(ws(f"bare{i}"), cfg)))
            local.append(timed(lambda: run_extract(ws(f"local{i}"), cfg, "local")))
        (t_bare, n), (t_local, _) = min(bare, key=lambda r: r[0]), min(local, key=lambda r: r[0])
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
        t_ray1, _ = timed(lambda: run_extract(ws("ray1"), cfg, "ray", workers=1))
        t_ray2, _ = timed(lambda: run_extract(ws("ray2"), cfg, "ray", workers=2))
        all_ws = fresh_ws(tmp, "all", args.layout, root, args.unit_size)
        t_first, _ = timed(lambda: run_all(all_ws, cfg, "ray"))
        t_noop, recomputed = timed(lambda: run_all(all_ws, cfg, "ray"))
        ray.shutdown()

        root4 = tmp / "data4"
        synthesize(args.layout, root4, clips=4 * args.clips, seed=0, size=args.size)
        rss_n = peak_rss_mb(args.layout, root, tmp / "rss1", args.encoders)
        rss_4n = peak_rss_mb(args.layout, root4, tmp / "rss4", args.encoders)

    print(f"{n} {args.layout} clips at {args.size}px, encoders={args.encoders}, unit size {args.unit_size}, "
          f"{os.cpu_count()} CPUs")
    print(f"  bare loop           {t_bare:7.2f} s  {n / t_bare:6.2f} clips/s")
    print(f"  engine, local       {t_local:7.2f} s  {n / t_local:6.2f} clips/s")
    print(f"  engine, Ray 1 actor {t_ray1:7.2f} s  {n / t_ray1:6.2f} clips/s")
    print(f"  engine, Ray 2 actors{t_ray2:7.2f} s  {n / t_ray2:6.2f} clips/s")
    print(f"(a) engine ÷ bare throughput: local {t_bare / t_local:.2f}, Ray 1 worker {t_bare / t_ray1:.2f}")
    print(f"(b) 2 Ray workers ÷ 1 worker throughput: {t_ray1 / t_ray2:.2f}")
    print(f"(c) no-op rerun ÷ first run (all stages, Ray): {t_noop:.2f} s / {t_first:.2f} s = {t_noop / t_first:.3f}"
          f" ({recomputed} clips recomputed)")
    print(f"(d) peak RSS of `icf stage all --executor local`: {args.clips} clips {rss_n:.0f} MB, "
          f"{4 * args.clips} clips {rss_4n:.0f} MB (ratio {rss_4n / rss_n:.2f})")


if __name__ == "__main__":
    main()
