"""The Python parts of bench/gpu_check.sh; each also runs on a CPU (``--device cpu``, tiny sizes) for testing.

    python bench/gpu_check.py extract --batch 64 [--clips 96] [--encoders default]
    python bench/gpu_check.py train [--preset paper-r50] [--steps 5] [--batch 4]
    python bench/gpu_check.py actors [--encoders default]

``extract``: steady-state frames/s of the extract stage through the engine (Ray, one actor per GPU) with
``--batch-frames B --batch-windows B/4``, and the bare towers fed random inputs at those batch sizes: CLIP
frames/s, CLAP windows/s, and the clips/s of both back to back (5 frames + 6 windows per S4 clip).
``train``: the preset's training step (``icf.train.trainer.train_step``: AMP bf16 on CUDA when the preset sets
``amp``) on random S4-shaped batches with cached embeddings: steps/s and peak GPU memory.
``actors``: runs a probe model stage on Ray and checks that there are as many actors as GPUs, each holding
its own GPU (one per CPU, none holding a GPU, on a machine without GPUs).
Random-init towers throughout (the timings do not depend on the weights). Each prints one line starting
with ``OK`` or ``FAIL`` and exits 1 on FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from icf.data.synth import synthesize  # noqa: E402
from icf.pipeline.engine import RunOptions, manifest_units, run_stage  # noqa: E402
from icf.pipeline.ledger import unit_path  # noqa: E402
from icf.pipeline.stage import Stage  # noqa: E402
from icf.pipeline.store import read_outputs  # noqa: E402
from icf.stages.extract import ExtractStage  # noqa: E402

# The default towers without weights: ViT-B-32 + HTSAT-tiny with the CLIP-style text tower (RoBERTa needs a
# local folder, and the text tower only builds the text banks).
SPECS = {"default": dict(encoders="default", clap_tmodel="transformer"), "tiny": dict(encoders="tiny")}


def extract_config(encoders: str, batch: int) -> ExtractStage.Config:
    return ExtractStage.Config(**SPECS[encoders], batch_frames=batch, batch_windows=max(1, batch // 4))


def bare_rates(cfg: ExtractStage.Config, device: str, reps: int = 3) -> tuple[float, float]:
    """(CLIP frames/s at ``cfg.batch_frames``, CLAP windows/s at ``cfg.batch_windows``) of the towers alone,
    on random inputs; on a CPU with torch on one thread, as an engine worker runs."""
    from icf.stages.extract import _load_quietly

    if device == "cpu":
        torch.set_num_threads(1)
    enc = _load_quietly(ExtractStage(cfg).spec, device=device)
    size = enc.clip.image_size
    frames = torch.randn(cfg.batch_frames, 3, size, size, device=device)
    windows = torch.rand(cfg.batch_windows, enc.clap.clip_samples, device=device) - 0.5
    rates = []
    for encode, x in ((enc.clip.encode_preprocessed, frames), (enc.clap.encode_prepared, windows)):
        encode(x)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            encode(x)
        sync(device)
        rates.append(reps * len(x) / (time.perf_counter() - t0))
    return rates[0], rates[1]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cmd_extract(args: argparse.Namespace) -> bool:
    from pipeline import engine_rate, staged

    import ray

    cfg = extract_config(args.encoders, args.batch)
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        synthesize("s4", tmp / "data", clips=args.clips, seed=0, size=args.size)
        ws = staged(tmp, "w", "s4", tmp / "data", args.unit_size)
        ray.init(include_dashboard=False, logging_level="WARNING")
        try:
            rate, startup, n = engine_rate(ws, cfg, "ray", args.workers or max(1, torch.cuda.device_count()))
        finally:
            ray.shutdown()
    frames = rate * 5  # S4: 5 frames and 5 one-second windows + 1 whole-clip window per clip
    clip_fps, clap_wps = bare_rates(cfg, args.device)
    towers = 1 / (5 / clip_fps + 6 / clap_wps)  # clips/s of the two towers alone, back to back
    ok = n == args.clips
    print(f"{'OK' if ok else 'FAIL'} extract batch {args.batch}/{cfg.batch_windows}: {frames:.0f} frames/s "
          f"({rate:.2f} clips/s) steady through the engine, start-up {startup:.1f} s, {n} clips; bare towers: CLIP "
          f"{clip_fps:.0f} frames/s at batch {cfg.batch_frames}, CLAP {clap_wps:.0f} windows/s at batch "
          f"{cfg.batch_windows}, both {towers:.2f} clips/s; engine ÷ bare towers {rate / towers:.2f}")
    return ok


def cmd_train(args: argparse.Namespace) -> bool:
    from train_step import batch_of, online_embeddings, towers

    from icf.config import preset
    from icf.encoders import load, text_bank
    from icf.model import ICF
    from icf.model.bidir import BidirSegmenter
    from icf.train.trainer import make_optimizer, to_device, train_step

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # a test run on a shared CPU; one thread avoids OpenMP spin-waits under load
    model_cfg, train_cfg = preset(args.preset, "s4")
    enc = load(towers("tiny" if args.preset == "tiny" else "paper"), device=args.device)
    model = ICF(BidirSegmenter(model_cfg), enc, text_bank(enc, ["dog", "cat", "guitar"])).to(device)
    opt = make_optimizer(model, train_cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    rng = np.random.default_rng(0)
    t = model_cfg.frames
    frames_u8 = rng.integers(0, 255, (args.batch, t, 224, 224, 3), dtype=np.uint8)
    wave = rng.standard_normal((args.batch, t * 16000)).astype(np.float32) * 0.1
    emb = {k: v.float().cpu() for k, v in online_embeddings(enc, frames_u8, wave, t, model_cfg.segment_div).items()}
    batch = to_device(batch_of(model_cfg, emb, args.batch), device)
    loss_of = model.loss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_step(model, loss_of, batch, opt, sched, train_cfg, device)  # warm-up
    sync(args.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        record = train_step(model, loss_of, batch, opt, sched, train_cfg, device)
    sync(args.device)
    rate = args.steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    amp = train_cfg.amp and device.type == "cuda"
    ok = bool(np.isfinite(record["total"]))
    print(f"{'OK' if ok else 'FAIL'} train {args.preset} batch {args.batch} on {device} (AMP {'bf16' if amp else 'off'}): "
          f"{rate:.2f} steps/s, {rate * args.batch:.1f} samples/s, peak GPU memory {peak:.2f} GiB, loss {record['total']:.3f}")
    return ok


class GpuProbe(Stage):
    """A model stage whose output per clip is the worker's process id and the GPU ids Ray gave it."""

    name = "gpuprobe"
    version = "1"
    uses_model = True

    def setup(self) -> None:
        import ray

        self.ids = np.array([int(i) for i in ray.get_gpu_ids()] or [-1], dtype=np.int64)

    def process_one(self, sample, upstream):
        time.sleep(0.05)  # long enough that every actor gets units
        return {"pid": np.array([os.getpid()], dtype=np.int64), "gpus": self.ids}


