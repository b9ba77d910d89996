"""``grng bench ablate``: the gradient-regularization strength ρ against what it is meant to
change.

For RING, RENG and R-Kalman (``--optimizers``; ``ring-factored`` may be added) and every ρ of
``--rhos`` it trains ``--seeds`` seeded runs per task with everything else held fixed: the learning rate is the one ``grng bench`` chose for that task and
optimizer (read from the tuning runs of finished results folders, ``--tuned DIR,...``;
without them, or for a pair they lack, the centre of the benchmark's tuning grid, i.e. the
optimizer's default or the task's own centre), and the damping λ is the optimizer's
default (the benchmark tunes the rate only). Reported per (task, optimizer, ρ), as mean ±
sample std over seeds:

* the task's test metric at the end of training;
* mean ‖g‖: the mini-batch gradient norm at θ averaged over all training steps (the
  quantity of the paper's Fig. 1, read as in the main benchmark);
* λmax(H): the top Hessian eigenvalue of the training loss at the end, on the benchmark's
  fixed training batch (power iteration, :func:`grng.bench.runner.hessian_top_eigenvalue`).

The default grid, ρ ∈ {0, 1e-3, 1e-2, 1e-1, 1, 10}, is the optimizers' default 1e-3 and
decades above it up to where ρ acts at the default damping: RING adds ρ‖g‖² to λ = 1,
which matters only once ρ‖g‖² approaches λ (ρ ≳ 1 for ‖g‖ ≈ 1); RENG adds ρH∇L, which
matters once ρ λmax(H) approaches 1; R-Kalman shortens its step by
``1/(1 + ρ‖g‖²‖Δ‖²/gᵀΔ)``. A one-seed probe on mnist1d-mlp (the default protocol, ρ from
1e-4 to 10) found ρ ≤ 1e-2 indistinguishable from ρ = 0 for all three (1e-4 is therefore
left out), RENG's λmax(H) falling from 15 to 3.4 between ρ = 0.01 and 1 at unchanged
accuracy and collapsing at 10, RING changing only at 10, and R-Kalman's λmax(H) rising from
0.4 to 15 between ρ = 0.1 and 10 (shorter steps, sharper end point).

ρ = 0 switches gradient regularization off: RING and RENG are then K-FAC (RING with its
exact damping ``(G ⊗ A + λI)⁻¹``, ``ring-factored`` and RENG with K-FAC's factored damping;
RENG does no second-order work), at the same lr, λ and inverse method as their ρ > 0 runs,
which is not the main benchmark's ``kfac`` row (its defaults differ); R-Kalman at ρ = 0 is
its Kalman filter with the full step length (α = 1).

Each task runs the protocol of the main benchmark for it (:func:`task_protocol`): the
default suite's for mnist1d (1000 steps, batch 128), the ``language`` suite's for
``sst2-minilm`` (:data:`grng.bench.tasks.SUITES`), with fewer seeds there by default
(:data:`ABLATION_SEEDS`). Outputs in ``--out``: ``runs.jsonl`` (one record per finished run,
appended as it ends; ``--resume`` skips finished runs and continues the one in progress
from its checkpoint), ``config.json`` (protocols, learning rates and their source, commit),
``summary.md``, ``summary.csv`` and ``ablation.png`` (each quantity against ρ).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import grng
from grng.bench.cli import (
    QUICK,
    UsageError,
    _load_tasks,
    _names,
    _positive_int,
    _timestamp,
    _union,
)
from grng.bench.optimizers import OPTIMIZERS, OptimizerSpec
from grng.bench.report import mean_std, write_csv
from grng.bench.tasks import SUITES, Task, get_task

__all__ = [
    "ABLATION_OPTIMIZERS",
    "ABLATION_SEEDS",
    "DEFAULT_RHOS",
    "DEFAULT_TASKS",
    "SUMMARY_FIELDS",
    "ablation_spec",
    "add_arguments",
    "run",
    "summarize",
    "task_protocol",
    "tuned_lrs",
]

DEFAULT_TASKS = ("mnist1d-mlp", "mnist1d-cnn", "sst2-minilm")
DEFAULT_RHOS = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
#: The optimizers with a ρ, and how to build each (grng class, fixed keywords).
ABLATION_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ring": ("RING", {}),
    "ring-factored": ("RING", {"damping_form": "factored"}),
    "reng": ("RENG", {}),
    "rkalman": ("RKalman", {}),
}
ABLATION_OPTIMIZERS = ("ring", "reng", "rkalman")
#: Seeds per task when ``--seeds`` is not given: 3, except SST-2, whose runs take minutes
#: each on a CPU (one seed; its standard deviations are then 0 and say nothing).
ABLATION_SEEDS = {"sst2-minilm": 1}
DEFAULT_SEEDS = 3

SUMMARY_FIELDS = [
    "task",
    "optimizer",
    "rho",
    "lr",
    "lr_source",
    "damping",
    "seeds",
    "ok_seeds",
    "metric",
    "test_mean",
    "test_std",
    "grad_norm_mean",
    "grad_norm_std",
    "hessian_mean",
    "hessian_std",
]

DESCRIPTION = (
    "Gradient-regularization ablation: RING, RENG and R-Kalman at every rho of --rhos, "
    "lr held at the rate grng bench chose (--tuned DIR,...; else the grid's centre) and damping "
    "at its default; per (task, optimizer, rho) the test metric, the mean gradient norm over "
    "training and the top Hessian eigenvalue at the end, mean ± std over seeds. rho = 0 is "
    "K-FAC (RING, RENG). Results: OUT/runs.jsonl, OUT/summary.md, OUT/summary.csv, "
    "OUT/ablation.png. See docs/benchmark.md."
)


def _rhos(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0, got {text!r}")
    return sorted(set(values))


def _folders(text: str) -> list[Path]:
    return [Path(v.strip()) for v in text.split(",") if v.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``grng bench ablate``."""
    p.add_argument("--tasks", type=_names, default=list(DEFAULT_TASKS), metavar="A,B,...",
                   help="tasks to run")  # fmt: skip
    p.add_argument("--optimizers", type=_names, default=list(ABLATION_OPTIMIZERS),
                   metavar="A,B,...",
                   help=f"optimizers; valid: {', '.join(ABLATION_CLASSES)}")  # fmt: skip
    p.add_argument("--rhos", type=_rhos, default=list(DEFAULT_RHOS), metavar="R,R,...",
                   help="gradient-regularization strengths (0 = K-FAC)")  # fmt: skip
    p.add_argument("--tuned", type=_folders, default=[], metavar="DIR,DIR,...",
                   help="finished grng bench results folders (or --suite folders of "
                        "them): each optimizer's lr is the one its tuning chose in the "
                        "first that has the task (default: the centre of the tuning "
                        "grid)")  # fmt: skip
    p.add_argument("--seeds", type=_positive_int, default=None,
                   help=f"seeded runs per (task, optimizer, rho) (default {DEFAULT_SEEDS}; "
                        "sst2-minilm 1; --quick 1)")  # fmt: skip
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps per run (default: the task's benchmark protocol: "
                        "1000 for mnist1d, the language suite's for sst2-minilm)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="batch size (default: the task's)")  # fmt: skip
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="steps between evaluations (default: the task's protocol)")  # fmt: skip
    p.add_argument("--hessian-iters", type=int, default=None,
                   help="power iterations for the top Hessian eigenvalue (default: the "
                        "task's protocol)")  # fmt: skip
    p.add_argument("--hessian-batch", type=_positive_int, default=None,
                   help="training examples the Hessian is measured on (default: the "
                        "task's protocol)")  # fmt: skip
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="as for grng bench")  # fmt: skip
    p.add_argument("--data", default=None, metavar="PATH",
                   help="data folder or file (as for grng bench)")  # fmt: skip
    p.add_argument("--download", action="store_true", help="download missing data")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where to train")  # fmt: skip
    p.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default runs/ablate-<timestamp>)")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="continue in an existing --out folder, skipping finished runs")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="save the run in progress every N steps (0: never; default 200)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-sized: quick data and models, {QUICK['steps']} steps, one "
                        "seed; explicit options still win")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------- protocol


