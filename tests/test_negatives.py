"""Negative audio (icf.augment.negatives): FPR arithmetic, the audio-blind oracle, determinism, off-screen
donors, the training option, and ``icf eval --negative``."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import signal
from typer.testing import CliRunner

import icf.augment.negatives as negatives
from icf.cli import app
from icf.clitools import UserError
from icf.config import TrainConfig, apply_overrides, preset
from icf.data.shards import ShardSet, ShardStream, make_loader
from icf.data.synth import plan_clips, render_frame, select_classes, signatures
from icf.data.datasets import object_vocabulary
from icf.eval.baselines import visible_objects
from icf.eval.evaluate import evaluate
from icf.eval.metrics import FalsePositiveMetrics, negative_score, positive_j
from icf.augment.negatives import (
    NOISE_DBFS,
    AudioFrontEnd,
    ClipClasses,
    Negative,
    NegativeAudio,
    PoolClip,
    assign_donors,
    build_negative,
    choose_negatives,
    mix_negatives,
    negative_batch,
    pink_noise,
    read_pool,
    synthetic_classes,
)
from icf.methods.icf import frozen_towers
from icf.train.logs import read_metrics
from icf.train.run import RunSpec
from icf.train.trainer import train
from icf.encoders import EncoderSpec

LOG_SILENCE = math.log(0.01)  # the mel stage's log(mel + 0.01) of digital silence


# ----------------------------------------------------------------------------- FPR arithmetic


def test_fpr_on_hand_made_binary_and_semantic_predictions() -> None:
    probs = torch.zeros(2, 3, 4, 4)
    probs[0, 0, 0, 0] = 0.9  # frame with one pixel over 0.5
    probs[0, 1] = 0.5  # exactly 0.5 is not sounding (J's prob > 0.5)
    probs[1, 0, :2] = 0.7  # 8 pixels
    probs[1, 2] = 0.99  # padding frame, not scored
    scored = torch.tensor([[True, True, True], [True, True, False]])
    m = FalsePositiveMetrics(binary=True)
    m.update(probs, torch.zeros(2, 3, 4, 4, dtype=torch.long), scored)
    r = m.compute()
    assert r["n_frames"] == 5
    assert r["FPR_frame"] == pytest.approx(2 / 5)
    assert r["FPR_pixel"] == pytest.approx((1 + 8) / (5 * 16))

    ids = torch.zeros(1, 2, 3, 3, dtype=torch.long)
    ids[0, 1, 1, 1:] = torch.tensor([5, 70])
    s = FalsePositiveMetrics(binary=False)
    s.update(ids, torch.zeros_like(ids), torch.ones(1, 2, dtype=torch.bool))
    assert s.compute() == {"FPR_frame": 0.5, "FPR_pixel": pytest.approx(2 / 18), "n_frames": 2}


def test_negative_score_is_the_harmonic_mean_of_j_and_silence() -> None:
    rng = np.random.default_rng(0)
    for j, fpr in rng.uniform(0, 1, (20, 2)):
        assert negative_score(j, fpr) == pytest.approx(statistics.harmonic_mean([j, 1 - fpr]))
    assert negative_score(0.9, 1.0) == 0.0 and negative_score(0.0, 0.0) == 0.0
    assert positive_j({"J": 0.1, "J_present": 0.6}) == 0.6 and positive_j({"J": 0.4}) == 0.4


def test_audio_blind_oracle_has_fpr_one_on_frames_with_visible_objects() -> None:
    """The visible-objects oracle ignores the audio: whatever the negative, every frame showing an object
    is a false positive, and the pixel FPR is the share of object pixels (from the renderer's owner map)."""
    size = 32
    plans = [p for p in plan_clips("avss", 40, 3) if p.split != "train"][:6]
    sigs = signatures(select_classes(object_vocabulary("avss"), 8))
    predict = visible_objects("avss", 40, 3, 8, size, size, size)
    t_max = 10
    valid = torch.tensor([[t < p.n_frames for t in range(t_max)] for p in plans])
    batch = {"uid": [p.uid for p in plans], "valid": valid}
    pred = predict(batch)
    m = FalsePositiveMetrics(binary=False)
    m.update(pred, torch.zeros_like(pred), valid)
    r = m.compute()
    object_pixels = sum(int((render_frame(p, t, size, sigs)[1] > 0).sum()) for p in plans for t in range(p.n_frames))
    assert r["n_frames"] == int(valid.sum())
    assert all(len(p.objects) > 0 for p in plans)  # every synthetic frame shows objects
    assert r["FPR_frame"] == 1.0
    assert r["FPR_pixel"] == pytest.approx(object_pixels / (r["n_frames"] * size * size))


# ----------------------------------------------------------------------------- waveforms and front ends


def test_pink_noise_level_and_spectrum() -> None:
    x = pink_noise(160000, np.random.default_rng(1))
    assert 20 * math.log10(math.sqrt(np.mean(x.astype(np.float64) ** 2))) == pytest.approx(NOISE_DBFS, abs=1e-3)
    f, psd = signal.welch(x.astype(np.float64), fs=16000, nperseg=4096)
    band = (f > 50) & (f < 5000)
    slope = np.polyfit(np.log10(f[band]), np.log10(psd[band]), 1)[0]
    assert slope == pytest.approx(-1.0, abs=0.1)  # power ∝ 1/f


def _batch(n_frames: list[int], t_max: int = 10, labels: int = 71) -> dict:
    b = len(n_frames)
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[t < n for t in range(t_max)] for n in n_frames])
    return {
        "uid": [f"clip{i}" for i in range(b)],
        "valid": valid,
        "gt": valid.clone(),
        "masks": torch.randint(0, 3, (b, t_max, 8, 8), generator=g) * valid[..., None, None],
        "labels": torch.ones(b, labels),
        "frames": torch.randn(b, t_max, 3, 8, 8, generator=g),
        "mel": torch.randn(b, t_max, 96, 64, generator=g) * valid[..., None, None],
    }


