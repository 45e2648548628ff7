"""Negative audio: does a model segment what it hears, or whatever is visible?

AVS models tend to segment the visually salient object whatever the audio says (Li et al., "Do
Audio-Visual Segmentation Models Truly Segment Sounding Objects?", 2025: AVSBench-Robust with silence,
ambient noise and off-screen sound as negatives). A negative clip keeps its frames, gets audio in which
no visible object sounds, and its true target is empty (all background) on every real frame.

Kinds (:data:`NEGATIVE_KINDS`):

* ``silence`` — digital silence: a waveform of zeros, as long as the clip.
* ``noise`` — ambient noise without a sounding object: **pink noise** (power ∝ 1/f, the usual model of
  room/traffic/wind ambience) at :data:`NOISE_DBFS` = −30 dBFS RMS. On the synthetic data that is about
  10 dB below one source (0.15 × [0.6, 1] × unit RMS ≈ −16 to −21 dBFS) and 6.5 dB above the generator's
  white-noise floor (−36.5 dBFS at its default 20 dB SNR), i.e. clearly audible, yet carrying no class
  tone. Each clip gets one of :data:`NOISE_BANK` seeded noise waveforms (chosen by seed and uid).
* ``offscreen`` — the audio of another clip of the same split whose sounding classes are not visible in
  this one (see :func:`assign_donors` for the rule).

Every audio input reaches the model: silence and noise are **waveforms**, turned into every key of
:data:`icf.data.shard_format.AUDIO_KEYS` by the project's own front ends (:class:`AudioFrontEnd`): the
log-Mel of the mel stage (VGGish framing, stored as float16) and the CLAP embeddings of the extract stage
(per-second windows and the whole clip, L2-normalised, float16) through the frozen CLAP audio tower of
the shards' encoder spec. So ``clap`` / ``clap_clip`` are not zeroed but exactly what the extract stage
would have cached for that audio. Off-screen negatives take every audio key of the donor together.
A batch holding an audio key that no front end produces is refused (:func:`check_audio_keys`), so a
new audio input cannot silently keep the real audio.

Off-screen donors (:func:`assign_donors`): candidates are the other clips of the split with the same
number of frames (so the donor's cached embeddings are exactly what the target's length would give)
that sound at all, and none of whose sounding classes is visible in the target; one is drawn with
``numpy.random.default_rng([seed, crc32(uid)])`` from the candidates sorted by uid, so the choice depends
only on the seed, the clip and the split, not on batching, shard order or ``--limit``. What is visible
and what sounds comes from a class catalog:

* synthetic data (:func:`synthetic_classes`, from the generator's clip plans): visible = every object
  on screen, silent distractors included; sounding = every source heard, off-screen ones included.
* annotations (:func:`annotated_classes`, any shards): visible = the labelled sounding classes plus the
  classes in the GT masks; sounding = the labelled classes. Real annotations name neither silent
  visible objects nor off-screen sounds, so this rule is weaker; MS3 shards carry no class labels at all,
  and offscreen is refused there unless a synthetic catalog is given.

Clips without a valid donor are left out of the off-screen evaluation (counted as ``skipped``).

Training (:func:`training_negatives`, ``train.negative_fraction``): in each batch a seeded, stochastically
rounded ``P · B`` clips get a silence or noise negative and an empty target. Off-screen audio is not used
in training: the annotations do not say which silent objects are visible, so a wrong donor would teach
the model to ignore a sound whose object is on screen.
"""

from __future__ import annotations

import io
import json
import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from icf.clitools import UserError
from icf.data.shard_format import AUDIO_KEYS

if TYPE_CHECKING:
    from icf.config import TrainConfig
    from icf.data.shards import ShardSet
    from icf.encoders.clap import ClapEncoder

NEGATIVE_KINDS = ("silence", "noise", "offscreen")
TRAIN_KINDS = ("silence", "noise")
NOISE_DBFS = -30.0
NOISE_BANK = 16
Batch = dict[str, Any]
Audio = dict[str, torch.Tensor]  # one clip: mel (T, 96, 64), clap (T, Da), clap_clip (Da,), clap_latent (T, D_h)