def task_protocol(task: str, args: argparse.Namespace) -> Any:
    """The :class:`grng.bench.runner.Protocol` of ``task``'s ablation runs: the main
    benchmark's for that task (the ``language`` suite's entry when it has one, else the
    default suite's), quick sizes with ``--quick``, then every explicit option."""
    from grng.bench.runner import Protocol

    base = Protocol()
    entry = next((e for suite in SUITES.values() for e in suite if e.task == task), None)
    values: dict[str, Any] = {
        "steps": base.steps,
        "batch_size": None,
        "eval_every": base.eval_every,
        "hessian_iters": base.hessian_iters,
        "hessian_batch": base.hessian_batch,
        "seeds": ABLATION_SEEDS.get(task, DEFAULT_SEEDS),
    }
    if entry is not None:
        values.update(
            steps=entry.steps,
            batch_size=entry.batch_size,
            eval_every=entry.eval_every,
            hessian_iters=entry.hessian_iters,
            hessian_batch=entry.hessian_batch,
        )
    if args.quick:
        values.update({k: QUICK[k] for k in ("steps", "eval_every", "hessian_iters",
                                              "hessian_batch")}, seeds=1)  # fmt: skip
    explicit = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "hessian_iters": args.hessian_iters,
        "hessian_batch": args.hessian_batch,
        "seeds": args.seeds,
    }
    values.update({k: v for k, v in explicit.items() if v is not None})
    if values["hessian_iters"] < 0:
        raise UsageError(f"--hessian-iters must be >= 0, got {values['hessian_iters']}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    return Protocol(
        lr_grid=1,
        timing_rounds=0,
        checkpoint_every=(
            base.checkpoint_every if args.checkpoint_every is None else args.checkpoint_every
        ),
        quick=args.quick,
        samples=args.samples,
        **values,
    )


