"""Stage ``mel``: the clip's WAV → log-Mel patches in VGGish framing, float16 ``(T, 96, 64)``.

VGGish framing (``vggish_params.py`` / ``mel_features.py``, see FORMATS.md §4): 16 kHz mono, 25 ms
periodic-Hann window (400 samples) every 10 ms (160), 512-point FFT magnitude, 64 HTK-scale mel bands
125–7500 Hz, ``log(mel + 0.01)``, then non-overlapping 0.96 s patches of 96 frames. VGGish frames a
400-sample window with no centring; ``torch.stft`` centres a 400-sample window inside each 512-sample
frame, so the wave is padded by (512 − 400)/2 samples on both sides to put frame k on samples
[160k, 160k + 400) exactly as VGGish does. One patch per video frame (patch k ↔ frame k); when the audio
yields fewer patches than frames the last patch repeats (the official S4/MS3 ``extract_one_log_mel``).
The mel filterbank is torchaudio's (triangles linear in Hz between HTK mel points), not VGGish's own
matrix (triangles linear in mel), a small difference in band shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from icf.data.io import read_wav
from icf.data.sample import Sample
from icf.pipeline.stage import Stage, option
from icf.pipeline.store import Output


class MelStage(Stage):
    """Log-Mel spectrogram patches (VGGish framing), one 0.96 s patch per frame."""

    name = "mel"
    version = "1"

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
        import torch
        import torchaudio

        c = self.cfg
        self._win = round(c.window_s * c.sample_rate)
        self._mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=c.sample_rate,
            n_fft=c.n_fft,
            win_length=self._win,
            hop_length=round(c.hop_s * c.sample_rate),
            f_min=c.f_min,
            f_max=c.f_max,
            n_mels=c.n_mels,
            window_fn=torch.hann_window,  # periodic, as VGGish's periodic_hann
            power=1.0,  # magnitude
            center=False,
            norm=None,
            mel_scale="htk",
        )

    def log_mel(self, wave: np.ndarray) -> np.ndarray:
        """Mono wave ``(N,)`` at ``sample_rate`` → log-Mel ``(frames, n_mels)`` float32, VGGish frames.

        Raises ``ValueError`` when the wave is shorter than one STFT window."""
        import torch

        if len(wave) < self._win:
            raise ValueError(f"{len(wave)} audio samples is shorter than one {self._win}-sample STFT window")

        pad = (self.cfg.n_fft - self._win) // 2
        x = torch.nn.functional.pad(torch.from_numpy(wave), (pad, pad))
        with torch.no_grad():
            mel = self._mel(x)  # (n_mels, frames)
        return torch.log(mel + self.cfg.log_offset).T.contiguous().numpy()

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
