"""Median step time of the GRNG optimizers relative to AdamW, measured in one run.

    .venv/bin/python benchmarks/overhead.py [--steps 300] [--threads 1] [--batch-size 128]

Each optimizer trains the same model on the same random batches; a "step" is
zero_grad + forward + backward + optimizer step, so the ratio is what a user's
training loop pays. Optimizers are timed in interleaved rounds (every round
times each optimizer for a slice of steps) so slow drifts of a shared machine
hit all of them alike.
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

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]

#: name -> factory; the refresh periods of the issue: factors every 10, inverses every 50.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "kfac": lambda m: grng.KFAC(m, factor_update_freq=10, inverse_update_freq=50),
    "ring": lambda m: grng.RING(m, factor_update_freq=10, inverse_update_freq=50),
    "ring-newton-schulz": lambda m: grng.RING(
        m, inverse="newton_schulz", factor_update_freq=10, inverse_update_freq=50
    ),
}


def mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def conv1d_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(),
        nn.Conv1d(32, 32, 5, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 40, 10),
    )  # fmt: skip


def time_steps(
    make_model: Callable[[], nn.Module], names: list[str], steps: int, batch: int, rounds: int = 5
) -> dict[str, tuple[float, float]]:
    """(median, mean) seconds per step for each optimizer, interleaved over ``rounds``.

    The median is the typical step; the mean includes the amortised cost of the
    steps that capture statistics and refresh inverses.
    """
    conv = isinstance(make_model()[0], nn.Conv1d)
    shape = (batch, 1, 40) if conv else (batch, 40)
    runs = {}
    for name in names:
        torch.manual_seed(0)
        model = make_model()
        runs[name] = (model, OPTIMIZERS[name](model))
    samples: dict[str, list[float]] = {name: [] for name in names}
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(*shape, generator=generator), torch.randint(0, 10, (batch,), generator=generator))
               for _ in range(8)]  # fmt: skip
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for name, (model, optimizer) in runs.items():
            for i in range(per_round):
                x, y = batches[i % len(batches)]
                start = time.perf_counter()
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                samples[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), statistics.mean(t)) for name, t in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=300, help="timed steps per optimizer and model"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = least noise)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated names")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.optimizers.split(",")
    if "adamw" not in names:
        names.insert(0, "adamw")
    models: dict[str, Callable[[], nn.Module]] = {
        "mnist1d MLP 40-256-256-10": mlp,
        "Conv1d net": conv1d_net,
    }
    print(
        f"batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps; "
        "ms/step median (ratio to AdamW's median) / mean (ratio to AdamW's mean)"
    )
    for label, make in models.items():
        times = time_steps(make, names, args.steps, args.batch_size)
        median0, mean0 = times["adamw"]
        cells = ", ".join(
            f"{n} {1e3 * med:.2f} ({med / median0:.2f}x) / {1e3 * mean:.2f} ({mean / mean0:.2f}x)"
            for n, (med, mean) in times.items()
        )
        print(f"{label}: {cells}")


if __name__ == "__main__":
    main()