def _run_logs(folder: Path) -> list[tuple[Path, list[dict[str, Any]]]]:
    """``(path, records)`` of ``folder/runs.jsonl`` and of ``folder/*/runs.jsonl`` (a
    ``--suite`` folder), in that order; lines cut short by a kill are skipped."""
    logs = []
    for path in [folder / "runs.jsonl", *sorted(folder.glob("*/runs.jsonl"))]:
        if not path.is_file():
            continue
        records = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        logs.append((path, records))
    return logs


def tuned_lrs(
    folders: Sequence[Path], tasks: dict[str, Task], optimizers: Sequence[str]
) -> dict[tuple[str, str], tuple[float, str]]:
    """``(task, optimizer) -> (lr, source)``: the rate the benchmark's tuning chose
    (:func:`grng.bench.runner.choose_lr` over the ``tune`` records of the first
    ``runs.jsonl`` that has that pair, searching each folder of ``folders`` and then its
    sub-folders, in order), else the centre of the benchmark's grid for that pair.
    ``source`` says which.

    Raises:
        UsageError: a folder does not exist or holds no ``runs.jsonl``.
    """
    from grng.bench.runner import choose_lr

    logs: list[tuple[Path, list[dict[str, Any]]]] = []
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"--tuned {folder}: no such folder")
        found = _run_logs(folder)
        if not found:
            raise UsageError(f"--tuned {folder}: no runs.jsonl in it or its sub-folders")
        logs += found
    lrs: dict[tuple[str, str], tuple[float, str]] = {}
    for name, task in tasks.items():
        for opt in optimizers:
            centre = task.lr_centre(opt, OPTIMIZERS[opt].default_lr)
            lrs[name, opt] = (centre, "grid centre (default)")
            for path, records in logs:
                tunes = [r for r in records if r.get("task") == name
                         and r.get("optimizer") == opt and r.get("phase") == "tune"]  # fmt: skip
                best = choose_lr(tunes, task) if tunes else None
                if best is not None:
                    lrs[name, opt] = (best, f"tuned ({len(tunes)} rates) in {path}")
                    break
    return lrs


