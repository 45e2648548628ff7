"""``icf predict --video``: a trained run on video files made here with PyAV (mp4, mkv, webm, mov), a separate WAV,
and the bad files (no video, no audio, too short, unreadable) each as one ``error:`` line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

from icf.cli import app
from icf.data.synth import synthesize
from icf.eval.video import SAMPLE_RATE, read_video

LOCAL = ["--executor", "local", "--no-progress"]
# container suffix → (video codec, audio codec, audio rate)
FORMATS = {"mp4": ("libx264", "aac", 16000), "mkv": ("libx264", "pcm_s16le", 16000),
           "webm": ("libvpx-vp9", "libopus", 48000), "mov": ("mpeg4", "aac", 44100)}


def make_video(path: Path, seconds: float, fps: int = 4, size: int = 48, audio: tuple[str, int] | None = ("aac", 16000),
               codec: str = "libx264") -> Path:
    """A video whose frame at time s is filled with grey level 20·⌊s⌋ (so the second a frame came from can be
    read back), with a 440 Hz tone, written with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        sound = container.add_stream(audio[0], rate=audio[1], layout="mono") if audio else None
        for i in range(int(seconds * fps)):
            image = np.full((size, size, 3), 20 * int(i / fps), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        container.mux(stream.encode(None))
        if sound is not None:
            rate = audio[1]
            tone = (0.3 * np.sin(2 * math.pi * 440 * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
            fmt = "s16" if audio[0].startswith("pcm") else "fltp"
            step = sound.codec_context.frame_size or 1024
            for i in range(0, len(tone), step):
                chunk = tone[None, i: i + step]
                data = (chunk * 32767).astype(np.int16) if fmt == "s16" else chunk
                frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
                frame.sample_rate = rate
                for packet in sound.encode(frame):
                    container.mux(packet)
            container.mux(sound.encode(None))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny ICF run (2 steps) on a staged 6-clip synthetic AVSS workspace."""
    base = tmp_path_factory.mktemp("video")
    synthesize("avss", base / "data", clips=6, seed=2, size=32)
    work = str(base / "work")
    runner = CliRunner()
    for args in (["stage", "all", "--dataset", "avss", "--root", str(base / "data"), "--encoders", "tiny",
                  "--image-size", "32", *LOCAL],
                 ["train", "--preset", "tiny", "--max-steps", "2", "--out", str(base / "run")]):
        res = runner.invoke(app, [*args, "--work", work])
        assert res.exit_code == 0, res.output
    return base / "run"


def test_frames_are_sampled_once_per_second_at_mid_second(tmp_path):
    decoded = read_video(make_video(tmp_path / "v.mp4", 10.5), seconds=5)
    assert len(decoded.frames) == 2 and decoded.starts == [0.0, 5.0]
    levels = [int(round(f.mean() / 20)) for w in decoded.frames for f in w]
    assert levels == list(range(10))  # frame t of window w is from second 5w + t
    assert 0 <= len(decoded.wave) / SAMPLE_RATE - 10.5 < 0.15  # AAC pads the last frames to 1024 samples


@pytest.mark.parametrize("suffix", sorted(FORMATS))
def test_predict_on_a_video_writes_the_overlay_with_its_audio_and_panels(trained, tmp_path, suffix):
    codec, audio_codec, rate = FORMATS[suffix]
    video = make_video(tmp_path / f"clip.{suffix}", 10.2, audio=(audio_codec, rate), codec=codec)
    res = CliRunner().invoke(app, ["predict", "--run", str(trained), "--video", str(video), "--out", str(tmp_path / "o"),
                                   "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["windows"] == 1 and summary["seconds"] == 10 and len(summary["panels"]) == 1
    with av.open(summary["overlay"]) as container:
        assert container.streams.video and container.streams.audio
        frames = sum(1 for _ in container.decode(video=0))
        assert frames == 10  # one overlay frame per sampled second
        assert container.duration / av.time_base >= 9.5
    if suffix == "mp4":
        five = CliRunner().invoke(app, ["predict", "--run", str(trained), "--video", str(video), "--seconds", "5",
                                        "--out", str(tmp_path / "o5"), "--json"])
        assert five.exit_code == 0 and json.loads(five.output.strip().splitlines()[-1])["windows"] == 2


def test_a_window_goes_through_the_pipelines_own_stage_code(trained, tmp_path, monkeypatch):
    """The mel stage's code runs on the window's audio (no second copy): patching it shows in the prediction path."""
    from icf.stages.mel import MelStage

    seen = []
    original = MelStage.process_one
    monkeypatch.setattr(MelStage, "process_one", lambda self, s, up: seen.append(s.audio_path) or original(self, s, up))
    video = make_video(tmp_path / "v.mp4", 5.0)
    res = CliRunner().invoke(app, ["predict", "--run", str(trained), "--video", str(video), "--seconds", "5",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert len(seen) == 1 and seen[0].endswith("audio.wav")


def test_a_separate_wav_replaces_the_missing_track(trained, tmp_path):
    video = make_video(tmp_path / "silent.mp4", 5.0, audio=None)
    res = CliRunner().invoke(app, ["predict", "--run", str(trained), "--video", str(video), "--seconds", "5",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no audio track" in res.output and "--audio" in res.output
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(SAMPLE_RATE * 6, np.float32) + 0.01, SAMPLE_RATE)
    res = CliRunner().invoke(app, ["predict", "--run", str(trained), "--video", str(video), "--audio", str(wav),
                                   "--seconds", "5", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("case", ["no-video", "too-short", "unreadable", "missing", "bad-seconds"])
def test_bad_video_input_is_one_error_line(trained, tmp_path, case):
    args = ["--seconds", "5"]
    if case == "no-video":
        video = tmp_path / "audio.wav"
        sf.write(video, np.zeros(SAMPLE_RATE * 6, np.float32), SAMPLE_RATE)
        expected = "no video track"
    elif case == "too-short":
        video, expected = make_video(tmp_path / "short.mp4", 3.0), "shorter than one 5-second window"
    elif case == "unreadable":
        video = tmp_path / "junk.mp4"
        video.write_bytes(b"this is not a video" * 10)
        expected = "unreadable media"
    elif case == "missing":
        video, expected = tmp_path / "nope.mp4", "no such file"
    else:
        video, expected, args = make_video(tmp_path / "v.mp4", 8.0), "avss clips are 5 or 10 seconds", ["--seconds", "7"]
    res = CliRunner().invoke(app, ["predict", "--run", str(trained), "--video", str(video), *args,
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and expected in res.output and "Traceback" not in res.output, res.output
    assert len([line for line in res.output.splitlines() if line.startswith("error:")]) == 1
