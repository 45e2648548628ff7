"""``icf predict --video``: a trained run on any video file (mp4, mkv, webm, mov; audio from its own track or a WAV).

The file is decoded with PyAV (FFmpeg) into windows of ``seconds`` seconds; each window becomes one clip sampled as
the run's dataset samples its clips (one frame per second, taken at the middle of each second, T = ``seconds``).
Each clip is written as a small AVSBench-style folder (PNG frames, 16 kHz WAV) and goes through the pipeline's own
code: the mel stage, the extract stage with the workspace's towers and options, and the shard stage's clip encoder,
then the trainer's ``collate``; so a clip seen here is prepared exactly as a clip of the shards (no second copy of
the mel or embedding code). Outputs: ``overlay.mp4`` (the predicted masks over the frames, one frame per second,
with the original audio) and one PNG panel per window (``window-XXX.png``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from icf.clitools import UserError

SAMPLE_RATE = 16000  # the mel stage's rate; the WAV handed to it is written at this rate


@dataclass
class Decoded:
    """A decoded video: ``frames[w]`` the ``(T, H, W, 3)`` uint8 frames of window ``w``, ``wave`` the mono audio
    at ``SAMPLE_RATE`` over the whole file, ``starts[w]`` the window's start in seconds."""

    frames: list[np.ndarray]
    wave: np.ndarray
    starts: list[float]
    duration: float


def _open(path: Path) -> Any:
    import av

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable media ({err})") from None


def read_audio(path: Path) -> np.ndarray:
    """The first audio stream of ``path`` as float32 mono at ``SAMPLE_RATE``; ``UserError`` when it has none."""
    import av

    with _open(path) as container:
        if not container.streams.audio:
            raise UserError(f"{path}: no audio track (give one with --audio FILE.wav)")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        chunks, lead = [], 0
        try:
            for frame in container.decode(audio=0):
                if not chunks and frame.time is not None and frame.time < 0:  # encoder priming (AAC): not the film's
                    lead = int(round(-frame.time * SAMPLE_RATE))
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
        except av.error.FFmpegError as err:
            raise UserError(f"{path}: unreadable audio ({err})") from None
    wave = np.concatenate(chunks)[lead:] if chunks else np.zeros(0, np.float32)
    if len(wave) == 0:
        raise UserError(f"{path}: the audio track holds no samples")
    return wave.astype(np.float32)


