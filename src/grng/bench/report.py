"""Tables and plots from the run records (``runs.jsonl``) and the interleaved timings
(``timing.jsonl``): ``summary.md``, ``summary.csv`` and one PNG per task. Everything here
is recomputed from the records alone, so a report can be regenerated from a results
folder at any time."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from grng.bench.tasks import Task

__all__ = [
    "SUMMARY_FIELDS",
    "format_table",
    "mean_std",
    "plot_task",
    "provenance_note",
    "summarize",
    "threads_text",
    "write_csv",
    "write_markdown",
]

SUMMARY_FIELDS = [
    "task",
    "optimizer",
    "lr",
    "lr_at_edge",
    "seeds",
    "ok_seeds",
    "test_mean",
    "test_std",
    "target",
    "reached_seeds",
    "steps_to_target",
    "seconds_to_target",
    "median_step_ms",
    "mean_step_ms",
    "step_time_vs_adamw",
    "mean_step_time_vs_adamw",
    "step_time_source",
    "timing_rounds",
    "run_median_step_ms",
    "state_mb",
    "peak_device_mb",
    "mean_grad_norm",
    "hessian_top",
]


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1; 0 for a single value); ``None`` if empty."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def _ms(timing: dict[str, dict[str, Any]], optimizer: str, key: str) -> float | None:
    """``timing[optimizer][key]`` (seconds) in milliseconds; None when absent."""
    v = timing.get(optimizer, {}).get(key)
    return v * 1e3 if v is not None else None


def summarize(
    records: Iterable[dict[str, Any]], tasks: dict[str, Task], optimizers: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per (task, optimizer) from the ``final`` runs (see :data:`SUMMARY_FIELDS`).

    * ``test_mean``/``test_std``: the task metric on the test split at the end of training,
      over the seeds that finished (``ok_seeds``); diverged seeds are counted, not averaged.
    * ``steps_to_target``/``seconds_to_target``: mean over the seeds that reached the target
      (``reached_seeds`` of them), at the resolution of the evaluation interval; seconds
      are training time only (evaluations excluded).
    * Step time, ``step_time_source == "interleaved"`` when the records hold the task's
      interleaved timing (``phase == "timing"``, the newest ``timing_group`` of the task;
      see :func:`grng.bench.runner.time_task`): ``median_step_ms`` and ``mean_step_ms`` are
      the median and mean of the optimizer's ``timing_rounds`` timed steps there (the mean
      includes the steps that capture statistics or refresh inverses), and
      ``step_time_vs_adamw`` / ``mean_step_time_vs_adamw`` divide them by AdamW's median /
      mean in the same rounds. Without one (older results, ``timing_rounds=0``),
      ``step_time_source == "runs"``: ``median_step_ms`` is ``run_median_step_ms`` and
      the ratio divides it by AdamW's; those runs ran one after another, so a change in
      the machine's load between them shows in the ratio.
    * ``run_median_step_ms``: median over seeds of each final run's own median step time
      (wall clock of ``train_step`` + scheduler step, as recorded in ``runs.jsonl``).
    * ``state_mb``: parameters + gradients + optimizer state tensors (MiB).
    """
    from grng.bench.runner import latest_timing

    records = list(records)
    finals = [r for r in records if r.get("phase") == "final"]
    tunes = [r for r in records if r.get("phase") == "tune"]
    rows: list[dict[str, Any]] = []
    for task_name, task in tasks.items():
        by_opt = {o: [r for r in finals if r["task"] == task_name and r["optimizer"] == o]
                  for o in optimizers}  # fmt: skip
        run_ms = {
            o: (statistics.median(vals) * 1e3 if vals else None)
            for o, runs in by_opt.items()
            for vals in [[r["median_step_seconds"] for r in runs if r.get("median_step_seconds")]]
        }
        timing = latest_timing(records, task_name)
        interleaved = timing.get("adamw", {}).get("median_step_seconds") is not None
        if interleaved:
            step_ms = {o: _ms(timing, o, "median_step_seconds") for o in optimizers}
            mean_ms = {o: _ms(timing, o, "mean_step_seconds") for o in optimizers}
            base = _ms(timing, "adamw", "median_step_seconds")
            base_mean = _ms(timing, "adamw", "mean_step_seconds")
        else:
            step_ms, mean_ms = run_ms, dict.fromkeys(optimizers)
            base, base_mean = run_ms.get("adamw"), None
        for opt in optimizers:
            runs = by_opt[opt]
            if not runs:
                continue
            ok = [r for r in runs if r.get("test_score") is not None]
            mean, std = mean_std([r["test_score"] for r in ok])
            reached = [r for r in ok if r.get("steps_to_target") is not None]
            ms, mean_step = step_ms[opt], mean_ms[opt]
            state = _mean(
                (r["param_bytes"] + r["grad_bytes"] + r["optimizer_state_bytes"]) / 2**20
                for r in runs
                if "param_bytes" in r
            )
            peak = _mean(r["peak_device_bytes"] / 2**20 for r in runs if r.get("peak_device_bytes"))
            grid = [r["lr"] for r in tunes if r["task"] == task_name and r["optimizer"] == opt]
            lr = runs[0]["lr"]
            rows.append(
                {
                    "task": task_name,
                    "optimizer": opt,
                    "lr": lr,
                    # The best rate is the grid's smallest or largest: a wider grid might
                    # have found a better one (flagged † in the table).
                    "lr_at_edge": len(grid) > 1 and lr in (min(grid), max(grid)),
                    "seeds": len(runs),
                    "ok_seeds": len(ok),
                    "test_mean": mean,
                    "test_std": std,
                    "target": task.target,
                    "reached_seeds": len(reached),
                    "steps_to_target": _mean(r["steps_to_target"] for r in reached),
                    "seconds_to_target": _mean(r["seconds_to_target"] for r in reached),
                    "median_step_ms": ms,
                    "mean_step_ms": mean_step,
                    "step_time_vs_adamw": ms / base if ms is not None and base else None,
                    "mean_step_time_vs_adamw": (
                        mean_step / base_mean if mean_step is not None and base_mean else None
                    ),
                    "step_time_source": "interleaved" if interleaved else "runs",
                    "timing_rounds": timing["adamw"].get("rounds") if interleaved else None,
                    "run_median_step_ms": run_ms[opt],
                    "state_mb": state,
                    "peak_device_mb": peak,
                    "mean_grad_norm": _mean(r.get("mean_grad_norm") for r in ok),
                    "hessian_top": _mean(r.get("hessian_top") for r in ok),
                }
            )
    return rows


