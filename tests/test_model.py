"""The assembled ICF model: Batch contract, losses, ablations, presets, weights loading and real learning."""

from __future__ import annotations

import dataclasses
import time

import pytest
import timm
import torch

import icf.encoders as enc
from icf import methods
from icf.config import ModelConfig, TrainConfig, apply_overrides, apply_values, preset, read_overrides
from icf.model import ICF
from icf.model.backbone import Backbone, BackboneWeightsError
from icf.model.bidir import BidirSegmenter
from icf.model.losses import segmentation_loss
from icf.model.pixel_decoder import ms_deform_attn

COLORS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, 1.0, -1.0], [-1.0, -1.0, 1.0]])


@pytest.fixture(scope="module")
def encoders():
    return enc.load(enc.EncoderSpec.tiny())


def make_batch(cfg: ModelConfig, encoders, b: int = 2, n_real: list[int] | None = None, seed: int = 0) -> dict:
    """A random Batch (ARCHITECTURE.md); ``n_real`` pads clips to cfg.frames."""
    g = torch.Generator().manual_seed(seed)
    t, h = cfg.frames, cfg.image_size
    valid = torch.ones(b, t, dtype=torch.bool)
    for i, n in enumerate(n_real or []):
        valid[i, n:] = False
    k = max(cfg.num_classes, 2)
    dc, dv, da = encoders.clip.dim, encoders.videoclip.dim, encoders.clap.dim
    return {
        "frames": torch.randn(b, t, 3, h, h, generator=g),
        "masks": torch.randint(0, k, (b, t, h, h), generator=g),
        "gt": valid.clone(),
        "valid": valid,
        "mel": torch.randn(b, t, 96, 64, generator=g),
        "clip": torch.randn(b, t, dc, generator=g),
        "vclip": torch.randn(b, dv, generator=g),
        "vclip_seg": torch.randn(b, 4, dv, generator=g),
        "clap": torch.randn(b, t, da, generator=g),
        "clap_clip": torch.randn(b, da, generator=g),
        "labels": torch.zeros(b, k),
        "uid": [f"clip{i}" for i in range(b)],
    }


def tiny(dataset: str = "s4", **kw) -> ModelConfig:
    return dataclasses.replace(preset("tiny", dataset)[0], **kw)


def make_icf(cfg: ModelConfig, encoders=None, bank=None) -> ICF:
    """ICF over the bidirectional baseline segmenter (the ``icf`` method's default)."""
    return ICF(BidirSegmenter(cfg), encoders, bank)


def _grad_norm(module: torch.nn.Module) -> float:
    return float(sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None))


# ---- the full model ------------------------------------------------------------------------------


def test_binary_forward_losses_and_gradients(encoders) -> None:
    torch.manual_seed(0)
    cfg = tiny("s4")
    model = make_icf(cfg, encoders).train()
    batch = make_batch(cfg, encoders, b=3)
    out = model(batch)
    assert out["logits"].shape == (3, 5, 1, 16, 16)  # training: stride 4, Eq. 18 upsamples the scored frames
    losses = model.loss(out, batch)
    assert {"total", "seg", "mit", "cf", "cdcl", "v_a", "v_l", "a_l"} <= set(losses)
    assert {"pos_frac", "z_xcos", "cf_degree", "cf_cos", "cf_cos_mix"} <= set(losses)  # diagnostics
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    # Eq. 19 with the supplement's weights (+ Eq. 3's matching term)
    contrast = 0.4 * losses["v_a"] + 0.3 * losses["v_l"] + 0.3 * losses["a_l"]
    torch.testing.assert_close(losses["cdcl"], contrast)
    torch.testing.assert_close(losses["total"], losses["seg"] + cfg.lambda_mit * losses["mit"] + 0.2 * losses["cf"] + 0.2 * contrast)
    losses["total"].backward()
    seg = model.segmenter
    for part in (seg.backbone, seg.pixel_decoder, seg.audio, seg.decoder, seg.mask_head, seg.context, model.mit.gate_v, model.sc.eps_net):
        assert _grad_norm(part) > 0, type(part).__name__
    for level in ("video", "segment", "frame", "audio"):
        assert model.mit.texts[level].ctx.grad.abs().sum() > 0, level
    probs = model.predict(batch)
    assert probs.shape == (3, 5, 64, 64) and model.training  # predict runs in eval mode, then restores the mode
    with torch.no_grad():
        torch.testing.assert_close(probs, torch.sigmoid(model.eval()(batch)["logits"][:, :, 0]))  # binary: σ(channel 0)