def ablation_spec(optimizer: str, rho: float) -> OptimizerSpec:
    """The benchmark's spec of ``optimizer`` (its train step) with ``rho`` fixed."""
    cls_name, options = ABLATION_CLASSES[optimizer]
    cls = getattr(grng, cls_name)
    base = OPTIMIZERS[optimizer]

    def factory(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        optimizer: torch.optim.Optimizer = cls(model, lr=lr, rho=rho, **options)
        return optimizer

    return replace(base, name=optimizer, factory=factory)


def _default_damping(optimizer: str) -> float:
    cls_name, _ = ABLATION_CLASSES[optimizer]
    return float(inspect.signature(getattr(grng, cls_name)).parameters["damping"].default)


def _run_key(task: str, opt: str, rho: float, seed: int) -> tuple[str, str, str, int]:
    return (task, opt, _rho_key(rho), int(seed))


def _rho_key(rho: float) -> str:
    return f"{rho:.6g}"


# --------------------------------------------------------------------------- report


def summarize(
    records: Sequence[dict[str, Any]],
    tasks: dict[str, Task],
    optimizers: Sequence[str],
    rhos: Sequence[float],
) -> list[dict[str, Any]]:
    """One row per (task, optimizer, ρ) present in ``records`` (see :data:`SUMMARY_FIELDS`):
    means and sample standard deviations over the seeds that finished; a diverged seed is
    counted in ``seeds`` but not ``ok_seeds``."""
    rows = []
    for name, task in tasks.items():
        for opt in optimizers:
            for rho in rhos:
                runs = [r for r in records if r["task"] == name and r["optimizer"] == opt
                        and _rho_key(r["rho"]) == _rho_key(rho)]  # fmt: skip
                if not runs:
                    continue
                ok = [r for r in runs if r.get("test_score") is not None]

                def stats(key: str, ok: list[dict[str, Any]] = ok) -> tuple[Any, Any]:
                    return mean_std([r[key] for r in ok if r.get(key) is not None])

                test = stats("test_score")
                norm = stats("mean_grad_norm")
                hess = stats("hessian_top")
                rows.append({
                    "task": name, "optimizer": opt, "rho": rho, "lr": runs[0]["lr"],
                    "lr_source": runs[0].get("lr_source"), "damping": runs[0].get("damping"),
                    "seeds": len(runs), "ok_seeds": len(ok), "metric": task.metric,
                    "test_mean": test[0], "test_std": test[1],
                    "grad_norm_mean": norm[0], "grad_norm_std": norm[1],
                    "hessian_mean": hess[0], "hessian_std": hess[1],
                })  # fmt: skip
    return rows


def _pm(mean: float | None, std: float | None, spec: str) -> str:
    if mean is None:
        return "—"
    return f"{mean:{spec}} ± {std:{spec}}" if std is not None else f"{mean:{spec}}"


def _rho_label(optimizer: str, rho: float) -> str:
    if rho == 0:
        return "0 (K-FAC)" if optimizer in ("ring", "ring-factored", "reng") else "0 (no GR)"
    return f"{rho:g}"


def format_markdown(rows: Sequence[dict[str, Any]], tasks: dict[str, Task], header: str) -> str:
    """``summary.md``: the header, then one table per task."""
    lines = [header, ""]
    for name, task in tasks.items():
        task_rows = [r for r in rows if r["task"] == name]
        if not task_rows:
            continue
        lines += [
            f"### {name}: {task.metric}, mean ‖g‖, λmax(H) against ρ",
            "",
            f"| optimizer | ρ | lr | damping | {task.metric} | mean ‖g‖ | λmax(H) | seeds |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in task_rows:
            seeds = f"{r['ok_seeds']}" + (f" of {r['seeds']}" if r["ok_seeds"] < r["seeds"] else "")
            lines.append(
                f"| {r['optimizer']} | {_rho_label(r['optimizer'], r['rho'])} | {r['lr']:.3g} "
                f"| {r['damping']:g} | {_pm(r['test_mean'], r['test_std'], '.3f')} "
                f"| {_pm(r['grad_norm_mean'], r['grad_norm_std'], '.3g')} "
                f"| {_pm(r['hessian_mean'], r['hessian_std'], '.3g')} | {seeds} |"
            )
        lines.append("")
    lines.append(
        "ρ = 0 switches gradient regularization off: RING and RENG are K-FAC there (RING "
        "with exact damping, RENG with K-FAC's factored damping) at the same lr and λ; "
        "R-Kalman takes its full step (α = 1). lr: the rate tuned by grng bench (or the "
        "grid's centre, see summary.csv's lr_source), the same for every ρ; mean ± sample "
        "std over the seeds that finished."
    )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], tasks: dict[str, Task], path: Path) -> None:
    """One row of three panels per task: test metric, mean ‖g‖ and λmax(H) against ρ (ρ = 0
    at the left end of a symmetric-log axis), one line per optimizer, error bars ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in tasks if any(r["task"] == n for r in rows)]
    if not names:
        return
    panels = (("test_mean", "test_std", None), ("grad_norm_mean", "grad_norm_std", "mean ‖g‖"),
              ("hessian_mean", "hessian_std", "λmax(H)"))  # fmt: skip
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.4 * len(names)), squeeze=False)
    positive = [r["rho"] for r in rows if r["rho"] > 0]
    linthresh = min(positive) if positive else 1.0
    for i, name in enumerate(names):
        task_rows = [r for r in rows if r["task"] == name]
        for j, (mean_key, std_key, label) in enumerate(panels):
            ax = axes[i][j]
            for opt in dict.fromkeys(r["optimizer"] for r in task_rows):
                pts = [r for r in task_rows if r["optimizer"] == opt and r[mean_key] is not None]
                if pts:
                    ax.errorbar([r["rho"] for r in pts], [r[mean_key] for r in pts],
                                yerr=[r[std_key] or 0.0 for r in pts], marker="o",
                                capsize=3, label=opt)  # fmt: skip
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_xlabel("ρ")
            ax.set_title(f"{name}: {label or tasks[name].metric}", fontsize=10)
            if mean_key == "hessian_mean" and all(
                (r[mean_key] or 0) > 0 for r in task_rows if r[mean_key] is not None
            ):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- run


def planned_runs(
    records: Sequence[dict[str, Any]], tasks: Sequence[str], optimizers: Sequence[str],
    rhos: Sequence[float], protocols: dict[str, Any],
) -> tuple[int, int]:  # fmt: skip
    """``(done, planned)``: the runs of ``tasks`` × ``optimizers`` × ``rhos`` × each task's
    seeds, and how many of them ``records`` holds."""
    have = {_run_key(r["task"], r["optimizer"], r["rho"], r["seed"]) for r in records}
    plan = [_run_key(t, o, rho, s) for t in tasks for o in optimizers for rho in rhos
            for s in range(1, protocols[t].seeds + 1)]  # fmt: skip
    return sum(k in have for k in plan), len(plan)


def write_summary(
    out: Path,
    records: Sequence[dict[str, Any]],
    tasks: dict[str, Task],
    optimizers: Sequence[str],
    rhos: Sequence[float],
    protocols: dict[str, Any],
    device: str,
    provenance: dict[str, str],
    note: str,
    progress: tuple[int, int],
) -> str:
    """The ablation's ``summary.csv``, ``summary.md`` and ``ablation.png`` from its run
    records; returns the markdown. ``note`` ends the header's first sentence (what this
    invocation did); ``progress`` (done, planned) says how many runs are missing."""
    from grng.bench.report import provenance_note, threads_text

    rows = summarize(records, tasks, optimizers, rhos)
    write_csv(rows, out / "summary.csv", SUMMARY_FIELDS)
    protocol_text = "; ".join(
        f"{t}: {p.steps} steps, batch {p.batch_for(tasks[t])}, {p.seeds} seed(s), λmax from "
        f"{p.hessian_iters} power iterations on {p.hessian_batch} examples"
        for t, p in protocols.items()
    )
    header = (
        f"# grng bench ablate — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — grng "
        f"{provenance['grng_version']}, commit {provenance['commit']}\n\n"
        f"ρ ∈ {{{', '.join(f'{r:g}' for r in rhos)}}}, lr and damping fixed per "
        f"(task, optimizer); {protocol_text}; device {device}, "
        f"{threads_text(records)} thread(s); {note}."
        + provenance_note(records, provenance["commit"], *progress)
    )
    text = format_markdown(rows, tasks, header)
    (out / "summary.md").write_text(text, encoding="utf-8")
    plot(rows, tasks, out / "ablation.png")
    return text


def summarize_folder(out: Path, config: dict[str, Any], provenance: dict[str, str]) -> str:
    """``grng bench report`` for an ablation folder: its summary regenerated from its
    ``config.json`` and ``runs.jsonl``, no training; returns the markdown. It reports every
    task, optimizer and ρ the records hold (a ``--resume`` rewrites ``config.json``'s
    lists); the missing runs it counts are those of the latest invocation's plan."""
    from grng.bench.runner import Protocol, RunLog

    protocols = {t: Protocol(**p) for t, p in config["protocols"].items()}
    tasks = {t: get_task(t) for t in protocols}
    records = [r for r in RunLog(out / "runs.jsonl", write=False).records if r["task"] in tasks]
    optimizers = _union(config["optimizers"], (r["optimizer"] for r in records))
    by_key = {
        _rho_key(float(rho)): float(rho) for rho in [*config["rhos"], *(r["rho"] for r in records)]
    }
    rhos = sorted(by_key.values())
    progress = planned_runs(records, config["tasks"], config["optimizers"], config["rhos"],
                            protocols)  # fmt: skip
    return write_summary(out, records, tasks, optimizers, rhos, protocols, config["device"],
                         provenance, "summarised by `grng bench report`, no training",
                         progress)  # fmt: skip


