"""Would a wider grid have chosen another rate? One tuning run beyond each edge choice.

    .venv/bin/python benchmarks/grid_edge_probe.py runs/language/sst2-minilm [--optimizers sam,sgd]

For every (task, optimizer) of a finished ``grng bench`` folder whose chosen rate is at
an edge of its tuning grid (the summary's †), this runs one more tuning run (seed 0, the
folder's own protocol from ``config.json``) at the next rate of the same half-decade
grid beyond that edge, and prints the validation score there against the chosen rate's.
A probe that scores better means the grid was too narrow for that optimizer: its
reported row used a rate the protocol would not have chosen with one more grid point.
Each probe's record is appended to ``FOLDER/grid-probe.jsonl`` as it finishes, and a
rerun skips the probes already there, so an interrupted probe resumes. The probes do not
change the suite's rows: the folder's ``runs.jsonl`` and summary are left alone.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

import grng
from grng.bench.optimizers import OPTIMIZERS
from grng.bench.runner import (
    TUNE_SEED,
    Protocol,
    RunLog,
    RunSpec,
    choose_lr,
    git_commit,
    lr_grid,
    train_run,
)
from grng.bench.tasks import get_task

#: Ratio of neighbouring rates in the benchmark's grids (half a decade).
GRID_STEP = 10**0.5


def edge_probes(
    records: list[dict[str, Any]], grid_size: int
) -> list[tuple[str, str, float, float | None, float]]:
    """``(task, optimizer, chosen lr, its validation score, probe lr)`` for every edge
    choice in ``records``.

    The probe lies beyond the chosen edge, and also beyond the other edge when that one
    scored the same: a tie across the grid (an optimizer that did not move off its
    starting score at any rate) is broken toward the smaller rate by the benchmark, which
    says nothing about which side is worth trying."""
    probes = []
    pairs = sorted({(r["task"], r["optimizer"]) for r in records if r.get("phase") == "tune"})
    for task_name, optimizer in pairs:
        task = get_task(task_name)
        tuned = [r for r in records if (r["task"], r["optimizer"], r.get("phase"))
                 == (task_name, optimizer, "tune")]  # fmt: skip
        chosen = choose_lr(tuned, task)
        if chosen is None:
            continue
        best = _val_at(tuned, chosen)
        grid = lr_grid(task.lr_centre(optimizer, OPTIMIZERS[optimizer].default_lr), grid_size)
        for edge, beyond in ((grid[0], grid[0] / GRID_STEP), (grid[-1], grid[-1] * GRID_STEP)):
            at_edge = math.isclose(chosen, edge, rel_tol=1e-6)
            tied = best is not None and _val_at(tuned, edge) == best
            if at_edge or tied:
                probes.append((task_name, optimizer, chosen, best, beyond))
    return probes


def _val_at(tuned: list[dict[str, Any]], lr: float) -> float | None:
    """The validation score of the tuning run at ``lr`` (None: diverged or not run)."""
    return next((r["val_score"] for r in tuned if math.isclose(r["lr"], lr, rel_tol=1e-6)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a finished grng bench results folder")
    parser.add_argument("--optimizers", default=None, help="only these (comma-separated)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = json.loads((args.folder / "config.json").read_text())
    protocol = Protocol(**config["protocol"])
    records = RunLog(args.folder / "runs.jsonl", write=False).records
    log = RunLog(args.folder / "grid-probe.jsonl",
                 stamp={"commit": git_commit(), "grng_version": grng.__version__})  # fmt: skip
    done = log.finished()
    wanted = None if args.optimizers is None else set(args.optimizers.split(","))
    if wanted is not None and not wanted <= OPTIMIZERS.keys():
        parser.error(f"--optimizers: unknown {sorted(wanted - OPTIMIZERS.keys())}; "
                     f"valid: {', '.join(OPTIMIZERS)}")  # fmt: skip
    loaded: dict[str, Any] = {}
    print("| task | optimizer | chosen lr | its val | probe lr | probe val | wider grid |")
    print("|---|---|---:|---:|---:|---:|---|")
    for task_name, optimizer, chosen, chosen_val, probe in edge_probes(records, protocol.lr_grid):
        if wanted is not None and optimizer not in wanted:
            continue
        task = get_task(task_name)
        run = RunSpec(task_name, optimizer, probe, TUNE_SEED, "tune")
        if run.key not in done:
            if task_name not in loaded:
                loaded[task_name] = task.load(data=None, download=False, quick=protocol.quick,
                                              samples=protocol.samples, seed=0)  # fmt: skip
            spec = OPTIMIZERS[optimizer]
            log.append(train_run(run, task, spec, loaded[task_name], protocol,
                                 torch.device(args.device)))  # fmt: skip
        probe_val = _val_at(log.of(task_name, optimizer, "tune"), probe)
        verdict = _verdict(chosen, chosen_val, probe, probe_val, task)
        print(f"| {task_name} | {optimizer} | {chosen:.3g} | {_score(chosen_val)} | "
              f"{probe:.3g} | {_score(probe_val)} | {verdict} |", flush=True)  # fmt: skip


def _verdict(chosen: float, chosen_val: float | None, probe: float, probe_val: float | None,
             task: Any) -> str:  # fmt: skip
    """Whether the benchmark's rule would pick the probe over the chosen rate."""
    if chosen_val == probe_val:
        return "tie (no signal)"
    pair = [{"lr": chosen, "val_score": chosen_val}, {"lr": probe, "val_score": probe_val}]
    return "would choose the probe" if choose_lr(pair, task) == probe else "same choice"


def _score(value: float | None) -> str:
    return "diverged" if value is None else f"{value:.4g}"


if __name__ == "__main__":
    main()