def test_multiclass_with_padding(encoders) -> None:
    """AVSS: 71 logits, T = 10 with a padded 5-frame clip; padding changes nothing about the real clip."""
    torch.manual_seed(1)
    cfg = tiny("avss")
    model = make_icf(cfg, encoders).train()
    batch = make_batch(cfg, encoders, b=2, n_real=[5, 10])
    out = model(batch)
    assert out["logits"].shape == (2, 10, 71, 16, 16)  # training: stride 4
    losses = model.loss(out, batch)
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    pred = model.predict(batch)
    assert pred.dtype == torch.int64 and pred.shape == (2, 10, 64, 64) and 0 <= pred.min() and pred.max() < 71
    # eval logits of clip 0's real frames do not depend on what its padded frames hold
    model.eval()
    other = dict(batch, frames=batch["frames"].clone(), mel=batch["mel"].clone())
    other["frames"][0, 5:] = 7.0
    other["mel"][0, 5:] = -3.0
    with torch.no_grad():
        torch.testing.assert_close(model(other)["logits"][0, :5], model(batch)["logits"][0, :5], atol=1e-5, rtol=1e-5)


def test_audio_changes_the_mask(encoders) -> None:
    torch.manual_seed(2)
    cfg = tiny("s4")
    model = make_icf(cfg, encoders).eval()
    batch = make_batch(cfg, encoders)
    with torch.no_grad():
        a = model(batch)["logits"]
        b = model(dict(batch, mel=batch["mel"].flip(0)))["logits"]
    assert (a - b).abs().max() > 1e-4


def test_eval_mode_runs_no_mit_or_sc(encoders) -> None:
    cfg = tiny("s4")
    model = make_icf(cfg, encoders).eval()
    batch = make_batch(cfg, encoders)
    out = model(batch)
    assert set(out) == {"logits"}
    assert set(model.loss(out, batch)) == {"seg", "bce", "dice", "focal", "total"}


# ---- ablations -----------------------------------------------------------------------------------


def test_full_ablation_is_the_baseline(encoders) -> None:
    torch.manual_seed(3)
    full = make_icf(tiny("s4"), encoders)
    base = make_icf(tiny("s4", ablate={"mit", "sc", "cdcl"}), None)  # no encoders needed
    assert base.mit is None and base.sc is None and base.segmenter.context is not None  # note 4: the baseline has it
    missing, unexpected = base.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith(("mit.", "sc.")) for k in unexpected)
    batch = make_batch(full.cfg, encoders)
    full.eval(), base.eval()
    with torch.no_grad():
        torch.testing.assert_close(base(batch)["logits"], full(batch)["logits"])
    base.train()
    losses = base.loss(base(batch), batch)
    assert set(losses) == {"seg", "bce", "dice", "focal", "total"}
    torch.testing.assert_close(losses["total"], losses["seg"])


def test_partial_ablations(encoders) -> None:
    torch.manual_seed(4)
    no_mit = make_icf(tiny("s4", ablate={"mit"}), None).train()
    assert no_mit.mit is None and no_mit.sc is None  # SC needs MIT's z
    batch = make_batch(no_mit.cfg, encoders, b=3)
    losses = no_mit.loss(no_mit(batch), batch)
    assert {"v_a", "cdcl"} <= set(losses) and not {"v_l", "a_l", "cf"} & set(losses)  # CDCL degenerates to v↔a

    no_sc = make_icf(tiny("s4", ablate={"sc"}), encoders).train()
    out = no_sc(batch)
    assert "cf" not in out
    losses = no_sc.loss(out, batch)
    assert {"v_a", "v_l", "a_l"} <= set(losses) and "cf" not in losses  # in-batch z_j negatives

    no_cdcl = make_icf(tiny("s4", ablate={"cdcl"}), encoders).train()
    losses = no_cdcl.loss(no_cdcl(batch), batch)
    assert "cf" in losses and not {"v_a", "v_l", "a_l", "cdcl"} & set(losses)
    cfg = no_cdcl.cfg
    torch.testing.assert_close(losses["total"], losses["seg"] + cfg.lambda_mit * losses["mit"] + cfg.lambda_cf * losses["cf"])


ROWS = {  # the paper's Table 2 component rows → what --ablate switches off
    "baseline": {"mit", "sc", "cdcl"},
    "MIT": {"sc", "cdcl"},
    "CDCL": {"mit", "sc"},
    "MIT+SC": {"cdcl"},
    "MIT+CDCL": {"sc"},
    "full": set(),
}


