"""Modality contribution (icf.eval.modality): Shapley values of audio and vision for J, the masked inputs, and
the ``icf compare --setting modality`` columns."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from icf.augment.negatives import NegativeAudio, front_end_for
from icf.cli import app
from icf.data.shard_format import AUDIO_KEYS
from icf.data.shards import ShardSet
from icf.eval.evaluate import batches
from icf.eval.modality import BlankFrame, blank_vision, check_keys, modality_scores, shapley, silent_audio
from icf.train.run import RunSpec
from icf.train.trainer import train
from test_train import FAST

SIZE = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, avss_shards) -> ShardSet:
    work = tmp_path_factory.mktemp("modality")
    return ShardSet.load(avss_shards(work, n_train=4, n_val=4, size=SIZE))


def test_two_player_shapley_is_the_closed_form_and_efficient() -> None:
    rng = random.Random(0)
    for _ in range(20):
        v = {frozenset(s): rng.uniform(-1, 1) for s in ((), ("audio",), ("vision",), ("audio", "vision"))}
        phi = shapley(lambda s: v[s])
        av, a, vis, none = v[frozenset({"audio", "vision"})], v[frozenset({"audio"})], v[frozenset({"vision"})], v[frozenset()]
        assert phi["audio"] == pytest.approx(0.5 * ((av - vis) + (a - none)), abs=1e-12)
        assert phi["vision"] == pytest.approx(0.5 * ((av - a) + (vis - none)), abs=1e-12)
        assert phi["audio"] + phi["vision"] == pytest.approx(av - none, abs=1e-12)


def test_shapley_three_players_dummy_and_symmetry() -> None:
    """A player that never changes v gets 0; two interchangeable players get equal shares; the sum is v(N) − v(∅)."""
    v = lambda s: float(len(s & {"a", "b"}) ** 2)  # noqa: E731  ("c" is a dummy)
    phi = shapley(v, ("a", "b", "c"))
    assert phi["c"] == 0.0 and phi["a"] == pytest.approx(phi["b"]) and sum(phi.values()) == pytest.approx(4.0)


def test_every_batch_input_is_audio_or_vision() -> None:
    check_keys()


def test_masked_inputs_replace_every_key_and_keep_the_target(shards: ShardSet) -> None:
    batch = next(iter(batches(shards, "val", SIZE)))
    batch["valid"][1, 3:] = False  # a padded clip: padding must stay as it was
    for k in ("frames", "clip", "mel", "clap"):
        batch[k][1, 3:] = 0
    silence = NegativeAudio(front_end_for(shards))
    blank = BlankFrame.for_shards(shards)
    quiet, dark = silent_audio(batch, silence), blank_vision(batch, blank)
    for k in ("masks", "gt", "valid"):
        assert torch.equal(quiet[k], batch[k]) and torch.equal(dark[k], batch[k])
    for k in AUDIO_KEYS:
        if k in batch:
            assert not torch.equal(quiet[k], batch[k]), k
            assert torch.equal(dark[k], batch[k]), k
    for k in ("frames", "clip", "vclip", "vclip_seg"):
        assert not torch.equal(dark[k], batch[k]) and torch.equal(quiet[k], batch[k]), k
    # silence: every clip's mel is the same (digital silence), the padding stays zero
    assert torch.equal(quiet["mel"][0, 0], quiet["mel"][2, 0]) and (quiet["mel"][1, 3:] == 0).all()
    # blank: one uniform colour on every real frame, one embedding everywhere, padding zero
    real = dark["frames"][batch["valid"]]
    assert torch.allclose(real, blank.pixel[None, :, None, None].expand_as(real))
    assert (dark["frames"][1, 3:] == 0).all() and (dark["clip"][1, 3:] == 0).all()
    torch.testing.assert_close(dark["vclip"], blank.clip.expand_as(dark["vclip"]))
    assert torch.allclose(blank.clip.norm(), torch.tensor(1.0), atol=1e-3)
    seg_real = batch["vclip_seg"].abs().sum(-1) > 0
    torch.testing.assert_close(dark["vclip_seg"][seg_real], blank.clip.expand(int(seg_real.sum()), -1))


def vision_only(batch: dict) -> torch.Tensor:
    """Class 1 wherever the frame differs from its corner (background) pixel: reads the frames, never the audio."""
    frames = batch["frames"]
    fg = (frames - frames[..., :1, :1]).abs().sum(2) > 0.5
    return fg.long()


def audio_only(batch: dict) -> torch.Tensor:
    """The class the frame's log-Mel encodes (the test clips' mel is noise + label; silence → 0) on the pixels of
    the ground-truth mask (not an input of either modality): reads the audio, never the frames."""
    label = batch["mel"].float().mean((-1, -2)).round().clamp(0, 70).long()  # (B, T)
    return torch.where(batch["masks"] > 0, label[..., None, None], 0)


def test_a_predictor_that_ignores_audio_gets_zero_audio_share(shards: ShardSet) -> None:
    s = modality_scores(vision_only, shards, "val", SIZE)
    assert s["phi_audio"] == 0.0  # exactly: v(A,V) = v(V) and v(A) = v(∅) for a deterministic predictor
    assert s["v_audio_vision"] == s["v_vision"] and s["v_audio"] == s["v_none"]
    assert s["phi_vision"] > 0
    assert s["phi_audio"] + s["phi_vision"] == pytest.approx(s["v_audio_vision"] - s["v_none"], abs=1e-12)
    assert s["J"] == s["v_audio_vision"]


def test_a_predictor_that_only_listens_gets_zero_vision_share(shards: ShardSet) -> None:
    s = modality_scores(audio_only, shards, "val", SIZE, metric="J_present")
    assert s["phi_vision"] == 0.0 and s["phi_audio"] > 0
    assert s["phi_audio"] + s["phi_vision"] == pytest.approx(s["v_audio_vision"] - s["v_none"], abs=1e-12)


def test_compare_modality_columns(tmp_path: Path, avss_shards) -> None:
    avss_shards(tmp_path, n_train=4, n_val=3)
    run = train(RunSpec(dataset="avss", preset="tiny", work=tmp_path, out=tmp_path / "runs" / "a", epochs=1, max_steps=1,
                        overrides=FAST, seed=0))
    res = CliRunner().invoke(app, ["compare", str(run), "--split", "val", "--setting", "modality", "--setting", "shuffled-audio", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output.strip().splitlines()[-1])
    assert doc["settings"] == ["clean", "modality Shapley (J)", "shuffled audio"]
    assert {"phi_audio", "phi_vision"} <= set(doc["metrics"])
    r = doc["runs"][0]["results"]["modality Shapley (J)"]
    assert r["J"] == pytest.approx(doc["runs"][0]["results"]["clean"]["J"], abs=1e-12)
    assert r["phi_audio"] + r["phi_vision"] == pytest.approx(r["v_audio_vision"] - r["v_none"], abs=1e-12)
    bad = CliRunner().invoke(app, ["compare", str(run), "--split", "val", "--setting", "modality=IoU"])
    assert bad.exit_code == 2 and "expected one of" in bad.output
