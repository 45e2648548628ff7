"""Robustness settings of the paper (Fig. 5 r^a, r^v; supplement note 5; QDFormer Fig. 7) and the audio
control used to show that a model uses its audio.

* :func:`mix_noise` — background noise at a given SNR. The trainer and evaluator only see the cached
  log-Mel (``mel``, VGGish front end: ``log(M + 0.01)`` of mel-weighted STFT **magnitudes**), so noise is
  mixed in the linear mel domain: with M_s = exp(L) − 0.01 and a white-noise mel spectrum M_n,
  ``M_mix = (M_s^(2/p) + g²·M_n^(2/p))^(p/2)`` where p is the spectrogram power (1 = magnitude, VGGish;
  2 = power). For a power spectrogram this is exact in expectation for additive independent noise
  (E|S + N|² = |S|² + E|N|², and the mel weighting is linear in power); for VGGish magnitudes it is exact
  per STFT bin and approximate after the mel weighting of magnitudes. The gain g sets
  ``10·log10(Σ M_s^(2/p) / Σ g²·M_n^(2/p)) = snr_db`` per clip over its real frames. The noise mel
  spectrum is that of white Gaussian noise (complex-Gaussian STFT bins → Rayleigh magnitudes → the
  VGGish mel filterbank, HTK, 125–7500 Hz); QDFormer mixes AudioSet recordings, which are not available
  offline. ``domain="wave"`` mixes white noise into a waveform exactly (for callers that have audio).
  The cached CLAP embeddings cannot be re-noised; at evaluation the model's audio path is the mel
  encoder (MIT, the only CLAP consumer, is training-only), so the noise reaches every audio input used.
* :func:`frame_mix` — a fraction ``p`` of the clips in a batch (QDFormer/ICF: 1/4) get about half of their
  real frames replaced by the same-position frames of another clip of the batch. The frame's mask, GT
  flag and CLIP embedding travel with it (the GT describes the pixels shown); the audio stays.
* :class:`AudioRotation` — the clip-shuffled audio control: every clip gets the audio (``mel``,
  ``clap``, ``clap_clip``, ``clap_latent``) of the clip before it in evaluation order, a derangement of the stream that
  does not depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torchaudio.functional as AF

from icf.data.shard_format import AUDIO_KEYS, FRAME_KEYS

LOG_OFFSET = 0.01  # VGGish log(mel + 0.01)
SAMPLE_RATE = 16000
N_FFT = 512  # VGGish: next power of two above the 400-sample window
MEL_LOW_HZ, MEL_HIGH_HZ = 125.0, 7500.0
NOISABLE_KEYS = ("mel",)  # the audio keys `noisy_batch` can reach; the CLAP embeddings are cached


def snr_refusal(method: str, audio_keys: tuple[str, ...]) -> str | None:
    """Why ``--snr-db`` cannot test ``method`` (none of its ``audio_keys`` is re-noisable here), naming the fix; or None."""
    if set(audio_keys) & set(NOISABLE_KEYS):
        return None
    return (f"--snr-db: method {method} hears only cached embeddings ({', '.join(audio_keys)}), which the log-Mel noise "
            "cannot reach; the fix is shards re-extracted from noisy waveforms (white noise at the SNR mixed into the "
            "wave before the CLAP tower, its own extract cache key and shard tag), which icf does not build yet")


def white_noise_logmel(shape: tuple[int, ...], generator: torch.Generator, power: float = 1.0) -> torch.Tensor:
    """Linear mel spectrum ``(..., F, M)`` of white Gaussian noise through the VGGish front end.

    STFT bins of white noise are independent complex Gaussians; their magnitudes (``**power``) are
    weighted by the HTK mel filterbank (``n_mels = shape[-1]``). Scale is arbitrary (set by the SNR).
    """
    n_mels = shape[-1]
    fb = AF.melscale_fbanks(N_FFT // 2 + 1, MEL_LOW_HZ, MEL_HIGH_HZ, n_mels, SAMPLE_RATE, norm=None, mel_scale="htk")
    re = torch.randn(*shape[:-1], fb.shape[0], generator=generator)
    im = torch.randn(*shape[:-1], fb.shape[0], generator=generator)
    mag = torch.sqrt(re * re + im * im) ** power
    return mag @ fb


def mix_noise(
    x: torch.Tensor,
    snr_db: float,
    generator: torch.Generator,
    domain: str = "logmel",
    power: float = 1.0,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mix white background noise into one clip's audio at ``snr_db``.

    Args:
        x: ``domain="logmel"``: ``(T, F, M)`` log-Mel patches (one per frame); ``domain="wave"``: ``(N,)``.
        snr_db: signal-to-noise ratio in dB (signal energy / noise energy over the clip).
        generator: seeded RNG for the noise.
        power: spectrogram power of the log-Mel front end (1 = magnitude, VGGish).
        valid: ``(T,)`` bool, real frames (padding is neither measured nor changed); default all.
    Returns:
        the noisy audio, same shape and dtype as ``x``.
    """
    scale = 10.0 ** (-snr_db / 10.0)
    if domain == "wave":
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        gain2 = x.double().pow(2).sum() * scale / noise.pow(2).sum()
        return (x.double() + gain2.sqrt() * noise).to(x.dtype)
    if domain != "logmel":
        raise ValueError(f"domain must be 'logmel' or 'wave', got {domain!r}")
    if x.dim() != 3:
        raise ValueError(f"expected log-Mel patches (T, F, M), got shape {tuple(x.shape)}")
    valid = torch.ones(x.shape[0], dtype=torch.bool) if valid is None else valid.bool().cpu()
    energy_exp = 2.0 / power
    sig = (x.double().exp() - LOG_OFFSET).clamp_min(0) ** energy_exp  # (T, F, M) energy
    noise = white_noise_logmel(tuple(x.shape), generator, power).double() ** energy_exp
    gain2 = sig[valid].sum() * scale / noise[valid].sum().clamp_min(1e-30)
    mixed = ((sig + gain2 * noise) ** (1.0 / energy_exp) + LOG_OFFSET).log()
    return torch.where(valid[:, None, None], mixed, x.double()).to(x.dtype)


