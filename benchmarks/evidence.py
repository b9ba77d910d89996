"""The numbers of the "Evidence" table (docs/benchmark.md), read from result folders.

    .venv/bin/python benchmarks/evidence.py --suites results,results/language/sst2-minilm \
        --ablations results/ablate-mnist1d,results/ablate-sst2

For every task in the suites' ``summary.csv`` it prints one markdown column of the claims
table (the verdicts stay the reader's): steps and training seconds to the target and the
test metric of RING (exact and factored damping), RENG and R-Kalman against SGD, AdamW, K-FAC and SophiaG (SAM and SOAP
in brackets), the ρ = 0 → 1 change of mean ‖g‖ and λmax(H) from the ablation, and
R-Kalman's stability (tuning and ablation runs that diverged), state and step time beside
K-FAC's. A missing optimizer or task shows as "–", so a partial folder can be read too;
an ablation folder without a ``summary.csv`` is named on stderr and left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

NAMES = {"sgd": "SGD", "adamw": "AdamW", "kfac": "K-FAC", "ring": "RING",
         "ring-factored": "RING (factored)", "reng": "RENG",
         "rkalman": "R-Kalman", "sophia": "SophiaG", "sam": "SAM", "soap": "SOAP"}  # fmt: skip
GRNG = ("ring", "ring-factored", "reng", "rkalman")
BASELINES = ("sgd", "adamw", "kfac", "sophia")
OTHERS = ("sam", "soap")
ABLATED = ("reng", "ring", "rkalman")
CLAIMS = (
    "Faster optimization (steps / training seconds to the target)",
    "Better generalization (test metric)",
    "Lower gradient norm (mean ‖g‖, ρ = 0 → 1)",
    "Flatter minima (λmax(H), ρ = 0 → 1)",
    "R-Kalman stable and cheap",
)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _num(value: str | None) -> float | None:
    return float(value) if value not in (None, "", "None") else None


def _records(folder: Path) -> list[dict[str, Any]]:
    path = folder / "runs.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _join(parts: list[str]) -> str:
    return ", ".join(parts) if parts else "–"


def _seconds(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def speed(rows: dict[str, dict[str, str]], names: tuple[str, ...]) -> list[str]:
    """``NAME steps / seconds s`` to the target; ``(k/S)`` when only k of S seeds reached it."""
    parts = []
    for name in names:
        row = rows.get(name)
        if row is None:
            continue
        steps, seconds = _num(row["steps_to_target"]), _num(row["seconds_to_target"])
        reached, seeds = int(row["reached_seeds"] or 0), int(row["ok_seeds"] or 0)
        if steps is None or seconds is None:
            parts.append(f"{NAMES[name]} not reached")
            continue
        share = f" ({reached}/{seeds})" if reached < seeds else ""
        parts.append(f"{NAMES[name]} {steps:.0f} / {_seconds(seconds)} s{share}")
    return parts


def metric(rows: dict[str, dict[str, str]], names: tuple[str, ...]) -> list[str]:
    """``NAME mean``; ``(n of N seeds)`` when the row has fewer finals than the task's others
    (a suite still running)."""
    most = max((int(r["seeds"] or 0) for r in rows.values()), default=0)
    items = []
    for name in names:
        row = rows.get(name)
        if row is None or _num(row["test_mean"]) is None:
            continue
        seeds = int(row["seeds"] or 0)
        share = f" ({seeds} of {most} seeds)" if seeds < most else ""
        items.append(f"{NAMES[name]} {float(row['test_mean']):.3f}{share}")
    return items


def rho_change(ablation: list[dict[str, str]], key: str) -> list[str]:
    """``NAME value(ρ=0) → value(ρ=1)`` of ``key`` for each ablated optimizer."""
    parts = []
    for name in ABLATED:
        mine = {float(r["rho"]): _num(r[key]) for r in ablation if r["optimizer"] == name}
        if mine.get(0.0) is not None and mine.get(1.0) is not None:
            parts.append(f"{NAMES[name]} {_sig3(mine[0.0])} → {_sig3(mine[1.0])}")
    return parts


def _sig3(value: float) -> str:
    """Three significant digits, trailing zeros kept (13.0), no bare point (155, not 155.)."""
    return f"{value:#.3g}".removesuffix(".")


def rkalman(rows: dict[str, dict[str, str]], tunes: list[dict[str, Any]],
            ablation_runs: list[dict[str, Any]]) -> list[str]:  # fmt: skip
    """R-Kalman's diverged runs (tuning and ablation), and its state and step time beside
    K-FAC's."""
    parts = []
    if tunes:
        bad = [r for r in tunes if r.get("status") != "ok"]
        rates = sorted(r["lr"] for r in tunes)
        parts.append(f"tuning: {len(bad)} of {len(tunes)} runs diverged (lr {rates[0]:.3g}–"
                     f"{rates[-1]:.3g})")  # fmt: skip
    if ablation_runs:
        bad = [r for r in ablation_runs if r.get("status") != "ok"]
        parts.append(f"ablation: {len(bad)} of {len(ablation_runs)} diverged")
    for key, unit in (("state_mb", " MiB"), ("step_time_vs_adamw", "× AdamW")):
        mine, kfac = (_num(rows[n][key]) if n in rows else None for n in ("rkalman", "kfac"))
        if mine is not None:
            other = f" (K-FAC {kfac:.3g})" if kfac is not None else ""
            parts.append(f"{'state' if key == 'state_mb' else 'step'} {mine:.3g}{unit}{other}")
    return parts