# ----------------------------------------------------------------------------- waveforms


def pink_noise(n: int, rng: np.random.Generator, dbfs: float = NOISE_DBFS) -> np.ndarray:
    """``(n,)`` float32 pink noise (power spectral density ∝ 1/f, no DC) scaled to ``dbfs`` RMS."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return (x * (10.0 ** (dbfs / 20.0)) / np.sqrt(np.mean(x**2))).astype(np.float32)


def negative_wave(kind: str, seconds: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """The waveform of a ``silence`` or ``noise`` negative, ``(seconds · sample_rate,)`` float32."""
    n = seconds * sample_rate
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "noise":
        return pink_noise(n, rng)
    raise ValueError(f"no waveform for negative kind {kind!r}; expected silence or noise")


# ----------------------------------------------------------------------------- front ends


def _float16(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """As stored in the shards (float16) and read back by the loader (float32)."""
    return torch.as_tensor(np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    """L2-normalise the last axis, as the extract stage does before storing."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class AudioFrontEnd:
    """A waveform at the dataset's sample rate → every audio key of a clip, as the stages compute them.

    ``mel``: :class:`icf.stages.mel.MelStage` in its default configuration (VGGish framing, the one that
    gives the models' ``(T, 96, 64)`` input) → ``(T, 96, 64)``. ``clap`` / ``clap_clip``:
    the extract stage's recipe (resample to the tower's rate, one-second windows → ``(T, Da)``, the first
    T seconds → ``(Da,)``, L2-normalised) through ``clap``; without a tower these keys cannot be made.
    """

    sample_rate: int = 16000
    clap: ClapEncoder | None = None
    _mel: Any = field(default=None, init=False, repr=False)

    def __call__(self, wave: np.ndarray, n_frames: int) -> Audio:
        """``wave (n_frames · sample_rate,)`` → ``mel (T, 96, 64)``; with a tower ``clap (T, Da)``, ``clap_clip (Da,)``,
        ``clap_latent (T, D_h)``."""
        import torchaudio.functional as AF

        if self._mel is None:
            from icf.stages.mel import MelStage

            self._mel = MelStage()
            self._mel.setup()
        mel_wave = wave if self._mel.cfg.sample_rate == self.sample_rate else \
            AF.resample(torch.from_numpy(wave), self.sample_rate, self._mel.cfg.sample_rate).numpy()
        out = {"mel": _float16(self._mel.patches(self._mel.log_mel(mel_wave), n_frames))}
        if self.clap is not None:
            sr = self.clap.sample_rate
            x = AF.resample(torch.from_numpy(wave), self.sample_rate, sr).numpy() if sr != self.sample_rate else wave
            rows = self.clap.prepare_audio(x[: n_frames * sr].reshape(n_frames, sr))
            both = self.clap.encode_prepared_latent(rows).cpu().numpy()
            whole = self.clap.encode_audio(x[None, : n_frames * sr])[0].cpu().numpy()
            da = self.clap.dim
            out["clap"], out["clap_clip"] = _float16(_unit(both[:, :da])), _float16(_unit(whole))
            out["clap_latent"] = _float16(both[:, da:])
        return out


def front_end_for(shards: ShardSet, device: torch.device | str = "cpu") -> AudioFrontEnd:
    """The front end of ``shards``: its dataset's sample rate and the CLAP tower of its encoder spec
    (the trainer's cached frozen towers, the same instance the model uses)."""
    from icf.data.datasets import load_info
    from icf.encoders import EncoderSpec
    from icf.methods.icf import frozen_towers

    towers = frozen_towers(EncoderSpec.from_dict(shards.encoders), str(device))
    return AudioFrontEnd(load_info(shards.dataset).sample_rate, towers.clap)


def check_audio_keys(batch: Batch, produced: Iterable[str]) -> None:
    """Refuse a batch holding an audio key (:data:`AUDIO_KEYS`) that the negative does not replace."""
    missing = [k for k in AUDIO_KEYS if k in batch and k not in set(produced)]
    if missing:
        raise UserError(f"negative audio cannot replace {', '.join(missing)} (no front end for it); "
                        "the model would still hear the real audio")


