"""What one refresh of a dense factor costs, by width: the figures behind ``max_factor_dim``.

    .venv/bin/python benchmarks/factor_cost.py [--widths 1024,2048,4096,4608]

Per width d, one thread: ``eigh_factor`` (RING's and eigh-mode K-FAC's refresh) and a
float64 Cholesky inverse (the damped-inverse ladder's fallback rung) of a random SPD
factor built from 2d rows, best of two runs each.
"""

from __future__ import annotations

import argparse
import time

import torch

from grng.linalg import eigh_factor


def seconds(fn: object, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", default="1024,2048,4096,4608")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| d | eigh_factor (s) | float64 Cholesky inverse (s) |")
    print("|---:|---:|---:|")
    for d in map(int, args.widths.split(",")):
        rows = torch.randn(2 * d, d, generator=torch.Generator().manual_seed(d))
        factor = rows.T @ rows / rows.shape[0]
        damped = factor.double() + 1e-3 * torch.eye(d, dtype=torch.float64)
        eigh = seconds(lambda factor=factor: eigh_factor(factor))
        chol = seconds(lambda damped=damped: torch.cholesky_inverse(torch.linalg.cholesky(damped)))
        print(f"| {d} | {eigh:.2f} | {chol:.2f} |", flush=True)


if __name__ == "__main__":
    main()
