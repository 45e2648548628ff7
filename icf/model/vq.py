"""Vector quantisation with one shared codebook (QDFormer Eq. 2 and Eq. 9; VQ-VAE's straight-through estimator).

VQ(x) = argmin_{e^k ∈ C} ‖x − e^k‖₂ with C = {e^k}, k = 1..K a ``(K, d)`` parameter (ties → the lowest k). The
forward value of the quantised token is the code e; its gradient is the identity onto x (straight-through:
x̂ = x + sg[e − x]). The loss has two parts (Eq. 9, each a mean over elements, as R2VOS's ``F.mse_loss``):

* codebook term ‖VQ(x) − sg[x]‖²: updates C only;
* commitment term λ_com·‖sg[VQ(x)] − x‖²: updates x only.

``quantize(x, update_codebook=False)`` looks x up in ``C.detach()`` (QDFormer's local tokens: "they do not update
C but are committed to being close to the vectors in C"), so neither its commitment term nor its straight-through
path reaches C.

Dead-code restart (``restart_after=N``, off when 0; the paper and R2VOS have none, so the paper presets keep it
off): plain VQ on LayerNorm'd tokens can collapse (measured: QDFormer tiny on 64 synthetic AVSS clips uses one code
from step ~30, so every clip's quantised audio is the same vector and the model cannot listen). Every training batch
that updates C pushes its real tokens into a FIFO buffer of the last ``buffer_size`` tokens (several batches); before
the lookup, every code no token of the last N such batches selected is re-seeded from that buffer by k-means++
seeding (Arthur & Vassilvitskii 2007): one token at a time, drawn with probability ∝ its squared distance to the
nearest live or already re-seeded code. So the re-seeded codes go where the live codes serve tokens worst, each onto
a different token, and never onto a token a live code already sits on; when no buffered token is left at a positive
distance, the remaining dead codes wait for the next batch. (Before: every dead code moved onto a random token of
the current batch, several onto one token when the batch had few; reproduction review, QDFormer row 2. On
`bench/vq_restart.py`'s paper-scale toy the share of training tokens quantised to a code sitting exactly on them
fell from 20.9 % to 1.9 %.) Without gradient;
the local path's lookups do not count as use; torch's global RNG draws the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Quantized:
    """Result of `VectorQuantizer.quantize` for tokens x ``(…, d)``.

    Attributes:
        st: the straight-through value x + sg[e − x] ``(…, d)`` (forward = e, gradient → x).
        codes: the selected codewords e ``(…, d)`` (carry C's gradient when the codebook is updated).
        idx: code indices ``(…)`` int64.
        codebook_loss: mean ‖e − sg[x]‖² (zero tensor when the codebook is not updated).
        commit_loss: λ_com · mean ‖sg[e] − x‖².
        restarted: how many dead codes were re-seeded from the token buffer before the lookup (a diagnostic).
    """

    st: Tensor
    codes: Tensor
    idx: Tensor
    codebook_loss: Tensor
    commit_loss: Tensor
    restarted: int = 0


def nearest_code(x: Tensor, codebook: Tensor) -> Tensor:
    """Eq. 2: argmin_k ‖x − e^k‖₂ for x ``(…, d)``, codebook ``(K, d)`` → ``(…)`` int64; ties → lowest k.

    Squared distances are formed from the differences (not ‖x‖² − 2x·e + ‖e‖²), so equal distances compare equal
    and ``argmin`` (first minimum) breaks ties towards the lowest index."""
    dist = (x.detach()[..., None, :] - codebook.detach()).pow(2).sum(-1)  # (…, K)
    return dist.argmin(-1)


INITS = ("normal", "first_batch")


def real_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """The tokens of x ``(…, d)`` that ``mask`` ``(…)`` keeps (all when None), detached → ``(M, d)``."""
    return x.detach().reshape(-1, x.shape[-1]) if mask is None else x.detach()[mask]


class VectorQuantizer(nn.Module):
    """One K × d codebook shared by every token that is quantised with it (Eq. 2, module docstring).

    Args:
        size: K, the number of codewords.
        dim: d.
        commitment: λ_com of Eq. 9.
        init: ``"normal"``: the codebook starts N(0, 1) (R2VOS), matching LayerNorm-scaled tokens;
            ``"first_batch"``: it starts as K tokens of the first training batch quantised with the codebook update.
        restart_after: N > 0 re-seeds a code unused for N codebook-updating training batches from the token
            buffer (module docstring); 0 never does (plain VQ).
        buffer_size: tokens kept for re-seeding (the most recent, over several batches); used only with restarts.
    """

    def __init__(self, size: int, dim: int, commitment: float = 0.25, init: str = "normal", restart_after: int = 0,
                 buffer_size: int = 256):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"codebook init must be one of {INITS}, got {init!r}")
        if restart_after < 0:
            raise ValueError(f"restart_after must be >= 0, got {restart_after}")
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.commitment, self.restart_after = commitment, restart_after
        self.codebook = nn.Parameter(torch.randn(size, dim))
        # "first_batch": the codebook is overwritten by the first training batch's tokens (saved, so a resumed run
        # does not redo it)
        self.register_buffer("pending", torch.tensor(init == "first_batch"))
        # per code, codebook-updating training batches since a token last selected it (saved with the model)
        self.register_buffer("idle", torch.zeros(size, dtype=torch.long))
        # the FIFO of recent real tokens that dead codes are re-seeded from, and how many tokens were ever pushed
        # (row `seen % buffer_size` is overwritten next); saved, so a resumed run re-seeds as an unbroken one
        self.register_buffer("recent", torch.zeros(buffer_size, dim))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    @staticmethod
    def draw(x: Tensor, n: int) -> Tensor:
        """n of the tokens x ``(M, d)`` drawn by torch's global RNG, without replacement when M ≥ n → ``(n, d)``."""
        m = x.shape[0]
        pick = torch.randperm(m, device=x.device)[:n] if m >= n else torch.randint(0, m, (n,), device=x.device)
        return x[pick]

    @torch.no_grad()
    def init_from(self, x: Tensor) -> None:
        """Set the codebook to K of the tokens x ``(M, d)`` (`draw`), so that every code starts where tokens are
        (against codes that are never selected)."""
        self.codebook.copy_(self.draw(x, self.size))
        self.pending.fill_(False)

    @torch.no_grad()
    def remember(self, x: Tensor) -> None:
        """Push the tokens x ``(M, d)`` into the FIFO buffer (the oldest rows are overwritten first)."""
        cap = self.recent.shape[0]
        x = x[-cap:].to(self.recent.dtype)
        rows = (int(self.seen) + torch.arange(len(x), device=x.device)) % cap
        self.recent[rows] = x
        self.seen += len(x)

    def buffered(self) -> Tensor:
        """The buffered tokens ``(min(seen, buffer_size), d)``."""
        return self.recent[: min(int(self.seen), self.recent.shape[0])]

    @torch.no_grad()
    def restart_dead(self) -> int:
        """Re-seed every code idle for ``restart_after`` batches from the buffer by k-means++ seeding against the
        live codes (module docstring) → how many were re-seeded."""
        dead = (self.idle >= self.restart_after).nonzero().flatten()
        tokens = self.buffered()
        if not len(dead) or not len(tokens):
            return 0
        live = self.codebook[self.idle < self.restart_after].detach()
        d2 = (tokens[:, None] - live).pow(2).sum(-1).amin(-1) if len(live) else torch.full_like(tokens[:, 0], 1.0)
        seeded = 0
        for code in dead.tolist():
            if not bool((d2 > 0).any()):
                break  # every buffered token sits on a code: the rest wait for new tokens
            pick = int(torch.multinomial(d2, 1))
            self.codebook[code] = tokens[pick].to(self.codebook.dtype)
            d2 = torch.minimum(d2, (tokens - tokens[pick]).pow(2).sum(-1))
            self.idle[code] = 0
            seeded += 1
        return seeded

    @torch.no_grad()
    def mark_used(self, idx: Tensor) -> None:
        """Count one batch for every code and reset the codes in ``idx`` (any shape) to 0."""
        self.idle += 1
        self.idle[idx.flatten()] = 0

    @property
    def size(self) -> int:
        return self.codebook.shape[0]

    def quantize(self, x: Tensor, update_codebook: bool = True, mask: Tensor | None = None) -> Quantized:
        """Quantise x ``(…, d)`` (Eq. 2) with the Eq. 9 loss parts; ``update_codebook=False`` uses ``C.detach()``.
        ``mask`` ``(…)`` bool: the tokens the losses average over (default all; e.g. the real frames)."""
        learn = self.training and update_codebook
        if self.training and bool(self.pending):
            self.init_from(real_tokens(x, mask))
        restarted = 0
        if learn and self.restart_after:
            self.remember(real_tokens(x, mask))
            restarted = self.restart_dead()
        book = self.codebook if update_codebook else self.codebook.detach()
        idx = nearest_code(x, book)
        if learn:
            self.mark_used(idx if mask is None else idx[mask])
        codes = F.embedding(idx, book)
        st = x + (codes - x).detach()  # straight-through: forward e, gradient identity onto x
        xs, cs = (x, codes) if mask is None else (x[mask], codes[mask])
        codebook_loss = F.mse_loss(cs, xs.detach()) if update_codebook else x.new_zeros(())  # Eq. 9, term 1
        commit_loss = self.commitment * F.mse_loss(cs.detach(), xs)  # Eq. 9, terms 2 and 3
        return Quantized(st, codes, idx, codebook_loss, commit_loss, restarted)

    def forward(self, x: Tensor, update_codebook: bool = True, mask: Tensor | None = None) -> Quantized:
        return self.quantize(x, update_codebook, mask)


def perplexity(idx: Tensor, size: int) -> Tensor:
    """Codebook usage perplexity exp(H(p)) of the code histogram p over ``size`` codes (a diagnostic: 1 = one
    code used, ``size`` = uniform use)."""
    counts = torch.bincount(idx.flatten(), minlength=size).to(torch.float32)
    p = counts / counts.sum().clamp_min(1.0)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