# ----------------------------------------------------------------------------- class catalogs


@dataclass(frozen=True)
class ClipClasses:
    """What a clip shows and what it sounds like (class names)."""

    visible: frozenset[str]
    sounding: frozenset[str]


def synthetic_classes(layout: str, clips: int, seed: int, classes: int = 8) -> dict[str, ClipClasses]:
    """Exact catalog of a tree written by ``icf synth`` with these arguments, from its clip plans."""
    from icf.data.synth import plan_clips

    out = {}
    for p in plan_clips(layout, clips, seed, classes):
        heard = [o.name for o in p.objects if any(o.sounding)] + [name for name, flags in p.offscreen if any(flags)]
        out[p.uid] = ClipClasses(frozenset(o.name for o in p.objects), frozenset(heard))
    return out


def annotated_classes(meta: Mapping[str, Any], mask_ids: Iterable[int], class_names: Sequence[str]) -> ClipClasses:
    """Catalog entry from a shard sample: sounding = the labelled classes; visible = those plus the
    classes in its GT masks (AVSS ids → names; binary masks add nothing)."""
    labelled = frozenset(meta.get("classes", []))
    in_masks = frozenset(class_names[i] for i in mask_ids if 0 < i < len(class_names))
    return ClipClasses(labelled | in_masks, labelled)


# ----------------------------------------------------------------------------- off-screen donors


@dataclass(frozen=True)
class PoolClip:
    """One clip of the donor pool: its length, classes and audio (every audio key, unpadded)."""

    uid: str
    n_frames: int
    classes: ClipClasses
    audio: Audio


def _clip_rng(seed: int, uid: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(uid.encode())])


def assign_donors(clips: Sequence[PoolClip], seed: int) -> dict[str, str | None]:
    """For every clip, the uid of its off-screen donor (None when no clip qualifies).

    A donor is another clip with the same frame count, at least one sounding class, and no sounding class
    among the target's visible classes; one is drawn uniformly from them (sorted by uid) by
    ``default_rng([seed, crc32(uid)])``, so the choice does not depend on the order of ``clips``.
    """
    out: dict[str, str | None] = {}
    for target in clips:
        cands = sorted(c.uid for c in clips if c.uid != target.uid and c.n_frames == target.n_frames
                 and c.classes.sounding and not (c.classes.sounding & target.classes.visible))
        out[target.uid] = cands[int(_clip_rng(seed, target.uid).integers(len(cands)))] if cands else None
    return out


def _npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))


def _mask_ids(raw: Mapping[str, Any], gt: np.ndarray) -> set[int]:
    from PIL import Image

    ids: set[int] = set()
    for t in np.flatnonzero(gt):
        ids.update(np.unique(np.asarray(Image.open(io.BytesIO(raw[f"m{t}.png"])))).tolist())
    return ids


def read_pool(shards: ShardSet, split: str, catalog: Mapping[str, ClipClasses] | None = None) -> list[PoolClip]:
    """Every clip of ``split`` as a :class:`PoolClip`, reading only meta, audio and (for the annotation
    catalog) mask members. ``catalog`` (e.g. :func:`synthetic_classes`) overrides the annotations and
    must name every clip."""
    import webdataset as wds

    from icf.data.datasets import load_info

    names = load_info(shards.dataset).classes
    urls = [e["url"] for e in shards.shard_list(split)]
    pool = []
    for raw in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        meta = json.loads(raw["meta.json"])
        uid = meta["uid"]
        if catalog is not None:
            if uid not in catalog:
                raise UserError(f"{shards.path}: clip {uid} is not in the synthetic plan (wrong --synth arguments?)")
            classes = catalog[uid]
        else:
            semantic = not load_info(shards.dataset).binary
            ids = _mask_ids(raw, np.load(io.BytesIO(raw["gt.npy"]))) if semantic else set()
            classes = annotated_classes(meta, ids, names)
        audio = {k: _npy(raw[f"{k}.npy"]) for k in AUDIO_KEYS if f"{k}.npy" in raw}
        pool.append(PoolClip(uid, int(meta["n_frames"]), classes, audio))
    if catalog is None and not any(c.classes.sounding for c in pool):
        raise UserError(f"{shards.path}: the {split} clips carry no class labels ({shards.dataset}), so no "
                        "off-screen donor can be chosen; pass --synth for synthetic shards")
    return pool


