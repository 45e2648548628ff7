"""Semantic counterfactual (SC, paper §3.3, Eq. 6–12), training only.

From the composite factual text z (MIT, Eq. 5) the SC generates counterfactual texts ℓ^cf:

1. normalise z; draw r ~ N(0, I) and Gram–Schmidt it against z (Eq. 7);
2. mix z' = √(1 − c)·z + √c·r with c = α·m·s (Eq. 8): α_k ~ U[0.7, 0.8) per candidate, m ∈ (0, 1) per sample
   and s ∈ (0, 1)^d per feature from small sigmoid heads on z — learnable inside the α bound (SPEC §5);
3. train the ε-network on the counterfactual: z and z' are noised with the **same** ε (noise symmetry,
   Eq. 6) to a step t ~ U{1..t*}; L_cf = ‖ε − ε_θ(z'_t, t, v)‖² + λ_ortho·L_ortho (Eq. 10–11);
4. generate: noise z' to t* = s^d (``cf_start_step``; "counterfactual generation intervenes in the
   intermediate state"), denoise with DDIM to t = 0 (Eq. 9), keep the Top-K (k^c) of the 2·k^c candidates by
   cosine to z (Eq. 12), with their α_k for Eq. 17's weights.

Decisions (documented because the paper leaves them open):

* The noise schedule is diffusers' ``DDPMScheduler`` (1000 linear-β training steps; ``add_noise``) and the
  reverse pass ``DDIMScheduler`` with the same betas, never a hand-written schedule.
* Eq. 11's expectation over t is realised by sampling t ∈ [1, t*] per candidate, because the reverse pass
  queries ε_θ at every step below t*.
* The SC learns to counterfactualise z; it does not reshape z: z and the conditioning visual feature v enter
  detached, and generation runs without gradient (ℓ^cf are fixed negatives for Eq. 17). The m/s heads learn
  through L_ortho, the ε-network through the noise-prediction term.
* L_ortho (Eq. 10) = ‖z'_t − z_t‖² + λ_z·(ẑ'_t·ẑ_t)², averaged over candidates, with the product taken
  between the L2-normalised noised vectors (a cosine). The raw product carries the shared noise's
  (1 − ᾱ_t)·‖ε‖² ≈ (1 − ᾱ_t)·d (≈ 90 at t* = 200, d = 256), whose square would dwarf every other loss and
  dominate gradient clipping; the cosine keeps the term in [0, λ_z] for any d. The first term needs no
  change: with the same ε it equals ᾱ_t·‖z' − z‖² exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from icf.config import ModelConfig


def orthogonalize(z: Tensor, r: Tensor) -> Tensor:
    """Eq. 7: r − (r·ẑ)ẑ, normalised, per sample (ẑ = z/‖z‖).

    Args:
        z: ``(B, d)`` factual texts.
        r: ``(B, d)`` or ``(B, N, d)`` random directions (N candidates per sample).
    Returns: unit vectors orthogonal to z, shaped like r.
    """
    zn = F.normalize(z, dim=-1)
    if r.ndim == zn.ndim + 1:
        zn = zn.unsqueeze(-2)
    return F.normalize(r - (r * zn).sum(-1, keepdim=True) * zn, dim=-1)


def mix(z: Tensor, r: Tensor, c: Tensor) -> Tensor:
    """Eq. 8: z' = √(1 − c)·z + √c·r; c = 1 gives r (fully orthogonal), c = 0 gives z. Broadcasts over shapes."""
    return (1 - c).sqrt() * z + c.sqrt() * r


