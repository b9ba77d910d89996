"""Tests of the summary tables: numbers recomputed independently from synthetic records."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from grng.bench import report
from grng.bench.tasks import get_task


def rec(opt: str, seed: int, test: float | None, steps: int | None, ms: float,
        **kw: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "task": "mnist1d-mlp", "optimizer": opt, "phase": "final", "lr": 0.01, "seed": seed,
        "status": "ok" if test is not None else "diverged", "test_score": test,
        "steps_to_target": steps, "seconds_to_target": None if steps is None else steps / 100,
        "median_step_seconds": ms / 1e3, "param_bytes": 2**20, "grad_bytes": 2**20,
        "optimizer_state_bytes": 2**21, "peak_device_bytes": None, "mean_grad_norm": 1.0,
        "hessian_top": 5.0, **kw,
    }  # fmt: skip


def test_summary_rows_and_tables(tmp_path: Path) -> None:
    tasks = {"mnist1d-mlp": get_task("mnist1d-mlp")}
    records = [
        rec("adamw", 1, 0.60, 400, 1.0), rec("adamw", 2, 0.70, 200, 1.2),
        rec("adamw", 3, 0.65, None, 0.8),
        rec("kfac", 1, 0.80, 100, 3.0), rec("kfac", 2, None, None, 3.3),
        {"task": "mnist1d-mlp", "optimizer": "kfac", "phase": "tune", "lr": 1.0, "seed": 0,
         "status": "ok", "val_score": 0.1, "test_score": None},
        {"task": "mnist1d-mlp", "optimizer": "kfac", "phase": "tune", "lr": 0.01, "seed": 0,
         "status": "ok", "val_score": 0.2, "test_score": None},
    ]  # fmt: skip
    rows = report.summarize(records, tasks, ["adamw", "kfac", "sgd"])
    assert [r["optimizer"] for r in rows] == ["adamw", "kfac"]  # sgd has no runs
    a, k = rows
    assert a["test_mean"] == pytest.approx(0.65) and a["test_std"] == pytest.approx(0.05)
    assert (a["reached_seeds"], a["steps_to_target"]) == (2, 300)
    assert a["seconds_to_target"] == pytest.approx(3.0)
    assert a["median_step_ms"] == pytest.approx(1.0) and a["step_time_vs_adamw"] == 1.0
    assert a["state_mb"] == pytest.approx(4.0)
    assert (k["seeds"], k["ok_seeds"], k["test_std"]) == (2, 1, 0.0)
    assert k["step_time_vs_adamw"] == pytest.approx(3.15)

    table = report.format_table(rows, tasks["mnist1d-mlp"])
    assert "target ≥ 0.6" in table
    assert "| adamw | 0.01 | 0.650 ± 0.050 | 300 (2/3) | 3.00 (2/3) | 1.00 |" in table
    # kfac has 2 finals where adamw has 3 (a suite still running): flagged
    assert "| kfac | 0.01† | 0.800 ± 0.000 (1 diverged) (2 of 3 seeds) |" in table
    assert "† the chosen rate is at the edge" in table
    assert (a["lr_at_edge"], k["lr_at_edge"]) == (False, True)

    report.write_csv(rows, tmp_path / "s.csv")
    with (tmp_path / "s.csv").open() as f:
        back = list(csv.DictReader(f))
    assert float(back[1]["test_mean"]) == 0.8 and back[1]["peak_device_mb"] == ""
    text = report.write_markdown(rows, tasks, tmp_path / "s.md", header="# head")
    assert text.startswith("# head") and (tmp_path / "s.md").read_text() == text


def test_plot_writes_a_png(tmp_path: Path) -> None:
    task = get_task("mnist1d-mlp")
    curves = {"log_step": [1, 2, 3], "train_loss": [2.0, 1.5, 1.0], "grad_norm": [1, 0.5, 0.4],
              "eval_step": [2, 3], "eval_seconds": [0.1, 0.2], "val_score": [0.3, 0.4],
              "test_score": [0.3, 0.5]}  # fmt: skip
    records = [rec("adamw", s, 0.5, None, 1.0, curves=curves) for s in (1, 2)]
    report.plot_task(records, task, ["adamw"], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    # The test metric against steps and against training seconds (language evidence).
    fig = report.plot_task(records, task, ["adamw"], None)
    _, by_step, by_time, _ = fig.axes
    assert list(by_step.lines[0].get_xdata()) == [2, 3]
    assert list(by_time.lines[0].get_xdata()) == [0.1, 0.2]
    assert list(by_step.lines[0].get_ydata()) == list(by_time.lines[0].get_ydata()) == [0.3, 0.5]
    assert by_step.get_xlabel() == "step" and by_time.get_xlabel() == "training time (s)"


def timing(opt: str, median_ms: float, mean_ms: float, group: str = "g1") -> dict[str, Any]:
    return {"task": "mnist1d-mlp", "optimizer": opt, "phase": "timing", "lr": 0.01, "seed": 1,
            "status": "ok", "timing_group": group, "rounds": 100,
            "median_step_seconds": median_ms / 1e3, "mean_step_seconds": mean_ms / 1e3}  # fmt: skip


def test_step_time_comes_from_the_newest_interleaved_timing() -> None:
    tasks = {"mnist1d-mlp": get_task("mnist1d-mlp")}
    runs = [rec("adamw", 1, 0.6, 100, 1.0), rec("kfac", 1, 0.7, 100, 9.0)]
    old = [timing("adamw", 5.0, 5.0, "g0"), timing("kfac", 5.0, 5.0, "g0")]
    new = [timing("adamw", 1.0, 1.5, "g1"), timing("kfac", 2.5, 6.0, "g1")]
    rows = report.summarize(runs + old + new, tasks, ["adamw", "kfac"])
    a, k = rows
    assert k["step_time_source"] == "interleaved" and k["timing_rounds"] == 100
    assert k["median_step_ms"] == pytest.approx(2.5) and k["mean_step_ms"] == pytest.approx(6.0)
    assert k["step_time_vs_adamw"] == pytest.approx(2.5)
    assert k["mean_step_time_vs_adamw"] == pytest.approx(4.0)
    assert k["run_median_step_ms"] == pytest.approx(9.0)  # the run's own wall clock, kept
    assert a["step_time_vs_adamw"] == 1.0
    table = report.format_table(rows, tasks["mnist1d-mlp"])
    assert "| kfac | 0.01 | 0.700 ± 0.000 | 100 | 1.00 | 2.50 |" in table
    assert "median step time in 100 interleaved rounds" in table
    # Without a timing (older results): the runs' medians, and the note says so.
    rows = report.summarize(runs, tasks, ["adamw", "kfac"])
    assert rows[1]["step_time_source"] == "runs" and rows[1]["step_time_vs_adamw"] == 9.0
    assert rows[1]["mean_step_ms"] is None
    assert "ran one after another" in report.format_table(rows, tasks["mnist1d-mlp"])
