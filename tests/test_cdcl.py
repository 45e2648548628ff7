"""CDCL (Eq. 13–17): the T×T closed forms against a slow float64 scipy reference, and the loss properties."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from icf.model import cdcl

EPS = 1e-3


def _ref_cov(x: np.ndarray, eps: float, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and Σ + εI of one clip (T, d) over its real frames, the plain d×d way."""
    if mask is not None:
        x = x[mask]
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.T @ xc / len(x) + eps * np.eye(x.shape[1])


def ref_entropy(x: np.ndarray, eps: float, mask: np.ndarray | None = None) -> float:
    _, cov = _ref_cov(x, eps, mask)
    sign, logdet = np.linalg.slogdet(cov)
    assert sign > 0
    d = x.shape[1]
    return 0.5 * (d * np.log(2 * np.pi * np.e) + logdet)


def ref_w2(x: np.ndarray, y: np.ndarray, eps: float) -> float:
    mx, sx = _ref_cov(x, eps)
    my, sy = _ref_cov(y, eps)
    rx = scipy.linalg.sqrtm(sx)
    cross = scipy.linalg.sqrtm(rx @ sy @ rx)
    return float(np.sum((mx - my) ** 2) + np.trace(sx + sy - 2 * cross.real))


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("t,d", [(5, 32), (10, 64), (3, 3), (8, 5)])
def test_entropy_matches_slogdet(t: int, d: int) -> None:
    x = _rand(4, t, d, seed=t * d)
    got = cdcl.gaussian_entropy(x, EPS).numpy()
    want = np.array([ref_entropy(xi, EPS) for xi in x.numpy()])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("t1,t2,d", [(5, 5, 32), (10, 4, 48), (5, 1, 16), (4, 6, 6)])
def test_wasserstein2_matches_sqrtm(t1: int, t2: int, d: int) -> None:
    x = _rand(3, t1, d, seed=1) * 0.5
    y = _rand(2, t2, d, seed=2) * 0.5 + 0.1
    got = cdcl.wasserstein2(x, y, EPS).numpy()
    want = np.array([[ref_w2(xi, yj, EPS) for yj in y.numpy()] for xi in x.numpy()])
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_masked_frames_are_ignored() -> None:
    x = _rand(2, 6, 20, seed=3)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, False]])
    x_garbage = x.clone()
    x_garbage[1, 3:] = 1e3  # padding content must not matter
    h = cdcl.gaussian_entropy(x_garbage, EPS, mask)
    np.testing.assert_allclose(h[1].item(), ref_entropy(x[1].numpy(), EPS, mask[1].numpy()), rtol=1e-6)
    y = _rand(1, 4, 20, seed=4)
    w = cdcl.wasserstein2(x_garbage, y, EPS, x_mask=mask)
    np.testing.assert_allclose(w[1, 0].item(), ref_w2(x[1, :3].numpy(), y[0].numpy(), EPS), rtol=1e-6)


def test_w2_is_zero_on_itself_and_symmetric() -> None:
    x = _rand(3, 5, 64, seed=5)
    y = _rand(4, 5, 64, seed=6)
    self_dist = cdcl.wasserstein2(x, x, EPS).diagonal()
    assert torch.all(self_dist.abs() < 1e-9)
    torch.testing.assert_close(cdcl.wasserstein2(x, y, EPS), cdcl.wasserstein2(y, x, EPS).T, rtol=1e-9, atol=1e-10)
    # and a different clip is at a positive distance
    assert torch.all(cdcl.wasserstein2(x, y, EPS) > 1e-3)


def test_finite_gradients_when_frames_repeat_and_t_much_smaller_than_d() -> None:
    base = _rand(2, 1, 256, seed=7)
    x = base.repeat(1, 5, 1)  # five identical frames: Σ = 0, every Gram eigenvalue repeated
    x[1, 3:] = _rand(1, 2, 256, seed=8)  # second clip: two distinct frames, repeated
    x[1, 4] = x[1, 3]
    x.requires_grad_(True)
    y = _rand(3, 10, 256, seed=9).requires_grad_(True)
    d = cdcl.distribution_distance(x, y, eps=1e-4, gamma=0.1, per_dim=True)
    d.sum().backward()
    assert torch.isfinite(d).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
    assert x.grad.abs().sum() > 0


