"""Stage ``extract``: frozen-encoder embeddings per clip, plus the dataset's text banks.

Per clip (float16, L2-normalised; T = the clip's frames):

* ``clip`` ``(T, Dc)``: CLIP image embedding of each frame,
* ``vclip`` ``(Dv,)`` and ``vclip_seg`` ``(S, Dv)``: VideoCLIP (CLIP4Clip-style substitute, Decisions D6) over
  the clip and over each segment window of ⌈T/2⌉ frames (S4/MS3) or ⌈T/4⌉ (AVSS) (ICF §3.2),
* ``clap`` ``(T, Da)``: CLAP embedding of each one-second audio window k ↔ frame k (windows past the end of
  the audio repeat the last full second, as the mel stage repeats its last patch),
* ``clap_clip`` ``(Da,)``: CLAP embedding of the clip's first T seconds,
* ``clap_latent`` ``(T, D_h)``: the CLAP audio tower's embedding of each one-second window *before*
  ``audio_projection``, not normalised (HTS-AT: average-pooled last Swin tokens; DDESeg's audio feature F_a and
  the source of its semantic memory, `icf.stages.bank`).

``finish`` writes ``text_bank.npz``: the prompt embeddings of ICF §3.2 ("A video/segment/frame of [X]",
"An audio of [X]") for the dataset's object vocabulary, plus the class names (``names``).

Batched: ``process`` embeds the frames of all the clips it is given through CLIP in forward passes of
``--batch-frames`` frames and their one-second windows (plus each clip's whole-clip input) through CLAP in
passes of ``--batch-windows``, regardless of clip boundaries; a reader of ``--readers`` threads decodes the
JPEGs and WAVs (and resamples, resizes, pads) up to ``PREFETCH_CLIPS`` clips ahead of the forward passes.
None of the three changes the outputs beyond float16 rounding, so none enters the cache key. A clip whose
media is bad fails alone with its reason; an exception inside a forward pass makes the engine retry each
clip of the call alone.

Model stage: on Ray each actor loads the towers once. Weights come only from local files; without them
the towers are randomly initialised (seeded), which is announced loudly and recorded as
``weights: random`` in every unit's stats.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icf.clitools import UserError
from icf.data.io import read_rgb, read_wav
from icf.data.datasets import load_info, object_vocabulary
from icf.data.sample import DATASETS, Sample
from icf.encoders import Encoders, EncoderSpec, RandomWeightsWarning
from icf.encoders.spec import TINY_CLAP, TINY_CLIP
from icf.encoders.videoclip import segment_window
from icf.pipeline.stage import FinishContext, Inputs, Result, Stage, option
from icf.pipeline.store import atomic_write, npz_bytes

TEXT_BANK = "text_bank.npz"
# How many clips the reader decodes ahead of the one the forward passes consume.
PREFETCH_CLIPS = 8


def resolve_spec(cfg: "ExtractStage.Config") -> EncoderSpec:
    """The EncoderSpec a config names: a preset or JSON file, then the per-field flags on top.

    Weight paths become absolute (workers may run elsewhere) and must exist (``UserError`` otherwise).
    """
    if cfg.encoders == "default":
        spec = EncoderSpec()
    elif cfg.encoders == "tiny":
        spec = EncoderSpec.tiny()
    else:
        path = Path(cfg.encoders).expanduser()
        if not path.is_file():
            raise UserError(f"--encoders {cfg.encoders}: expected 'default', 'tiny' or an EncoderSpec JSON file")
        try:
            spec = EncoderSpec.from_json(path.read_text())
        except ValueError as err:
            raise UserError(f"{path}: not an EncoderSpec JSON file ({err})") from None
    flags = {k: getattr(cfg, k) for k in ("clip_model", "clip_weights", "clap_amodel", "clap_tmodel",
                                           "clap_weights", "clap_text_dir")}
    spec = replace(spec, **{k: v for k, v in flags.items() if v is not None})
    if cfg.encoder_seed is not None:
        spec = replace(spec, seed=cfg.encoder_seed)
    for name in ("clip_weights", "clap_weights", "clap_text_dir"):
        value = getattr(spec, name)
        if value is not None:
            p = Path(value).expanduser().resolve()
            if not p.exists():
                raise UserError(f"--{name.replace('_', '-')} {value}: no such file or folder")
            spec = replace(spec, **{name: str(p)})
    return spec


def _fingerprint(path: str | None) -> list[int] | None:
    """(size, mtime) of a weights file, so replacing the file at the same path changes the cache key."""
    if path is None:
        return None
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _load_quietly(spec: EncoderSpec, device: str = "cpu") -> Encoders:
    """The towers of ``spec``, without repeating on every worker the random-weights warning that
    :meth:`ExtractStage.notices` printed once (the log line stays) or third-party deprecation chatter."""
    from icf.encoders import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
        return load(spec, device=device)


def _unit(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis (float32), then float16 for storage."""
    x = x.astype(np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float16)


