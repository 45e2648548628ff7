"""icf towers: the loss is CLIP's where it should be, the checkpoints reload through the public extract
path with the training code's embeddings, zero-shot runs on val only, and a rerun is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from icf.cli import app
from icf.data.adapters import load_samples
from icf.data.synth import synthesize
from icf.encoders import load
from icf.stages.extract import ExtractStage, resolve_spec
from icf.towers.examples import crop, split_examples, square_box, towers_vocabulary
from icf.towers.loss import multi_positive_loss
from icf.towers.train import TowersConfig, build_towers, clap_embed, train_towers

pytestmark = [
    pytest.mark.filterwarnings("ignore::icf.encoders.spec.RandomWeightsWarning"),
    pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning"),
]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_loss_is_clip_loss_of_open_clip_and_laion_clap_on_one_positive_per_row() -> None:
    from laion_clap.clap_module.loss import ClipLoss as LaionClipLoss
    from open_clip.loss import ClipLoss as OpenClipLoss

    gen = torch.Generator().manual_seed(0)
    a, t = _unit(torch.randn(6, 8, generator=gen)), _unit(torch.randn(6, 8, generator=gen))
    scale = torch.tensor(7.5)
    ours = multi_positive_loss(a, t, torch.eye(6), scale)
    assert torch.allclose(ours, OpenClipLoss()(a, t, scale), atol=1e-6)
    assert torch.allclose(ours, LaionClipLoss()(a, t, scale), atol=1e-6)


def test_multi_positive_loss_matches_float64_reference() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(7, 5)); a /= np.linalg.norm(a, axis=1, keepdims=True)
    t = rng.normal(size=(4, 5)); t /= np.linalg.norm(t, axis=1, keepdims=True)
    pos = (rng.random((7, 4)) < 0.4).astype(float)
    pos[np.arange(7), rng.integers(0, 4, 7)] = 1.0
    pos[:, 3] = 0.0  # a prompt with no sample in the batch: no text→sample term for it
    s = 3.0
    logits = s * a @ t.T

    def soft_ce(lg: np.ndarray, q: np.ndarray) -> float:
        rows = [i for i in range(len(q)) if q[i].sum() > 0]
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return float(np.mean([-(q[i] / q[i].sum() * logp[i]).sum() for i in rows]))

    expected = 0.5 * (soft_ce(logits, pos) + soft_ce(logits.T, pos.T))
    got = multi_positive_loss(torch.tensor(a).float(), torch.tensor(t).float(), torch.tensor(pos).float(), torch.tensor(s))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_square_box_covers_the_region_inside_the_image() -> None:
    region = np.zeros((20, 30), bool)
    region[2:8, 25:29] = True
    top, left, side = square_box(region)
    assert 0 <= top and top + side <= 20 and 0 <= left and left + side <= 30
    assert top <= 2 and top + side >= 8 and left <= 25 and left + side >= 29
    rgb = np.zeros((40, 60, 3), np.uint8)  # a frame twice the mask's size
    rgb[4:16, 50:58] = 200
    assert crop(rgb, region, 16).shape == (16, 16, 3) and crop(rgb, region, 16).mean() > 50


def test_training_audio_embedding_is_the_public_encode_audio() -> None:
    _, clap = build_towers(0, "cpu")
    clap.model.eval()
    wave = torch.from_numpy(np.random.default_rng(0).normal(0, 0.1, (3, clap.sample_rate)).astype(np.float32))
    with torch.no_grad():
        assert torch.allclose(clap_embed(clap, wave), clap.encode_audio(wave), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("towers")
    root = base / "AVSS"
    synthesize("avss", root, clips=30, seed=3, size=48)
    cfg = TowersConfig(dataset="avss", root=str(root), epochs=1, seed=0, batch_size=16)
    return cfg, base / "work", train_towers(cfg, base / "work")


def test_checkpoints_reload_through_extract_with_the_training_embeddings(tiny_run) -> None:
    cfg, _, result = tiny_run
    layout = torch.load(result.folder / "clap.pt", weights_only=True)
    assert set(layout) >= {"state_dict"} and all(k.startswith("module.") for k in layout["state_dict"])
    clip_state = torch.load(result.folder / "clip.pt", weights_only=True)
    assert "visual.conv1.weight" in clip_state  # open_clip's bare state dict
    spec = resolve_spec(ExtractStage.Config(encoders=str(result.spec_path)))
    assert "random" not in spec.weights_summary().values()
    public = load(spec)

    # the training code's view of the same weights (towers built, then the checkpoints loaded into them)
    clip, clap = build_towers(123, "cpu")  # another seed: every parameter must come from the files
    clip.model.load_state_dict(clip_state)
    clap.model.load_state_dict({k[len("module."):]: v for k, v in layout["state_dict"].items()})
    clip.model.eval(), clap.model.eval()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    wave = torch.from_numpy(rng.normal(0, 0.1, (2, clap.sample_rate)).astype(np.float32))
    with torch.no_grad():
        train_img = clip.model.encode_image(clip.preprocess(torch.from_numpy(frames)), normalize=True)
        train_aud = clap_embed(clap, wave)
    assert torch.allclose(public.clip.encode_images(frames), train_img, atol=1e-5)
    assert torch.allclose(public.clap.encode_audio(wave), train_aud, atol=1e-5)
    assert torch.allclose(public.clip.encode_text(["A frame of dog."]), clip.encode_text(["A frame of dog."]), atol=1e-5)


def test_zero_shot_is_measured_on_val_only(tiny_run) -> None:
    cfg, _, result = tiny_run
    vocab = towers_vocabulary("avss")
    counts = {}
    for split in ("train", "val"):
        ex, _ = split_examples(load_samples("avss", cfg.root, [split]), vocab, 64, 48000)
        singles = sum(len(lab) == 1 for lab in ex.second_labels)
        counts[split] = (len(ex.crop_labels), singles, len(ex.second_labels) - singles)
    stats = result.stats
    got = (stats["counts"]["objects"], stats["counts"]["single_source"], stats["counts"]["multi_source"])
    assert got == counts["val"] != counts["train"]
    assert stats["train"]["objects"] == counts["train"][0]
    assert 0.0 <= stats["accuracy"]["objects"] <= 1.0
    assert json.loads((result.folder / "stats.json").read_text())["accuracy"] == stats["accuracy"]
    assert (result.folder / "confusion.png").stat().st_size > 1000


def test_rerun_is_a_no_op_and_the_cli_prints_one_summary(tiny_run) -> None:
    cfg, work, result = tiny_run
    before = {p.name: p.stat().st_mtime_ns for p in result.folder.iterdir()}
    res = CliRunner().invoke(app, ["towers", "--dataset", "avss", "--root", cfg.root, "--work", str(work), "--epochs", "1",
                                   "--batch-size", "16"], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    assert "towers (cached)" in res.output and str(result.spec_path) in res.output.replace("\n", "")
    assert {p.name: p.stat().st_mtime_ns for p in result.folder.iterdir()} == before


def test_ms3_cannot_train_towers_with_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "MS3"
    synthesize("ms3", root, clips=3, seed=0, size=32)
    res = CliRunner().invoke(app, ["towers", "--dataset", "ms3", "--root", str(root), "--work", str(tmp_path / "w")])
    assert res.exit_code == 2 and "names no classes" in res.output