def select_top_k(candidates: Tensor, z: Tensor, alpha: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Eq. 12: the k candidates most similar (cosine) to z, most similar first.

    Args:
        candidates: ``(B, N, d)`` generated z*; z: ``(B, d)``; alpha: ``(B, N)`` each candidate's α.
    Returns: ℓ^cf ``(B, k, d)`` (L2-normalised) and their α ``(B, k)``.
    """
    sim = F.cosine_similarity(candidates, z.unsqueeze(1), dim=-1)
    idx = sim.topk(k, dim=1).indices
    picked = candidates.gather(1, idx[..., None].expand(-1, -1, candidates.shape[-1]))
    return F.normalize(picked, dim=-1), alpha.gather(1, idx)


class EpsilonNet(nn.Module):
    """ε_θ(z'_t, t, v): an MLP over [z'_t, sinusoidal embedding of t, v] predicting the added noise ``(…, d)`` (Eq. 9, 11)."""

    def __init__(self, dim: int, hidden: int, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.time = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(2 * dim, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x ``(B, N, d)``, t ``(B, N)`` int steps, v ``(B, d)`` visual condition → ``(B, N, d)``."""
        temb = get_timestep_embedding(t.reshape(-1), self.time_dim).view(*t.shape, self.time_dim).to(x.dtype)
        cond = v.unsqueeze(1).expand_as(x)
        return self.body(self.inp(torch.cat([x, cond], dim=-1)) + self.time(temb))


class SemanticCounterfactual(nn.Module):
    """The SC branch: m/s heads, ε-network and the diffusers schedules (module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.k = cfg.k_c
        self.candidates = 2 * cfg.k_c
        self.alpha_range = cfg.alpha_range
        self.lambda_z = cfg.lambda_z
        self.lambda_ortho = cfg.lambda_ortho
        self.m_head = nn.Linear(d, 1)  # inter-sample degree m ∈ (0, 1)
        self.s_head = nn.Linear(d, d)  # intra-sample, per-feature degree s ∈ (0, 1)^d
        self.eps_net = EpsilonNet(d, cfg.eps_hidden)
        self.noise = DDPMScheduler(num_train_timesteps=cfg.diffusion_train_steps)
        self.reverse = DDIMScheduler(num_train_timesteps=cfg.diffusion_train_steps, clip_sample=False)
        self.reverse.set_timesteps(max(1, cfg.diffusion_train_steps * cfg.cf_steps // cfg.cf_start_step))
        # DDIM steps at or below t* (the first one is t* when cf_steps divides it)
        self.steps = [int(t) for t in self.reverse.timesteps if 0 < int(t) <= cfg.cf_start_step]
        self.t_start = self.steps[0]

    def degrees(self, zn: Tensor, alpha: Tensor) -> Tensor:
        """c = α·m·s ``(B, N, d)`` from α ``(B, N)`` and the heads on ẑ ``(B, d)`` (Eq. 8)."""
        m = torch.sigmoid(self.m_head(zn))  # (B, 1)
        s = torch.sigmoid(self.s_head(zn))  # (B, d)
        return alpha[..., None] * m[:, None] * s[:, None]

    def _add_noise(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0) of Eq. 6 through diffusers (``add_noise`` flattens any leading shape)."""
        shape = x.shape
        return self.noise.add_noise(x.reshape(-1, shape[-1]), eps.reshape(-1, shape[-1]), t.reshape(-1)).view(shape)

    def ortho_loss(self, zcf_t: Tensor, z_t: Tensor) -> Tensor:
        """Eq. 10: ‖z'_t − z_t‖² + λ_z·cos(z'_t, z_t)², mean over samples and candidates (module docstring)."""
        cos = F.cosine_similarity(zcf_t, z_t, dim=-1)
        return ((zcf_t - z_t).pow(2).sum(-1) + self.lambda_z * cos.pow(2)).mean()

    @torch.no_grad()
    def generate(self, zcf: Tensor, v: Tensor) -> Tensor:
        """Eq. 9: noise z' ``(B, N, d)`` to t*, then DDIM-denoise to t = 0 with ε_θ conditioned on v → z* ``(B, N, d)``."""
        start = torch.full(zcf.shape[:2], self.t_start, device=zcf.device, dtype=torch.long)
        x = self._add_noise(zcf, torch.randn_like(zcf), start)
        for t in self.steps:
            eps = self.eps_net(x, torch.full_like(start, t), v)
            x = self.reverse.step(eps, t, x).prev_sample
        return x

    def forward(self, z: Tensor, v: Tensor) -> dict[str, Tensor]:
        """z ``(B, d)`` factual text, v ``(B, d)`` pooled visual feature →

        ``loss_cf`` (Eq. 11, scalar), ``cf`` ℓ^cf ``(B, k_c, d)``, ``cf_alpha`` ``(B, k_c)``, ``degree`` mean c.
        """
        zn = F.normalize(z.detach(), dim=-1)
        v = v.detach()
        b, d = zn.shape
        lo, hi = self.alpha_range
        alpha = lo + (hi - lo) * torch.rand(b, self.candidates, device=z.device, dtype=z.dtype)
        c = self.degrees(zn, alpha)
        r = orthogonalize(zn, torch.randn(b, self.candidates, d, device=z.device, dtype=z.dtype))
        z0 = zn.unsqueeze(1).expand_as(r)
        zcf = mix(z0, r, c)  # Eq. 8
        t = torch.randint(1, self.t_start + 1, (b, self.candidates), device=z.device)
        eps = torch.randn_like(zcf)
        z_t, zcf_t = self._add_noise(z0, eps, t), self._add_noise(zcf, eps, t)  # noise symmetry
        loss = F.mse_loss(self.eps_net(zcf_t, t, v), eps) + self.lambda_ortho * self.ortho_loss(zcf_t, z_t)
        cf, cf_alpha = select_top_k(self.generate(zcf.detach(), v), zn, alpha, self.k)
        return {"loss_cf": loss, "cf": cf, "cf_alpha": cf_alpha, "degree": c.mean().detach()}