def test_gradient_matches_finite_differences() -> None:
    x = _rand(1, 4, 12, seed=10).requires_grad_(True)
    y = _rand(1, 3, 12, seed=11).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: cdcl.wasserstein2(a, b, EPS), (x, y), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(lambda a: cdcl.gaussian_entropy(a, EPS), (x,), eps=1e-6, atol=1e-5)


def test_float32_close_to_float64() -> None:
    x = _rand(4, 10, 256, seed=12)
    y = _rand(4, 10, 256, seed=13)
    x, y = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1)
    d64 = cdcl.wasserstein2(x, y, 1e-4)
    d32 = cdcl.wasserstein2(x.float(), y.float(), 1e-4).double()
    torch.testing.assert_close(d32, d64, rtol=1e-3, atol=1e-4)


def test_visual_audio_loss_falls_as_positives_approach() -> None:
    """Eq. 16 with logits −D/τ: shrinking positive distances / growing negative ones lowers the loss."""
    dist = torch.full((4, 4), 2.0)
    positives = torch.eye(4, dtype=torch.bool)
    base = cdcl.loss_visual_audio(dist, positives, 0.1)
    closer = cdcl.loss_visual_audio(dist - torch.eye(4), positives, 0.1)
    farther = cdcl.loss_visual_audio(dist + (1 - torch.eye(4)), positives, 0.1)
    assert closer < base and farther < base


def test_visual_audio_loss_on_features() -> None:
    """Moving clip i's audio frames toward its visual frames lowers L_v↔a."""
    v = _rand(4, 5, 16, seed=14)
    a = _rand(4, 5, 16, seed=15)
    pos = torch.eye(4, dtype=torch.bool)

    def loss(audio: torch.Tensor) -> torch.Tensor:
        d = cdcl.distribution_distance(v, audio, eps=EPS, gamma=0.0, per_dim=True)
        return cdcl.loss_visual_audio(d, pos, 1.0)

    assert loss(0.5 * a + 0.5 * v) < loss(a)


def test_audio_positives_use_threshold() -> None:
    anchor = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    pos = cdcl.audio_positives(anchor, theta=0.8, centre=False)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]


def test_centred_positives_separate_texts_that_share_a_common_component() -> None:
    """Anchors = a big shared vector + small clip-specific parts (what a mixture of shared prompts gives):
    raw cosines all pass θ (every pair positive, L_v↔a ≡ 0); the batch-centred ones keep only true matches."""
    g = torch.Generator().manual_seed(21)
    common = 10 * torch.randn(1, 32, generator=g)
    own = torch.randn(2, 32, generator=g)
    anchor = common + own[[0, 0, 1, 1]] + 0.05 * torch.randn(4, 32, generator=g)  # clips 0,1 sound alike; 2,3 alike
    raw = cdcl.audio_positives(anchor, theta=0.8, centre=False)
    centred = cdcl.audio_positives(anchor, theta=0.8, centre=True)
    assert raw.all()
    assert centred.tolist() == [[True, True, False, False], [True, True, False, False],
                                [False, False, True, True], [False, False, True, True]]
    dist = cdcl.distribution_distance(_rand(4, 5, 16, seed=22), _rand(4, 5, 16, seed=23), eps=EPS, gamma=0.1, per_dim=True)
    assert cdcl.loss_visual_audio(dist, raw, 0.1) == 0  # the dead term
    assert cdcl.loss_visual_audio(dist, centred, 0.1) > 0


