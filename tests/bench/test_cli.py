"""End-to-end tests of ``grng bench``: every task in ``--quick`` size, the output files, the
summary recomputed from the JSON lines, ``--resume``, interrupted suites and bad input.
Nothing is downloaded: mnist1d is generated, Shakespeare comes from shared/data when
present, CIFAR from a tiny tarball written here."""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import grng
from grng.bench import cli, runner
from grng.bench import data as D
from grng.bench.optimizers import OPTIMIZERS

ALL = list(OPTIMIZERS)


def bench(*args: str) -> int:
    return cli.main(["bench", *args, "--quiet"])


def read_runs(out: Path) -> list[dict[str, Any]]:
    with (out / "runs.jsonl").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_csv(out: Path) -> list[dict[str, str]]:
    with (out / "summary.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def check_outputs(out: Path, tasks: list[str], opts: list[str], grid: int, seeds: int) -> None:
    """runs.jsonl holds one row per run (unique keys), the summary's numbers match the rows,
    and every file a suite promises exists."""
    runs = read_runs(out)
    assert len(runs) == len(tasks) * len(opts) * (grid + seeds)
    keys = [runner.run_key(r["task"], r["optimizer"], r["lr"], r["seed"], r["phase"]) for r in runs]
    assert len(set(keys)) == len(keys)
    assert all(r["status"] == "ok" for r in runs), [r.get("error") for r in runs]
    assert all(r["test_score"] is None for r in runs if r["phase"] == "tune")  # test unseen
    rows = read_csv(out)
    assert len(rows) == len(tasks) * len(opts)
    for row in rows:
        finals = [r for r in runs if r["phase"] == "final" and r["task"] == row["task"]
                  and r["optimizer"] == row["optimizer"]]  # fmt: skip
        assert len(finals) == seeds and {r["seed"] for r in finals} == set(range(1, seeds + 1))
        assert len({r["lr"] for r in finals}) == 1
        scores = [r["test_score"] for r in finals]
        std = statistics.stdev(scores) if len(scores) > 1 else 0.0
        assert float(row["test_mean"]) == pytest.approx(statistics.fmean(scores), abs=1e-12)
        assert float(row["test_std"]) == pytest.approx(std, abs=1e-12)
        # The chosen rate is the tuning run's best validation score.
        tunes = [r for r in runs if r["phase"] == "tune" and r["task"] == row["task"]
                 and r["optimizer"] == row["optimizer"]]  # fmt: skip
        assert len(tunes) == grid
        best = max(tunes, key=lambda r: (r["val_score"], -r["lr"]))
        assert best["lr"] == finals[0]["lr"] == float(row["lr"])
    md = (out / "summary.md").read_text(encoding="utf-8")
    for t in tasks:
        assert f"### {t}" in md and (out / f"{t}.png").stat().st_size > 1000
    assert json.loads((out / "config.json").read_text())["protocol"]["seeds"] == seeds


def test_quick_mnist1d_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "res"
    tasks = ["mnist1d-mlp", "mnist1d-cnn"]
    assert bench("--quick", "--tasks", ",".join(tasks), "--out", str(out)) == 0
    check_outputs(out, tasks, ALL, cli.QUICK["lr_grid"], cli.QUICK["seeds"])
    printed = capsys.readouterr().out
    assert "target ≥ 0.6" in printed and "| adamw |" in printed
    runs = read_runs(out)
    final = next(r for r in runs if r["phase"] == "final")
    for k in ("hessian_top", "mean_grad_norm", "median_step_seconds", "optimizer_state_bytes"):
        assert final[k] is not None
    assert len(final["curves"]["train_loss"]) == len(final["curves"]["log_step"]) > 0


def test_quick_shakespeare_end_to_end(tmp_path: Path) -> None:
    if D.find_data_file("tinyshakespeare.txt") is None:
        pytest.skip("shared/data/tinyshakespeare.txt is not present")
    out = tmp_path / "res"
    assert bench("--quick", "--tasks", "shakespeare-char", "--out", str(out), "--lr-grid", "1",
                 "--seeds", "1", "--steps", "8", "--samples", "20000") == 0  # fmt: skip
    check_outputs(out, ["shakespeare-char"], ALL, 1, 1)
    assert "test_loss (target ≤ 1.8)" in (out / "summary.md").read_text(encoding="utf-8")


def write_cifar_tarball(folder: Path, per_batch: int) -> Path:
    """A tiny CIFAR-10 tarball in the official layout (as in test_data.py)."""
    spec = D.CIFAR_SPECS["cifar10"]
    rng = np.random.default_rng(0)
    path = folder / spec.archive
    with tarfile.open(path, "w:gz") as tar:
        for member in (*spec.train_members, spec.test_member):
            batch = {
                b"batch_label": b"fake batch",
                b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
                spec.label_key: rng.integers(0, 10, size=per_batch).tolist(),
                b"filenames": [b"img%d.png" % i for i in range(per_batch)],
            }
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"{spec.folder}/{member}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_quick_cifar10_from_tiny_tarball(tmp_path: Path) -> None:
    path = write_cifar_tarball(tmp_path, per_batch=8)
    out = tmp_path / "res"
    assert bench("--quick", "--tasks", "cifar10", "--data", str(path), "--out", str(out),
                 "--lr-grid", "1", "--seeds", "1", "--steps", "2", "--batch-size", "8",
                 "--hessian-iters", "1") == 0  # fmt: skip
    check_outputs(out, ["cifar10"], ALL, 1, 1)


def test_resume_reruns_nothing_and_completes_an_interrupted_suite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "res"
    args = ["--quick", "--tasks", "mnist1d-mlp", "--optimizers", "sgd,adamw", "--out", str(out)]
    real = runner.train_run
    calls: list[runner.RunSpec] = []

    def interrupt_after_3(run: runner.RunSpec, *a: Any, **k: Any) -> dict[str, Any]:
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(run)
        return real(run, *a, **k)

    monkeypatch.setattr(runner, "train_run", interrupt_after_3)
    with pytest.raises(KeyboardInterrupt):
        bench(*args)
    assert len(read_runs(out)) == 3  # the finished runs were kept

    assert bench(*args) == 2  # the folder holds results: refuse to mix without --resume

    def counting(run: runner.RunSpec, *a: Any, **k: Any) -> dict[str, Any]:
        calls.append(run)
        return real(run, *a, **k)

    calls.clear()
    monkeypatch.setattr(runner, "train_run", counting)
    assert bench(*args, "--resume") == 0
    total = 2 * (cli.QUICK["lr_grid"] + cli.QUICK["seeds"])
    assert len(calls) == total - 3  # only the missing runs
    check_outputs(out, ["mnist1d-mlp"], ["sgd", "adamw"], cli.QUICK["lr_grid"], cli.QUICK["seeds"])

    def forbidden(run: runner.RunSpec, *a: Any, **k: Any) -> dict[str, Any]:
        raise AssertionError(f"reran a finished run: {run}")

    monkeypatch.setattr(runner, "train_run", forbidden)
    assert bench(*args, "--resume") == 0
    assert len(read_runs(out)) == total


def test_killed_process_keeps_finished_rows(tmp_path: Path) -> None:
    out = tmp_path / "res"
    cmd = [sys.executable, "-m", "grng.bench", "--quick", "--tasks", "mnist1d-mlp",
           "--optimizers", "sgd,adamw", "--steps", "1500", "--tune-steps", "300",
           "--out", str(out), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    runs_file = out / "runs.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if runs_file.exists() and runs_file.read_text(encoding="utf-8").count("\n") >= 1:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    rows = read_runs(out)  # every line parses: each was written whole and flushed
    assert 1 <= len(rows) < 2 * (cli.QUICK["lr_grid"] + cli.QUICK["seeds"])
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "adamw,nope"], "unknown optimizer 'nope'; valid optimizers: sgd"),
        (["--tasks", "mnist2d"], "unknown task 'mnist2d'; valid tasks: mnist1d-mlp"),
        (["--steps", "0"], "--steps: expected a positive integer, got 0"),
        (["--seeds", "-1"], "--seeds: expected a positive integer, got -1"),
        (["--lr-grid", "x"], "--lr-grid: expected a positive integer, got 'x'"),
        (["--hessian-iters", "-2"], "--hessian-iters must be >= 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--tasks", "cifar10"], "pass --data PATH, or --download"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # No data anywhere (for the cifar case): no env dir, an empty cache, no shared/data.
    monkeypatch.setenv("GRNG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRNG_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "_ancestors", lambda start: [])
    assert bench("--quick", "--out", str(tmp_path / "o"), *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("grng bench: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o" / "runs.jsonl").exists()


@pytest.mark.parametrize("git", [True, False])
def test_results_record_commit_and_version(
    git: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config.json, every run record and summary.md's header line name the code; without
    git the commit is "unknown" and the suite still runs."""
    if not git:
        monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no git to run
    out = tmp_path / "res"
    assert bench("--quick", "--tasks", "mnist1d-mlp", "--optimizers", "adamw", "--lr-grid",
                 "1", "--seeds", "1", "--steps", "2", "--hessian-iters", "0",
                 "--out", str(out)) == 0  # fmt: skip
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    commit = config["commit"]
    assert config["grng_version"] == grng.__version__
    if not git:
        assert commit == "unknown"
    assert isinstance(commit, str) and commit
    assert all((r["commit"], r["grng_version"]) == (commit, grng.__version__)
               for r in read_runs(out))  # fmt: skip
    first = (out / "summary.md").read_text(encoding="utf-8").splitlines()[0]
    assert f"grng {grng.__version__}, commit {commit}" in first


def test_resumed_summary_names_every_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "res"
    args = ["--quick", "--tasks", "mnist1d-mlp", "--optimizers", "adamw", "--lr-grid", "1",
            "--seeds", "1", "--steps", "2", "--hessian-iters", "0", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(runner, "git_commit", lambda: "aaa1111")
    assert bench(*args) == 0
    monkeypatch.setattr(runner, "git_commit", lambda: "bbb2222-dirty")
    assert bench(*args, "--resume") == 0  # nothing left to run: every record is aaa1111
    assert json.loads((out / "config.json").read_text())["commit"] == "bbb2222-dirty"
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "commit bbb2222-dirty" in md.splitlines()[0]
    assert "Runs come from commits aaa1111 (see runs.jsonl)." in md


def test_resume_with_other_protocol_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "res"
    base = ["--quick", "--tasks", "mnist1d-mlp", "--optimizers", "adamw", "--out", str(out)]
    assert bench(*base, "--steps", "4", "--hessian-iters", "0") == 0
    capsys.readouterr()
    assert bench(*base, "--steps", "5", "--hessian-iters", "0", "--resume") == 2
    assert "different protocol" in capsys.readouterr().err


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--help"]) == 0
    text = capsys.readouterr().out
    for opt in ("--optimizers", "--tasks", "--steps", "--tune-steps", "--batch-size",
                "--lr-grid", "--seeds", "--samples", "--data", "--download", "--device",
                "--out", "--resume", "--quick", "--threads", "overhead"):  # fmt: skip
        assert opt in text
    assert cli.main(["bench", "overhead", "--help"]) == 0
    assert "--widths" in capsys.readouterr().out
