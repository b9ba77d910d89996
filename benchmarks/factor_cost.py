"""What capture, refresh and preconditioning of one dense factor side cost, by width.

    .venv/bin/python benchmarks/factor_cost.py [--widths 256,512,1024,2048,4096] [--rows 4096]

The figures behind ``docs/performance.md`` (cost model) and ``max_factor_dim``. Per width d,
one thread, a random factor ``A = RᵀR/n`` from ``n = --rows`` rows, damping 0.1 (float32
unless said otherwise), best of two runs in CPU time (``time.process_time``, so that a
shared machine's waiting is not counted):

* capture: ``RᵀR/n``, one side's statistics on a capture step (``2nd²`` flops);
* eigh: :func:`grng.linalg.eigh_factor`, the refresh of RING and ``inverse="eigh"``;
* inverse: :func:`grng.linalg.damped_inverse` without a warm start (K-FAC's refresh on CPU:
  float32 Cholesky inverse + float64 certificate), then its two parts alone, and the float64
  Cholesky inverse (the ladder's float64 rung; before 2026-11-30 the CPU's usual rung);
* NS iteration: one Newton–Schulz iteration (two float32 products), the unit of the warm
  start that accelerators take (:func:`grng.linalg.prefers_newton_schulz`);
* step, 2 products: ``X_G V X_A`` for a ``d × d`` gradient (stored inverses: K-FAC, RENG,
  R-Kalman, and eigh-mode K-FAC with constant damping);
* step, 4 products: ``Q_G [(Q_Gᵀ V Q_A) ⊘ (g aᵀ + γ)] Q_Aᵀ`` (RING's exact solve);
* R-Kalman update: one capture's ``kalman_absorb`` of ``k = 32`` rows plus the floor's
  ``absorb_coordinates`` of ``m = 32`` coordinates (``O(d²k)``, no refresh).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from grng.linalg import (
    damped_inverse,
    eigh_factor,
    kronecker_solve_inverse,
    kronecker_tikhonov_solve_eigh,
)
from grng.optim.rkalman import absorb_coordinates, kalman_absorb

COLUMNS = (
    "capture",
    "eigh",
    "inverse (CPU route)",
    "f32 Cholesky inverse",
    "f64 certificate",
    "f64 Cholesky inverse",
    "NS iteration",
    "step, 2 products",
    "step, 4 products",
    "R-Kalman update",
)


def milliseconds(fn: Callable[[], object], repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return 1e3 * best


def row(d: int, n: int) -> list[float]:
    gen = torch.Generator().manual_seed(d)
    rows = torch.randn(n, d, generator=gen)
    factor = rows.T @ rows / n
    damped = factor + 0.1 * torch.eye(d)
    damped64 = damped.double()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    v = torch.randn(d, d, generator=gen)
    eig = eigh_factor(factor)
    u = torch.randn(d, 32, generator=gen) / 32**0.5
    index, information = torch.arange(32), torch.tensor(1e-2)

    def certificate() -> object:
        error = damped64 @ inverse.double()
        error.diagonal().sub_(1.0)
        return torch.linalg.matrix_norm(error)

    def newton_schulz_iteration() -> object:
        error = damped @ inverse
        error.diagonal().sub_(1.0)
        return inverse - inverse @ error

    return [
        milliseconds(lambda: rows.T @ rows / n),
        milliseconds(lambda: eigh_factor(factor)),
        milliseconds(lambda: damped_inverse(factor, 0.1)),
        milliseconds(lambda: torch.cholesky_inverse(torch.linalg.cholesky_ex(damped)[0])),
        milliseconds(certificate),
        milliseconds(lambda: torch.cholesky_inverse(torch.linalg.cholesky_ex(damped64)[0])),
        milliseconds(newton_schulz_iteration),
        milliseconds(lambda: kronecker_solve_inverse(v, inverse, inverse)),
        milliseconds(lambda: kronecker_tikhonov_solve_eigh(v, eig, eig, 0.1)),
        milliseconds(
            lambda: absorb_coordinates(kalman_absorb(inverse, u, 0.95, 0.05), index, information)
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="256,512,1024,2048,4096")
    parser.add_argument("--rows", type=int, default=4096)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, n = {args.rows} rows; CPU ms")
    print("| d | " + " | ".join(COLUMNS) + " |")
    print("|---:|" + "---:|" * len(COLUMNS))
    for d in map(int, args.widths.split(",")):
        cells = " | ".join(f"{t:.1f}" if t < 100 else f"{t:.0f}" for t in row(d, args.rows))
        print(f"| {d} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