def _prepare_out(args: argparse.Namespace, config: dict[str, Any]) -> Path:
    """Create (or, with ``--resume``, reuse) the results folder and write ``config.json``.

    A resume must run every task it shares with the folder's earlier invocations under the
    same protocol and learning rates, on the same device; the tasks and rates of those
    earlier invocations stay in ``config.json``."""
    out: Path = args.out or Path("runs") / f"ablate-{_timestamp()}"
    config_path = out / "config.json"
    if (out / "runs.jsonl").exists() and not args.resume:
        raise UsageError(f"--out {out} already holds runs.jsonl; pass --resume or another --out")
    if args.resume and config_path.exists():
        old = json.loads(config_path.read_text(encoding="utf-8"))
        if old.get("device") != config["device"]:
            raise UsageError(
                f"--resume: {out} was run on {old.get('device')}, not {config['device']}; "
                "use the same options or another --out"
            )
        for key, what in (("protocols", "protocol"), ("lrs", "learning rate")):
            before = old.get(key, {})
            for name, value in config[key].items():
                if name in before and before[name] != value:
                    raise UsageError(
                        f"--resume: {out} was run with a different {what} for {name} (was "
                        f"{before[name]}); use the same options or another --out"
                    )
            config[key] = {**before, **config[key]}
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return out