def test_distance_to_a_text_distribution_depends_on_its_spread() -> None:
    """Eq. 15 against a text Gaussian: same mean, different spread → different D (Bures and entropy terms);
    against a one-point text (εI) the spread terms are constants that cancel in Eq. 17."""
    x = _rand(1, 5, 16, seed=24)
    centre = _rand(1, 1, 16, seed=25)
    offsets = _rand(1, 5, 16, seed=26)
    offsets = offsets - offsets.mean(1, keepdim=True)
    kw = dict(eps=EPS, gamma=0.1, per_dim=True, paired=True)
    narrow = cdcl.distribution_distance(x, centre + 0.1 * offsets, **kw)
    wide = cdcl.distribution_distance(x, centre + offsets, **kw)
    point = cdcl.distribution_distance(x, centre, **kw)
    mean_term = (x.mean(1) - centre[:, 0]).pow(2).sum(-1)
    # the mean term is the same for all three (offsets are centred): only the spread moved D
    assert float((narrow - wide).abs()) > 1e-3 * float(mean_term)
    assert float((narrow - point).abs()) > 0


def test_text_loss_sign_and_weights() -> None:
    pos = torch.tensor([1.0, 1.0])
    neg = torch.tensor([[1.0, 3.0], [1.0, 3.0]])
    w = cdcl.counterfactual_weights(torch.tensor([[0.7, 0.79], [0.7, 0.79]]))
    torch.testing.assert_close(w.sum(-1), torch.ones(2))
    assert w[0, 0] > w[0, 1]  # weaker counterfactual = harder negative = larger weight
    base = cdcl.loss_text(pos, neg, w, 0.5)
    assert cdcl.loss_text(pos - 0.5, neg, w, 0.5) < base
    assert cdcl.loss_text(pos, neg + 0.5, w, 0.5) < base
    # the text Gaussian (T = 1) has covariance εI: its entropy is the constant ½·d·log(2πeε)
    z = _rand(3, 1, 8, seed=16)
    torch.testing.assert_close(cdcl.gaussian_entropy(z, EPS), torch.full((3,), 0.5 * 8 * np.log(2 * np.pi * np.e * EPS), dtype=torch.float64))


def test_in_batch_text_negatives_are_the_other_clips() -> None:
    """`other_clips`: row i holds every clip but i, in order, with weights 1/(B − 1)."""
    text = _rand(4, 3, 8, seed=30)
    mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False], [True, True, True]])
    neg, neg_mask, w = cdcl.other_clips(text, mask)
    assert neg.shape == (4, 3, 3, 8) and neg_mask.shape == (4, 3, 3)
    for i in range(4):
        others = [j for j in range(4) if j != i]
        torch.testing.assert_close(neg[i], text[others])
        assert torch.equal(neg_mask[i], mask[others])
    torch.testing.assert_close(w, torch.full((4, 3), 1 / 3, dtype=torch.float64))