def _grads(model: ICF, loss: torch.Tensor) -> dict[str, float]:
    """|∂loss/∂θ| summed per part of the model (0 where the loss does not reach)."""
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    seg = model.segmenter
    parts = {"backbone": seg.backbone, "decoder": seg.decoder, "context": seg.context, "mit": model.mit, "text_attn": seg.text_attn}
    return {k: _grad_norm(m) if m is not None else 0.0 for k, m in parts.items()}


@pytest.mark.parametrize("row", list(ROWS))
def test_each_table2_component_reaches_the_segmenter(encoders, row: str) -> None:
    """Gradients prove that each row's components train the segmenter (not only themselves)."""
    torch.manual_seed(8)
    cfg = tiny("s4", ablate=frozenset(ROWS[row]))
    model = make_icf(cfg, encoders).train()
    batch = make_batch(cfg, encoders, b=4)
    out = model(batch)
    losses = model.loss(out, batch)
    assert _grads(model, losses["seg"])["context"] > 0  # Eq. 1-2 are part of every row (note 4)
    if row == "baseline":
        assert set(losses) == {"seg", "bce", "dice", "focal", "total"}
    if row == "MIT":  # §4.2: the text enters modality interaction by zero-gated cross-attention
        assert model.injects_text and not model.detaches_sc
        g = _grads(model, losses["seg"])
        assert g["text_attn"] > 0  # the gates get gradient at init, so the text path opens
        for attn in model.segmenter.text_attn:
            attn.gate.data.fill_(0.5)
        losses = model.loss(model(batch), batch)
        assert _grads(model, losses["seg"])["mit"] > 0  # …and then L_seg trains MIT through it
    if row == "CDCL":  # no text: CDCL degenerates to the visual-audio contrast, which is live
        assert losses["v_a"] > 0 and losses["pos_frac"] < 1
        g = _grads(model, losses["v_a"])
        assert g["decoder"] > 0 and g["backbone"] > 0
    if row == "MIT+SC":  # L_cf reaches z (not detached without CDCL), hence MIT and the segmenter
        assert model.injects_text and not model.detaches_sc
        g = _grads(model, losses["cf"])
        assert g["mit"] > 0 and g["backbone"] > 0
    if row in ("MIT+CDCL", "full"):  # the text is training-only and reaches the segmenter through L_v↔l / L_a↔l
        assert not model.injects_text
        for proj in model.mit.query_proj.values():  # as after a first step (zero-initialised: queries start cached)
            torch.nn.init.normal_(proj.weight, std=0.1)
        losses = model.loss(model(batch), batch)
        g = _grads(model, losses["v_l"])
        assert g["mit"] > 0 and g["context"] > 0 and g["decoder"] > 0
        assert losses["v_a"] > 0 and losses["pos_frac"] < 1
    if row == "full":
        assert model.detaches_sc and _grads(model, losses["cf"])["mit"] == 0  # SC learns to counterfactualise z


def test_mit_row_text_path_changes_the_prediction(encoders) -> None:
    """By outputs: with --ablate sc,cdcl the eval prediction depends on the text path; at init (gates 0) it is
    exactly the no-text forward, and one optimiser step opens the gates."""
    torch.manual_seed(9)
    cfg = tiny("s4", ablate=frozenset({"sc", "cdcl"}))
    model = make_icf(cfg, encoders)
    batch = make_batch(cfg, encoders, b=3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch)["logits"], model.segmenter(batch)["logits"])  # starts at the baseline
    model.train()
    opt = torch.optim.AdamW(model.trainable_parameters(), 1e-2)
    model.loss(model(batch), batch)["total"].backward()
    opt.step()
    assert all(float(a.gate.abs()) > 0 for a in model.segmenter.text_attn)
    model.eval()
    with torch.no_grad():
        with_text = model(batch)["logits"]
        without = model.segmenter(batch)["logits"]  # the same weights, the text path cut
    assert (with_text - without).abs().max() > 1e-5


def test_channel_context_is_in_the_eval_path(encoders) -> None:
    """Eq. 2 updates the segmenter's features in inference: removing the context changes the full model's output."""
    torch.manual_seed(10)
    model = make_icf(tiny("s4"), encoders).eval()
    batch = make_batch(model.cfg, encoders)
    with torch.no_grad():
        a = model(batch)["logits"]
        context, model.segmenter.context = model.segmenter.context, None
        b = model(batch)["logits"]
        model.segmenter.context = context
    assert (a - b).abs().max() > 1e-4