def run(args: argparse.Namespace) -> int:
    """``grng bench ablate``: returns the exit status (bad input raises UsageError)."""
    from tqdm import tqdm

    from grng.bench.runner import RunLog, RunSpec, git_commit, train_run

    for name in args.optimizers:
        if name not in ABLATION_CLASSES:
            raise UsageError(
                f"unknown optimizer {name!r} for the rho ablation; valid: "
                f"{', '.join(ABLATION_CLASSES)}"
            )
        if name not in OPTIMIZERS:
            raise UsageError(f"{name}: this grng has no such optimizer")
    try:
        for name in args.tasks:
            get_task(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    protocols = {name: task_protocol(name, args) for name in args.tasks}
    loaded = _load_tasks(args)
    tasks = {name: task for name, (task, _) in loaded.items()}
    lrs = tuned_lrs(args.tuned, tasks, args.optimizers)
    provenance = {"commit": git_commit(), "grng_version": grng.__version__}
    config = {
        "protocols": {name: asdict(p) for name, p in protocols.items()},
        "device": str(device),
        "tasks": args.tasks,
        "optimizers": args.optimizers,
        "rhos": args.rhos,
        "tuned": [str(f) for f in args.tuned],
        "lrs": {f"{t}/{o}": {"lr": lr, "source": src} for (t, o), (lr, src) in lrs.items()},
        "damping": {o: _default_damping(o) for o in args.optimizers},
        **provenance,
    }
    out = _prepare_out(args, config)
    log = RunLog(out / "runs.jsonl", stamp=provenance)

    done = {_run_key(r["task"], r["optimizer"], r["rho"], r["seed"]) for r in log.records}
    plan = [(t, o, rho, s) for t in args.tasks for o in args.optimizers for rho in args.rhos
            for s in range(1, protocols[t].seeds + 1)]  # fmt: skip
    total = sum(protocols[t].steps for t, *_ in plan)
    start = time.perf_counter()
    with tqdm(total=total, unit="step", desc="grng bench ablate", file=sys.stderr,
              disable=args.quiet, dynamic_ncols=True, smoothing=0.05) as bar:  # fmt: skip
        for task_name, opt, rho, seed in plan:
            protocol = protocols[task_name]
            if _run_key(task_name, opt, rho, seed) in done:
                bar.update(protocol.steps)
                continue
            task, data = loaded[task_name]
            lr, source = lrs[task_name, opt]
            run_spec = RunSpec(task_name, opt, lr, seed, "final")
            bar.set_postfix_str(f"{task_name} {opt} rho={rho:g} s{seed}", refresh=False)
            ckpt = out / "checkpoints" / f"{task_name}_{opt}_rho{_rho_key(rho)}_s{seed}.pt"
            try:
                record = train_run(run_spec, task, ablation_spec(opt, rho), data, protocol,
                                   device, bar.update, None, ckpt)  # fmt: skip
            except Exception as exc:  # recorded, reported, the ablation goes on
                print(f"error: {opt} on {task_name} (rho {rho:g}, seed {seed}): "
                      f"{type(exc).__name__}: {exc}", file=sys.stderr)  # fmt: skip
                record = {**asdict(run_spec), "status": "error",
                          "error": f"{type(exc).__name__}: {exc}", "test_score": None}  # fmt: skip
            log.append({**record, "rho": rho, "lr_source": source,
                        "damping": _default_damping(opt)})  # fmt: skip
            done.add(_run_key(task_name, opt, rho, seed))
    elapsed = time.perf_counter() - start

    wanted = {_run_key(*p) for p in plan}
    records = [
        r for r in log.records if _run_key(r["task"], r["optimizer"], r["rho"], r["seed"]) in wanted
    ]
    progress = planned_runs(records, args.tasks, args.optimizers, args.rhos, protocols)
    text = write_summary(out, records, tasks, args.optimizers, args.rhos, protocols,
                         str(device), provenance, f"this invocation took {elapsed:.0f} s",
                         progress)  # fmt: skip
    errors = [r for r in records if r.get("status") == "error"]
    print(text)
    print(f"results in {out}/ ({len(records)} runs; {elapsed:.0f} s)")
    if errors:
        print(f"warning: {len(errors)} run(s) failed; see 'error' in runs.jsonl", file=sys.stderr)
    return 0
