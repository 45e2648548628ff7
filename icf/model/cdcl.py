"""Collaborative distribution-aware contrastive learning (CDCL, paper §3.4, Eq. 13–17).

Each modality of a clip is a Gaussian over its T per-frame features (Eq. 13): mean μ and covariance
Σ = (1/T)·Σ_t (x_t − μ)(x_t − μ)ᵀ, regularised to Σ + εI (T ≪ d makes Σ singular). Text is a Gaussian over
its points too (z's per-frame points, `icf.model.icf`); a single point (ℓ^cf) gives mean ℓ^cf and covariance εI.

Everything is computed without a d×d square root or determinant:

* **Entropy (Eq. 14).** With the centred, weight-scaled frames X (T×d), Σ + εI = XᵀX + εI. By Sylvester's
  identity det(εI_d + XᵀX) = ε^(d−T)·det(εI_T + XXᵀ), so logdet needs one T×T Cholesky factorisation.
* **Bures term of W2 (Eq. 15).** Let U (d×n) be an orthonormal basis of a subspace that holds the rows of
  both centred sets (n = T1 + T2). In the basis [U, U⊥] both regularised covariances split into a block
  A = UᵀΣU + εI_n on U and εI on U⊥, so Tr(Σx + Σy − 2(Σx^½ Σy Σx^½)^½) =
  Tr(Ax + Ay − 2(Ax^½ Ay Ax^½)^½) exactly: the U⊥ block contributes ε + ε − 2√(ε·ε) = 0 per dimension.
  The n×n trace is Σ_i √λ_i(Lxᵀ Ay Lx) with the Cholesky factor Ax = Lx Lxᵀ (Lxᵀ Ay Lx is similar to
  Ax Ay, whose eigenvalues are those of Ax^½ Ay Ax^½). U comes from a QR factorisation of the stacked rows;
  it is taken without gradient, which leaves the gradient exact: the value depends only on the Gram matrix
  of the rows, whose first-order change involves only the components of a perturbation inside span(U).
* **Degeneracies.** Repeated frames give repeated (zero) Gram eigenvalues. Only Cholesky factors of
  matrices ≥ εI and *eigenvalues* (never eigenvectors) of a symmetric matrix whose spectrum is ≥ ε² are
  used; the eigenvalue gradient U·diag(g)·Uᵀ has no 1/(λ_i − λ_j) factor, and √ is applied only to values
  ≥ ε², so values and gradients stay finite.

Losses (Eq. 16–17) use logits −D/τ: the paper prints exp(D/τ), a sign slip, since D is a distance and
positives must get closer (ARCHITECTURE.md, faithfulness table). Eq. 17's negatives can join the sample's
counterfactual points with the other clips' text Gaussians (`other_clips`, `join_negatives`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _frame_weights(x: Tensor, mask: Tensor | None) -> Tensor:
    """Per-frame weights ``(B, T)`` that sum to 1 over the real frames (``mask`` True) of each clip."""
    if mask is None:
        return x.new_full(x.shape[:2], 1.0 / x.shape[1])
    w = mask.to(x.dtype)
    count = w.sum(1, keepdim=True)
    if bool((count == 0).any()):
        raise ValueError("every clip needs at least one real frame for its Gaussian")
    return w / count


def gaussian_moments(x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Eq. 13: mean ``(B, d)`` and the square-root factor X ``(B, T, d)`` with Σ = XᵀX.

    Rows of X are √w_t·(x_t − μ) with w_t = 1/T over the real frames (``mask`` ``(B, T)``, True = real) and 0
    on padding, so padded frames add nothing to μ or Σ.
    """
    w = _frame_weights(x, mask)
    mu = torch.einsum("bt,btd->bd", w, x)
    return mu, (x - mu[:, None]) * w.sqrt()[..., None]


def gaussian_entropy(x: Tensor, eps: float, mask: Tensor | None = None) -> Tensor:
    """Eq. 14: differential entropy ½·log((2πe)^d·det(Σ + εI)) of each clip's Gaussian, ``(B, T, d)`` → ``(B,)``.

    logdet(Σ + εI) = (d − T)·log ε + logdet(εI_T + XXᵀ) (Sylvester), via a T×T Cholesky factor.
    """
    _, xs = gaussian_moments(x, mask)
    t, d = xs.shape[-2:]
    gram = xs @ xs.transpose(-1, -2) + eps * torch.eye(t, dtype=x.dtype, device=x.device)
    logdet = 2 * torch.linalg.cholesky(gram).diagonal(dim1=-2, dim2=-1).log().sum(-1) + (d - t) * math.log(eps)
    return 0.5 * (d * math.log(2 * math.pi * math.e) + logdet)