@dataclass(frozen=True)
class Decoded:
    """One clip's media, ready for the towers.

    Attributes:
        frames: ``(T, 3, S, S)`` CLIP input (`ClipEncoder.preprocess` of the clip's frames).
        windows: ``(seconds + 1, clip_samples)`` CLAP input (`ClapEncoder.prepare_audio`): the first
            ``seconds = min(audio seconds, T)`` one-second windows, then the clip's first T seconds.
    """

    frames: torch.Tensor
    windows: torch.Tensor


class RowBatcher:
    """Rows of many clips through one tower in forward passes of exactly ``size`` rows (the last one smaller).

    ``add`` queues a clip's rows and runs every full pass; ``flush`` runs the rest and returns all the
    embeddings ``(rows added, D)`` float32 in the order the rows were added.
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], size: int) -> None:
        if size < 1:
            raise ValueError(f"batch size must be >= 1, got {size}")
        self.encode, self.size = encode, size
        self.added = 0
        self._queue: list[torch.Tensor] = []
        self._queued = 0
        self._done: list[np.ndarray] = []

    def add(self, rows: torch.Tensor) -> int:
        """Queue ``rows (n, ...)``; returns the index of its first row in the final output."""
        first = self.added
        self.added += len(rows)
        self._queue.append(rows)
        self._queued += len(rows)
        while self._queued >= self.size:
            self._run(self.size)
        return first

    def flush(self) -> np.ndarray:
        if self._queued:
            self._run(self._queued)
        return np.concatenate(self._done) if self._done else np.zeros((0, 0), np.float32)

    def _run(self, n: int) -> None:
        x = self._queue[0] if len(self._queue) == 1 else torch.cat(self._queue)
        self._done.append(self.encode(x[:n]).float().cpu().numpy())
        rest = x[n:]
        self._queue, self._queued = ([rest] if len(rest) else []), len(rest)


def prefetch(read: Callable[[Sample], Decoded], samples: Sequence[Sample], threads: int,
             ahead: int = PREFETCH_CLIPS) -> Iterator[tuple[Sample, Decoded | ValueError]]:
    """``(sample, read(sample))`` in order, ``read`` running on ``threads`` threads up to ``ahead`` clips early.

    A ``ValueError`` from ``read`` (bad media) is yielded in place of the result; any other exception
    propagates. Leaving the generator early cancels what has not started.
    """
    def safe(s: Sample) -> Decoded | ValueError:
        try:
            return read(s)
        except ValueError as err:
            return err

    todo = iter(samples)
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="extract-reader") as pool:
        queue: deque[tuple[Sample, Future]] = deque((s, pool.submit(safe, s)) for s in _take(todo, max(1, ahead)))
        try:
            while queue:
                s, future = queue.popleft()
                for nxt in _take(todo, 1):
                    queue.append((nxt, pool.submit(safe, nxt)))
                yield s, future.result()
        finally:
            for _, future in queue:
                future.cancel()


def _take(it: Iterator[Sample], n: int) -> list[Sample]:
    out = []
    for _ in range(n):
        nxt = next(it, None)
        if nxt is None:
            break
        out.append(nxt)
    return out


class ExtractStage(Stage):
    """CLIP / VideoCLIP / CLAP embeddings per clip and the prompt text banks."""

    name = "extract"
    version = "2"  # 2: clap_latent
    uses_model = True
    clips_per_call = 256  # a whole unit per process() call, so forward passes span clips

    @dataclass(frozen=True)
    class Config:
        encoders: str = option(
            "default", "'default' (ViT-B-32 + HTSAT-tiny), 'tiny' (tiny test configs) or an EncoderSpec JSON file.")
        clip_model: str | None = option(None, "open_clip model name.")
        clip_weights: str | None = option(None, "Local CLIP checkpoint file.")
        clap_amodel: str | None = option(None, "laion-clap audio model name.")
        clap_tmodel: str | None = option(None, "laion-clap text model ('roberta', 'transformer').")
        clap_weights: str | None = option(None, "Local CLAP checkpoint file.")
        clap_text_dir: str | None = option(None, "Local RoBERTa config/tokenizer folder.")
        encoder_seed: int | None = option(None, "Seed of random-init towers.")
        batch_frames: int = option(256, "Frames per CLIP forward pass, across clips (not in the cache key).")
        batch_windows: int = option(64, "One-second audio windows per CLAP forward pass, across clips (not in the cache key).")
        readers: int = option(2, "Threads per worker decoding JPEG/WAV ahead of the forward passes.")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        for flag in ("batch_frames", "batch_windows", "readers"):
            if getattr(self.cfg, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(self.cfg, flag)}")
        self.spec = resolve_spec(self.cfg)

    def config(self) -> dict[str, Any]:
        return {
            "encoders": self.spec.to_dict(),
            "weights_files": {"clip": _fingerprint(self.spec.clip_weights), "clap": _fingerprint(self.spec.clap_weights)},
            "segment_divisor": {d: load_info(d).segment_divisor for d in DATASETS},
        }

    def stats(self) -> dict[str, Any]:
        summary = self.spec.weights_summary()
        return {"weights": "random" if set(summary.values()) == {"random"} else summary}

    def notices(self) -> list[str]:
        random = [t for t, w in self.spec.weights_summary().items() if w == "random"]
        if not random:
            return []
        flags = " / ".join(f"--{t}-weights" for t in random)
        return [f"extract: {' and '.join(random).upper()} use RANDOM weights (no {flags} given); "
                "their embeddings carry no pretrained semantics"]

    def cpu_hint(self) -> str | None:
        """Full-size towers (anything but the tiny test towers) are slow on a CPU: say so, with the try-out flag."""
        if self.spec.clip_model == TINY_CLIP and self.spec.clap_amodel == TINY_CLAP:
            return None
        return ("extract runs full-size CLIP / CLAP towers without a GPU; for a try-out, `--encoders tiny` (tiny "
                "towers) or `icf towers` (tiny towers trained on your train split) is minutes, not hours")

    def setup(self) -> None:
        self.enc = _load_quietly(self.spec, device="cuda" if torch.cuda.is_available() else "cpu")

    def decode(self, s: Sample) -> Decoded:
        """Read, check and prepare one clip's frames and audio (raises ``ValueError`` naming the file)."""
        frames = [read_rgb(p) for p in s.frame_paths]
        odd = next((t for t, f in enumerate(frames) if f.shape != frames[0].shape), None)
        if odd is not None:
            (h0, w0), (h, w) = frames[0].shape[:2], frames[odd].shape[:2]
            raise ValueError(f"{s.frame_paths[odd]}: frame {odd} is {w}x{h}, but frame 0 of the clip "
                             f"({s.frame_paths[0]}) is {w0}x{h0}")
        sr = self.enc.clap.sample_rate
        wave = read_wav(s.audio_path, sr=sr)
        seconds = min(len(wave) // sr, s.n_frames)
        if seconds == 0:
            raise ValueError(f"{s.audio_path}: audio is {len(wave) / sr:.2f} s, shorter than one second")
        prepare = self.enc.clap.prepare_audio
        windows = torch.cat([prepare(wave[: seconds * sr].reshape(seconds, sr)), prepare(wave[None, : s.n_frames * sr])])
        return Decoded(frames=self.enc.clip.preprocess(np.stack(frames)), windows=windows)

    def process(self, samples: Sequence[Sample], inputs: Inputs) -> list[Result]:
        """All embeddings of every clip of ``samples``: decoded ahead, embedded in cross-clip batches."""
        images = RowBatcher(self.enc.clip.encode_preprocessed, self.cfg.batch_frames)
        audio = RowBatcher(self.enc.clap.encode_prepared_latent, self.cfg.batch_windows)
        rows: dict[str, tuple[int, int, int]] = {}  # uid → first frame row, first window row, window rows
        failed: dict[str, str] = {}
        for s, item in prefetch(self.decode, samples, self.cfg.readers):
            if isinstance(item, ValueError):
                failed[s.uid] = str(item)
            else:
                rows[s.uid] = (images.add(item.frames), audio.add(item.windows), len(item.windows))
        frame_emb, window_emb = images.flush(), audio.flush()
        results = []
        for s in samples:
            if s.uid in failed:
                results.append(Result.failed(s.uid, failed[s.uid]))
                continue
            f0, a0, n = rows[s.uid]
            results.append(Result.success(s.uid, **self.outputs(s, frame_emb[f0 : f0 + s.n_frames], window_emb[a0 : a0 + n])))
        return results

    def outputs(self, s: Sample, clip: np.ndarray, windows: np.ndarray) -> dict[str, np.ndarray]:
        """A clip's stored outputs from its CLIP frame rows ``(T, Dc)`` and CLAP rows ``(seconds + 1, Da + D_h)``
        (`ClapEncoder.encode_prepared_latent`: projected embedding, then the latent)."""
        da = self.enc.clap.dim
        per_second, whole = windows[:-1], windows[-1, :da]
        per_second = np.concatenate([per_second, np.repeat(per_second[-1:], s.n_frames - len(per_second), axis=0)])
        frames = torch.from_numpy(clip)
        window = segment_window(s.n_frames, load_info(s.dataset).segment_divisor)
        return {
            "clip": _unit(clip),
            "vclip": _unit(self.enc.videoclip.encode_video(frames).numpy()),
            "vclip_seg": _unit(self.enc.videoclip.encode_segments(frames, window).numpy()),
            "clap": _unit(per_second[:, :da]),
            "clap_clip": _unit(whole),
            "clap_latent": per_second[:, da:].astype(np.float16),
        }

    @classmethod
    def finish_problem(cls, dataset_dir: Path, cache_key: str) -> str | None:
        """Whether this key's ``text_bank.npz`` is on disk and a whole zip (a deleted or truncated bank makes
        ``stage all`` write it again)."""
        path = dataset_dir / cls.name / cache_key / TEXT_BANK
        if not path.is_file():
            return f"{path}: missing file"
        if not zipfile.is_zipfile(path):
            return f"{path}: damaged (not a whole .npz archive)"
        return None

    def finish(self, ctx: FinishContext) -> dict[str, Any]:
        """Text banks for the dataset's object vocabulary → ``<stage dir>/text_bank.npz``."""
        from icf.encoders import text_bank

        names = object_vocabulary(ctx.dataset)
        bank = text_bank(_load_quietly(self.spec), names)
        atomic_write(ctx.stage_dir / TEXT_BANK, npz_bytes({**bank, "names": np.array(names)}))
        return {"text_bank": TEXT_BANK, "encoders": json.loads(self.spec.to_json()), "classes": len(names)}
