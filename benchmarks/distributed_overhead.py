"""Per-step cost of data-parallel K-FAC/RING: 1 process vs 2 gloo ranks, shard vs replicate.

    .venv/bin/python benchmarks/distributed_overhead.py [--steps 200] [--width 512]
        [--batch-size 256] [--factor-freq 10] [--inverse-freq 50] [--threads 1]

Every configuration trains the same MLP (40 → width → width → 10) on the same
random global batches; with 2 ranks each rank gets half of every batch under
DistributedDataParallel. A step is zero_grad + forward + backward + optimizer
step, timed on every rank, and the table reports the mean over steps and ranks
(the refresh steps amortised), plus two shares of that time:

* ``comm``: inside the optimizer's collectives — the estimate all-reduce on
  capture steps and the curvature broadcast on refresh steps. The broadcast
  time includes waiting for the slowest owner, i.e. load imbalance. DDP's own
  gradient all-reduce is not in it (any optimizer pays that).
* ``inverse``: inside eigendecompositions / damped inverses (grng.linalg).

Ranks rendezvous through a FileStore in a temporary directory; each rank runs
with ``--threads`` intra-op threads, so on a 2-core machine 2 ranks × 1 thread
use the same cores as 1 process × 2 threads would.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import grng
import grng.optim.kfac as kfac_module

#: name -> (class, keyword arguments)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac": ("KFAC", {"inverse": "eigh"}),
    "ring": ("RING", {}),
    "ring-newton-schulz": ("RING", {"inverse": "newton_schulz", "damping_form": "factored"}),
}


def _timed(fn: Callable[..., Any], bucket: list[float]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[0] += time.perf_counter() - start

    return wrapper


def _mlp(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def _time_steps(
    optimizer: torch.optim.Optimizer,
    forward: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rows: slice,
    args: argparse.Namespace,
    world: int,
) -> float:
    """Seconds for ``args.steps`` steps, after one refresh period of warm-up.

    The communication and inverse timers (``_TIMERS``) are reset after warm-up.
    """

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        optimizer.zero_grad()
        F.cross_entropy(forward(x[rows]), y[rows]).backward()
        optimizer.step()

    for i in range(args.inverse_freq):
        step(i)
    if world > 1:
        dist.barrier()
    _reset_timers()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    return time.perf_counter() - start


_TIMERS: list[list[float]] = []


def _reset_timers() -> None:
    for timer in _TIMERS:
        timer[0] = 0.0


def _run(rank: int, world: int, store_file: str | None, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    if world > 1:
        assert store_file is not None
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(store_file, world),
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=120),
        )
    inverse_time = [0.0]
    _TIMERS.append(inverse_time)
    kfac_module.eigh_factor = _timed(kfac_module.eigh_factor, inverse_time)
    kfac_module.damped_inverse = _timed(kfac_module.damped_inverse, inverse_time)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 40, generator=generator),
            torch.randint(0, 10, (args.batch_size,), generator=generator),
        )
        for _ in range(8)
    ]
    per_rank = args.batch_size // world
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    results: dict[str, Any] = {}
    modes: tuple[str | None, ...] = (None,) if world == 1 else ("shard", "replicate")
    for name, (cls, kwargs) in OPTIMIZERS.items():
        for mode in modes:
            torch.manual_seed(0)
            model = _mlp(args.width)
            forward: nn.Module = model if world == 1 else nn.parallel.DistributedDataParallel(model)
            optimizer = getattr(grng, cls)(
                model,
                lr=0.01,
                factor_update_freq=args.factor_freq,
                inverse_update_freq=args.inverse_freq,
                distributed=mode,
                **kwargs,
            )
            comm_time = [0.0]
            _TIMERS[1:] = [comm_time]
            distributor = optimizer.distributor
            distributor.all_reduce_estimates = _timed(distributor.all_reduce_estimates, comm_time)
            distributor.broadcast_curvature = _timed(distributor.broadcast_curvature, comm_time)

            elapsed = _time_steps(optimizer, forward, batches, rows, args, world)
            results[f"{name}/{mode or 'single'}"] = {
                "step_ms": 1e3 * elapsed / args.steps,
                "comm_share": comm_time[0] / elapsed,
                "inverse_share": inverse_time[0] / elapsed,
            }
    # Baseline: what DDP alone costs on this machine (no curvature at all).
    torch.manual_seed(0)
    model = _mlp(args.width)
    forward = model if world == 1 else nn.parallel.DistributedDataParallel(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elapsed = _time_steps(adamw, forward, batches, rows, args, world)
    results["adamw"] = {
        "step_ms": 1e3 * elapsed / args.steps,
        "comm_share": 0.0,
        "inverse_share": 0.0,
    }
    if world > 1:
        dist.destroy_process_group()
    return results


def _worker(rank: int, world: int, store_file: str, out_dir: str, args: argparse.Namespace) -> None:
    results = _run(rank, world, store_file, args)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--factor-freq", type=int, default=10)
    parser.add_argument("--inverse-freq", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    rows: dict[str, list[dict[str, Any]]] = {}
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(
                _worker,
                args=(world, str(Path(tmp) / "store"), tmp, args),
                nprocs=world,
                join=True,
                start_method="spawn",
            )
            for rank in range(world):
                for key, value in json.loads((Path(tmp) / f"rank{rank}.json").read_text()).items():
                    rows.setdefault(f"{world} × {key}", []).append(value)

    print(
        f"# {date.today()} · {platform.node()} · {platform.processor() or platform.machine()} · "
        f"{torch.get_num_threads()} threads max, {args.threads} per rank · torch {torch.__version__}"
    )
    print(
        f"# MLP 40-{args.width}-{args.width}-10, global batch {args.batch_size}, "
        f"{args.steps} steps, factors every {args.factor_freq}, inverses every {args.inverse_freq}"
    )
    print("| ranks × optimizer/mode | step ms | comm % | inverse % |")
    print("|---|---:|---:|---:|")
    for key, values in rows.items():
        step_ms = statistics.mean(v["step_ms"] for v in values)
        comm = statistics.mean(v["comm_share"] for v in values)
        inverse = statistics.mean(v["inverse_share"] for v in values)
        print(f"| {key} | {step_ms:.2f} | {100 * comm:.1f} | {100 * inverse:.1f} |")


if __name__ == "__main__":
    main()