def test_silence_mel_is_the_log_offset_and_padding_stays_zero() -> None:
    batch = _batch([10, 5])
    neg = negative_batch(batch, NegativeAudio(AudioFrontEnd(16000)), "silence")
    assert torch.all(neg["mel"][0] == torch.tensor(LOG_SILENCE).half().float())
    assert torch.all(neg["mel"][1, :5] == torch.tensor(LOG_SILENCE).half().float())
    assert torch.all(neg["mel"][1, 5:] == 0)
    assert torch.all(neg["masks"] == 0) and torch.all(neg["labels"] == 0) and torch.equal(neg["gt"], batch["valid"])
    assert torch.equal(neg["frames"], batch["frames"])


def test_clap_keys_get_the_tower_embedding_of_the_negative_wave() -> None:
    clap = frozen_towers(EncoderSpec.tiny(), "cpu").clap
    batch = {**_batch([5, 5], t_max=5), "clap": torch.randn(2, 5, clap.dim), "clap_clip": torch.randn(2, clap.dim)}
    neg = negative_batch(batch, NegativeAudio(AudioFrontEnd(16000, clap)), "silence")
    zeros = np.zeros((1, clap.sample_rate), np.float32)
    second = torch.nn.functional.normalize(clap.encode_audio(zeros).float(), dim=-1)[0].half().float()
    whole = clap.encode_audio(np.zeros((1, 5 * clap.sample_rate), np.float32))[0].half().float()
    assert torch.allclose(neg["clap"][0], second.expand(5, -1), atol=1e-3)
    assert torch.allclose(neg["clap_clip"][1], whole, atol=1e-3)


def test_an_audio_key_without_front_end_is_refused() -> None:
    batch = {**_batch([5], t_max=5), "clap_clip": torch.randn(1, 16)}
    with pytest.raises(UserError, match="clap_clip"):
        negative_batch(batch, NegativeAudio(AudioFrontEnd(16000)), "noise")  # no CLAP tower for clap_clip


def test_a_negative_of_another_shape_is_refused() -> None:
    batch = {**_batch([5], t_max=5), "mel": torch.zeros(1, 5, 96, 128)}  # shards with 128 mel bands
    with pytest.raises(UserError, match="shape"):
        negative_batch(batch, NegativeAudio(AudioFrontEnd(16000)), "silence")