def test_text_distribution_changes_eq17(encoders) -> None:
    """Eq. 17 with the text Gaussian over per-frame texts differs from the one-point text (εI)."""
    torch.manual_seed(11)
    cfg = tiny("s4")
    model = make_icf(cfg, encoders).train()
    batch = make_batch(cfg, encoders, b=3)
    out = model(batch)
    frames = model.loss(out, batch)
    model.cfg = dataclasses.replace(cfg, text_distribution="point")
    point = model.loss(out, batch)
    model.cfg = cfg
    assert not torch.allclose(frames["v_l"], point["v_l"]) and not torch.allclose(frames["a_l"], point["a_l"])
    torch.testing.assert_close(frames["v_a"], point["v_a"])  # only the text terms change


def test_encoders_required_for_tower_mode_and_bank_mode_works(encoders) -> None:
    with pytest.raises(ValueError, match="encoders"):
        make_icf(tiny("s4"), None)
    bank = enc.text_bank(encoders, ["dog", "guitar", "piano", "car"])
    model = make_icf(tiny("s4", text_mode="bank"), None, bank).train()
    batch = make_batch(model.cfg, encoders)
    losses = model.loss(model(batch), batch)
    losses["total"].backward()
    assert {"v_l", "a_l", "cf"} <= set(losses)


def test_state_dict_excludes_frozen_towers(encoders) -> None:
    model = make_icf(tiny("s4"), encoders)
    tower_ids = {id(p) for p in encoders.clip.model.parameters()} | {id(p) for p in encoders.clap.model.parameters()}
    assert not tower_ids & {id(p) for p in model.parameters()}
    state = model.state_dict()
    reloaded = make_icf(tiny("s4"), encoders)
    reloaded.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], v) for k, v in reloaded.state_dict().items())
    assert len(model.trainable_parameters()) == len(list(model.parameters()))


# ---- losses on GT frames only --------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["s4", "avss"])
def test_segmentation_loss_uses_only_gt_real_frames(dataset: str) -> None:
    cfg = tiny(dataset)
    k = cfg.num_classes
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 3, k, 8, 8, generator=g)
    masks = torch.randint(0, max(k, 2), (2, 3, 8, 8), generator=g)
    gt = torch.tensor([[True, False, True], [True, True, False]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    base = segmentation_loss(logits, masks, gt, valid, cfg)["seg"]
    changed = logits.clone()
    changed[0, 1] += 5.0  # no GT
    changed[1, 2] -= 5.0  # padding
    torch.testing.assert_close(segmentation_loss(changed, masks, gt, valid, cfg)["seg"], base)
    changed[0, 0, -1] += 5.0  # a GT frame (one channel: softmax is shift-invariant)
    assert not torch.allclose(segmentation_loss(changed, masks, gt, valid, cfg)["seg"], base)


@pytest.mark.parametrize("dataset", ["s4", "avss"])
def test_segmentation_loss_prefers_the_right_answer(dataset: str) -> None:
    cfg = tiny(dataset)
    k = cfg.num_classes
    masks = torch.randint(0, max(k, 2), (1, 2, 8, 8), generator=torch.Generator().manual_seed(6))
    ones = torch.ones(1, 2, dtype=torch.bool)
    if cfg.binary:
        right = (masks.float() * 2 - 1)[:, :, None] * 8
    else:
        right = torch.nn.functional.one_hot(masks, k).permute(0, 1, 4, 2, 3).float() * 8
    good = segmentation_loss(right, masks, ones, ones, cfg)
    bad = segmentation_loss(-right, masks, ones, ones, cfg)
    assert good["seg"] < 0.1 < bad["seg"]
    assert all(good[p] < bad[p] for p in ("bce", "dice", "focal"))


# ---- components ----------------------------------------------------------------------------------


def test_deformable_attention_samples_the_right_pixel() -> None:
    """All weight on one point at a pixel centre returns exactly that pixel's value (per head, per level)."""
    value = torch.randn(1, 4 * 4 + 2 * 2, 2, 3)  # levels 4×4 and 2×2, 2 heads, 3 dims
    loc = torch.zeros(1, 1, 2, 2, 1, 2)
    loc[..., 0, 0, :] = torch.tensor([(2 + 0.5) / 4, (1 + 0.5) / 4])  # level 0: x = 2, y = 1
    loc[..., 1, 0, :] = torch.tensor([(1 + 0.5) / 2, (0 + 0.5) / 2])  # level 1: x = 1, y = 0
    weights = torch.zeros(1, 1, 2, 2, 1)
    weights[:, :, 0, 0] = 1.0  # head 0 → level 0
    weights[:, :, 1, 1] = 1.0  # head 1 → level 1
    out = ms_deform_attn(value, [(4, 4), (2, 2)], loc, weights).view(2, 3)
    torch.testing.assert_close(out[0], value[0, 1 * 4 + 2, 0])
    torch.testing.assert_close(out[1], value[0, 16 + 0 * 2 + 1, 1])


def test_backbone_loads_local_weights(tmp_path) -> None:
    kwargs = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 96]}
    reference = timm.create_model("resnet18", pretrained=False, **kwargs)
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    backbone = Backbone("resnet18", str(path), kwargs)
    assert torch.equal(backbone.body.conv1.weight, reference.conv1.weight)
    assert backbone.channels == [16, 32, 64, 96]
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        Backbone("resnet18", str(tmp_path / "missing.pth"), kwargs)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="bad.pth"):
        Backbone("resnet18", str(tmp_path / "bad.pth"), kwargs)


