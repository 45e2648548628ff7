"""The tiny-step speed-ups (issue 24) change no number: each fast path against the code it replaced.

* the multi-class Eq. 18 loss (`_SoftmaxLosses`, closed-form backward) against the autograd chain it replaced
  (cross-entropy, softmax, one-hot Dice), values and gradients in float64, and `gradcheck`;
* `resize_bilinear` against ``F.interpolate(mode="bilinear", align_corners=False)``, up and down, with gradients;
* Eq. 18 on stride-4 logits (resized on the scored frames only) against resizing every frame first;
* the audio CNN's pool-before-ReLU blocks against ReLU-before-pool (ties at 0 included), and the channels-last
  backbone and audio CNN against the same modules in NCHW;
* a whole tiny ICF training step on AVSS (loss terms and every parameter's gradient) with the new paths against
  the same step with all the old ones patched back in, and fused AdamW against the per-tensor loop;
* `keep_freed_memory`: a freed large block is reused without page faults.
Timing is in ``bench/train_speed.py`` (and where the time goes in ``bench/profile_step.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import ctypes
import ctypes.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import icf.encoders as enc
from icf.config import preset
from icf.data.datasets import load_info
from icf.model import ICF, bidir, losses
from icf.model.audio import _small_cnn
from icf.model.bidir import BidirSegmenter
from icf.model.resize import resize_bilinear
from icf.train.host_memory import keep_freed_memory
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


def test_segmentation_loss_on_stride4_logits_equals_resizing_every_frame() -> None:
    """Eq. 18 on low-resolution logits (resized on the scored frames only) = resize all frames, then Eq. 18."""
    g = torch.Generator().manual_seed(2)
    gt = torch.tensor([[True, False, True, True], [True, False, False, False]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    for k in (1, 5):
        cfg = dataclasses.replace(preset("tiny", "avss" if k > 1 else "s4")[0], num_classes=k)
        logits = torch.randn(2, 4, k, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
        masks = torch.randint(0, max(k, 2), (2, 4, 16, 20), generator=g)
        full = F.interpolate(logits.flatten(0, 1), size=(16, 20), mode="bilinear", align_corners=False).view(2, 4, k, 16, 20)
        new, ref = (losses.segmentation_loss(x, masks, gt, valid, cfg) for x in (logits, full))
        for key in ref:
            torch.testing.assert_close(new[key], ref[key], rtol=1e-12, atol=1e-12)
        grads = [torch.autograd.grad(parts["seg"], logits)[0] for parts in (new, ref)]
        torch.testing.assert_close(*grads, rtol=1e-10, atol=1e-13)
        assert grads[1][~(gt & valid)].abs().max() == 0  # unscored frames get no gradient either way


def relu_before_pool(body: nn.Sequential) -> nn.Sequential:
    """The audio CNN as it was: conv–BN–ReLU–pool (the same modules, the ReLU and max-pool swapped back)."""
    layers = list(body)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    return nn.Sequential(*layers)


def test_pool_before_relu_equals_relu_before_pool() -> None:
    """Max and ReLU commute, values and gradients, whatever the windows hold: all negative, a positive maximum
    reached twice, zeros."""
    torch.manual_seed(0)
    body = _small_cnn((3, 4))
    assert [type(m) for m in body[:4]] == [nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ReLU]
    old = relu_before_pool(copy.deepcopy(body))
    assert [type(m) for m in old[:4]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    x = torch.randn(4, 3, 6, 8, dtype=torch.float64)
    x[0, 0, :2, :2] = -1.0  # a window below zero
    x[0, 1, :2, 2:4] = torch.tensor([[0.5, 0.5], [0.1, -2.0]], dtype=torch.float64)  # a tied positive maximum
    x[1, :, :2, :2] = 0.0
    x.requires_grad_()
    up = torch.randn(4, 3, 3, 4, dtype=torch.float64)
    new_y, old_y = (F.max_pool2d(x, 2).relu(), F.max_pool2d(x.relu(), 2))
    assert torch.equal(new_y, old_y)
    assert torch.equal(*(torch.autograd.grad(y, x, up)[0] for y in (new_y, old_y)))
    mel = torch.randn(6, 1, 96, 64)
    body.double()
    old.double()
    new_out, old_out = body(mel.double()), old(mel.double())
    torch.testing.assert_close(new_out, old_out, rtol=0, atol=0)
    new_g, old_g = (torch.autograd.grad(out.pow(2).sum(), list(net.parameters())) for out, net in ((new_out, body), (old_out, old)))
    for a, b in zip(new_g, old_g):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def nchw_reference(model: ICF) -> ICF:
    """A copy of ``model`` the way the tiny step ran before the speed-ups: backbone and audio CNN in NCHW, the audio
    CNN's ReLU before its max-pool."""
    old = copy.deepcopy(model)
    for module in (old.segmenter.backbone, old.segmenter.audio):
        module.layout = torch.contiguous_format
        module.to(memory_format=torch.contiguous_format)
    old.segmenter.audio.body = relu_before_pool(old.segmenter.audio.body)
    return old


