"""Multi-positive contrastive loss between samples and class prompts.

A batch holds B samples (object crops or one-second audio windows) and the K class prompts of the
vocabulary; ``positives (B, K)`` marks the classes of each sample (one for a crop; one or more for a
second of audio with several sources). The loss is the symmetric InfoNCE of CLIP with the one-hot
targets replaced by the normalised positive sets (the multi-positive form of UniCL / SupCon):

    L = ½ [ CE(s · A Tᵀ, P / |P|_row) + CE(s · T Aᵀ, Pᵀ / |Pᵀ|_row) ]

over the rows that have at least one positive (a prompt without a sample in the batch has no target).
When B = K and ``positives`` is the identity this *is* CLIP's loss, i.e. open_clip's and laion-clap's
``ClipLoss``; ``tests/test_towers.py`` checks that against both libraries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows with a positive of ``-Σ_j q_ij log softmax(logits)_ij``, q = targets / row sum.

    Args:
        logits: ``(N, M)``; targets: ``(N, M)`` non-negative (0/1 positive marks).
    """
    mass = targets.sum(dim=1)
    keep = mass > 0
    q = targets[keep] / mass[keep, None]
    return -(q * F.log_softmax(logits[keep], dim=1)).sum(dim=1).mean()


def multi_positive_loss(
    features: torch.Tensor, text: torch.Tensor, positives: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE.

    Args:
        features: ``(B, D)`` L2-normalised sample embeddings.
        text: ``(K, D)`` L2-normalised prompt embeddings.
        positives: ``(B, K)`` 0/1, every sample row has at least one positive.
        logit_scale: scalar (already exponentiated), as open_clip's ``logit_scale.exp()``.
    """
    logits = logit_scale * features @ text.T  # (B, K)
    targets = positives.to(logits.dtype)
    return 0.5 * (soft_cross_entropy(logits, targets) + soft_cross_entropy(logits.T, targets.T))