def cmd_actors(args: argparse.Namespace) -> bool:
    from pipeline import staged

    import ray

    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        synthesize("s4", tmp / "data", clips=args.clips, seed=0, size=32)
        ws = staged(tmp, "w", "s4", tmp / "data", 2)
        ray.init(include_dashboard=False, logging_level="WARNING")
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            cpus = int(ray.cluster_resources().get("CPU", 1))
            summary = run_stage(ws, GpuProbe(), RunOptions(executor="ray", batch_size=1, progress=False), _quiet())
        finally:
            ray.shutdown()
        units = manifest_units(ws)[0]
        folder = ws.stage_dir(GpuProbe.name, summary.cache_key)
        outs = [o for u in units for o in read_outputs(unit_path(folder, u, "out.parquet")).values()]
    actors = {int(o["pid"][0]): tuple(int(g) for g in o["gpus"]) for o in outs}
    held = sorted(g for ids in actors.values() for g in ids if g >= 0)
    expected = gpus or min(cpus, len(units))
    ok = len(actors) == expected and (held == list(range(gpus)) if gpus else not held)
    print(f"{'OK' if ok else 'FAIL'} actors: {gpus} GPUs in the cluster, {len(actors)} actors ran units "
          f"(expected {expected}), GPU ids held {held}")
    return ok


def _quiet():
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    e = sub.add_parser("extract")
    e.add_argument("--batch", type=int, required=True)
    e.add_argument("--clips", type=int, default=96)
    e.add_argument("--size", type=int, default=224)
    e.add_argument("--unit-size", type=int, default=64)
    e.add_argument("--workers", type=int, default=None)
    e.add_argument("--encoders", choices=sorted(SPECS), default="default")
    e.add_argument("--device", default=default_device)
    t = sub.add_parser("train")
    t.add_argument("--preset", default="paper-r50")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--batch", type=int, default=4)
    t.add_argument("--device", default=default_device)
    a = sub.add_parser("actors")
    a.add_argument("--clips", type=int, default=16)
    args = ap.parse_args(argv)
    ok = {"extract": cmd_extract, "train": cmd_train, "actors": cmd_actors}[args.cmd](args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