def test_joined_negatives_keep_each_sets_distances() -> None:
    """`join_negatives` pads point negatives (T = 1) to the text sets' T with masked rows: D to every negative is
    the one computed on the unpadded set, so padding adds nothing to a Gaussian."""
    x = _rand(2, 5, 8, seed=31)
    valid = torch.ones(2, 5, dtype=torch.bool)
    points = _rand(2, 2, 1, 8, seed=32)
    texts = _rand(2, 3, 5, 8, seed=33)
    groups = [(points, torch.ones(2, 2, 1, dtype=torch.bool), torch.full((2, 2), 0.5, dtype=torch.float64)),
              (texts, torch.ones(2, 3, 5, dtype=torch.bool), torch.full((2, 3), 1 / 3, dtype=torch.float64))]
    neg, mask, w = cdcl.join_negatives(groups)
    assert neg.shape == (2, 5, 5, 8) and w.shape == (2, 5)
    kw = dict(eps=EPS, gamma=0.1, per_dim=True, paired=True)

    def dist(n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        k = n.shape[1]
        return cdcl.distribution_distance(x.repeat_interleave(k, 0), n.flatten(0, 1), x_mask=valid.repeat_interleave(k, 0),
                                          y_mask=m.flatten(0, 1), **kw).view(2, k)

    expect = torch.cat([dist(points, groups[0][1]), dist(texts, groups[1][1])], 1)
    torch.testing.assert_close(dist(neg, mask), expect)


def test_gradient_shares_against_hand_computed_gradients() -> None:
    """`gradient_shares` on terms with known gradients: L_seg = a·p (∇ = a), L_x = b·p + c·q (∇ = (b, c)),
    L_y = ‖p‖²/2 at p (∇ = p); shares are the norms over their sum, gcos the cosine to a (zero on q)."""
    from icf.model.losses import gradient_shares

    g = torch.Generator().manual_seed(0)
    p = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    a, b, c = (torch.randn(n, generator=g, dtype=torch.float64) for n in (5, 5, 3))
    terms = {"seg": (a * p).sum(), "x": (b * p).sum() + (c * q).sum(), "y": 0.5 * p.pow(2).sum()}
    got = gradient_shares(terms, [p, q])
    grads = {"seg": torch.cat([a, torch.zeros(3, dtype=torch.float64)]), "x": torch.cat([b, c]),
             "y": torch.cat([p.detach(), torch.zeros(3, dtype=torch.float64)])}
    norms = {k: v.norm() for k, v in grads.items()}
    for k in grads:
        assert abs(float(got[f"gs_{k}"]) - float(norms[k] / sum(norms.values()))) < 1e-6
    for k in ("x", "y"):
        assert abs(float(got[f"gcos_{k}"]) - float(grads[k] @ grads["seg"] / (norms[k] * norms["seg"]))) < 1e-6
    assert "gcos_seg" not in got
    assert abs(sum(float(got[f"gs_{k}"]) for k in grads) - 1) < 1e-6


def test_visual_tap_before_the_last_relu_is_signed_and_leaves_the_logits() -> None:
    """``cdcl_visual``: "post_relu" frame features lie in the positive orthant, "pre_relu" ones do not; the
    segmentation forward (logits) is the same whichever map CDCL reads."""
    import dataclasses

    from icf.config import preset
    from icf.model.bidir import BidirSegmenter

    cfg = dataclasses.replace(preset("tiny", "s4")[0], cdcl_visual="pre_relu")
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.randn(2, cfg.frames, 3, 64, 64, generator=g), "mel": torch.randn(2, cfg.frames, 96, 64, generator=g),
             "valid": torch.ones(2, cfg.frames, dtype=torch.bool)}
    torch.manual_seed(0)
    model = BidirSegmenter(cfg).train()
    pre = model(batch)
    model.cfg = dataclasses.replace(cfg, cdcl_visual="post_relu")
    post = model(batch)
    torch.testing.assert_close(pre["logits"], post["logits"])
    assert float(post["vis_feat"].min()) >= 0
    assert float((pre["vis_feat"] < 0).float().mean()) > 0.2
    torch.testing.assert_close(pre["vis_feat"].norm(dim=-1), torch.ones(2, cfg.frames))


def test_masked_frame_features_match_a_float64_reference() -> None:
    """``frame_features`` with a weight map is the weighted spatial mean (masked average pooling), L2-normalised;
    a constant weight gives the plain mean; ``foreground_probability`` is σ (binary) or 1 − P(background)."""
    from icf.model.segmenter import foreground_probability, frame_features

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(6, 5, 4, 3, generator=g), torch.rand(6, 4, 3, generator=g)
    xs, ws = x.double().numpy(), w.double().numpy()
    ref = np.einsum("ndhw,nhw->nd", xs, ws) / ws.sum((1, 2))[:, None]
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(frame_features(x, 2, w).reshape(6, 5).numpy(), ref, atol=1e-6)
    torch.testing.assert_close(frame_features(x, 2, torch.full_like(w, 0.3)), frame_features(x, 2))
    logits = torch.randn(6, 4, 4, 3, generator=g)
    ls = logits.double().numpy()
    np.testing.assert_allclose(foreground_probability(logits[:, :1], True).numpy(), 1 / (1 + np.exp(-ls[:, 0])), atol=1e-6)
    soft = np.exp(ls) / np.exp(ls).sum(1, keepdims=True)
    np.testing.assert_allclose(foreground_probability(logits, False).numpy(), 1 - soft[:, 0], atol=1e-6)