def claims(suites: list[Path], ablations: list[Path]) -> dict[str, dict[str, list[list[str]]]]:
    """Per task and claim, the cell's groups of items (GRNG methods; baselines; others)."""
    by_task: dict[str, dict[str, dict[str, str]]] = {}
    tunes: dict[str, list[dict[str, Any]]] = {}
    for folder in suites:
        for row in _rows(folder / "summary.csv"):
            by_task.setdefault(row["task"], {})[row["optimizer"]] = row
        for r in _records(folder):
            if r.get("optimizer") == "rkalman" and r.get("phase") == "tune":
                tunes.setdefault(r["task"], []).append(r)
    ablation: dict[str, list[dict[str, str]]] = {}
    ablation_runs: dict[str, list[dict[str, Any]]] = {}
    for folder in ablations:
        if not (folder / "summary.csv").exists():
            print(f"evidence.py: {folder} has no summary.csv; its ρ cells stay empty "
                  "(pass an ablation folder, e.g. results/ablate-mnist1d)", file=sys.stderr)  # fmt: skip
            continue
        for row in _rows(folder / "summary.csv"):
            ablation.setdefault(row["task"], []).append(row)
        for r in _records(folder):
            if r.get("optimizer") == "rkalman":
                ablation_runs.setdefault(r["task"], []).append(r)
    table: dict[str, dict[str, list[list[str]]]] = {}
    for task, rows in by_task.items():
        mine = ablation.get(task, [])
        table[task] = {
            CLAIMS[0]: [speed(rows, GRNG), speed(rows, BASELINES)],
            CLAIMS[1]: [metric(rows, GRNG), metric(rows, BASELINES), metric(rows, OTHERS)],
            CLAIMS[2]: [rho_change(mine, "grad_norm_mean")],
            CLAIMS[3]: [rho_change(mine, "hessian_mean")],
            CLAIMS[4]: [rkalman(rows, tunes.get(task, []), ablation_runs.get(task, []))],
        }
    return table


def cell(groups: list[list[str]]) -> str:
    """Items joined by commas, groups by semicolons, a third group in brackets."""
    text = "; ".join(_join(g) for g in groups[:2])
    return f"{text} ({_join(groups[2])})" if len(groups) > 2 else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", default="results", help="comma-separated suite folders")
    parser.add_argument("--ablations", default="results/ablate-mnist1d",
                        help="comma-separated ablation folders")  # fmt: skip
    args = parser.parse_args()
    table = claims([Path(f) for f in args.suites.split(",")],
                   [Path(f) for f in args.ablations.split(",")])  # fmt: skip
    print("| claim | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for claim in CLAIMS:
        print(f"| {claim} | " + " | ".join(cell(c[claim]) for c in table.values()) + " |")


if __name__ == "__main__":
    main()