def _bures(xs: Tensor, ys: Tensor, eps: float) -> Tensor:
    """Tr(Σx + Σy − 2(Σx^½ Σy Σx^½)^½) for paired factors ``(P, T1, d)``, ``(P, T2, d)`` (Σ = XᵀX + εI) → ``(P,)``.

    Works in an n = T1 + T2 dimensional orthonormal basis of both row spaces (module docstring).
    """
    rows = torch.cat([xs, ys], dim=1)
    n, d = rows.shape[-2:]
    if d > n:
        with torch.no_grad():
            basis = torch.linalg.qr(rows.transpose(-1, -2)).Q  # (P, d, n), span ⊇ rows of both sets
        rows = rows @ basis
    cx, cy = rows[:, : xs.shape[1]], rows[:, xs.shape[1] :]
    eye = eps * torch.eye(rows.shape[-1], dtype=rows.dtype, device=rows.device)
    ax = cx.transpose(-1, -2) @ cx + eye
    ay = cy.transpose(-1, -2) @ cy + eye
    lx = torch.linalg.cholesky(ax)
    cross = lx.transpose(-1, -2) @ ay @ lx
    cross = 0.5 * (cross + cross.transpose(-1, -2))  # exact symmetry for eigvalsh
    root_trace = torch.linalg.eigvalsh(cross).clamp_min(eps * eps).sqrt().sum(-1)
    trace = ax.diagonal(dim1=-2, dim2=-1).sum(-1) + ay.diagonal(dim1=-2, dim2=-1).sum(-1)
    return (trace - 2 * root_trace).clamp_min(0.0)


def paired_wasserstein2(
    x: Tensor, y: Tensor, eps: float, x_mask: Tensor | None = None, y_mask: Tensor | None = None
) -> Tensor:
    """Squared 2-Wasserstein distance between the Gaussians of x[p] and y[p]: ``(P, T1, d)``, ``(P, T2, d)`` → ``(P,)``."""
    mx, xs = gaussian_moments(x, x_mask)
    my, ys = gaussian_moments(y, y_mask)
    return (mx - my).pow(2).sum(-1) + _bures(xs, ys, eps)


def wasserstein2(x: Tensor, y: Tensor, eps: float, x_mask: Tensor | None = None, y_mask: Tensor | None = None) -> Tensor:
    """All-pairs squared 2-Wasserstein distances, ``(B, T1, d)`` × ``(B2, T2, d)`` → ``(B, B2)`` (Eq. 15's first two terms).

    W2² = ‖μx − μy‖² + Tr(Σx + Σy − 2(Σx^½ Σy Σx^½)^½), both Σ regularised by εI.
    """
    mx, xs = gaussian_moments(x, x_mask)
    my, ys = gaussian_moments(y, y_mask)
    b, b2 = x.shape[0], y.shape[0]
    pair_x = xs[:, None].expand(b, b2, *xs.shape[1:]).reshape(b * b2, *xs.shape[1:])
    pair_y = ys[None].expand(b, b2, *ys.shape[1:]).reshape(b * b2, *ys.shape[1:])
    mean_term = (mx[:, None] - my[None]).pow(2).sum(-1)
    return mean_term + _bures(pair_x, pair_y, eps).view(b, b2)


def entropy_term(x: Tensor, eps: float, per_dim: bool, mask: Tensor | None = None) -> Tensor:
    """H(x) of Eq. 14, divided by d when ``per_dim`` (default; ARCHITECTURE.md faithfulness table: keeps γ's scale independent of d)."""
    h = gaussian_entropy(x, eps, mask)
    return h / x.shape[-1] if per_dim else h


def distribution_distance(
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    gamma: float,
    per_dim: bool,
    x_mask: Tensor | None = None,
    y_mask: Tensor | None = None,
    paired: bool = False,
) -> Tensor:
    """Eq. 15: D(x, y) = W2²(x, y) + γ·(H(x) + H(y)).

    ``paired=False``: all pairs ``(B, T1, d)`` × ``(B2, T2, d)`` → ``(B, B2)``; ``paired=True``: row p of x with
    row p of y → ``(P,)``.
    """
    hx = entropy_term(x, eps, per_dim, x_mask)
    hy = entropy_term(y, eps, per_dim, y_mask)
    if paired:
        return paired_wasserstein2(x, y, eps, x_mask, y_mask) + gamma * (hx + hy)
    return wasserstein2(x, y, eps, x_mask, y_mask) + gamma * (hx[:, None] + hy[None])


