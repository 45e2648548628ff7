"""CDCL closed forms vs. a straightforward d×d implementation, side by side in one run.

For the paper's shapes (B = 8 clips, T = 5 and 10 frames, d = 256, all B×B pairs) it times
``icf.model.cdcl.wasserstein2`` + ``gaussian_entropy`` (T×T / (T1+T2)-dimensional identities) against the
textbook computation on d×d covariances (``torch.linalg.eigh`` matrix square roots, ``slogdet``), forward and
forward+backward, and prints the speed ratio, the largest relative difference of the values and whether the
gradients are finite (the d×d eigenvector gradient divides by eigenvalue gaps, and Σ + εI has d − T + 1 equal
eigenvalues ε).

    python bench/cdcl.py [--repeats 10] [--eps 1e-4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from icf.model.cdcl import gaussian_entropy, wasserstein2


def dense_cov(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(B, d)`` and Σ + εI ``(B, d, d)``."""
    mu = x.mean(1)
    xc = x - mu[:, None]
    return mu, xc.transpose(1, 2) @ xc / x.shape[1] + eps * torch.eye(x.shape[2], dtype=x.dtype)


def dense_sqrtm(a: torch.Tensor) -> torch.Tensor:
    """Symmetric PSD square root through the eigendecomposition."""
    vals, vecs = torch.linalg.eigh(a)
    return vecs @ torch.diag_embed(vals.clamp_min(0).sqrt()) @ vecs.transpose(-1, -2)


def dense_cdcl(x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All-pairs W2² ``(B, B2)`` and the entropies of both sets ``(B + B2,)``, the d×d way."""
    mx, sx = dense_cov(x, eps)
    my, sy = dense_cov(y, eps)
    root = dense_sqrtm(sx)  # (B, d, d)
    cross = root[:, None] @ sy[None] @ root[:, None]  # (B, B2, d, d)
    root_trace = torch.linalg.eigvalsh(cross).clamp_min(0).sqrt().sum(-1)
    trace = sx.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None] + sy.diagonal(dim1=-2, dim2=-1).sum(-1)[None]
    w2 = (mx[:, None] - my[None]).pow(2).sum(-1) + trace - 2 * root_trace
    d = x.shape[2]
    logdet = torch.linalg.slogdet(torch.cat([sx, sy])).logabsdet
    entropy = 0.5 * (d * torch.log(torch.tensor(2 * torch.pi * torch.e, dtype=x.dtype)) + logdet)
    return w2, entropy


def fast_cdcl(x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return wasserstein2(x, y, eps), torch.cat([gaussian_entropy(x, eps), gaussian_entropy(y, eps)])


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time in milliseconds (one warm-up call first)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def run_case(impl, x: torch.Tensor, y: torch.Tensor, eps: float, backward: bool):
    """One evaluation; with ``backward`` also the gradient of the summed outputs."""
    xg, yg = x.clone().requires_grad_(backward), y.clone().requires_grad_(backward)
    w2, h = impl(xg, yg, eps)
    if backward:
        (w2.sum() + h.sum()).backward()
        return w2.detach(), h.detach(), torch.isfinite(xg.grad).all().item() and torch.isfinite(yg.grad).all().item()
    return w2, h, True


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eps", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch}, d={args.dim}, "
          f"eps={args.eps}, all {args.batch}x{args.batch} pairs; median of {args.repeats}")
    header = f"{'T':>3} {'dtype':>8} {'pass':>8} {'ours ms':>9} {'dxd ms':>9} {'speed-up':>9} {'max rel W2':>11} {'max rel H':>10} {'finite grad ours/dxd':>21}"
    print(header)
    print("-" * len(header))
    for t in (5, 10):
        for dtype in (torch.float64, torch.float32):
            g = torch.Generator().manual_seed(t)
            # unit-norm frame features, as CDCL receives them
            x = torch.nn.functional.normalize(torch.randn(args.batch, t, args.dim, generator=g, dtype=torch.float64), dim=-1)
            y = torch.nn.functional.normalize(torch.randn(args.batch, t, args.dim, generator=g, dtype=torch.float64), dim=-1)
            ref_w2, ref_h, _ = run_case(dense_cdcl, x, y, args.eps, False)  # float64 d×d reference values
            xs, ys = x.to(dtype), y.to(dtype)
            for backward in (False, True):
                w2, h, ok_fast = run_case(fast_cdcl, xs, ys, args.eps, backward)
                _, _, ok_dense = run_case(dense_cdcl, xs, ys, args.eps, backward)
                fast_ms = timed(lambda: run_case(fast_cdcl, xs, ys, args.eps, backward), args.repeats)
                dense_ms = timed(lambda: run_case(dense_cdcl, xs, ys, args.eps, backward), args.repeats)
                name = "fwd+bwd" if backward else "fwd"
                print(f"{t:>3} {str(dtype).removeprefix('torch.'):>8} {name:>8} {fast_ms:>9.2f} {dense_ms:>9.2f} "
                      f"{dense_ms / fast_ms:>8.1f}x {max_rel(w2.double(), ref_w2):>11.2e} {max_rel(h.double(), ref_h):>10.2e} "
                      f"{str(ok_fast) + '/' + str(ok_dense):>21}")


if __name__ == "__main__":
    main()
