"""Semantic counterfactual (SC, paper §3.3, Eq. 6–12), training only.

From the composite factual text z (MIT, Eq. 5) the SC generates counterfactual texts ℓ^cf:

1. normalise z; draw r ~ N(0, I) and Gram–Schmidt it against z (Eq. 7);
2. mix z' = √(1 − c)·z + √c·r (Eq. 8) with the degree c = α·(c₀ + (1 − c₀)·m·s): α_k ~ U[0.7, 0.8) per candidate
   (the paper's α^o), m ∈ (0, 1) per sample and s ∈ (0, 1)^d per feature from small sigmoid heads on z. The
   floor c₀ (``cf_degree_floor``, 0.8) is the "boundary for learning" the paper sets by combining the
   hyper-parameter with the learnable parts: c stays in [c₀·α, α), so L_ortho (minimised at c = 0 for unit
   vectors) cannot collapse the counterfactuals onto z;
3. train the ε-network on the counterfactual in a unit-variance latent space: z and z' are scaled by √d
   (``sc_unit_variance``; LDM's latent scale factor — a unit vector against unit-variance noise would be pure
   noise at t*: cos(z_t*, z) = 0.086 at d = 256 instead of √ᾱ = 0.81), noised with the **same** ε (noise
   symmetry, Eq. 6) to a step t ~ U{1..t*}; L_cf = ‖ε − ε_θ(z'_t, t, v)‖² + λ_ortho·L_ortho (Eq. 10–11);
4. generate: noise z' to t* = s^d (``cf_start_step``; "counterfactual generation intervenes in the
   intermediate state"), denoise with DDIM to t = 0 (Eq. 9), rescale by 1/√d, keep the Top-K (k^c) of the
   2·k^c candidates by cosine to z (Eq. 12), with their α_k for Eq. 17's weights.

Decisions (documented because the paper leaves them open):

* The noise schedule is diffusers' ``DDPMScheduler`` (1000 linear-β training steps; ``add_noise``) and the
  reverse pass ``DDIMScheduler`` with the same betas, never a hand-written schedule.
* Eq. 11's expectation over t is realised by sampling t ∈ [1, t*] per candidate, because the reverse pass
  queries ε_θ at every step below t*.
* Whether L_cf reshapes z and the conditioning visual feature v is the caller's choice (`icf.model.icf`,
  ``sc_detach``): with CDCL on they enter detached (SC learns to counterfactualise z); without CDCL the
  gradient flows into MIT and the segmenter (the paper's MIT+SC row). Generation runs without gradient
  (ℓ^cf are fixed negatives for Eq. 17).
* L_ortho (Eq. 10) = ‖z'_t − z_t‖²/σ² + λ_z·(ẑ'_t·ẑ_t)², averaged over candidates, σ the latent scale (so the
  first term equals ᾱ_t·‖z' − z‖² for unit z whatever the scale) and the product taken between the
  L2-normalised noised vectors (a cosine). The raw product carries the shared noise's (1 − ᾱ_t)·‖ε‖², whose
  square would dwarf every other loss and dominate gradient clipping; the cosine keeps the term in [0, λ_z].
* The order follows Fig. 2's pipeline reading: orthogonalise the clean z, then noise z and z' with one ε
  (§3.1's "orthogonalize … in the noise space" read as: the orthogonal part lives in the diffusion latent).
* Diagnostics: ``degree`` (mean c), ``cf_cos`` (mean cos(ℓ^cf, z) of the kept counterfactuals) and
  ``cf_cos_mix`` (mean cos(z'_k, z) of the same candidates before diffusion, ≈ √(1 − c)).
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


def select_top_k(candidates: Tensor, z: Tensor, alpha: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Eq. 12: the k candidates most similar (cosine) to z, most similar first.

    Args:
        candidates: ``(B, N, d)`` generated z*; z: ``(B, d)``; alpha: ``(B, N)`` each candidate's α.
    Returns: ℓ^cf ``(B, k, d)`` (L2-normalised), their α ``(B, k)`` and their indices in ``candidates`` ``(B, k)``.
    """
    sim = F.cosine_similarity(candidates, z.unsqueeze(1), dim=-1)
    idx = sim.topk(k, dim=1).indices
    picked = candidates.gather(1, idx[..., None].expand(-1, -1, candidates.shape[-1]))
    return F.normalize(picked, dim=-1), alpha.gather(1, idx), idx


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
        self.floor = cfg.cf_degree_floor
        self.scale = float(d) ** 0.5 if cfg.sc_unit_variance else 1.0
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
        """c = α·(c₀ + (1 − c₀)·m·s) ``(B, N, d)`` from α ``(B, N)`` and the heads on ẑ ``(B, d)`` (Eq. 8)."""
        m = torch.sigmoid(self.m_head(zn))  # (B, 1)
        s = torch.sigmoid(self.s_head(zn))  # (B, d)
        return alpha[..., None] * (self.floor + (1 - self.floor) * m[:, None] * s[:, None])

    def _add_noise(self, x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """q(x_t | x_0) of Eq. 6 through diffusers (``add_noise`` flattens any leading shape)."""
        shape = x.shape
        return self.noise.add_noise(x.reshape(-1, shape[-1]), eps.reshape(-1, shape[-1]), t.reshape(-1)).view(shape)

    def ortho_loss(self, zcf_t: Tensor, z_t: Tensor) -> Tensor:
        """Eq. 10: ‖z'_t − z_t‖²/σ² + λ_z·cos(z'_t, z_t)², mean over samples and candidates (module docstring)."""
        cos = F.cosine_similarity(zcf_t, z_t, dim=-1)
        return ((zcf_t - z_t).pow(2).sum(-1) / self.scale**2 + self.lambda_z * cos.pow(2)).mean()

    @torch.no_grad()
    def generate(self, zcf: Tensor, v: Tensor) -> Tensor:
        """Eq. 9: noise σ·z' ``(B, N, d)`` to t*, then DDIM-denoise to t = 0 with ε_θ conditioned on v → z*/σ."""
        start = torch.full(zcf.shape[:2], self.t_start, device=zcf.device, dtype=torch.long)
        x = self._add_noise(self.scale * zcf, torch.randn_like(zcf), start)
        for t in self.steps:
            eps = self.eps_net(x, torch.full_like(start, t), v)
            x = self.reverse.step(eps, t, x).prev_sample
        return x / self.scale

    def forward(self, z: Tensor, v: Tensor) -> dict[str, Tensor]:
        """z ``(B, d)`` factual text, v ``(B, d)`` pooled visual feature →

        ``loss_cf`` (Eq. 11, scalar), ``cf`` ℓ^cf ``(B, k_c, d)``, ``cf_alpha`` ``(B, k_c)`` and the diagnostics
        ``degree``, ``cf_cos``, ``cf_cos_mix`` (module docstring). Gradients reach z and v unless the caller detaches.
        """
        zn = F.normalize(z, dim=-1)
        b, d = zn.shape
        lo, hi = self.alpha_range
        alpha = lo + (hi - lo) * torch.rand(b, self.candidates, device=z.device, dtype=z.dtype)
        c = self.degrees(zn, alpha)
        r = orthogonalize(zn, torch.randn(b, self.candidates, d, device=z.device, dtype=z.dtype))
        z0 = zn.unsqueeze(1).expand_as(r)
        zcf = mix(z0, r, c)  # Eq. 8
        t = torch.randint(1, self.t_start + 1, (b, self.candidates), device=z.device)
        eps = torch.randn_like(zcf)
        z_t, zcf_t = self._add_noise(self.scale * z0, eps, t), self._add_noise(self.scale * zcf, eps, t)  # noise symmetry
        loss = F.mse_loss(self.eps_net(zcf_t, t, v), eps) + self.lambda_ortho * self.ortho_loss(zcf_t, z_t)
        zd, zcf_d = zn.detach(), zcf.detach()
        cf, cf_alpha, idx = select_top_k(self.generate(zcf_d, v.detach()), zd, alpha, self.k)  # Eq. 12
        mix_cos = F.cosine_similarity(zcf_d, zd[:, None], dim=-1).gather(1, idx)
        return {
            "loss_cf": loss, "cf": cf, "cf_alpha": cf_alpha, "degree": c.mean().detach(),
            "cf_cos": (cf * zd[:, None]).sum(-1).mean(), "cf_cos_mix": mix_cos.mean(),
        }