def read_video(path: Path, seconds: int, audio: Path | None = None) -> Decoded:
    """Decode ``path`` into ``⌊duration / seconds⌋`` windows of ``seconds`` frames (1 fps, mid-second), and its
    audio (or ``audio``'s); ``UserError`` for a file without video, without audio, shorter than one window, or
    unreadable."""
    import av

    with _open(path) as container:
        if not container.streams.video:
            raise UserError(f"{path}: no video track")
        stream = container.streams.video[0]
        picked: dict[int, np.ndarray] = {}  # second → the first frame at or after its middle
        last_time = 0.0
        try:
            for frame in container.decode(stream):
                if frame.time is None:
                    continue
                last_time = max(last_time, float(frame.time))
                second = int(np.floor(frame.time - 0.5 + 1e-6)) if frame.time >= 0.5 else -1
                if second >= 0 and second not in picked:
                    picked[second] = frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as err:
            raise UserError(f"{path}: unreadable video ({err})") from None
        duration = float(container.duration / av.time_base) if container.duration else last_time
    wave = read_audio(audio if audio is not None else path)
    duration = min(duration, len(wave) / SAMPLE_RATE) if audio is None else duration
    windows = int(min(duration + 1e-6, len(picked)) // seconds)
    if windows == 0:
        raise UserError(f"{path}: {duration:.1f} s is shorter than one {seconds}-second window (--seconds)")
    frames = [np.stack([picked[w * seconds + t] for t in range(seconds)]) for w in range(windows)]
    return Decoded(frames, wave, [float(w * seconds) for w in range(windows)], duration)


def _clip_folder(folder: Path, frames: np.ndarray, wave: np.ndarray) -> tuple[tuple[str, ...], str]:
    """Write ``frames (T, H, W, 3)`` as PNGs and ``wave`` as a 16-bit WAV in ``folder``; their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, frame in enumerate(frames):
        paths.append(str(folder / f"{t}.png"))
        Image.fromarray(frame).save(paths[-1])
    audio = folder / "audio.wav"
    sf.write(audio, np.clip(wave, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")
    return tuple(paths), str(audio)


class ClipPreparer:
    """The workspace's mel, extract and shard stages (with the options of their last runs) as one function from
    a window's frames and audio to the decoded clip the trainer's ``collate`` takes."""

    def __init__(self, dataset_dir: Path) -> None:
        from icf.pipeline.ledger import Workspace
        from icf.stages import stage_classes
        from icf.workflow.run import latest_stage

        ws = Workspace(dataset_dir.parent, dataset_dir.name)
        missing = [n for n in ("mel", "extract", "shard") if ws.current(n) is None]
        if missing:
            raise UserError(f"{dataset_dir}: the run's workspace has no {', '.join(missing)} stage record; predicting "
                            "on a video reuses the options the shards were built with")
        classes = stage_classes()
        self.dataset = ws.dataset
        self.mel, self.extract, self.shard = (latest_stage(ws, classes[n]) for n in ("mel", "extract", "shard"))
        self.mel.setup()
        self.extract.setup()

    def __call__(self, uid: str, subset: str, frames: np.ndarray, wave: np.ndarray, scratch: Path) -> dict[str, Any]:
        from icf.data.sample import Sample
        from icf.data.shard_format import decode_sample
        from icf.pipeline.stage import Result

        frame_paths, audio_path = _clip_folder(scratch / uid, frames, wave)
        t = len(frame_paths)
        sample = Sample(uid=uid, dataset=self.dataset, split="test", subset=subset, frame_paths=frame_paths,
                        mask_paths=("",) * t, gt_frames=(False,) * t, audio_path=audio_path, classes=(), n_frames=t)
        try:
            upstream: dict[str, dict[str, Any]] = {"mel": self.mel.process_one(sample, {})}
        except ValueError as err:
            raise UserError(f"window {uid}: {err}") from None
        result: Result = self.extract.process([sample], {uid: upstream})[0]
        if not result.ok:
            raise UserError(f"window {uid}: {result.error}")
        upstream["extract"] = result.outputs
        members = self.shard.process_one(sample, upstream)
        clip = decode_sample(members)
        clip["meta"]["order"] = 0
        return clip


def subset_for(dataset: str, seconds: int) -> str:
    """The subset of ``dataset`` whose clips have ``seconds`` frames; ``UserError`` listing the lengths otherwise."""
    from icf.data.datasets import load_info

    info = load_info(dataset)
    match = [name for name, s in info.subsets.items() if s.n_frames == seconds]
    if not match:
        lengths = sorted({s.n_frames for s in info.subsets.values()})
        raise UserError(f"--seconds {seconds}: {dataset} clips are {' or '.join(map(str, lengths))} seconds long")
    return match[-1]


def windows(decoded: Decoded, seconds: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(w, frames, wave)`` of every window, the audio cut to the window's seconds."""
    for w, (start, frames) in enumerate(zip(decoded.starts, decoded.frames)):
        a = int(round(start * SAMPLE_RATE))
        yield w, frames, decoded.wave[a: a + seconds * SAMPLE_RATE]


def write_overlay_video(path: Path, images: list[np.ndarray], wave: np.ndarray) -> None:
    """``images`` (each ``(H, W, 3)`` uint8, one per second) as an H.264 mp4 at 1 fps with ``wave`` as AAC."""
    import av

    h, w = images[0].shape[:2]
    h, w = h - h % 2, w - w % 2  # yuv420p needs even sides
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=1)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
        for image in images:
            for packet in video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:h, :w]), format="rgb24")):
                container.mux(packet)
        container.mux(video.encode(None))
        samples = wave[: len(images) * SAMPLE_RATE].astype(np.float32)
        frame_size = audio.codec_context.frame_size or 1024
        for i in range(0, len(samples), frame_size):
            frame = av.AudioFrame.from_ndarray(samples[None, i: i + frame_size], format="flt", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            for packet in audio.encode(frame):
                container.mux(packet)
        container.mux(audio.encode(None))


@torch.no_grad()
def predict_video(run: Path, video: Path, out: Path, audio: Path | None = None, seconds: int | None = None,
                  which: str = "auto", allow_other_shards: bool = False) -> dict[str, Any]:
    """Run ``run`` on ``video``; write ``out/overlay.mp4`` and ``out/window-XXX.png``; return a summary."""
    from icf.data.datasets import load_info
    from icf.data.shards import collate
    from icf.eval.visualize import overlay, panel_palette, save_panels
    from icf.train.run import load_trained

    model, shards, doc, model_cfg, _ = load_trained(run, which=which, allow_other_shards=allow_other_shards)
    info = load_info(shards.dataset)
    seconds = seconds or info.max_frames
    subset = subset_for(shards.dataset, seconds)
    decoded = read_video(video, seconds, audio)
    prepare = ClipPreparer(shards.path.parent)
    palette = panel_palette(info.palette, model_cfg.binary)
    device = next(model.parameters()).device
    out.mkdir(parents=True, exist_ok=True)
    images, panels = [], []
    with tempfile.TemporaryDirectory(prefix="icf-video-") as scratch:
        for w, frames, wave in windows(decoded, seconds):
            uid = f"window-{w:03d}"
            clip = prepare(uid, subset, frames, wave, Path(scratch))
            batch = collate([clip], seconds, model_cfg.image_size, len(info.classes))
            pred = model.predict({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}).cpu()
            ids = (pred > 0.5).long() if model_cfg.binary else pred
            panels += save_panels(batch, ids, out, palette, info.classes, model_cfg.binary)
            for t in range(seconds):
                size = (frames.shape[2], frames.shape[1])
                mask = np.asarray(Image.fromarray(ids[0, t].numpy().astype(np.uint8)).resize(size, Image.Resampling.NEAREST))
                images.append(overlay(frames[t], mask, palette))
    write_overlay_video(out / "overlay.mp4", images, decoded.wave)
    return {"run": str(run), "checkpoint": doc["loaded"]["checkpoint"], "video": str(video),
            "audio": str(audio or video), "seconds": seconds, "windows": len(decoded.frames),
            "duration_s": round(decoded.duration, 3), "overlay": str(out / "overlay.mp4"),
            "panels": [str(p) for p in panels]}