def test_noise_negatives_are_deterministic_by_seed() -> None:
    batch = _batch([10, 5, 10])
    fe = AudioFrontEnd(16000)
    a = negative_batch(batch, NegativeAudio(fe, seed=4), "noise")["mel"]
    b = negative_batch(batch, NegativeAudio(fe, seed=4), "noise")["mel"]
    c = negative_batch(batch, NegativeAudio(fe, seed=5), "noise")["mel"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a[0].std() > 0.1 and a[0].mean() > LOG_SILENCE + 1  # audible, not silence


# ----------------------------------------------------------------------------- off-screen donors


def _synthetic_pool(clips: int = 300, seed: int = 0) -> tuple[list[PoolClip], dict]:
    plans = {p.uid: p for p in plan_clips("avss", clips, seed)}
    catalog = synthetic_classes("avss", clips, seed)
    pool = [PoolClip(uid, plans[uid].n_frames, catalog[uid], {}) for uid in plans]
    return pool, plans


def test_offscreen_never_picks_a_donor_whose_sounds_are_visible() -> None:
    pool, plans = _synthetic_pool()
    donors = assign_donors(pool, seed=0)
    assert sum(d is not None for d in donors.values()) > 0.9 * len(pool)
    for uid, donor in donors.items():
        if donor is None:
            continue
        target, source = plans[uid], plans[donor]
        on_screen = {o.name for o in target.objects}  # silent distractors included
        heard = {source.objects[k].name for t in range(source.n_frames) for k in source.sounding_objects(t)}
        heard |= {name for name, flags in source.offscreen if any(flags)}
        assert donor != uid and heard and not heard & on_screen
        assert source.n_frames == target.n_frames


def test_offscreen_donors_are_deterministic_by_seed_and_none_when_nothing_fits() -> None:
    pool, _ = _synthetic_pool(120)
    assert assign_donors(pool, 3) == assign_donors(pool, 3)
    assert assign_donors(pool, 3) != assign_donors(pool, 4)
    assert assign_donors(pool[::-1], 3) == assign_donors(pool, 3)  # independent of the clips' order
    hand = [PoolClip("a", 5, ClipClasses(frozenset({"dog", "cat"}), frozenset({"dog"})), {}),
            PoolClip("b", 5, ClipClasses(frozenset({"cat"}), frozenset({"cat"})), {}),
            PoolClip("c", 5, ClipClasses(frozenset({"cow"}), frozenset()), {}),
            PoolClip("d", 10, ClipClasses(frozenset({"owl"}), frozenset({"owl"})), {})]
    # a shows the cat that b sounds, c sounds nothing, d has another length
    d = assign_donors(hand, 0)
    assert d["a"] is None and d["b"] == "a" and d["c"] in ("a", "b") and d["d"] is None


def test_offscreen_batch_carries_every_audio_key_of_the_donor(tmp_path: Path, avss_shards) -> None:
    shards = ShardSet.load(avss_shards(tmp_path, n_train=2, n_val=6))
    pool = {c.uid: c for c in read_pool(shards, "val")}
    # the fixture's clips are labelled 1 + i % 3 and show only that class
    assert pool["val.000"].classes == ClipClasses(frozenset({"accordion"}), frozenset({"accordion"}))
    neg = build_negative("offscreen", shards, "val", seed=0)
    batch = next(iter(make_loader(ShardStream(shards, "val", 6, 32, train=False))))
    out = neg(batch)
    assert out["uid"] == batch["uid"]  # every clip found a donor: other labels, same length
    for i, uid in enumerate(out["uid"]):
        donor = pool[neg.source.donors[uid]]
        assert donor.classes.sounding.isdisjoint(pool[uid].classes.visible)
        n = donor.n_frames
        for k in ("mel", "clap"):
            assert torch.equal(out[k][i, :n], donor.audio[k])
        assert torch.equal(out["clap_clip"][i], donor.audio["clap_clip"])


# ----------------------------------------------------------------------------- training option


def test_negative_fraction_is_validated() -> None:
    model, train_cfg = preset("tiny", "avss")
    assert apply_overrides(model, train_cfg, ["train.negative_fraction=0.25"])[1].negative_fraction == 0.25
    assert TrainConfig().negative_fraction == 0.0
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ValueError, match="negative_fraction"):
            apply_overrides(model, train_cfg, [f"train.negative_fraction={bad}"])


