"""`grng bench --distributed` under torchrun: 2 gloo ranks, rank 0 writes the results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_runs_data_parallel_under_torchrun(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone", "-m", "grng.bench", "--distributed", "--quick",
        "--tasks", "mnist1d-mlp", "--optimizers", "sgd,ring,reng", "--out", str(out), "--quiet",
    ]  # fmt: skip
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish within 120 s")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    # Only rank 0 writes: one row per run, not one per rank.
    keys = [(r["optimizer"], r["lr"], r["seed"], r["phase"]) for r in rows]
    assert len(keys) == len(set(keys)) > 0
    assert all(r["ranks"] == 2 and r["backend"] == "gloo" for r in rows)
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert "2 rank(s), gloo backend" in (out / "summary.md").read_text()
