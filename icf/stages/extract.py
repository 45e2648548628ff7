"""Stage ``extract``: frozen-encoder embeddings per clip, plus the dataset's text banks.

Per clip (float16, L2-normalised; T = the clip's frames):

* ``clip`` ``(T, Dc)``: CLIP image embedding of each frame,
* ``vclip`` ``(Dv,)`` and ``vclip_seg`` ``(S, Dv)``: VideoCLIP (CLIP4Clip-style substitute, SPEC §4) over
  the clip and over each segment window of ⌈T/2⌉ frames (S4/MS3) or ⌈T/4⌉ (AVSS) (ICF §3.2),
* ``clap`` ``(T, Da)``: CLAP embedding of each one-second audio window k ↔ frame k (windows past the end of
  the audio repeat the last full second, as the mel stage repeats its last patch),
* ``clap_clip`` ``(Da,)``: CLAP embedding of the clip's first T seconds.

``finish`` writes ``text_bank.npz``: the prompt embeddings of ICF §3.2 ("A video/segment/frame of [X]",
"An audio of [X]") for the dataset's object vocabulary, plus the class names (``names``).

Model stage: on Ray each actor loads the towers once. Weights come only from local files; without them
the towers are randomly initialised (seeded), which is announced loudly and recorded as
``weights: random`` in every unit's stats.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from icf.clitools import UserError
from icf.data.io import read_rgb, read_wav
from icf.data.manifests import object_vocabulary
from icf.data.sample import Sample
from icf.encoders import Encoders, EncoderSpec, RandomWeightsWarning
from icf.encoders.videoclip import SEGMENT_DIVISOR, segment_window
from icf.pipeline.stage import FinishContext, Stage, option
from icf.pipeline.store import Output, atomic_write, npz_bytes

TEXT_BANK = "text_bank.npz"


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


class ExtractStage(Stage):
    """CLIP / VideoCLIP / CLAP embeddings per clip and the prompt text banks."""

    name = "extract"
    version = "1"
    uses_model = True

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

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.spec = resolve_spec(self.cfg)

    def config(self) -> dict[str, Any]:
        return {
            "encoders": self.spec.to_dict(),
            "weights_files": {"clip": _fingerprint(self.spec.clip_weights), "clap": _fingerprint(self.spec.clap_weights)},
            "segment_divisor": SEGMENT_DIVISOR,
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

    def setup(self) -> None:
        import torch

        self.enc = _load_quietly(self.spec, device="cuda" if torch.cuda.is_available() else "cpu")

    def embed(self, s: Sample) -> dict[str, np.ndarray]:
        """All embeddings of one clip (raises ``ValueError`` naming the file on bad media)."""
        frames = [read_rgb(p) for p in s.frame_paths]
        sizes = {f.shape for f in frames}
        if len(sizes) > 1:
            raise ValueError(f"{s.frame_paths[0]}: frames of this clip differ in size {sorted(sizes)}")
        clip = self.enc.clip.encode_images(np.stack(frames))  # (T, Dc)
        window = segment_window(s.n_frames, SEGMENT_DIVISOR[s.dataset])
        sr = self.enc.clap.sample_rate
        wave = read_wav(s.audio_path, sr=sr)
        seconds = min(len(wave) // sr, s.n_frames)
        if seconds == 0:
            raise ValueError(f"{s.audio_path}: audio is {len(wave) / sr:.2f} s, shorter than one second")
        per_second = self.enc.clap.encode_audio(wave[: seconds * sr].reshape(seconds, sr)).cpu().numpy()
        per_second = np.concatenate([per_second, np.repeat(per_second[-1:], s.n_frames - seconds, axis=0)])
        whole = self.enc.clap.encode_audio(wave[None, : s.n_frames * sr])[0]
        return {
            "clip": _unit(clip.cpu().numpy()),
            "vclip": _unit(self.enc.videoclip.encode_video(clip).cpu().numpy()),
            "vclip_seg": _unit(self.enc.videoclip.encode_segments(clip, window).cpu().numpy()),
            "clap": _unit(per_second),
            "clap_clip": _unit(whole.cpu().numpy()),
        }

    def process_one(self, sample: Sample, upstream: Mapping[str, Mapping[str, Output]]) -> dict[str, Output]:
        return self.embed(sample)

    def finish(self, ctx: FinishContext) -> dict[str, Any]:
        """Text banks for the dataset's object vocabulary → ``<stage dir>/text_bank.npz``."""
        from icf.encoders import text_bank

        names = object_vocabulary(ctx.dataset)
        bank = text_bank(_load_quietly(self.spec), names)
        atomic_write(ctx.stage_dir / TEXT_BANK, npz_bytes({**bank, "names": np.array(names)}))
        return {"text_bank": TEXT_BANK, "encoders": json.loads(self.spec.to_json()), "classes": len(names)}