def test_mix_negatives_empties_exactly_the_chosen_clips() -> None:
    batch = _batch([10, 5, 10, 5, 10, 10, 5, 10])
    source = NegativeAudio(AudioFrontEnd(16000))
    chosen = choose_negatives(8, 0.3, torch.Generator().manual_seed(11))
    out = mix_negatives(batch, 0.3, source, torch.Generator().manual_seed(11))
    assert len(chosen) in (2, 3)
    for i in range(8):
        if i in chosen:
            assert torch.all(out["masks"][i] == 0) and torch.all(out["labels"][i] == 0)
            assert torch.equal(out["gt"][i], batch["valid"][i]) and not torch.equal(out["mel"][i], batch["mel"][i])
        else:
            for k in ("masks", "labels", "gt", "mel"):
                assert torch.equal(out[k][i], batch[k][i])
    assert torch.equal(out["frames"], batch["frames"])
    shares = [len(choose_negatives(4, 0.1, torch.Generator().manual_seed(s))) / 4 for s in range(2000)]
    assert np.mean(shares) == pytest.approx(0.1, abs=0.01)  # stochastic rounding keeps the share
    assert all(len(choose_negatives(4, 0.25, torch.Generator().manual_seed(s))) == 1 for s in range(50))


def test_trainer_applies_negative_fraction(tmp_path: Path, avss_shards) -> None:
    avss_shards(tmp_path, n_train=4, n_val=2)
    fast = ["train.batch_size=4", "model.image_size=32"]
    runs = {}
    for name, p in (("plain", 0.0), ("neg", 0.5)):
        spec = RunSpec(dataset="avss", preset="tiny", work=tmp_path, out=tmp_path / name, max_steps=1, seed=1,
                       overrides=fast + [f"train.negative_fraction={p}"])
        runs[name] = read_metrics(train(spec))[0]
    assert runs["plain"]["seg"] != runs["neg"]["seg"]


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_with_negatives_measures_listening(tmp_path: Path, avss_shards) -> None:
    """A predictor that segments everything unless the mel is digital silence: FPR 0 under silence,
    1 under noise and off-screen sound; one that ignores audio: 1 everywhere."""
    shards = ShardSet.load(avss_shards(tmp_path, n_train=2, n_val=4))
    silent = torch.tensor(LOG_SILENCE).half().float()

    def listens(batch: dict) -> torch.Tensor:
        loud = (batch["mel"] != silent).flatten(2).any(2)  # (B, T)
        return loud[..., None, None].long().expand(*loud.shape, 32, 32)

    def blind(batch: dict) -> torch.Tensor:
        return torch.ones_like(batch["masks"])

    for kind, expected in (("silence", 0.0), ("noise", 1.0), ("offscreen", 1.0)):
        neg = build_negative(kind, shards, "val", seed=0)
        r = evaluate(listens, shards, "val", 32, negative=neg)
        assert r["FPR_frame"] == expected and r["FPR_pixel"] == expected and r["skipped"] == 0
        assert r["n_frames"] == 10 + 5 + 10 + 5
        assert evaluate(blind, shards, "val", 32, negative=neg)["FPR_frame"] == 1.0


def test_eval_command_with_negatives(tmp_path: Path, avss_shards) -> None:
    avss_shards(tmp_path, n_train=4, n_val=4)
    run = train(RunSpec(dataset="avss", preset="tiny", work=tmp_path, out=tmp_path / "run", max_steps=1,
                        overrides=["train.batch_size=2", "model.image_size=32"]))
    runner = CliRunner()
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--json", "--negative", "silence",
                              "--negative", "offscreen"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output.strip().splitlines()[-1])
    assert set(rows) == {"clean", "silence", "offscreen"}
    for kind in ("silence", "offscreen"):
        r = rows[kind]
        assert 0 <= r["FPR_pixel"] <= r["FPR_frame"] <= 1
        assert r["HM"] == pytest.approx(negative_score(rows["clean"]["J_present"], r["FPR_frame"]))
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--negative", "applause"])
    assert res.exit_code == 2 and "--negative must be one of" in res.output
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--negative", "noise", "--snr-db", "0"])
    assert res.exit_code == 2 and "cannot be combined" in res.output
    res = runner.invoke(app, ["eval", "--run", str(run), "--split", "val", "--negative", "offscreen", "--synth", "12:0"])
    assert res.exit_code == 2 and "not in the synthetic plan" in res.output
