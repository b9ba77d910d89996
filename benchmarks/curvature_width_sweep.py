"""Curvature cost against layer width: R-Kalman's O(d²k) update against K-FAC's O(d³) refresh.

    .venv/bin/python benchmarks/curvature_width_sweep.py [--threads 1] [--widths 256,512,1024,2048]

One factor of size d = hidden + 1: R-Kalman's update per capture (data rows
k = 32 plus a floor block of m = 32 coordinates) beside K-FAC's refresh of the
same factor (eigh, or a damped Newton–Schulz inverse from a cold start, with its
fallbacks). Whole-step times of every optimizer are in ``benchmarks/overhead.py``.
"""

from __future__ import annotations

import argparse

import torch
from _timing import best_of

from grng.linalg import damped_inverse, eigh_factor
from grng.optim.rkalman import absorb_coordinates, kalman_absorb


def sweep_row(width: int, k: int) -> tuple[float, float, float]:
    """Seconds for one R-Kalman factor update, a K-FAC eigh and a cold NS inverse."""
    d = width + 1
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(4 * d, d, generator=g)
    factor = rows.T @ rows / rows.shape[0]
    covariance = torch.linalg.inv(factor + 1e-2 * torch.eye(d))  # set-up only, untimed
    u = torch.randn(d, k, generator=g) / k**0.5
    index, info, damping = torch.arange(k), torch.tensor(1e-2), torch.tensor(1e-2)
    return (
        # As RKalman._update_curvature: the data update unsymmetrised, the floor's symmetrises.
        best_of(
            lambda: absorb_coordinates(
                kalman_absorb(covariance, u, 0.95, 0.05, symmetric=False), index, info
            )
        ),
        best_of(lambda: eigh_factor(factor), 3),
        best_of(lambda: damped_inverse(factor, damping), 3),
    )


def width_sweep(widths: list[int], k: int = 32) -> None:
    print(f"\nper-factor curvature cost, d = hidden + 1, k = m = {k} (ms, best of 5 / 3)")
    print("  d      rkalman update   kfac eigh   kfac newton-schulz (cold)")
    for width in widths:
        t_k, t_e, t_n = sweep_row(width, k)
        print(f"  {width + 1:<6} {1e3 * t_k:12.2f}   {1e3 * t_e:10.2f}   {1e3 * t_n:10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", default="256,512,1024,2048")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    width_sweep([int(w) for w in args.widths.split(",")])


if __name__ == "__main__":
    main()
