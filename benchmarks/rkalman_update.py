"""R-Kalman's per-factor update: time, growth per doubling of d, and symmetry drift.

    .venv/bin/python benchmarks/rkalman_update.py [--threads 1] [--widths 256,512,1024,2048]
        [--updates 300]

One update of a dense factor of size d = width + 1 as ``RKalman._update_curvature``
runs it with forgetting: absorb k = 32 data rows (``kalman_absorb``), then m = 32
floor coordinates (``absorb_coordinates``), then ``torch.where`` on the finiteness
flag. ``current`` is the library's code (the data update left unsymmetrised, the floor
update symmetrised once as ``H + Hᵀ``); ``before`` reproduces the earlier code, which
symmetrised both updates as ``(M + Mᵀ)/2``. Best of 5, covariance from a run of
updates (not the identity), float32.

Drift: ``--updates`` float32 updates of a d = 257 factor with random rows (k = m = 32,
β = 0.95), against the same recursion in float64: the relative Frobenius error of the
float32 covariance, its smallest eigenvalue, and the largest relative asymmetry
``‖P − Pᵀ‖_F / ‖P‖_F`` of the unsymmetrised intermediate (after the data update).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from _timing import best_of
from torch import Tensor

from grng.linalg import symmetrize
from grng.optim.rkalman import absorb_coordinates, floor_schedule, kalman_absorb

K = 32
BETA = 0.95


def _before_downdate(
    covariance: Tensor, pu: Tensor, utpu: Tensor, noise: float | Tensor, decay: float
) -> Tensor:
    """The earlier ``_downdate``: ``symmetrize(P − W Wᵀ)`` after every update."""
    eye = torch.eye(utpu.shape[0], dtype=utpu.dtype)
    s = utpu + noise * eye
    lower, _ = torch.linalg.cholesky_ex(0.5 * (s + s.mT))
    w = torch.linalg.solve_triangular(lower, pu.mT, upper=False).mT
    return symmetrize(torch.addmm(covariance, w, w.mT, beta=1 / decay, alpha=-1 / decay))


def update_before(p: Tensor, u: Tensor, index: Tensor, information: Tensor) -> Tensor:
    pu = p @ u
    p = _before_downdate(p, pu, u.mT @ pu, BETA / (1 - BETA), BETA)
    pu = p.index_select(1, index)
    return _before_downdate(p, pu, pu.index_select(0, index), 1 / information, 1.0)


def update_current(p: Tensor, u: Tensor, index: Tensor, information: Tensor) -> Tensor:
    p = kalman_absorb(p, u, BETA, 1 - BETA, symmetric=False)
    return absorb_coordinates(p, index, information)


def _masked(update: Callable[..., Tensor], finite: Tensor, p: Tensor, *args: Tensor) -> Tensor:
    return torch.where(finite, update(p, *args), p)  # as _update_curvature masks it


def _inputs(
    d: int, step: int, generator: torch.Generator, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    u = (torch.randn(d, K, generator=generator) / K**0.5).to(dtype)
    index = (torch.arange(K) + K * step) % d
    _, information, _ = floor_schedule(d, K, BETA)
    return u, index, torch.tensor(information * 0.01, dtype=dtype)


def timing(widths: list[int]) -> None:
    print(f"\nper-factor update, k = m = {K}, float32 (ms, best of 5)")
    print("  d       before   current   (growth per doubling: before, current)")
    last: tuple[float, float] | None = None
    for width in widths:
        d = width + 1
        g = torch.Generator().manual_seed(0)
        p = torch.eye(d) * 10.0
        for step in range(3):  # a covariance with off-diagonal structure
            p = update_current(p, *_inputs(d, step, g, torch.float32))
        args = (p, *_inputs(d, 3, g, torch.float32))
        finite = torch.tensor(True)
        old = best_of(partial(_masked, update_before, finite, *args))
        new = best_of(partial(_masked, update_current, finite, *args))
        growth = "" if last is None else f"   ×{old / last[0]:.1f}, ×{new / last[1]:.1f}"
        print(f"  {d:<6} {1e3 * old:8.2f}  {1e3 * new:8.2f}{growth}")
        last = (old, new)


def drift(updates: int, d: int = 257) -> None:
    g = torch.Generator().manual_seed(1)
    p32 = {"before": torch.eye(d) * 10.0, "current": torch.eye(d) * 10.0}
    p64 = torch.eye(d, dtype=torch.float64) * 10.0
    asymmetry = 0.0
    for step in range(updates):
        u, index, information = _inputs(d, step, g, torch.float64)
        p64 = update_before(p64, u, index, information)
        p32["before"] = update_before(p32["before"], u.float(), index, information.float())
        middle = kalman_absorb(p32["current"], u.float(), BETA, 1 - BETA, symmetric=False)
        asymmetry = max(asymmetry, float((middle - middle.mT).norm() / middle.norm()))
        p32["current"] = absorb_coordinates(middle, index, information.float())
    print(f"\nfloat32 drift after {updates} updates, d = {d} (against float64)")
    for name, p in p32.items():
        error = float((p.double() - p64).norm() / p64.norm())
        smallest = float(torch.linalg.eigvalsh(p.double())[0])
        print(
            f"  {name:<8} relative error {error:.2e}, exactly symmetric: "
            f"{bool(torch.equal(p, p.mT))}, smallest eigenvalue {smallest:.3e}"
        )
    print(f"  largest relative asymmetry of the unsymmetrised intermediate: {asymmetry:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", default="256,512,1024,2048")
    parser.add_argument("--updates", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    timing([int(w) for w in args.widths.split(",")])
    drift(args.updates)


if __name__ == "__main__":
    main()