def audio_positives(anchor: Tensor, theta: float, centre: bool = True) -> Tensor:
    """Positive sets 𝒫 of Eq. 16 ``(B, B)`` bool: j is a positive of i when cos(anchor_i, anchor_j) ≥ θ, and i ∈ 𝒫(i).

    ``anchor`` ``(B, D)`` is the audio implicit text ℓ^a (paper: "we partition the sample space using ℓ^a as the
    anchor"), so clips with the same audio semantics are not pushed apart. With ``centre`` the batch mean is
    subtracted first: texts that share a large common component (every ℓ^a mixes the same prompts) would
    otherwise all pass θ, making every pair positive and L_v↔a identically 0.
    """
    a = anchor.detach()
    if centre:
        a = a - a.mean(0, keepdim=True)
    a = torch.nn.functional.normalize(a, dim=-1)
    pos = (a @ a.T) >= theta
    return pos | torch.eye(len(a), dtype=torch.bool, device=a.device)


def multi_positive_nce(dist: Tensor, positives: Tensor, tau: float) -> Tensor:
    """Eq. 16 in one direction: −mean_i log(Σ_{j∈𝒫(i)} e^{−D_ij/τ} / Σ_j e^{−D_ij/τ}); ``dist`` ``(B, B2)`` → scalar."""
    logits = -dist / tau
    pos_logits = logits.masked_fill(~positives, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - torch.logsumexp(pos_logits, dim=1)).mean()


def loss_visual_audio(dist: Tensor, positives: Tensor, tau: float) -> Tensor:
    """Eq. 16, L_v↔a: multi-positive InfoNCE on −D(F^v_i, A_j)/τ, averaged over both directions (v→a rows, a→v columns)."""
    return 0.5 * (multi_positive_nce(dist, positives, tau) + multi_positive_nce(dist.T, positives.T, tau))


def counterfactual_weights(alpha: Tensor) -> Tensor:
    """Eq. 17's w_k = √(1 − α_k) / Σ_j √(1 − α_j) over the K counterfactuals of each sample, ``(B, K)`` → ``(B, K)``.

    A weaker counterfactual (smaller α, closer to z) is a harder negative and gets a larger weight.
    """
    root = (1 - alpha).clamp_min(0).sqrt()
    return root / root.sum(-1, keepdim=True).clamp_min(1e-12)


def other_clips(text: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In-batch text negatives: for every clip i the other clips' text points, their masks and uniform weights 1/(B − 1).

    text ``(B, T', d)``, mask ``(B, T')`` → ``(B, B − 1, T', d)``, ``(B, B − 1, T')``, ``(B, B − 1)``; B ≥ 2.
    """
    b = text.shape[0]
    others = ~torch.eye(b, dtype=torch.bool, device=text.device)
    negatives = text[None].expand(b, *text.shape)[others].view(b, b - 1, *text.shape[1:])
    neg_mask = mask[None].expand(b, *mask.shape)[others].view(b, b - 1, mask.shape[1])
    return negatives, neg_mask, text.new_full((b, b - 1), 1.0 / (b - 1))


def join_negatives(groups: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate negative sets ``(B, K_g, T_g, d)`` / masks ``(B, K_g, T_g)`` / weights ``(B, K_g)`` along K, padding
    each set's points to the largest T_g with masked-out rows (a padded point adds nothing to its Gaussian)."""
    t = max(n.shape[2] for n, _, _ in groups)
    pad = [(torch.nn.functional.pad(n, (0, 0, 0, t - n.shape[2])), torch.nn.functional.pad(m, (0, t - m.shape[2]))) for n, m, _ in groups]
    return (torch.cat([n for n, _ in pad], 1), torch.cat([m for _, m in pad], 1), torch.cat([w for _, _, w in groups], 1))


def loss_text(pos_dist: Tensor, neg_dist: Tensor, neg_weight: Tensor, tau: float) -> Tensor:
    """Eq. 17, L_v↔l (and L_a↔l): −mean_i log(e^{−D_i⁺/τ} / (e^{−D_i⁺/τ} + Σ_k w_k·e^{−D_ik/τ})).

    Args:
        pos_dist: ``(B,)`` D(F_i, z_i) to the factual text.
        neg_dist: ``(B, K)`` D(F_i, ℓ^cf_ik) to the sample's own counterfactuals (and, with ``text_negatives =
            "counterfactual+batch"``, to the other clips' texts).
        neg_weight: ``(B, K)`` w_k (1/(B − 1) for the other clips' texts).
    """
    pos = -pos_dist / tau
    neg = -neg_dist / tau + neg_weight.clamp_min(1e-12).log()
    return (torch.logsumexp(torch.cat([pos[:, None], neg], dim=1), dim=1) - pos).mean()
