"""Noise at an SNR, frame mixing, and the shuffled-audio control."""

from __future__ import annotations

import math

import pytest
import torch
import torchaudio.functional as AF

from icf.eval.robustness import (
    AudioRotation,
    frame_mix,
    mix_noise,
    noisy_batch,
    white_noise_logmel,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logmel(seed: int = 0, t: int = 5) -> torch.Tensor:
    g = _gen(seed)
    return (torch.rand(t, 96, 64, generator=g) * 3 + 0.01).log()  # log(M + 0.01) of a linear mel spectrum M


def test_wave_noise_has_the_requested_snr() -> None:
    x = torch.sin(torch.linspace(0, 800 * math.pi, 16000)).double()
    for snr in (-5.0, 0.0, 10.0):
        y = mix_noise(x, snr, _gen(), domain="wave")
        measured = 10 * math.log10(float(x.pow(2).sum() / (y - x).pow(2).sum()))
        assert measured == pytest.approx(snr, abs=1e-9)


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_logmel_noise_has_the_requested_snr_in_mel_energy(power: float) -> None:
    x = _logmel().double()
    valid = torch.tensor([True, True, True, False, False])
    y = mix_noise(x, 3.0, _gen(), power=power, valid=valid)
    e = 2.0 / power  # energy = linear mel ** (2 / power)
    sig = (x.exp() - 0.01) ** e
    mixed = (y.exp() - 0.01) ** e
    added = (mixed - sig)[valid]
    assert (added >= -1e-9).all()  # independent noise only adds energy
    assert 10 * math.log10(float(sig[valid].sum() / added.sum())) == pytest.approx(3.0, abs=1e-9)
    assert torch.equal(y[~valid], x[~valid])  # padded frames untouched


def test_lower_snr_means_more_noise_and_is_seeded() -> None:
    x = _logmel()
    dist = [float((mix_noise(x, s, _gen(1)) - x).abs().mean()) for s in (20.0, 10.0, 0.0, -10.0)]
    assert dist == sorted(dist) and dist[0] > 0
    assert torch.equal(mix_noise(x, 5.0, _gen(2)), mix_noise(x, 5.0, _gen(2)))
    assert not torch.equal(mix_noise(x, 5.0, _gen(2)), mix_noise(x, 5.0, _gen(3)))
    with pytest.raises(ValueError, match="domain"):
        mix_noise(x, 5.0, _gen(), domain="spec")


def test_white_noise_mel_matches_the_stft_of_white_noise() -> None:
    # independent path: a white-noise waveform through a VGGish-like STFT (400-sample Hann window,
    # hop 160, 512-point FFT, magnitudes) and the same HTK mel filterbank; average band shapes must agree
    fb = AF.melscale_fbanks(257, 125.0, 7500.0, 64, 16000, norm=None, mel_scale="htk")
    wave = torch.randn(16000 * 20, generator=_gen(4), dtype=torch.float64)
    window = torch.hann_window(400, periodic=True, dtype=torch.float64)
    spec = torch.stft(wave, 512, hop_length=160, win_length=400, window=window, center=False, return_complex=True)
    ref = (spec.abs().T @ fb.double()).mean(0)
    ours = white_noise_logmel((2000, 64), _gen(5)).double().mean(0)
    ratio = (ours / ours.sum()) / (ref / ref.sum())
    assert ratio.sub(1).abs().max() < 0.05


def test_noisy_batch_only_changes_mel() -> None:
    batch = {"mel": torch.stack([_logmel(0), _logmel(1)]), "valid": torch.ones(2, 5, dtype=torch.bool), "clap": torch.ones(2, 5, 4)}
    out = noisy_batch(batch, 0.0, _gen())
    assert out["clap"] is batch["clap"] and not torch.equal(out["mel"], batch["mel"])


def _batch(b: int = 4, t: int = 5) -> dict:
    frames = torch.arange(b * t, dtype=torch.float32).view(b, t, 1, 1, 1).expand(b, t, 3, 2, 2).clone()
    masks = torch.arange(b * t).view(b, t, 1, 1).expand(b, t, 2, 2).clone()
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, 3:] = False  # a padded clip
    return {
        "frames": frames,
        "masks": masks,
        "gt": valid.clone(),
        "valid": valid,
        "clip": frames[:, :, 0, 0, :1].clone(),
        "mel": torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, t, 96, 64).clone(),
        "uid": [f"c{i}" for i in range(b)],
    }


def test_frame_mix_swaps_frames_with_their_masks() -> None:
    batch = _batch()
    out = frame_mix(batch, 0.5, _gen(7))
    src = out["masks"][:, :, 0, 0] // 5  # which clip each frame now comes from
    pos = out["masks"][:, :, 0, 0] % 5
    changed = [i for i in range(4) if (src[i] != i).any()]
    assert len(changed) == 2  # round(0.5 * 4) clips
    assert torch.equal(pos, torch.arange(5).expand(4, 5))  # same time step
    for i in changed:
        moved = src[i] != i
        assert len(set(src[i][moved].tolist())) == 1  # one partner clip
        j = int(src[i][moved][0])
        shared = int((batch["valid"][i] & batch["valid"][j]).sum())
        assert int(moved.sum()) == math.ceil(0.5 * shared)
        assert not moved[~(batch["valid"][i] & batch["valid"][j])].any()  # padding never swapped
    # frames, CLIP embeddings and GT flags travel with the masks; audio stays
    assert torch.equal(out["frames"][:, :, 0, 0, 0].long(), out["masks"][:, :, 0, 0])
    assert torch.equal(out["clip"][:, :, 0].long(), out["masks"][:, :, 0, 0])
    assert torch.equal(out["mel"], batch["mel"])
    assert torch.equal(frame_mix(batch, 0.0, _gen())["frames"], batch["frames"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        frame_mix(batch, 1.5, _gen())


def test_audio_rotation_is_a_stream_derangement() -> None:
    mel = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1)
    rot = AudioRotation()
    got = []
    for lo, hi in ((0, 3), (3, 4), (4, 6)):  # batch sizes 3, 1, 2
        got += rot({"mel": mel[lo:hi]})["mel"].flatten().tolist()
    assert got == [2.0, 0.0, 1.0, 2.0, 3.0, 4.0]  # clip k hears clip k-1; clip 0 hears clip 2
    assert all(g != k for k, g in enumerate(got))
    with pytest.raises(ValueError, match="two clips"):
        AudioRotation()({"mel": mel[:1]})
