"""R-Kalman's cost: step time relative to AdamW, and curvature cost against width.

    .venv/bin/python benchmarks/rkalman_overhead.py [--steps 300] [--threads 1]

1. Median (and mean, which includes the amortised capture steps) time of a
   whole training step (zero_grad + forward + backward + step), batch 128, on
   the mnist1d MLP 40-256-256-10 and a small Conv1d net, interleaved rounds so
   machine drift hits every optimizer alike; ratio to AdamW of the same run.
2. Width sweep: one factor of size d = hidden + 1. R-Kalman's update per capture
   (data rows k = 32 plus a floor block of m = 32 coordinates: O(d² k)) beside
   K-FAC's refresh of the same factor (eigh, or a damped Newton–Schulz inverse
   from a cold start: O(d³)).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import grng
from grng.linalg import damped_inverse, eigh_factor
from grng.optim.rkalman import absorb_coordinates, kalman_absorb

OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "kfac": lambda m: grng.KFAC(m, factor_update_freq=10, inverse_update_freq=50),
    "rkalman": lambda m: grng.RKalman(m, factor_update_freq=10),
}


def mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 40, 10),
    )  # fmt: skip


def step_times(
    make: Callable[[], nn.Module], shape: tuple[int, ...], steps: int, rounds: int = 5
) -> dict[str, tuple[float, float]]:
    """(median, mean) seconds per training step for each optimizer."""
    runs = {}
    for name, factory in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = make()
        runs[name] = (model, factory(model))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g))
               for _ in range(8)]  # fmt: skip
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (model, optimizer) in runs.items():
            for i in range(steps // rounds):
                x, y = batches[i % len(batches)]
                start = time.perf_counter()
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                samples[name].append(time.perf_counter() - start)
    return {n: (statistics.median(t), statistics.mean(t)) for n, t in samples.items()}


def best_of(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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
        best_of(lambda: absorb_coordinates(kalman_absorb(covariance, u, 0.95, 0.05), index, info)),
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
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--widths", default="256,512,1024,2048")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s), batch 128, {args.steps} steps per optimizer")
    print("median ms/step (ratio to AdamW) | mean ms/step (ratio)")
    for label, make, shape in (
        ("mnist1d MLP 40-256-256-10", mlp, (128, 40)),
        ("Conv1d net", conv1d_net, (128, 1, 40)),
    ):
        times = step_times(make, shape, args.steps)
        median0, mean0 = times["adamw"]
        cells = ", ".join(
            f"{n} {1e3 * md:.2f} ({md / median0:.2f}x) | {1e3 * mn:.2f} ({mn / mean0:.2f}x)"
            for n, (md, mn) in times.items()
        )
        print(f"{label}: {cells}")
    width_sweep([int(w) for w in args.widths.split(",")])


if __name__ == "__main__":
    main()
