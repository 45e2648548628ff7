"""QDFormer's dead-code restart at paper scale on a toy stream (reproduction review, QDFormer row 2).

Tokens: 70 classes with Zipf(1) frequencies, each a random centre in R^256, a token = LayerNorm(centre + noise);
20 tokens per batch (B·N = 4·5), K = 128 codes, d = 256, the codebook trained by Eq. 9's codebook term (Adam 1e-3).
Printed side by side for plain VQ and for the restart (``restart_after`` 20, buffer 256 tokens), over steps
100–600: the share of training tokens quantised to a code sitting exactly on them (VQ the identity for them), the
codes re-seeded per batch, the codes in use, and the eval quantisation error on 2000 held-out tokens.

    python bench/vq_restart.py [--steps 600] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from icf.model.vq import VectorQuantizer

CLASSES, DIM, CODES, PER_BATCH, NOISE = 70, 256, 128, 20, 0.5


def stream(gen: torch.Generator, centres: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor:
    """n tokens: LayerNorm(centre of a Zipf-drawn class + N(0, NOISE²)) → ``(n, d)``."""
    cls = torch.multinomial(probs, n, replacement=True, generator=gen)
    return F.layer_norm(centres[cls] + NOISE * torch.randn(n, DIM, generator=gen), (DIM,))


def run(restart: int, steps: int, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(CLASSES, DIM, generator=gen)
    probs = 1.0 / torch.arange(1, CLASSES + 1, dtype=torch.float32)
    held_out = stream(gen, centres, probs, 2000)
    torch.manual_seed(seed)
    vq = VectorQuantizer(CODES, DIM, restart_after=restart, buffer_size=256)
    opt = torch.optim.Adam(vq.parameters(), lr=1e-3)
    identity = tokens = restarted = 0
    used: set[int] = set()
    for step in range(steps):
        x = stream(gen, centres, probs, PER_BATCH)
        q = vq(x)
        opt.zero_grad()
        q.codebook_loss.backward()
        opt.step()
        if step >= 100:
            identity += int((q.codes.detach() == x).all(-1).sum())
            tokens += PER_BATCH
            restarted += q.restarted
            used |= set(q.idx.tolist())
    vq.eval()
    with torch.no_grad():
        err = float((vq(held_out).codes - held_out).pow(2).sum(-1).mean())
    return {"identity %": 100 * identity / tokens, "re-seeded / batch": restarted / (steps - 100),
            "codes used": len(used), "eval error": err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = {"plain VQ (paper presets)": run(0, args.steps, args.seed),
            "restart 20, buffer 256": run(20, args.steps, args.seed)}
    keys = list(next(iter(rows.values())))
    print(f"{'':28s}" + "".join(f"{k:>20s}" for k in keys))
    for name, row in rows.items():
        print(f"{name:28s}" + "".join(f"{row[k]:20.3f}" for k in keys))


if __name__ == "__main__":
    main()