# ----------------------------------------------------------------------------- negative batches


@dataclass
class NegativeAudio:
    """Audio of negative clips: ``audio(kind, uid, n_frames, rng)`` → the clip's audio keys or None.

    Silence and noise come from ``front_end`` (cached per frame count and noise index); off-screen audio
    from the donor pool (``donors``: uid → donor uid, ``pool``: uid → :class:`PoolClip`).
    """

    front_end: AudioFrontEnd
    seed: int = 0
    pool: dict[str, PoolClip] = field(default_factory=dict)
    donors: dict[str, str | None] = field(default_factory=dict)
    _cache: dict[tuple[str, int, int], Audio] = field(default_factory=dict, init=False, repr=False)

    def audio(self, kind: str, uid: str, n_frames: int, rng: np.random.Generator | None = None) -> Audio | None:
        """The negative audio of one clip (``rng`` picks the noise waveform; default: seed and uid)."""
        if kind == "offscreen":
            donor = self.donors.get(uid)
            return None if donor is None else self.pool[donor].audio
        rng = rng or _clip_rng(self.seed, uid)
        index = int(rng.integers(NOISE_BANK)) if kind == "noise" else 0
        key = (kind, n_frames, index)
        if key not in self._cache:
            wave = negative_wave(kind, n_frames, self.front_end.sample_rate, np.random.default_rng([self.seed, index]))
            self._cache[key] = self.front_end(wave, n_frames)
        return self._cache[key]


def offscreen_source(shards: ShardSet, split: str, front_end: AudioFrontEnd, seed: int = 0,
                     catalog: Mapping[str, ClipClasses] | None = None) -> NegativeAudio:
    """A :class:`NegativeAudio` whose donor pool is ``split`` of ``shards``."""
    pool = read_pool(shards, split, catalog)
    return NegativeAudio(front_end, seed, {c.uid: c for c in pool}, assign_donors(pool, seed))


def take(batch: Batch, idx: Sequence[int]) -> Batch:
    """The clips ``idx`` of ``batch`` (tensors and per-clip lists indexed along the clip axis)."""
    b = len(batch["uid"])
    index = torch.as_tensor(list(idx), dtype=torch.long)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b:
            out[k] = v[index]
        elif isinstance(v, list) and len(v) == b:
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v
    return out


def with_audio(batch: Batch, audio: Mapping[int, Audio]) -> Batch:
    """A copy of ``batch`` where each clip ``i`` of ``audio`` has that audio in every audio key (padding stays
    zero); the target is unchanged. Refuses an audio key the clip's audio does not replace."""
    out = {k: batch[k].clone() for k in AUDIO_KEYS if k in batch}
    for i, clip in audio.items():
        check_audio_keys(batch, clip)
        for k, v in clip.items():
            if k not in out:
                continue
            if v.shape == out[k].shape[1:]:  # per-clip (D,), or per-frame with T = T_max
                out[k][i] = v.to(out[k].dtype)
            elif v.shape[1:] != out[k].shape[2:] or v.shape[0] > out[k].shape[1]:
                raise UserError(f"negative {k} has shape {tuple(v.shape)}, the batch holds {tuple(out[k].shape[1:])} "
                                "per clip (shards made with another front-end configuration?)")
            else:  # per-frame (T, ...) into (T_max, ...): zero padding as the loader's
                out[k][i] = 0
                out[k][i, : v.shape[0]] = v.to(out[k].dtype)
    return {**batch, **out}


def with_negatives(batch: Batch, audio: Mapping[int, Audio]) -> Batch:
    """A copy of ``batch`` where each clip ``i`` of ``audio`` has that audio (`with_audio`) and an empty target:
    all-background ``masks``, no ``labels``, and ``gt`` = ``valid`` (the empty target is known on every real frame)."""
    if not audio:
        return dict(batch)
    batch = with_audio(batch, audio)
    out = {k: batch[k].clone() for k in ("masks", "gt", "labels") if k in batch}
    for i in audio:
        out["masks"][i] = 0
        out["gt"][i] = batch["valid"][i]
        if "labels" in out:
            out["labels"][i] = 0
    return {**batch, **out}


