"""Every GRNG optimizer on the model zoo of ``tests/cases.py``, against AdamW, at chosen settings.

    .venv/bin/python benchmarks/zoo.py [--steps 150] [--models A,B] [--optimizers A,B]
                                       [--set RING:lr=0.01,damping=0.1 ...] [--out FILE.jsonl]

Each model trains on its small learnable synthetic task (fresh seeded batches, the same
for every optimizer) for ``--steps`` steps; the score is the mean training loss of the
last 10% of steps, reported as the ratio to AdamW-at-its-defaults' on the same batches.
A ratio above 1.5, or a non-finite loss, is a failure of the defaults (issue: "Defaults
that train the models users bring"). ``--set`` overrides hyperparameters of one
optimizer (repeatable); ``--out`` appends one JSON line per run (resumable sweeps:
``benchmarks/tuning_sweep.py`` drives this module).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import grng

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.cases import MODELS, ModelCase

#: name -> (builder, needs a closure). RENG runs finite differences: it works on every model.
OPTIMIZERS: dict[str, Any] = {
    "adamw": lambda model, **kw: torch.optim.AdamW(model.parameters(), **kw),
    "kfac": lambda model, **kw: grng.KFAC(model, **kw),
    "ring": lambda model, **kw: grng.RING(model, **kw),
    "reng": lambda model, **kw: grng.RENG(model, hvp="finite_difference", **kw),
    "rkalman": lambda model, **kw: grng.RKalman(model, **kw),
}


def train(case: ModelCase, name: str, steps: int, seed: int = 0, **hyper: Any) -> dict[str, Any]:
    """Train ``case``'s model with optimizer ``name``; the run's record."""
    model = case.build(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = OPTIMIZERS[name](model, **hyper)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        x, y = case.batch(1000 * seed + step)

        def closure(x: Any = x, y: Any = y) -> torch.Tensor:
            optimizer.zero_grad()
            loss = case.loss(model, x, y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        value = float(loss)
        losses.append(value)
        if not math.isfinite(value) or value > 1e4:
            break
    tail = losses[-max(1, steps // 10) :] if len(losses) == steps else [math.inf]
    return {
        "model": case.name,
        "optimizer": name,
        "hyper": hyper,
        "steps": steps,
        "seed": seed,
        "first_loss": losses[0],
        "final_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - start,
    }


def parse_overrides(items: list[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for item in items:
        name, _, assignments = item.partition(":")
        for assignment in filter(None, assignments.split(",")):
            key, _, value = assignment.partition("=")
            out.setdefault(name.lower(), {})[key] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--set", action="append", default=[], help="NAME:key=value,...")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    overrides = parse_overrides(args.set)
    print(f"{'model':20} {'optimizer':8} {'loss0':>8} {'final':>9} {'×AdamW':>7} {'s':>6}")
    for model_name in args.models.split(","):
        case = MODELS[model_name]
        reference = None
        for name in ["adamw", *[n for n in args.optimizers.split(",") if n != "adamw"]]:
            try:
                record = train(case, name, args.steps, **overrides.get(name, {}))
            except Exception as error:  # a refused model: report it, go on
                print(f"{model_name:20} {name:8} failed: {error}"[:160])
                continue
            if name == "adamw":
                reference = record["final_loss"]
            ratio = record["final_loss"] / reference if reference else math.nan
            record["ratio_to_adamw"] = ratio
            print(
                f"{model_name:20} {name:8} {record['first_loss']:8.3f} "
                f"{record['final_loss']:9.4f} {ratio:7.2f} {record['seconds']:6.1f}",
                flush=True,
            )
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