def write_csv(
    rows: Sequence[dict[str, Any]], path: Path, fields: Sequence[str] = SUMMARY_FIELDS
) -> None:
    """A CSV of ``rows`` with the columns ``fields`` (default :data:`SUMMARY_FIELDS`, the
    summary's), empty cells for missing values."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if row.get(k) is None else row[k]) for k in fields})


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def format_table(rows: Sequence[dict[str, Any]], task: Task) -> str:
    """A Markdown table of one task's rows, headed by the task, its metric and target."""
    direction = "≥" if task.higher_is_better else "≤"
    lines = [
        f"### {task.name}: {task.metric} (target {direction} {task.target:g})",
        "",
        "| optimizer | lr | "
        f"{task.metric} | steps to target | s to target | step time ×AdamW "
        "| state MiB | mean ‖g‖ | λmax(H) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mine = [r for r in rows if r["task"] == task.name]
    # A partial suite (still running or stopped) can hold fewer finals for some pairs.
    most_seeds = max((r["seeds"] for r in mine), default=0)
    for r in mine:
        metric = (
            f"{r['test_mean']:.3f} ± {r['test_std']:.3f}" if r["test_mean"] is not None else "—"
        )
        if r["ok_seeds"] < r["seeds"]:
            metric += f" ({r['seeds'] - r['ok_seeds']} diverged)"
        if r["seeds"] < most_seeds:
            metric += f" ({r['seeds']} of {most_seeds} seeds)"
        partial = (
            f" ({r['reached_seeds']}/{r['ok_seeds']})"
            if 0 < r["reached_seeds"] < r["ok_seeds"]
            else ""
        )
        rel = r["step_time_vs_adamw"]
        rel_s = f"{rel:.2f}" if rel is not None else f"{_fmt(r['median_step_ms'], '.2f')} ms"
        lines.append(
            f"| {r['optimizer']} | {r['lr']:.3g}{'†' if r.get('lr_at_edge') else ''} "
            f"| {metric} "
            f"| {_fmt(r['steps_to_target'], '.0f')}{partial} "
            f"| {_fmt(r['seconds_to_target'], '.2f')}{partial} | {rel_s} "
            f"| {_fmt(r['state_mb'], '.2f')} | {_fmt(r['mean_grad_norm'], '.3f')} "
            f"| {_fmt(r['hessian_top'], '.3g')} |"
        )
    if any(r.get("lr_at_edge") for r in mine):
        lines += ["", "† the chosen rate is at the edge of the tuning grid."]
    if mine:
        lines += ["", step_time_note(mine[0])]
    return "\n".join(lines)


def step_time_note(row: dict[str, Any]) -> str:
    """The sentence under a task's table saying where its step-time column comes from."""
    if row.get("step_time_source") == "interleaved":
        return (
            f"Step time ×AdamW: median step time in {row.get('timing_rounds')} interleaved "
            "rounds after the runs (every optimizer, at its chosen rate, steps once per "
            "round on its own copy of the model, in a shuffled order), divided by AdamW's "
            "median in the same rounds; s to target is the runs' own training time."
        )
    return (
        "Step time ×AdamW: median over seeds of each run's median step time, divided by "
        "AdamW's; the runs ran one after another (no interleaved timing in these results), "
        "so a change in the machine's load between them shows in the ratio."
    )


def write_markdown(
    rows: Sequence[dict[str, Any]], tasks: dict[str, Task], path: Path, header: str = ""
) -> str:
    """``summary.md``: the header, then one table per task; returns the text."""
    parts = [header] if header else []
    parts += [format_table(rows, task) for task in tasks.values()]
    text = "\n\n".join(parts) + "\n"
    path.write_text(text, encoding="utf-8")
    return text


def threads_text(records: Sequence[dict[str, Any]]) -> str:
    """The thread counts the runs recorded ("1", or "1, 2" for a mixed resume)."""
    import torch

    counts = sorted({int(r["threads"]) for r in records if r.get("threads") is not None})
    return ", ".join(map(str, counts or [torch.get_num_threads()]))


def provenance_note(records: Sequence[dict[str, Any]], commit: str, done: int, planned: int) -> str:
    """The end of a summary header: how many planned runs are missing (a suite still
    running or stopped), and the commits of the runs when they are not all ``commit``."""
    note = ""
    if done < planned:
        note += (f" **Partial: runs.jsonl holds {done} of the {planned} runs planned** (the "
                 "suite is still running or was stopped; `--resume` completes it).")  # fmt: skip
    commits = sorted({str(r.get("commit", "unknown")) for r in records})
    if commits != [commit]:
        # A --resume can summarise runs of earlier code: say so rather than imply one commit.
        note += f" Runs come from commits {', '.join(commits)} (see runs.jsonl)."
    return note


def _band(series: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    """Per-position mean, min and max across seeds (truncated to the shortest)."""
    n = min(len(s) for s in series)
    cols = [[s[i] for s in series] for i in range(n)]
    return [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot_task(
    records: Iterable[dict[str, Any]], task: Task, optimizers: Sequence[str], path: Path | None
) -> Any:
    """One figure for ``task``: training loss vs steps, the test metric vs steps and vs
    training seconds, gradient norm vs steps; one line per optimizer (mean over seeds)
    with a min–max band. Saved to ``path``; with ``path=None`` the open figure is returned
    instead (for inspection)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finals = [
        r
        for r in records
        if r.get("phase") == "final" and r["task"] == task.name and r.get("status") == "ok"
    ]
    fig, grid = plt.subplots(2, 2, figsize=(11, 7), dpi=80)
    axes = grid.ravel()
    colors = plt.get_cmap("tab10")
    for i, opt in enumerate(optimizers):
        runs = [r["curves"] for r in finals if r["optimizer"] == opt]
        if not runs:
            continue
        c = colors(i % 10)
        panels = [
            (axes[0], "log_step", "train_loss"),
            (axes[1], "eval_step", "test_score"),
            (axes[2], "eval_seconds", "test_score"),
            (axes[3], "log_step", "grad_norm"),
        ]
        for ax, xs, ys in panels:
            if not all(cv[ys] for cv in runs):
                continue
            # null (a non-finite value in the JSON) plots as a gap
            x, _, _ = _band([[math.nan if v is None else v for v in cv[xs]] for cv in runs])
            mean, lo, hi = _band([[math.nan if v is None else v for v in cv[ys]] for cv in runs])
            n = min(len(x), len(mean))
            ax.plot(x[:n], mean[:n], color=c, label=opt, lw=1.3)
            ax.fill_between(x[:n], lo[:n], hi[:n], color=c, alpha=0.2, lw=0)
    axes[0].set(xlabel="step", ylabel="training loss (window mean)", yscale="log")
    axes[1].set(xlabel="step", ylabel=f"{task.metric} (test)")
    axes[2].set(xlabel="training time (s)", ylabel=f"{task.metric} (test)")
    for ax in axes[1:3]:
        ax.axhline(task.target, color="k", ls=":", lw=1)
    axes[3].set(xlabel="step", ylabel="‖∇L(θ)‖ (mini-batch)", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{task.name}: mean over seeds, band = min–max", fontsize=10)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path)
    plt.close(fig)
    return None
