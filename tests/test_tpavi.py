"""The AVSBench TPAVI baseline (`icf.model.tpavi`, method ``tpavi``) alone and with ICF attached."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_softmax, softmax
from test_model import make_batch, tiny

import icf.encoders as enc
from icf import methods
from icf.config import preset
from icf.methods.base import Resources
from icf.methods.tpavi import TPAVIOptions
from icf.model.icf import ICF
from icf.model.tpavi import TPAVI, TPAVISegmenter, avm_loss


@pytest.fixture(scope="module")
def encoders():
    return enc.load(enc.EncoderSpec.tiny())


def _grad(module: torch.nn.Module) -> float:
    return float(sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None))


def _open_tpavi(model: TPAVISegmenter, value: float = 1.0) -> None:
    """Set every TPAVI block's zero-initialised output BatchNorm scale to ``value`` (as after some training), so
    the audio-visual interaction reaches the output."""
    with torch.no_grad():
        for block in model.tpavi.values():
            block.w_z[1].weight.fill_(value)


# ---- shapes, padding, audio -------------------------------------------------------------------------


def test_binary_and_avss_shapes_with_padding(encoders) -> None:
    torch.manual_seed(0)
    for dataset, b, n_real, k in (("s4", 2, None, 1), ("avss", 2, [5, 10], 71)):
        cfg = tiny(dataset)
        model = TPAVISegmenter(cfg).train()
        batch = make_batch(cfg, encoders, b=b, n_real=n_real)
        out = model(batch)
        t = cfg.frames
        assert out["logits"].shape == (b, t, k, 64, 64)
        for key in ("vis_feat", "aud_feat"):
            assert out[key].shape == (b, t, cfg.d_model)
            torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(b, t))
        pred = model.predict(batch)
        assert pred.shape == (b, t, 64, 64)
        assert pred.dtype == (torch.float32 if k == 1 else torch.int64)
        assert set(model.eval()(batch)) == {"logits"}


@pytest.mark.parametrize("window", [5, 10])
def test_padded_frames_do_not_change_real_frames(encoders, window: int) -> None:
    """Window 5: the padded frames of a 5-frame clip fill their own window (as in the official code); window 10:
    they share the real frames' window and are excluded from its sum."""
    torch.manual_seed(1)
    cfg = tiny("avss")
    model = TPAVISegmenter(cfg, window=window)
    _open_tpavi(model)
    model.eval()
    batch = make_batch(cfg, encoders, b=2, n_real=[5, 10])
    other = dict(batch, frames=batch["frames"].clone(), mel=batch["mel"].clone())
    other["frames"][0, 5:] = 7.0
    other["mel"][0, 5:] = -3.0
    with torch.no_grad():
        base = model(batch)["logits"]
        torch.testing.assert_close(model(other)["logits"][0, :5], base[0, :5], atol=1e-5, rtol=1e-5)
        # the same change on a *real* frame does reach the other real frames (TPAVI mixes over time)
        real = dict(batch, frames=batch["frames"].clone())
        real["frames"][0, 4] = 7.0
        assert (model(real)["logits"][0, :4] - base[0, :4]).abs().max() > 1e-4


def test_audio_changes_the_mask_once_tpavi_is_open(encoders) -> None:
    torch.manual_seed(2)
    cfg = tiny("s4")
    model = TPAVISegmenter(cfg).eval()
    batch = make_batch(cfg, encoders)
    batch["mel"][0] += 2.0  # two clearly different sounds (random mels pool to nearly the same raw embedding)
    flipped = dict(batch, mel=batch["mel"].flip(0))
    with torch.no_grad():
        # W_z's BatchNorm starts at 0 (official init): the untrained block is LN(x) and ignores the audio
        torch.testing.assert_close(model(flipped)["logits"], model(batch)["logits"])
        _open_tpavi(model)
        assert (model(flipped)["logits"] - model(batch)["logits"]).abs().max() > 1e-4


def test_no_tpavi_stage_means_no_audio_in_the_mask(encoders) -> None:
    cfg = tiny("s4")
    model = TPAVISegmenter(cfg, stages=(), audio_path="projected").eval()
    assert len(model.tpavi) == 0
    batch = make_batch(cfg, encoders)
    with torch.no_grad():
        torch.testing.assert_close(model(dict(batch, mel=batch["mel"].flip(0)))["logits"], model(batch)["logits"])


