"""The tiny-step speed-ups (issue 24) change no number: each fast path against the code it replaced.

* the multi-class Eq. 18 loss (`_SoftmaxLosses`, closed-form backward) against the autograd chain it replaced
  (cross-entropy, softmax, one-hot Dice), values and gradients in float64, and `gradcheck`;
* `resize_bilinear` against ``F.interpolate(mode="bilinear", align_corners=False)``, up and down, with gradients;
* a whole tiny ICF training step on AVSS (loss terms and every parameter's gradient) with the new paths against
  the same step with the old ones patched back in, and foreach AdamW against the per-tensor loop.
Timing is in ``bench/train_speed.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import icf.encoders as enc
from icf.config import preset
from icf.data.datasets import load_info
from icf.model import ICF, bidir, losses
from icf.model.bidir import BidirSegmenter
from icf.model.resize import resize_bilinear
from icf.train.trainer import make_optimizer


def reference_multiclass(logits: torch.Tensor, target: torch.Tensor, gamma: float) -> dict[str, torch.Tensor]:
    """The replaced implementation: autograd through cross-entropy, softmax and a one-hot Dice."""
    ce = F.cross_entropy(logits, target, reduction="none")
    prob = logits.softmax(1)
    focal = (1 - prob.gather(1, target[:, None]).squeeze(1)).pow(gamma) * ce
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob.dtype)
    return {"bce": ce.mean(), "dice": losses.dice_loss(prob, onehot).mean(), "focal": focal.mean()}


@pytest.mark.parametrize("gamma", [0.0, 1.0, 1.5, 2.0])
def test_multiclass_loss_matches_the_autograd_reference(gamma: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 6, 7, 5, generator=g, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 6, (3, 7, 5), generator=g)
    target[0] = 2  # a frame with one class only (other classes: Σ y = 0)
    weights = torch.randn(3, generator=g, dtype=torch.float64)
    new, ref = losses.multiclass_losses(logits, target, gamma), reference_multiclass(logits, target, gamma)
    for key in ref:
        torch.testing.assert_close(new[key], ref[key], rtol=1e-12, atol=1e-12)
    grad_new = torch.autograd.grad(sum(w * new[k] for w, k in zip(weights, ref)), logits)[0]
    grad_ref = torch.autograd.grad(sum(w * ref[k] for w, k in zip(weights, ref)), logits)[0]
    torch.testing.assert_close(grad_new, grad_ref, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: torch.stack(list(losses.multiclass_losses(z, target, gamma).values())), (logits,))


def test_multiclass_loss_confident_right_answer_has_finite_gradients() -> None:
    """p_y → 1 (u = 1 − p_y → 0): the focal term's u^(γ−1) must not turn 0·∞ into NaN."""
    logits = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    logits[:, 1] = 80.0
    logits.requires_grad_()
    target = torch.ones(1, 2, 2, dtype=torch.long)
    for gamma in (0.5, 2.0):
        parts = losses.multiclass_losses(logits, target, gamma)
        grad = torch.autograd.grad(sum(parts.values()), logits)[0]
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("size", [(64, 64), (13, 29), (7, 5), (16, 16), (3, 40)])
def test_resize_bilinear_is_interpolate(size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = resize_bilinear(x, size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(got, x, up)[0], torch.autograd.grad(want, x, up)[0], rtol=1e-12, atol=1e-12)


def _step_grads(model: ICF, batch: dict) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    torch.manual_seed(3)  # SC's draws
    model.train()
    parts = model.loss(model(batch), batch)
    model.zero_grad(set_to_none=True)
    parts["total"].backward()
    scalars = {k: float(v.detach()) for k, v in parts.items() if v.numel() == 1}
    return scalars, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_icf_step_equals_the_old_paths(monkeypatch) -> None:
    """Loss terms and gradients of a tiny AVSS ICF step: new paths vs ``F.interpolate`` + the autograd loss."""
    encoders = enc.load(enc.EncoderSpec.tiny())
    cfg = preset("tiny", "avss")[0]
    torch.manual_seed(0)
    model = ICF(BidirSegmenter(cfg), encoders, enc.text_bank(encoders, list(load_info("avss").classes)[:4])).double()
    g = torch.Generator().manual_seed(0)
    b, t, s = 2, cfg.frames, cfg.image_size
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 5:] = False
    gt = valid.clone()
    gt[1, 1:] = False
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    dc, da = encoders.clip.dim, encoders.clap.dim
    batch = {"frames": rand(b, t, 3, s, s), "masks": torch.randint(0, 5, (b, t, s, s), generator=g), "gt": gt, "valid": valid,
             "mel": rand(b, t, 96, 64), "clip": rand(b, t, dc), "vclip": rand(b, dc), "vclip_seg": rand(b, 4, dc),
             "clap": rand(b, t, da), "clap_clip": rand(b, da), "labels": torch.zeros(b, cfg.num_classes), "uid": ["a", "b"]}
    old_model = copy.deepcopy(model)
    new_parts, new_grads = _step_grads(model, batch)
    with monkeypatch.context() as m:
        m.setattr(bidir, "resize_bilinear", lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        m.setattr(losses, "multiclass_losses", reference_multiclass)
        old_parts, old_grads = _step_grads(old_model, batch)
    assert set(new_parts) == set(old_parts) and {"seg", "mit", "cf", "cdcl"} <= set(new_parts)
    for key, value in old_parts.items():
        assert new_parts[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert set(new_grads) == set(old_grads)
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-7, atol=1e-10, msg=name)


def test_foreach_adamw_takes_the_loop_step() -> None:
    """`make_optimizer`'s foreach AdamW moves the parameters as the per-tensor loop does."""
    cfg, train_cfg = preset("tiny", "avss")
    torch.manual_seed(0)
    model = BidirSegmenter(cfg)
    twin = copy.deepcopy(model)
    fast = make_optimizer(model, train_cfg)
    assert all(group["foreach"] for group in fast.param_groups)
    slow = make_optimizer(twin, train_cfg)
    for group in slow.param_groups:
        group["foreach"] = False
    for step in range(3):
        for net in (model, twin):
            torch.manual_seed(step)
            for p in net.parameters():
                p.grad = torch.randn_like(p)
        fast.step()
        slow.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
