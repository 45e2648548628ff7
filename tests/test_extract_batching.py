"""Cross-clip batching of the extract stage: same embeddings as one clip at a time, bad clips fail alone,
the reader decodes ahead, forward passes hold exactly the batch size, the engine hands over whole units."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from rich.console import Console

from icf.clitools import UserError
from icf.data.adapters import load_samples
from icf.data.io import read_rgb, read_wav
from icf.data.synth import synthesize
from icf.data.datasets import load_info
from icf.encoders.videoclip import segment_window
from icf.pipeline.engine import RunOptions, plan_jobs, run_stage
from icf.pipeline.ledger import Workspace
from icf.stages.extract import ExtractStage, RowBatcher, _unit, prefetch
from icf.stages.index import run_index
from icf.stages.mel import MelStage

QUIET = Console(file=open(os.devnull, "w"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Six synthetic AVSS clips (T = 5 and 10); one clip's frames re-saved at another size (40×56)."""
    root = tmp_path_factory.mktemp("batching") / "data"
    synthesize("avss", root, clips=6, seed=5, size=48)
    samples = sorted(load_samples("avss", root, ["train", "val", "test"]), key=lambda s: s.uid)
    for p in samples[1].frame_paths:
        Image.open(p).convert("RGB").resize((56, 40)).save(p)
    return root, samples


@pytest.fixture(scope="module")
def stage():
    torch.set_num_threads(1)
    st = ExtractStage(ExtractStage.Config(encoders="tiny", batch_frames=7, batch_windows=5, readers=2))
    st.setup()
    return st


def per_clip_reference(s, enc) -> dict[str, np.ndarray]:
    """The embeddings of one clip computed on their own (the extract stage before cross-clip batching)."""
    clip = enc.clip.encode_images(np.stack([read_rgb(p) for p in s.frame_paths]))
    sr = enc.clap.sample_rate
    wave = read_wav(s.audio_path, sr=sr)
    seconds = min(len(wave) // sr, s.n_frames)
    both = enc.clap.encode_prepared_latent(enc.clap.prepare_audio(wave[: seconds * sr].reshape(seconds, sr))).numpy()
    both = np.concatenate([both, np.repeat(both[-1:], s.n_frames - seconds, axis=0)])
    per_second, latent = both[:, : enc.clap.dim], both[:, enc.clap.dim :]
    whole = enc.clap.encode_audio(wave[None, : s.n_frames * sr])[0]
    window = segment_window(s.n_frames, load_info(s.dataset).segment_divisor)
    return {
        "clip": _unit(clip.numpy()),
        "vclip": _unit(enc.videoclip.encode_video(clip).numpy()),
        "vclip_seg": _unit(enc.videoclip.encode_segments(clip, window).numpy()),
        "clap": _unit(per_second),
        "clap_clip": _unit(whole.numpy()),
        "clap_latent": latent.astype(np.float16),
    }


def assert_same_to_float16(outputs: dict, reference: dict) -> None:
    assert set(outputs) == set(reference)
    for name, ref in reference.items():
        assert outputs[name].dtype == np.float16 and outputs[name].shape == ref.shape, name
        np.testing.assert_array_max_ulp(outputs[name], ref, maxulp=1)


def test_batched_embeddings_equal_per_clip_ones_to_float16(clips, stage):
    _, samples = clips
    assert {s.n_frames for s in samples} == {5, 10}  # batches of 7 frames / 5 windows straddle clips of both lengths
    results = stage.process(samples, {})
    assert [r.uid for r in results] == [s.uid for s in samples]
    for s, r in zip(samples, results):
        assert r.ok, r.error
        assert_same_to_float16(r.outputs, per_clip_reference(s, stage.enc))


def test_a_bad_clip_fails_alone_with_its_reason(clips, stage, tmp_path):
    _, samples = clips
    missing, short = samples[2], samples[4]
    gone, short_wav = tmp_path / "missing.jpg", tmp_path / "short.wav"
    sf.write(short_wav, np.zeros(8000, np.float32), 16000)  # half a second
    broken = {missing.uid: replace(missing, frame_paths=(*missing.frame_paths[:-1], str(gone))),
              short.uid: replace(short, audio_path=str(short_wav))}
    bad = [broken.get(s.uid, s) for s in samples]
    results = {r.uid: r for r in stage.process(bad, {})}
    assert not results[missing.uid].ok and str(gone) in results[missing.uid].error
    assert not results[short.uid].ok and str(short_wav) in results[short.uid].error
    assert "shorter than one second" in results[short.uid].error
    for s in samples:
        if s.uid not in (missing.uid, short.uid):
            assert results[s.uid].ok
            assert_same_to_float16(results[s.uid].outputs, per_clip_reference(s, stage.enc))


def test_row_batcher_runs_full_passes_across_clips_in_order():
    seen = []

    def encode(x):
        seen.append(len(x))
        return x[:, :1] * 2

    batcher = RowBatcher(encode, 4)
    firsts = [batcher.add(torch.arange(a, a + n, dtype=torch.float32)[:, None]) for a, n in ((0, 3), (3, 6), (9, 2))]
    out = batcher.flush()
    assert firsts == [0, 3, 9] and seen == [4, 4, 3]
    np.testing.assert_array_equal(out[:, 0], 2 * np.arange(11))


def test_reader_decodes_ahead_in_order_and_passes_bad_media_through():
    started = [threading.Event() for _ in range(6)]
    overlapped = []

    def read(i):
        started[i].set()
        if i == 0:  # with a prefetching reader, clip 1 starts while clip 0 is still being read
            overlapped.append(started[1].wait(timeout=10))
        if i == 3:
            raise ValueError(f"clip {i}: bad")
        return i * 10

    out = list(prefetch(read, list(range(6)), threads=2, ahead=3))
    assert overlapped == [True]
    assert [s for s, _ in out] == list(range(6))
    assert [v for _, v in out if not isinstance(v, ValueError)] == [0, 10, 20, 40, 50]
    assert str(out[3][1]) == "clip 3: bad"


def test_engine_hands_a_whole_unit_to_one_process_call(clips, tmp_path):
    root, _ = clips
    ws = Workspace(tmp_path / "w", "avss")
    run_index(ws, root, None, 6)
    mel = run_stage(ws, MelStage(), RunOptions(executor="local", progress=False), QUIET)
    extract = ExtractStage(ExtractStage.Config(encoders="tiny"))
    ups = {"mel": mel.cache_key}
    default = RunOptions(executor="local", progress=False)
    assert {j.batch_size for j in plan_jobs(ws, extract, "k", ups, default)[1]} == {ExtractStage.clips_per_call}
    assert ExtractStage.clips_per_call >= 256 > MelStage.clips_per_call
    assert {j.batch_size for j in plan_jobs(ws, extract, "k", ups, replace(default, batch_size=3))[1]} == {3}
    calls = []

    class Recording(ExtractStage):
        def process(self, samples, inputs):
            calls.append(len(samples))
            return super().process(samples, inputs)

    summary = run_stage(ws, Recording(ExtractStage.Config(encoders="tiny")), default, QUIET)
    assert summary.computed >= 5 and summary.failed == 0
    assert len(calls) == summary.units_run and sum(calls) == summary.computed  # one call per unit


@pytest.mark.parametrize("flag", ["batch_frames", "batch_windows", "readers"])
def test_batch_flags_below_one_are_a_user_error(flag):
    with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} must be >= 1"):
        ExtractStage(ExtractStage.Config(encoders="tiny", **{flag: 0}))
