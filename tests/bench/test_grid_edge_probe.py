"""benchmarks/grid_edge_probe.py: which tuning runs it adds beyond a suite's grid (no training)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType
from typing import Any

from grng.bench.runner import lr_grid

ROOT = Path(__file__).resolve().parents[2]


def _probe() -> ModuleType:
    path = ROOT / "benchmarks" / "grid_edge_probe.py"
    spec = importlib.util.spec_from_file_location("grid_edge_probe", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tuning(optimizer: str, centre: float, scores: list[float | None]) -> list[dict[str, Any]]:
    grid = lr_grid(centre, len(scores))
    return [
        {
            "task": "mnist1d-mlp",
            "optimizer": optimizer,
            "phase": "tune",
            "lr": lr,
            "val_score": score,
        }
        for lr, score in zip(grid, scores, strict=True)
    ]


def test_probes_beyond_edge_choices_only() -> None:
    probe = _probe()
    # adamw's default 1e-3: grid 3.16e-4, 1e-3, 3.16e-3 (accuracy: higher is better).
    top = _tuning("adamw", 1e-3, [0.5, 0.6, 0.7])
    bottom = _tuning("sgd", 0.1, [0.7, 0.6, 0.5])
    inside = _tuning("kfac", 0.03, [0.5, 0.7, 0.6])
    found = {
        (o, round(math.log10(p), 3))
        for _, o, _, _, p in probe.edge_probes(top + bottom + inside, 3)
    }
    assert found == {("adamw", round(math.log10(1e-2), 3)), ("sgd", round(math.log10(1e-2), 3))}


def test_a_tie_across_the_grid_probes_both_sides() -> None:
    """SAM on sst2-minilm scored one class at every rate: the tie broke to the smallest rate,
    which says nothing about the side worth trying, so both sides are probed."""
    probe = _probe()
    flat = _tuning("sam", 0.1, [0.5555, 0.5555, 0.5555])
    probes = probe.edge_probes(flat, 3)
    assert [round(math.log10(p), 3) for *_, p in probes] == [-2.0, 0.0]
    assert all(math.isclose(chosen, 10**-1.5) for _, _, chosen, _, _ in probes)
    assert all(score == 0.5555 for *_, score, _ in probes)


def test_verdict_names_ties_and_follows_the_benchmark_rule() -> None:
    probe = _probe()
    from grng.bench.tasks import get_task

    accuracy, loss = get_task("mnist1d-mlp"), get_task("shakespeare-char")
    assert probe._verdict(0.1, 0.8, 0.3, 0.8, accuracy) == "tie (no signal)"
    assert probe._verdict(0.1, 0.8, 0.3, 0.9, accuracy) == "would choose the probe"
    assert probe._verdict(0.1, 2.0, 0.3, 1.9, loss) == "would choose the probe"
    assert probe._verdict(0.1, 0.8, 0.3, None, accuracy) == "same choice"  # diverged
