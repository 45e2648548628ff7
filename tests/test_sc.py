"""SC (Eq. 6–12): orthogonalisation, the mixing degree, Top-K, noise symmetry and gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from icf.config import preset
from icf.model.sc import SemanticCounterfactual, mix, orthogonalize, select_top_k


@pytest.fixture()
def cfg():
    return dataclasses.replace(preset("tiny", "s4")[0], d_model=16, eps_hidden=32)


def test_orthogonalize_removes_z_component_and_normalises() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 32, generator=g)
    r = torch.randn(4, 6, 32, generator=g)
    out = orthogonalize(z, r)
    assert out.shape == r.shape
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4, 6))
    cos = torch.einsum("bnd,bd->bn", out, F.normalize(z, dim=-1))
    assert cos.abs().max() < 1e-6
    # per-sample: the direction is r's own residual, not another sample's
    residual = r[1, 2] - (r[1, 2] @ F.normalize(z[1], dim=0)) * F.normalize(z[1], dim=0)
    torch.testing.assert_close(out[1, 2], F.normalize(residual, dim=0))
    # also for one r per sample
    assert orthogonalize(z, r[:, 0]).shape == (4, 32)


@pytest.mark.parametrize("c", [0.0, 0.3, 0.75, 1.0])
def test_mixing_degree_sets_the_cosine(c: float) -> None:
    """For unit z and r ⟂ z, cos(z', z) = √(1 − c) (Eq. 8) and z' stays a unit vector."""
    g = torch.Generator().manual_seed(1)
    z = F.normalize(torch.randn(5, 64, generator=g), dim=-1)
    r = orthogonalize(z, torch.randn(5, 64, generator=g))
    zp = mix(z, r, torch.tensor(c))
    torch.testing.assert_close(F.cosine_similarity(zp, z, dim=-1), torch.full((5,), (1 - c) ** 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(zp.norm(dim=-1), torch.ones(5))


def test_top_k_returns_the_most_similar_candidates() -> None:
    z = torch.tensor([[1.0, 0.0, 0.0]])
    cands = torch.tensor([[[0.0, 1.0, 0.0], [0.9, 0.1, 0.0], [-1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.99, 0.0, 0.1]]])
    alpha = torch.tensor([[0.70, 0.71, 0.72, 0.73, 0.74]])
    picked, picked_alpha, _ = select_top_k(cands, z, alpha, 3)
    expected = [4, 1, 3]  # cosines 0.995, 0.994, 0.707 (then 0, −1)
    torch.testing.assert_close(picked, F.normalize(cands[0, expected], dim=-1)[None])
    torch.testing.assert_close(picked_alpha, alpha[:, expected])


def test_reverse_schedule_starts_at_cf_start_step(cfg) -> None:
    sc = SemanticCounterfactual(cfg)
    assert sc.t_start == cfg.cf_start_step == 200
    assert len(sc.steps) == cfg.cf_steps and sc.steps == sorted(sc.steps, reverse=True) and sc.steps[-1] > 0


def test_noise_symmetry_makes_the_difference_noise_free(cfg) -> None:
    """z and z' noised with the same ε: z'_t − z_t = √ᾱ_t·(z' − z) exactly (the noise cancels)."""
    sc = SemanticCounterfactual(cfg)
    g = torch.Generator().manual_seed(2)
    z, zp, eps = (torch.randn(3, 2, 16, generator=g) for _ in range(3))
    t = torch.tensor([[10, 200], [50, 100], [1, 150]])
    diff = sc._add_noise(zp, eps, t) - sc._add_noise(z, eps, t)
    abar = sc.noise.alphas_cumprod[t].sqrt()[..., None]
    torch.testing.assert_close(diff, abar * (zp - z), atol=1e-5, rtol=1e-5)


def test_forward_shapes_bounds_and_gradients(cfg) -> None:
    torch.manual_seed(3)
    sc = SemanticCounterfactual(cfg)
    z = torch.randn(4, 16, requires_grad=True)
    out = sc(z, torch.randn(4, 16))
    assert out["cf"].shape == (4, cfg.k_c, 16) and out["cf_alpha"].shape == (4, cfg.k_c)
    lo, hi = cfg.alpha_range
    assert torch.all((out["cf_alpha"] >= lo) & (out["cf_alpha"] < hi))
    torch.testing.assert_close(out["cf"].norm(dim=-1), torch.ones(4, cfg.k_c))
    out["loss_cf"].backward()
    for name in ("m_head", "s_head", "eps_net"):
        grads = [p.grad for p in getattr(sc, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert z.grad is None  # the SC does not reshape z (documented decision)


def test_degree_is_bounded_by_alpha(cfg) -> None:
    sc = SemanticCounterfactual(cfg)
    zn = F.normalize(torch.randn(6, 16), dim=-1)
    alpha = torch.full((6, 4), 0.75)
    c = sc.degrees(zn, alpha)
    assert c.shape == (6, 4, 16)
    assert torch.all((c > 0) & (c < 0.75))