# ---- TPAVI against a slow reference -----------------------------------------------------------------


def _slow_tpavi(block: TPAVI, x: np.ndarray, aligned: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """The non-local block as written in AVSBench's TPAVI.py, on each window of ``block.window`` frames (official
    ``pre_reshape_for_tpavi``): the full (w·h·w)² affinity between θ(x) and φ of the audio broadcast over (h, w),
    divided by the number of positions, times g(x) — restricted to the window's real frames."""
    def conv1x1(conv: torch.nn.Conv2d, v: np.ndarray) -> np.ndarray:  # v (C, P) → (C', P)
        w = conv.weight.detach().double().numpy()[:, :, 0, 0]
        return w @ v + conv.bias.detach().double().numpy()[:, None]

    b, t = valid.shape
    _, c, h, w = x.shape
    phi_w, phi_b = block.phi.weight.detach().double().numpy(), block.phi.bias.detach().double().numpy()
    y = np.zeros((b, t, c // 2, h, w))
    for i in range(b):
        for start in range(0, t, block.window):
            frames = list(range(start, min(start + block.window, t)))
            pos = np.concatenate([x[i * t + s].reshape(c, -1) for s in frames], axis=1)  # (C, w·h·w)
            theta, g = conv1x1(block.theta, pos), conv1x1(block.g, pos)
            audio_map = np.repeat(aligned[i, frames].T, h * w, axis=1)  # (C, w·h·w): a_t broadcast over (h, w)
            phi = phi_w @ audio_map + phi_b[:, None]
            keep = np.repeat(valid[i, frames], h * w)
            f = theta.T @ phi[:, keep]  # (w·h·w, N_real)
            out = (f / max(keep.sum(), 1)) @ g[:, keep].T  # (w·h·w, C')
            y[i, frames] = out.T.reshape(c // 2, len(frames), h, w).transpose(1, 0, 2, 3)
    return y.reshape(b * t, c // 2, h, w)


@pytest.mark.parametrize("window", [5, 2])
def test_tpavi_attention_matches_the_explicit_non_local_block(window: int) -> None:
    torch.manual_seed(3)
    block = TPAVI(8, 6, window=window).double().eval()
    b, t, h, w = 2, 5, 3, 2
    x = torch.randn(b * t, 8, h, w, dtype=torch.float64)
    audio = torch.randn(b, t, 6, dtype=torch.float64)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    aligned = block.align(audio)
    got = block.attention(x, aligned, valid)
    want = _slow_tpavi(block, x.numpy(), aligned.detach().numpy(), valid.numpy())
    np.testing.assert_allclose(got.detach().numpy()[valid.flatten().numpy()], want[valid.flatten().numpy()], rtol=1e-10, atol=1e-12)
    # the full block: LN(x + BN(W_z y)) with a non-zero BN scale (eval statistics)
    with torch.no_grad():
        block.w_z[1].weight.uniform_(0.5, 1.5)
        block.w_z[1].running_mean.uniform_(-0.2, 0.2)
    z, out_audio = block(x, audio, valid)
    w_y = block.w_z(torch.from_numpy(want))
    ref = F.layer_norm((x + w_y).permute(0, 2, 3, 1), (8,), block.norm.weight, block.norm.bias).permute(0, 3, 1, 2)
    keep = valid.flatten()
    torch.testing.assert_close(z[keep], ref[keep], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_audio, aligned)


# ---- temporal window and audio path -----------------------------------------------------------------


def _avss_pair(encoders, window: int) -> tuple[TPAVISegmenter, dict, dict]:
    """An opened tiny AVSS model, one real 10-frame clip, and the same frames as two 5-frame clips."""
    torch.manual_seed(11)
    cfg = tiny("avss")
    model = TPAVISegmenter(cfg, window=window)
    _open_tpavi(model)
    batch = make_batch(cfg, encoders, b=1)
    halves = {k: batch[k].reshape(2, 5, *batch[k].shape[2:]) for k in ("frames", "masks", "gt", "valid", "mel")}
    return model.eval(), batch, halves


def test_window_of_five_on_ten_frames_is_two_five_frame_clips(encoders) -> None:
    model, batch, halves = _avss_pair(encoders, window=5)
    with torch.no_grad():
        whole = model(batch)["logits"]
        split = model(halves)["logits"]
    assert whole.shape == (1, 10, 71, 64, 64)
    torch.testing.assert_close(whole.reshape(split.shape), split, rtol=1e-5, atol=1e-5)


def test_window_of_ten_mixes_the_two_halves(encoders) -> None:
    """window ≥ T attends over the whole clip: the second half's frames change the first half's masks."""
    model, batch, halves = _avss_pair(encoders, window=10)
    with torch.no_grad():
        whole = model(batch)["logits"]
        split = model(halves)["logits"]
        changed = dict(batch, frames=batch["frames"].clone())
        changed["frames"][0, 7] = 5.0
        assert (model(changed)["logits"][0, :5] - whole[0, :5]).abs().max() > 1e-4
    assert (whole.reshape(split.shape) - split).abs().max() > 1e-4
    five, _, _ = _avss_pair(encoders, window=5)
    with torch.no_grad():
        base = five(batch)["logits"]
        torch.testing.assert_close(five(changed)["logits"][0, :5], base[0, :5])


def test_official_audio_path_reads_the_raw_embedding() -> None:
    for dataset, bias in (("s4", True), ("avss", False)):
        cfg = tiny(dataset)
        official = TPAVISegmenter(cfg)
        assert isinstance(official.audio.proj, torch.nn.Identity) and official.audio.width == cfg.audio_channels[-1]
        assert not any(k.startswith("audio.proj") for k in official.state_dict())
        for block in official.tpavi.values():
            assert block.align.in_features == cfg.audio_channels[-1]
            assert (block.align.bias is not None) == bias  # the official AVSS align_channel has no bias
        projected = TPAVISegmenter(cfg, audio_path="projected")
        assert projected.audio.width == cfg.d_model and projected.tpavi["0"].align.bias is not None
        assert projected.tpavi["0"].align.in_features == cfg.d_model


def test_official_audio_feature_is_the_deepest_blocks_aligned_audio(encoders) -> None:
    torch.manual_seed(12)
    cfg = tiny("s4")
    model = TPAVISegmenter(cfg, stages=(1, 2)).eval()
    batch = make_batch(cfg, encoders)
    with torch.no_grad():
        enc = model.encode(batch)
        torch.testing.assert_close(enc.audio, model.tpavi["2"].align(model.audio(batch["mel"])))
        torch.testing.assert_close(enc.state["stage_audio"][-1], enc.audio)
    with pytest.raises(ValueError, match="audio_path=projected"):
        TPAVISegmenter(cfg, stages=())


# ---- gradients and losses ---------------------------------------------------------------------------


def test_gradients_reach_every_part(encoders) -> None:
    torch.manual_seed(4)
    cfg = tiny("ms3")
    model = TPAVISegmenter(cfg).train()
    _open_tpavi(model, 0.5)
    batch = make_batch(cfg, encoders, b=2)
    losses = model.loss(model(batch), batch)
    assert {"seg", "bce", "avm", "total"} <= set(losses)
    losses["total"].backward()
    for name in ("backbone", "neck", "audio", "fusion", "head"):
        assert _grad(getattr(model, name)) > 0, name
    for i, block in model.tpavi.items():
        for part in ("align", "theta", "phi", "g", "w_z", "norm"):
            assert _grad(getattr(block, part)) > 0, (i, part)


def test_official_losses_per_dataset(encoders) -> None:
    torch.manual_seed(5)
    # S4: BCE on the annotated frames only (no AVM term in the official S4 recipe)
    cfg = tiny("s4")
    model = TPAVISegmenter(cfg).train()
    batch = make_batch(cfg, encoders, b=2)
    batch["gt"][:, 1:] = False  # S4 train: only frame 0 is annotated
    batch["masks"] = batch["masks"].clamp(max=1)
    out = model(batch)
    assert "avm_visual" not in out
    losses = model.loss(out, batch)
    assert set(losses) == {"seg", "bce", "total"}
    want = F.binary_cross_entropy_with_logits(out["logits"][:, 0, 0], batch["masks"][:, 0].float())
    torch.testing.assert_close(losses["total"], want)
    # MS3: BCE + 0.5·AVM
    cfg = tiny("ms3")
    model = TPAVISegmenter(cfg).train()
    batch = make_batch(cfg, encoders, b=2)
    out = model(batch)
    assert out["avm_visual"].shape == out["avm_audio"].shape == (4, 2, 5, cfg.d_model)
    losses = model.loss(out, batch)
    assert losses["avm"] > 0
    torch.testing.assert_close(losses["total"], losses["bce"] + 0.5 * losses["avm"])
    # AVSS: CE over the annotated real frames + 0.5·AVM; the eq18 switch gives the project's loss
    cfg = tiny("avss")
    model = TPAVISegmenter(cfg).train()
    batch = make_batch(cfg, encoders, b=2, n_real=[5, 10])
    out = model(batch)
    losses = model.loss(out, batch)
    keep = batch["gt"] & batch["valid"]
    torch.testing.assert_close(losses["ce"], F.cross_entropy(out["logits"][keep], batch["masks"][keep]))
    torch.testing.assert_close(losses["total"], losses["ce"] + 0.5 * losses["avm"])
    eq18 = TPAVISegmenter(cfg, loss="eq18").train()
    assert {"seg", "bce", "dice", "focal", "total"} == set(eq18.loss(eq18(batch), batch))
    none = TPAVISegmenter(cfg, avm_weight=0.0).train()
    assert "avm" not in none.loss(none(batch), batch)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_avm_loss_matches_scipy(reduction: str) -> None:
    rng = np.random.default_rng(6)
    v, a = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 5))
    keep = rng.random((3, 4)) > 0.3
    kl = (softmax(a, -1) * (log_softmax(a, -1) - log_softmax(v, -1))).sum(-1)  # (S, B, T)
    per_stage = np.array([kl[s][keep].sum() for s in range(2)])
    want = (per_stage / keep.sum() if reduction == "mean" else per_stage).mean()
    got = avm_loss(torch.from_numpy(v), torch.from_numpy(a), torch.from_numpy(keep), reduction)
    np.testing.assert_allclose(float(got), want, rtol=1e-10)


def test_ms3_avm_mask_pooling_follows_the_prediction(encoders) -> None:
    """MS3's v̄ is the stage map pooled under sigmoid(avgpool(logits)): more foreground, larger v̄."""
    torch.manual_seed(7)
    cfg = tiny("ms3")
    model = TPAVISegmenter(cfg, stages=(3,))
    maps = [torch.rand(2 * 5, cfg.d_model, 2, 2)] * 4
    low, high = (model._masked_stage_features(maps, torch.full((10, 1, 64, 64), v), 2) for v in (-3.0, 3.0))
    assert low.shape == (1, 2, 5, cfg.d_model)
    torch.testing.assert_close(high, maps[3].mean((-1, -2)).view(1, 2, 5, -1) * torch.sigmoid(torch.tensor(3.0)))
    assert (high > low).all()


# ---- the method and its options ---------------------------------------------------------------------


def test_method_registry_and_options() -> None:
    cfg = dataclasses.replace(tiny("s4"), method="tpavi", options={"tpavi_stages": [2, 3], "loss": "eq18"})
    options = methods.validate(cfg)
    assert options == TPAVIOptions(tpavi_stages=(2, 3), loss="eq18", audio_path="official", window=5)
    model = methods.get("tpavi").build(cfg, options, Resources())
    assert isinstance(model, TPAVISegmenter) and sorted(model.tpavi) == ["2", "3"] and model.loss_mode == "eq18"
    for bad, match in (({"tpavi_stages": [4]}, "tpavi_stages"), ({"loss": "iou"}, "loss"), ({"stages": [1]}, "unknown option"),
                       ({"audio_path": "raw"}, "audio_path"), ({"window": 0}, "window"), ({"window": 2.5}, "window")):
        with pytest.raises(ValueError, match=match):
            methods.validate(dataclasses.replace(cfg, options=bad))


def test_icf_method_builds_over_tpavi() -> None:
    cfg = dataclasses.replace(tiny("s4"), method="icf", options={"segmenter": "tpavi", "tpavi_stages": [3]})
    model = methods.get("icf").build(cfg, methods.validate(cfg), Resources(encoders=enc.EncoderSpec.tiny().to_dict()))
    assert isinstance(model, ICF) and isinstance(model.segmenter, TPAVISegmenter)
    assert sorted(model.segmenter.tpavi) == ["3"] and model.segmenter.context is not None


# ---- ICF attached to TPAVI --------------------------------------------------------------------------


def test_icf_over_tpavi_trains_and_cdcl_reaches_the_segmenter(encoders) -> None:
    torch.manual_seed(8)
    cfg = tiny("s4")
    seg = TPAVISegmenter(cfg)
    assert seg.context is None  # TPAVI has no channel context of its own
    model = ICF(seg, encoders).train()
    assert seg.context is not None
    batch = make_batch(cfg, encoders, b=3)
    losses = model.loss(model(batch), batch)
    assert {"total", "seg", "mit", "cf", "cdcl", "v_a", "v_l", "a_l"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["cdcl"].backward()
    for name in ("backbone", "neck", "audio", "fusion", "context"):
        assert _grad(getattr(seg, name)) > 0, name
    assert _grad(seg.head) == 0  # the output convolutions come after vis_feat


def test_icf_text_hook_over_tpavi_changes_eval_output(encoders) -> None:
    torch.manual_seed(9)
    cfg = tiny("s4", ablate=frozenset({"sc", "cdcl"}))
    seg = TPAVISegmenter(cfg)
    model = ICF(seg, encoders).eval()
    assert model.injects_text and seg.text_attn is not None and len(seg.text_attn) == 1
    batch = make_batch(cfg, encoders)
    with torch.no_grad():
        closed = model(batch)["logits"]
        seg.text_attn[0].gate.fill_(1.0)
        opened = model(batch)["logits"]
    assert (opened - closed).abs().max() > 1e-4
    # and in training the MIT parameters get gradient from the segmentation loss through the hook
    model.train()
    model.loss(model(batch), batch)["seg"].backward()
    assert _grad(seg.text_attn) > 0 and _grad(model.mit) > 0


# ---- paper presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset, epochs", [("s4", 15), ("ms3", 30), ("avss", 60)])
@pytest.mark.parametrize("name, backbone", [("paper-r50", "resnet50"), ("paper-pvt", "pvt_v2_b5")])
def test_paper_presets_take_the_official_recipe(dataset: str, epochs: int, name: str, backbone: str) -> None:
    """avs_scripts/*/train.py: Adam(model.parameters(), 1e-4), batch 4, no schedule, fp32, no clipping, VGGish frozen."""
    model, train = methods.get("tpavi").preset(name, *preset(name, dataset))
    assert (train.lr, train.weight_decay, train.schedule, train.warmup_steps) == (1e-4, 0.0, "constant", 0)
    assert (train.backbone_lr_mult, train.batch_size, train.epochs) == (1.0, 4, epochs)
    assert (train.amp, train.grad_clip) == (False, 0.0)
    assert model.backbone == backbone and model.audio_encoder == "vggish" and model.freeze_audio
    assert model.num_classes == (71 if dataset == "avss" else 1) and model.d_model == 256
    assert methods.validate(dataclasses.replace(model, method="tpavi")) == TPAVIOptions()
    tiny_model, tiny_train = methods.get("tpavi").preset("tiny", *preset("tiny", dataset))
    assert (tiny_model, tiny_train) == preset("tiny", dataset)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper-r50", "paper-pvt"])
def test_paper_presets_build_and_run(encoders, name: str) -> None:
    """Random-init paper-size TPAVI at 224 px: one training forward and the official MS3 loss, batch 1."""
    torch.manual_seed(10)
    cfg, _ = preset(name, "ms3")
    model = TPAVISegmenter(cfg).train()
    batch = make_batch(cfg, encoders, b=1)
    start = time.perf_counter()
    out = model(batch)
    losses = model.loss(out, batch)
    print(f"\n{name}: forward {time.perf_counter() - start:.1f} s, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    assert out["logits"].shape == (1, 5, 1, 224, 224)
    assert out["vis_feat"].shape == (1, 5, 256) and torch.isfinite(losses["total"])
