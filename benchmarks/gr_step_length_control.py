"""Is RING's or R-Kalman's gradient regularization more than a shorter step? A control.

    .venv/bin/python benchmarks/gr_step_length_control.py [--tasks mnist1d-mlp,mnist1d-cnn]
        [--tuned results] [--scales 0.5,0.25] [--seeds 3]

RING's ρ enters only as extra damping, ``γ_t = λ + ρ‖g_t‖²``, which shortens the step in
every eigendirection whose curvature is below γ_t; R-Kalman's ρ only scales its step by
``α ≤ 1``. Both are therefore partly a learning-rate reduction. This script runs the
control that separates the two: ρ = 0 (no gradient regularization) with the learning rate
multiplied by each of ``--scales``, under exactly the protocol of ``grng bench ablate``
(the tuned rate from ``--tuned``, default damping, the task's steps, seeds and λmax
measurement), and prints test metric, mean ‖g‖ and λmax(H) per (task, optimizer, scale),
mean ± std over seeds. Compare with the ablation's ρ > 0 rows: if a shorter step at ρ = 0
moves the three quantities the same way as ρ does, the regularizer acts as a step-length
change on these tasks.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from grng.bench import ablate
from grng.bench.cli import _load_tasks
from grng.bench.report import mean_std
from grng.bench.runner import RunSpec, train_run


def _cell(records: list[dict[str, Any]], key: str) -> str:
    """Mean ± sample std of ``key`` over the records that have it."""
    mean, std = mean_std([r[key] for r in records if r.get(key) is not None])
    return "–" if mean is None else f"{mean:.3g} ± {std:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="mnist1d-mlp,mnist1d-cnn")
    parser.add_argument("--optimizers", default="ring,rkalman")
    parser.add_argument("--tuned", default="results")
    parser.add_argument("--scales", default="0.5,0.25")
    parser.add_argument("--seeds", type=int, default=None)
    mine = parser.parse_args()
    # The ablation's own options and defaults, so that the protocol is the same.
    options = argparse.ArgumentParser()
    ablate.add_arguments(options)
    argv = ["--tasks", mine.tasks, "--optimizers", mine.optimizers, "--tuned", mine.tuned]
    if mine.seeds is not None:
        argv += ["--seeds", str(mine.seeds)]
    args = options.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = _load_tasks(args)
    tasks = {name: task for name, (task, _) in loaded.items()}
    lrs = ablate.tuned_lrs(args.tuned, tasks, args.optimizers)
    scales = [float(s) for s in mine.scales.split(",")]
    print("| task | optimizer | ρ | lr (scale) | test metric | mean ‖g‖ | λmax(H) | seeds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, (task, data) in loaded.items():
        protocol = ablate.task_protocol(name, args)
        for opt in args.optimizers:
            lr, _ = lrs[name, opt]
            for scale in scales:
                records = []
                for seed in range(1, protocol.seeds + 1):
                    run = RunSpec(name, opt, lr * scale, seed, "final")
                    records.append(train_run(run, task, ablate.ablation_spec(opt, 0.0), data,
                                             protocol, device))  # fmt: skip
                    print(f"  {name} {opt} ×{scale:g} seed {seed}: {records[-1]['test_score']}",
                          file=sys.stderr)  # fmt: skip
                print(f"| {name} | {opt} | 0 | {lr * scale:.3g} (×{scale:g}) | "
                      f"{_cell(records, 'test_score')} | {_cell(records, 'mean_grad_norm')} | "
                      f"{_cell(records, 'hessian_top')} | {len(records)} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
