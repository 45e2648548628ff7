"""Training-step time on cached embeddings ÷ the same step with the frozen CLIP image and CLAP audio towers
run online (what the trainer would cost without the extract stage), side by side, at the tiny and paper sizes.

    python bench/train_step.py [--sizes tiny,paper] [--steps 2] [--batch 2]

Random weights everywhere (the time does not depend on them). Tiny: the tiny registered CLIP/CLAP configs and
the ``tiny`` preset at 64 px; paper: ViT-B-32 + HTSAT-tiny (transformer text tower) and ``paper-r50`` at 224 px.
Both on S4-shaped clips (T = 5) so the paper size stays measurable on a CPU.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from icf.config import preset  # noqa: E402
from icf.encoders import EncoderSpec, load, text_bank  # noqa: E402
from icf.encoders.videoclip import segment_window, segment_windows  # noqa: E402
from icf.model import ICF  # noqa: E402
from icf.model.bidir import BidirSegmenter  # noqa: E402
from icf.train.trainer import make_optimizer  # noqa: E402

SR = 16000


def towers(size: str) -> EncoderSpec:
    if size == "tiny":
        return EncoderSpec.tiny()
    return EncoderSpec(clip_model="ViT-B-32", clap_amodel="HTSAT-tiny", clap_tmodel="transformer")


def online_embeddings(enc, frames_u8: np.ndarray, wave: np.ndarray, t: int, div: int) -> dict[str, torch.Tensor]:
    """What the extract stage caches, computed now: ``frames_u8 (B, T, H, W, 3)``, ``wave (B, T·SR)``."""
    b = frames_u8.shape[0]
    clip = enc.clip.encode_images(frames_u8.reshape(b * t, *frames_u8.shape[2:])).view(b, t, -1)
    per_second = enc.clap.encode_audio(wave.reshape(b * t, SR)).view(b, t, -1)
    whole = enc.clap.encode_audio(wave)
    window = segment_window(t, div)
    seg = torch.stack([clip[:, w].mean(1) for w in segment_windows(t, window)], 1)
    return {"clip": clip, "clap": per_second, "clap_clip": whole, "vclip": torch.nn.functional.normalize(clip.mean(1), dim=-1),
            "vclip_seg": torch.nn.functional.normalize(seg, dim=-1)}


def batch_of(cfg, emb: dict[str, torch.Tensor], b: int) -> dict:
    t, s = cfg.frames, cfg.image_size
    g = torch.Generator().manual_seed(0)
    return {"frames": torch.randn(b, t, 3, s, s, generator=g), "masks": (torch.rand(b, t, s, s, generator=g) > 0.7).long(),
            "gt": torch.ones(b, t, dtype=torch.bool), "valid": torch.ones(b, t, dtype=torch.bool),
            "mel": torch.randn(b, t, 96, 64, generator=g), "labels": torch.zeros(b, 23), "uid": [str(i) for i in range(b)], **emb}


def make_step(size: str, b: int) -> Callable[[bool], None]:
    """``step(online)``: one training step at ``size`` on batch ``b``, with cached or online tower embeddings."""
    model_cfg, train_cfg = preset("tiny" if size == "tiny" else "paper-r50", "s4")
    enc = load(towers(size))
    model = ICF(BidirSegmenter(model_cfg), enc, text_bank(enc, ["dog", "cat", "guitar"]))
    opt = make_optimizer(model, train_cfg)
    rng = np.random.default_rng(0)
    native = 224
    frames_u8 = rng.integers(0, 255, (b, model_cfg.frames, native, native, 3), dtype=np.uint8)
    wave = rng.standard_normal((b, model_cfg.frames * SR)).astype(np.float32) * 0.1
    cached = online_embeddings(enc, frames_u8, wave, model_cfg.frames, model_cfg.segment_div)

    def step(online: bool) -> None:
        emb = online_embeddings(enc, frames_u8, wave, model_cfg.frames, model_cfg.segment_div) if online else cached
        batch = batch_of(model_cfg, emb, b)
        loss = model.loss(model(batch), batch)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def timed_steps(size: str, steps: int, b: int, online: bool = True) -> tuple[float, float]:
    """Median seconds per step with cached embeddings and (``online``) with the towers run online (else NaN)."""
    step = make_step(size, b)
    modes = (False, True) if online else (False,)
    for mode in modes * 2:  # warm-up (allocator, first-call overheads)
        step(mode)
    times: dict[bool, list[float]] = {m: [] for m in modes}
    for _ in range(steps):  # interleaved, so machine load affects both alike
        for mode in modes:
            t0 = time.perf_counter()
            step(mode)
            times[mode].append(time.perf_counter() - t0)
    return float(np.median(times[False])), float(np.median(times[True])) if online else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="tiny,paper")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    for size in args.sizes.split(","):
        cached, online = timed_steps(size, args.steps, args.batch)
        print(f"{size:5s} batch {args.batch}: cached {cached:.2f} s/step, online towers {online:.2f} s/step (medians), "
              f"speed-up {online / cached:.2f}x")


if __name__ == "__main__":
    main()
