"""Step time and peak memory of the GRNG optimizers relative to AdamW, measured in one run.

    .venv/bin/python benchmarks/overhead.py [--steps 300] [--threads 1] [--batch-size 128]

A "step" is what a user's loop pays: zero_grad + forward + backward (RENG's
``optimizer.backward(loss)`` in its exact mode, which keeps the gradient's graph; a closure with one more forward and
backward for its finite-difference mode) + optimizer step. Optimizers are timed
in interleaved rounds, so slow drifts of a shared machine hit all of them
alike. The median is the typical step; the mean includes the amortised cost of
the steps that capture statistics (every 10) and refresh inverses (every 50).

Peak memory: the high-water mark of the bytes torch allocates while a fresh
model + optimizer takes ``--memory-steps`` steps (a capture and a refresh step
included), from the profiler's per-op allocation records: optimizer state,
activations and autograd graphs (RENG's second-order graph included) and the
step's temporaries; the parameters themselves, allocated before, are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import grng

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
Step = Callable[[nn.Module, torch.optim.Optimizer, Tensor, Tensor], None]

#: name -> factory; the refresh periods of the issue: factors every 10, inverses every 50.
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "kfac": lambda m: grng.KFAC(m),
    "ring": lambda m: grng.RING(m),
    "ring-newton-schulz": lambda m: grng.RING(m, inverse="newton_schulz", damping_form="factored"),
    "reng-exact": lambda m: grng.RENG(m, hvp="exact"),
    "reng-finite-difference": lambda m: grng.RENG(m, hvp="finite_difference"),
    "rkalman": lambda m: grng.RKalman(m),
}


def plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def second_order_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor
) -> None:
    optimizer.zero_grad()
    cast(Any, optimizer).backward(F.cross_entropy(model(x), y))  # RENG's exact-mode loop
    optimizer.step()


def closure_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)  # type: ignore[arg-type]


STEPS: dict[str, Step] = {"reng-exact": second_order_step, "reng-finite-difference": closure_step}


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


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mnist1d MLP 40-256-256-10": mlp,
    "Conv1d net 3x32ch k5": conv1d_net,
}


def _batches(model: nn.Module, batch: int) -> list[tuple[Tensor, Tensor]]:
    conv = any(isinstance(m, nn.Conv1d) for m in model.modules())
    shape = (batch, 1, 40) if conv else (batch, 40)
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(*shape, generator=generator),
            torch.randint(0, 10, (batch,), generator=generator),
        )
        for _ in range(8)
    ]


def time_steps(
    make_model: Callable[[], nn.Module], names: list[str], steps: int, batch: int, rounds: int = 5
) -> dict[str, tuple[float, float]]:
    """(median, mean) seconds per step for each optimizer, interleaved over ``rounds``."""
    runs = {}
    for name in names:
        torch.manual_seed(0)
        model = make_model()
        runs[name] = (model, OPTIMIZERS[name](model), STEPS.get(name, plain_step))
    batches = _batches(make_model(), batch)
    samples: dict[str, list[float]] = {name: [] for name in names}
    per_round = max(1, steps // rounds)
    for _ in range(rounds):
        for name, (model, optimizer, step) in runs.items():
            for i in range(per_round):
                x, y = batches[i % len(batches)]
                start = time.perf_counter()
                step(model, optimizer, x, y)
                samples[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), statistics.mean(t)) for name, t in samples.items()}


def peak_memory(make_model: Callable[[], nn.Module], name: str, steps: int, batch: int) -> int:
    """Peak bytes allocated by torch while ``name`` builds its state and takes ``steps`` steps.

    The profiler records each op's own allocations and frees; their running sum in
    time order, from before the optimizer's first step, peaks at the high-water mark.
    """
    torch.manual_seed(0)
    model = make_model()
    batches = _batches(model, batch)
    optimizer = OPTIMIZERS[name](model)
    step = STEPS.get(name, plain_step)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for i in range(steps):
            step(model, optimizer, *batches[i % len(batches)])
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


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
    parser.add_argument("--memory-steps", type=int, default=12, help="0 skips the memory runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.optimizers.split(",") if n != "adamw"]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    names.insert(0, "adamw")
    print(
        f"batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps. "
        "ms/step median (× AdamW's median), mean (× AdamW's mean), peak MiB allocated (× AdamW's)"
    )
    for label, make in MODELS.items():
        times = time_steps(make, names, args.steps, args.batch_size)
        memory = {
            n: peak_memory(make, n, args.memory_steps, args.batch_size) if args.memory_steps else 0
            for n in names
        }
        median0, mean0 = times["adamw"]
        print(f"\n{label}")
        for n, (med, mean) in times.items():
            mem = memory[n] / 2**20
            mem_ratio = f"{memory[n] / memory['adamw']:.1f}x" if memory["adamw"] > 0 else "-"
            print(
                f"  {n:24s} {1e3 * med:7.2f} ({med / median0:4.2f}x)  {1e3 * mean:7.2f} "
                f"({mean / mean0:4.2f}x)  {mem:6.1f} MiB ({mem_ratio})"
            )


if __name__ == "__main__":
    main()