def negative_batch(batch: Batch, source: NegativeAudio, kind: str) -> Batch:
    """Every clip of ``batch`` as a ``kind`` negative; clips without negative audio (off-screen clips with
    no donor) are dropped, so the result may hold fewer clips (or none)."""
    if kind not in NEGATIVE_KINDS:
        raise ValueError(f"negative kind must be one of {', '.join(NEGATIVE_KINDS)}, got {kind!r}")
    n_frames = batch["valid"].sum(1).tolist()
    found = {i: source.audio(kind, uid, int(n)) for i, (uid, n) in enumerate(zip(batch["uid"], n_frames))}
    keep = [i for i, a in found.items() if a is not None]
    negative = with_negatives(batch, {i: found[i] for i in keep})
    return take(negative, keep) if len(keep) < len(found) else negative


@dataclass(frozen=True)
class Negative:
    """One negative-audio eval setting, a batch transform: ``Negative(kind, source)(batch)``."""

    kind: str
    source: NegativeAudio

    def __call__(self, batch: Batch) -> Batch:
        """:func:`negative_batch` of ``batch`` (off-screen clips without a donor are dropped)."""
        return negative_batch(batch, self.source, self.kind)


def build_negative(kind: str, shards: ShardSet, split: str, device: torch.device | str = "cpu", seed: int = 0,
                   catalog: Mapping[str, ClipClasses] | None = None) -> Negative:
    """The ``kind`` setting for ``split`` of ``shards`` (off-screen: donors from that split; ``catalog``
    as in :func:`read_pool`)."""
    if kind not in NEGATIVE_KINDS:
        raise UserError(f"--negative must be one of {', '.join(NEGATIVE_KINDS)}, got {kind!r}")
    front_end = front_end_for(shards, device)
    if kind == "offscreen":
        return Negative(kind, offscreen_source(shards, split, front_end, seed, catalog))
    return Negative(kind, NegativeAudio(front_end, seed))


def choose_negatives(b: int, fraction: float, generator: torch.Generator) -> list[int]:
    """The clips of a batch of ``b`` that become negatives: ``floor(fraction·b + u)`` of them, u ~ U[0, 1)
    (stochastic rounding: the expected share is exactly ``fraction``), drawn without replacement."""
    u = float(torch.rand((), generator=generator))
    n = min(b, int(math.floor(fraction * b + u)))
    return sorted(torch.randperm(b, generator=generator)[:n].tolist())


def mix_negatives(batch: Batch, fraction: float, source: NegativeAudio, generator: torch.Generator) -> Batch:
    """A copy of ``batch`` whose :func:`choose_negatives` clips get a silence or noise negative (kind and
    noise waveform drawn from ``generator``) and an empty target."""
    chosen = choose_negatives(len(batch["uid"]), fraction, generator)
    n_frames = batch["valid"].sum(1).tolist()
    audio = {}
    for i in chosen:
        kind = TRAIN_KINDS[int(torch.randint(len(TRAIN_KINDS), (1,), generator=generator))]
        rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator)))
        audio[i] = source.audio(kind, batch["uid"][i], int(n_frames[i]), rng)
    return with_negatives(batch, audio)


def training_negatives(
    cfg: TrainConfig, shards: ShardSet, device: torch.device | str = "cpu"
) -> Callable[[Batch, int], Batch]:
    """``fn(batch, step)`` for the trainer's loop: :func:`mix_negatives` with ``cfg.negative_fraction``,
    seeded by ``(cfg.seed, step)`` (a resumed run draws the same negatives); the identity when the
    fraction is 0 (nothing is loaded)."""
    if not cfg.negative_fraction:
        return lambda batch, step: batch
    source = NegativeAudio(front_end_for(shards, device), cfg.seed)

    def apply(batch: Batch, step: int) -> Batch:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        return mix_negatives(batch, cfg.negative_fraction, source, gen)

    return apply