@pytest.mark.parametrize("segmenter", ["bidir", "tpavi"])
def test_masked_visual_pool_reads_the_predicted_foreground_without_training_it(segmenter: str) -> None:
    """``cdcl_visual_pool = "mask"``: F^v changes (it averages where the model predicts a sounding object), the
    logits do not, and no gradient of F^v reaches what only shapes the logits (the mask is detached): CDCL moves
    the features, never the mask it pools with."""
    import dataclasses

    from icf.config import preset
    from icf.model.bidir import BidirSegmenter
    from icf.model.tpavi import TPAVISegmenter

    cfg = preset("tiny", "avss")[0]
    g = torch.Generator().manual_seed(0)
    batch = {"frames": torch.randn(2, cfg.frames, 3, 64, 64, generator=g), "mel": torch.randn(2, cfg.frames, 96, 64, generator=g),
             "valid": torch.ones(2, cfg.frames, dtype=torch.bool)}
    torch.manual_seed(0)
    model = (BidirSegmenter if segmenter == "bidir" else TPAVISegmenter)(cfg).train()
    logit_only = model.mask_head if segmenter == "bidir" else model.head
    # At initialisation 1 − P(background) ≈ 70/71 everywhere (pooling ≈ the mean): give the classifier a trained
    # model's contrast, so some pixels are predicted background and some not.
    torch.nn.init.normal_((model.mask_head.pixel if segmenter == "bidir" else model.head.cls).weight, std=2.0)
    mean = model(batch)
    model.cfg = dataclasses.replace(cfg, cdcl_visual_pool="mask")
    seen = {}
    if segmenter == "tpavi":  # the fused map the head reads is F^v's map: pool it by hand (block means, float64)
        model.head.register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach(), logits=out.detach()))
    masked = model(batch)
    torch.testing.assert_close(mean["logits"], masked["logits"])
    assert float((mean["vis_feat"] - masked["vis_feat"]).abs().max()) > (1e-3 if segmenter == "bidir" else 1e-5)
    if seen:
        x, probs = seen["x"].double().numpy(), seen["logits"].double().softmax(1).numpy()
        n, d, h, w = x.shape
        fg = (1 - probs[:, 0]).reshape(n, h, probs.shape[-2] // h, w, probs.shape[-1] // w).mean((2, 4))
        ref = np.einsum("ndhw,nhw->nd", x, fg) / fg.sum((1, 2))[:, None]
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)
        np.testing.assert_allclose(masked["vis_feat"].detach().reshape(n, d).numpy(), ref, atol=1e-5)
    masked["vis_feat"].sum().backward()
    assert all(p.grad is None for p in logit_only.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.backbone.parameters())


@pytest.mark.parametrize("detach", [True, False])
def test_which_terms_reach_the_segmenter(detach: bool) -> None:
    """`gradient_shares` on the full tiny model (MIT's query projections non-zero, as after the first steps): the
    CDCL terms reach the segmenter; L_cf never does with CDCL on (z, v detached); Eq. 3's matching loss does only
    when the segmenter's descriptors enter MIT attached (``mit_detach_visual=False``)."""
    import dataclasses

    import icf.encoders as enc
    from icf.model.losses import gradient_shares, weighted_terms
    from test_model import make_batch, make_icf, tiny

    torch.manual_seed(3)
    encoders = enc.load(enc.EncoderSpec.tiny())
    cfg = dataclasses.replace(tiny("s4"), mit_detach_visual=detach, grad_share_every=0)
    model = make_icf(cfg, encoders).train()
    for proj in model.mit.query_proj.values():
        torch.nn.init.normal_(proj.weight, std=0.1)
    batch = make_batch(cfg, encoders, b=4)
    parts = model.loss(model(batch), batch)
    shares = gradient_shares(weighted_terms(parts, cfg), list(model.segmenter.parameters()))
    assert float(shares["gs_cf"]) == 0.0
    assert min(float(shares[f"gs_{k}"]) for k in ("v_a", "v_l", "a_l")) > 0
    assert (float(shares["gs_mit"]) == 0.0) == detach
