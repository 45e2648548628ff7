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
    assert z.grad is not None and z.grad.abs().sum() > 0  # L_cf can shape z; ICF detaches when CDCL is on


def test_degree_stays_inside_its_bound_whatever_the_heads_say(cfg) -> None:
    """c = α·(c₀ + (1 − c₀)·m·s) ∈ [c₀·α, α), even with heads driven to their extremes."""
    sc = SemanticCounterfactual(cfg)
    zn = F.normalize(torch.randn(6, 16), dim=-1)
    alpha = torch.full((6, 4), 0.75)
    floor = cfg.cf_degree_floor
    for bias in (-50.0, 0.0, 50.0):
        torch.nn.init.constant_(sc.m_head.bias, bias)
        torch.nn.init.constant_(sc.s_head.bias, bias)
        c = sc.degrees(zn, alpha)
        assert c.shape == (6, 4, 16)
        assert torch.all((c >= floor * 0.75 - 1e-6) & (c <= 0.75))
    assert c.min() > 0.75 - 1e-3 and sc.degrees(zn, alpha).max() <= 0.75


def test_unit_variance_latent_keeps_an_intermediate_state(cfg) -> None:
    """√d·ẑ against unit-variance noise: cos(z_t*, z) ≈ √ᾱ_t* (≈ 0.81 at t* = 200), not ≈ 0.09 (d = 256)."""
    big = dataclasses.replace(cfg, d_model=256)
    torch.manual_seed(5)
    z = F.normalize(torch.randn(64, 256), dim=-1)
    t = torch.full((64,), big.cf_start_step)
    for unit_var, expected in ((True, float(SemanticCounterfactual(big).noise.alphas_cumprod[200].sqrt())), (False, None)):
        sc = SemanticCounterfactual(dataclasses.replace(big, sc_unit_variance=unit_var))
        noised = sc._add_noise(sc.scale * z, torch.randn_like(z), t)
        cos = F.cosine_similarity(noised, z, dim=-1).mean()
        if expected is None:
            assert cos < 0.15  # the unit vector is drowned
        else:
            assert abs(float(cos) - expected) < 0.03