def noisy_batch(batch: dict, snr_db: float, generator: torch.Generator, power: float = 1.0) -> dict:
    """A copy of ``batch`` whose ``mel (B, T, 96, 64)`` carries background noise at ``snr_db`` per clip."""
    mel = torch.stack(
        [mix_noise(m, snr_db, generator, power=power, valid=v) for m, v in zip(batch["mel"], batch["valid"])]
    )
    return {**batch, "mel": mel}


def frame_mix(batch: dict, p: float, generator: torch.Generator, frame_fraction: float = 0.5) -> dict:
    """Swap frames between clips (the paper's r^v): a copy of ``batch`` where ``round(p·B)`` clips have
    ``ceil(frame_fraction · n)`` of their ``n`` shared real frames taken from another clip of the batch.

    Frame-wise visual keys (``frames (B,T,3,H,W)``, ``masks (B,T,H,W)``, ``gt (B,T)``, ``clip (B,T,D)``)
    move together; audio keys stay. ``uid`` is unchanged. Needs B ≥ 2 when any clip is selected.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"frame-mix fraction must lie in [0, 1], got {p}")
    b = batch["frames"].shape[0]
    n_sel = int(round(p * b))
    if n_sel == 0:
        return dict(batch)
    if b < 2:
        raise ValueError("frame mixing needs at least two clips per batch")
    out = {k: batch[k].clone() for k in FRAME_KEYS if k in batch}
    selected = torch.randperm(b, generator=generator)[:n_sel]
    for i in selected.tolist():
        j = (i + 1 + int(torch.randint(b - 1, (1,), generator=generator))) % b  # any clip but i
        shared = (batch["valid"][i] & batch["valid"][j]).nonzero().flatten()
        k = math.ceil(frame_fraction * len(shared))
        ts = shared[torch.randperm(len(shared), generator=generator)[:k]]
        for key, value in out.items():
            value[i, ts] = batch[key][j, ts]
    return {**batch, **out}


@dataclass
class AudioRotation:
    """Stateful audio control: each clip receives the audio of the previous clip of the stream.

    The first clip of the stream receives the audio of the last clip of the first batch, so the first
    batch needs at least two clips; afterwards any batch size works (one clip is carried over).
    """

    carry: dict[str, torch.Tensor] | None = field(default=None)

    def __call__(self, batch: dict) -> dict:
        """A copy of ``batch`` with its :data:`AUDIO_KEYS` rotated by one clip across the stream."""
        keys = [k for k in AUDIO_KEYS if k in batch]
        b = batch[keys[0]].shape[0]
        if self.carry is None and b < 2:
            raise ValueError("shuffled-audio evaluation needs at least two clips in the first batch")
        out = {}
        for k in keys:
            prev = self.carry[k] if self.carry is not None else batch[k][-1:]
            out[k] = torch.cat([prev, batch[k][:-1]])
        self.carry = {k: batch[k][-1:].clone() for k in keys}
        return {**batch, **out}
