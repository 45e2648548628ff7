"""Stage ``mel``: the clip's WAV → log-Mel patches in VGGish's front end, float16 ``(T, 96, 64)``.

The published VGGish front end (tensorflow/models ``research/audioset/vggish``: ``vggish_params.py``,
``mel_features.py``), reimplemented from its algorithm: 16 kHz mono; frames of 25 ms (400 samples)
every 10 ms (160), no centring, ``1 + (N - 400) // 160`` of them; a periodic Hann window
``0.5 - 0.5 cos(2πn/400)``; the magnitude of a 512-point real FFT (257 bins); VGGish's own mel matrix
(:func:`vggish_mel_matrix`: 64 triangles *linear in mel* between 66 points equally spaced on the HTK mel
scale ``1127 ln(1 + f/700)`` from 125 to 7500 Hz, evaluated at the FFT bins' mel positions, DC bin
zeroed); ``log(mel + 0.01)``; then non-overlapping 0.96 s patches of 96 frames. Everything runs in
float64 as VGGish's numpy code does, and is stored as float16. One patch per video frame (patch k ↔
frame k); when the audio yields fewer patches than frames the last patch repeats (the official S4/MS3
``extract_one_log_mel``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from icf.data.io import read_wav
from icf.data.sample import Sample
from icf.pipeline.stage import Stage, option
from icf.pipeline.store import Output


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale (the one VGGish uses): ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log1p(np.asarray(hz, dtype=np.float64) / 700.0)


def vggish_mel_matrix(n_bins: int, sample_rate: float, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """VGGish's spectrogram → mel weights, ``(n_bins, n_mels)`` float64.

    The FFT bins sit at ``linspace(0, sample_rate / 2, n_bins)`` Hz; band k rises linearly *in mel* from
    edge k to edge k+1 and falls to edge k+2, the ``n_mels + 2`` edges equally spaced in mel between
    ``f_min`` and ``f_max``; weights are the triangle's height at each bin's mel value (no area
    normalisation), and the DC bin gets weight 0 in every band.
    """
    bins = hz_to_mel(np.linspace(0.0, sample_rate / 2.0, n_bins))[:, None]  # (n_bins, 1)
    edges = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    rising = (bins - lower) / (centre - lower)
    falling = (upper - bins) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


class MelStage(Stage):
    """Log-Mel spectrogram patches (VGGish front end), one 0.96 s patch per frame."""

    name = "mel"
    version = "2"  # 2: VGGish's own mel matrix (linear in mel, DC zeroed), float64

    @dataclass(frozen=True)
    class Config:
        sample_rate: int = option(16000, "Resample audio to this rate (Hz).")
        window_s: float = option(0.025, "STFT window length (s).")
        hop_s: float = option(0.010, "STFT hop (s).")
        n_fft: int = option(512, "FFT size.")
        n_mels: int = option(64, "Mel bands.")
        f_min: float = option(125.0, "Lowest mel band edge (Hz).")
        f_max: float = option(7500.0, "Highest mel band edge (Hz).")
        log_offset: float = option(0.01, "log(mel + offset).")
        patch_frames: int = option(96, "STFT frames per patch (0.96 s).")

        def __post_init__(self) -> None:
            """``ValueError`` naming the flag for a setting that cannot give a log-Mel."""
            for name in ("sample_rate", "window_s", "hop_s", "n_fft", "n_mels", "log_offset", "patch_frames"):
                value = getattr(self, name)
                if not value > 0 or value == float("inf"):
                    raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
            if round(self.window_s * self.sample_rate) > self.n_fft:
                raise ValueError(f"--window-s {self.window_s} is {round(self.window_s * self.sample_rate)} samples, "
                                 f"more than --n-fft {self.n_fft}")
            if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
                raise ValueError(f"need 0 <= --f-min < --f-max <= sample_rate/2, got {self.f_min}, {self.f_max}")

    def setup(self) -> None:
        c = self.cfg
        self._win = round(c.window_s * c.sample_rate)
        self._hop = round(c.hop_s * c.sample_rate)
        self._window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(self._win) / self._win)  # periodic Hann
        self._bank = vggish_mel_matrix(c.n_fft // 2 + 1, c.sample_rate, c.n_mels, c.f_min, c.f_max)

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """Mono wave ``(N,)`` at ``sample_rate`` → log-Mel ``(frames, n_mels)`` float32, VGGish frames
        (``frames = 1 + (N - window) // hop``).

        Raises ``ValueError`` when the wave is shorter than one STFT window."""
        if len(wave) < self._win:
            raise ValueError(f"{len(wave)} audio samples is shorter than one {self._win}-sample STFT window")
        frames = np.lib.stride_tricks.sliding_window_view(np.asarray(wave, dtype=np.float64), self._win)[:: self._hop]
        spectrum = np.abs(np.fft.rfft(frames * self._window, self.cfg.n_fft))  # (frames, n_fft // 2 + 1)
        return np.log(spectrum @ self._bank + self.cfg.log_offset).astype(np.float32)

    def patches(self, log_mel: np.ndarray, n_frames: int) -> np.ndarray:
        """``(frames, n_mels)`` → ``(n_frames, patch_frames, n_mels)``; repeats the last patch if short."""
        p = self.cfg.patch_frames
        n = log_mel.shape[0] // p
        if n == 0:
            raise ValueError(f"{log_mel.shape[0]} STFT frames is shorter than one {p}-frame patch")
        x = log_mel[: n * p].reshape(n, p, -1)[:n_frames]
        if len(x) < n_frames:
            x = np.concatenate([x, np.repeat(x[-1:], n_frames - len(x), axis=0)])
        return x

    def process_one(self, sample: Sample, upstream: Mapping[str, Mapping[str, Output]]) -> dict[str, Output]:
        wave = read_wav(sample.audio_path, sr=self.cfg.sample_rate)  # its errors name the file
        try:
            mel = self.patches(self.log_mel(wave), sample.n_frames)
        except ValueError as err:
            raise ValueError(f"{sample.audio_path}: {err}") from None
        return {"mel": mel.astype(np.float16)}