def _step_grads(model: ICF, batch: dict, full_size: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One training forward/backward: the loss terms and every parameter's gradient. ``full_size``: the logits of
    every frame upsampled to the frame size with ``F.interpolate`` before Eq. 18 (the old path)."""
    torch.manual_seed(3)  # SC's draws
    model.train()
    out = model(batch)
    if full_size:
        logits = out["logits"]
        size = batch["frames"].shape[-2:]
        out["logits"] = F.interpolate(logits.flatten(0, 1), size=size, mode="bilinear", align_corners=False).view(*logits.shape[:3], *size)
    parts = model.loss(out, batch)
    model.zero_grad(set_to_none=True)
    parts["total"].backward()
    scalars = {k: float(v.detach()) for k, v in parts.items() if v.numel() == 1}
    return scalars, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_tiny_icf_step_equals_the_old_paths(monkeypatch) -> None:
    """Loss terms and gradients of a tiny AVSS ICF step: new paths vs NCHW convolutions, ReLU before pool, every
    frame upsampled with ``F.interpolate`` and the autograd loss."""
    encoders = enc.load(enc.EncoderSpec.tiny())
    cfg = preset("tiny", "avss")[0]
    torch.manual_seed(0)
    model = ICF(BidirSegmenter(cfg), encoders, enc.text_bank(encoders, list(load_info("avss").classes)[:4])).double()
    assert model.segmenter.backbone.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
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
    old_model = nchw_reference(model)
    new_parts, new_grads = _step_grads(model, batch)
    with monkeypatch.context() as m:
        m.setattr(losses, "multiclass_losses", reference_multiclass)
        old_parts, old_grads = _step_grads(old_model, batch, full_size=True)
    assert set(new_parts) == set(old_parts) and {"seg", "mit", "cf", "cdcl"} <= set(new_parts)
    for key, value in old_parts.items():
        assert new_parts[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert set(new_grads) == set(old_grads)
    for name, grad in old_grads.items():
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-7, atol=1e-10, msg=name)
    model.eval(), old_model.eval()
    with torch.no_grad(), monkeypatch.context() as m:  # eval: frame-size logits through `resize_bilinear`
        new_eval = model(batch)["logits"]
        m.setattr(bidir, "resize_bilinear", lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        torch.testing.assert_close(new_eval, old_model(batch)["logits"], rtol=1e-9, atol=1e-10)
    assert new_eval.shape == (b, t, cfg.num_classes, s, s)


def test_fused_adamw_takes_the_loop_step() -> None:
    """`make_optimizer`'s fused AdamW moves the parameters as the per-tensor loop does."""
    cfg, train_cfg = preset("tiny", "avss")
    torch.manual_seed(0)
    model = BidirSegmenter(cfg)
    twin = copy.deepcopy(model)
    fast = make_optimizer(model, train_cfg)
    assert all(group["fused"] for group in fast.param_groups)
    slow = make_optimizer(twin, train_cfg)
    for group in slow.param_groups:
        group["fused"], group["foreach"] = False, False
    for step in range(3):
        for net in (model, twin):
            torch.manual_seed(step)
            for p in net.parameters():
                p.grad = torch.randn_like(p)
        fast.step()
        slow.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_keep_freed_memory_keeps_large_blocks_in_the_heap() -> None:
    """After `keep_freed_memory` a block larger than glibc's default mmap ceiling (32 MiB) comes from the heap, not
    from ``mmap``, and stays there once freed (glibc's own counters, ``mallinfo2``); by default it would be mapped
    and unmapped, its pages faulted in again at every allocation."""
    threshold = keep_freed_memory()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not threshold or not hasattr(libc, "mallinfo2"):
        pytest.skip("malloc is not glibc's (2.33 or later)")
    assert keep_freed_memory() == threshold  # once per process
    libc.mallinfo2.restype = _MallInfo2
    size = min(threshold // 2, 64 << 20)
    block = torch.ones(size // 4)
    mapped = libc.mallinfo2().hblkhd
    assert mapped < size  # not an mmap of its own
    del block
    assert libc.mallinfo2().fordblks >= size  # free in the heap, ready for the next step