# ---- config --------------------------------------------------------------------------------------


def test_presets_and_overrides(tmp_path) -> None:
    m, t = preset("paper-r50", "avss")
    assert (m.num_classes, m.frames, m.segment_div, m.image_size, m.d_model) == (71, 10, 4, 224, 256)
    assert (m.k_t, m.k_c, m.cf_start_step, m.lambda_va, m.lambda_cf) == (15, 8, 200, 0.4, 0.2)
    assert (t.lr, t.batch_size, t.epochs) == (1e-4, 8, 60)
    assert preset("paper-pvt", "s4")[0].backbone == "pvt_v2_b5" and preset("tiny", "ms3")[0].num_classes == 1
    m2, t2 = apply_overrides(m, t, ["model.d_model=64", "lr=3e-4", "ablate=mit,sc", "alpha_range=[0.6, 0.7]"])
    assert (m2.d_model, t2.lr, m2.ablate, m2.alpha_range) == (64, 3e-4, frozenset({"mit", "sc"}), (0.6, 0.7))
    with pytest.raises(ValueError, match="unknown"):
        apply_overrides(m, t, ["model.nope=1"])
    with pytest.raises(ValueError, match="ablate"):
        methods.validate(apply_overrides(m, t, ["ablate=foo"])[0])
    m4, _ = apply_overrides(m, t, ["method.segmenter=bidir", "method.channel_context=false"])
    assert m4.options == {"segmenter": "bidir", "channel_context": False} and methods.validate(m4).segmenter == "bidir"
    with pytest.raises(ValueError, match="channel_context"):  # the error lists the valid options
        methods.validate(apply_overrides(m, t, ["method.nope=1"])[0])
    path = tmp_path / "run.toml"  # an `icf train --config` file: typed values, no string round trip
    path.write_text('[model]\nk_t = 5\ntext_mode = "bank"\nalpha_range = [0.6, 0.7]\n[train]\nepochs = 3\n'
                    '[method]\nsegmenter = "tpavi"\n')
    m3, t3 = apply_values(*preset("tiny", "avss"), read_overrides(path))
    assert (m3.k_t, m3.text_mode, m3.alpha_range, m3.num_classes, t3.epochs) == (5, "bank", (0.6, 0.7), 71, 3)
    assert m3.options == {"segmenter": "tpavi"} and isinstance(t3, TrainConfig)
    for text, match in (('preset = "tiny"\n', "only \\[model\\], \\[train\\] and \\[method\\]"), ("[model\n", "cannot read"),
                        ("[train]\nlr = \"abc\"\n", "train.lr must be a number")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match):
            apply_values(m, t, read_overrides(path))
    path.write_text("[model]\nbogus = 1\n")
    with pytest.raises(ValueError, match="unknown ModelConfig key 'bogus'"):
        apply_values(m, t, read_overrides(path))


# ---- heavy: paper presets and real learning ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["paper-r50", "paper-pvt"])
def test_paper_presets_forward_backward(encoders, name: str) -> None:
    """Random-init paper models: one forward/backward on a batch of 2 at 224 px (prints the wall time)."""
    torch.manual_seed(7)
    cfg, _ = preset(name, "s4")
    model = make_icf(cfg, encoders).train()
    batch = make_batch(cfg, encoders, b=2)
    start = time.perf_counter()
    losses = model.loss(model(batch), batch)
    losses["total"].backward()
    print(f"\n{name}: forward+backward {time.perf_counter() - start:.1f} s, "
          f"{sum(p.numel() for p in model.trainable_parameters()) / 1e6:.1f} M trainable parameters")
    with torch.no_grad():
        assert model.eval()(batch)["logits"].shape == (2, 5, 1, 224, 224)  # frame-sized in eval (training: stride 4)
    assert torch.isfinite(losses["total"]) and _grad_norm(model.segmenter.backbone) > 0
