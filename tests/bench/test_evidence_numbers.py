"""The Evidence section of docs/benchmark.md quotes the published result files: every
number ``benchmarks/evidence.py`` reads from ``results/`` (steps and seconds to the target,
test metrics, the ablation's ρ = 0 → 1 changes, R-Kalman's state and step time) appears
in that task's column of the section's tables as it prints it. Regenerated results
without updated docs fail here. (R-Kalman's counts of diverged runs are quoted in prose,
summed over tasks, and are not checked.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


def _evidence() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "benchmarks" / "evidence.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _columns() -> dict[str, str]:
    """Each column's text over every table of the Evidence section, by its header."""
    text = (ROOT / "docs" / "benchmark.md").read_text(encoding="utf-8")
    start = text.index("## Evidence")
    section = text[start : text.index("\n## ", start + 1)]
    columns: dict[str, str] = {}
    header: list[str] | None = None
    for line in section.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set(line) <= set("|-: "):
            for name, cell in zip(header, cells, strict=False):
                columns[name] = columns.get(name, "") + "\n" + cell
    return columns


def _missing(evidence: ModuleType, table: dict[str, Any]) -> list[str]:
    columns = _columns()
    missing = []
    for task, cells in table.items():
        for claim, groups in cells.items():
            items = [i for g in groups for i in g]
            if claim == evidence.CLAIMS[4]:  # the tuning and ablation counts are prose
                items = [i for i in items if i.startswith(("state ", "step "))]
            missing += [f"{task}: {i}" for i in items if i not in columns.get(task, "")]
    return missing


def _published(evidence: ModuleType) -> dict[str, Any]:
    suites = [RESULTS, *sorted(p for p in (RESULTS / "language").glob("*") if p.is_dir())]
    suites = [s for s in suites if (s / "summary.csv").exists()]
    return evidence.claims(suites, sorted(RESULTS.glob("ablate-*")))  # type: ignore[no-any-return]


def test_every_published_number_is_quoted() -> None:
    evidence = _evidence()
    table = _published(evidence)
    for task in ("mnist1d-mlp", "mnist1d-cnn"):  # the ablated tasks: no cell may be empty
        assert all(g for groups in table[task].values() for g in groups[:2]), task
    missing = _missing(evidence, table)
    assert not missing, "docs/benchmark.md Evidence lacks:\n" + "\n".join(missing)


def test_a_changed_number_is_caught(tmp_path: Path) -> None:
    """The check can fail: a summary with one test metric changed is reported missing."""
    evidence = _evidence()
    text = (RESULTS / "summary.csv").read_text(encoding="utf-8")
    assert ",0.7203333333333334," in text
    (tmp_path / "summary.csv").write_text(text.replace(",0.7203333333333334,", ",0.7213,"))
    table = evidence.claims([tmp_path], [])
    assert _missing(evidence, table) == ["mnist1d-mlp: SGD 0.721"]


def test_partial_folders_read(tmp_path: Path) -> None:
    """An ablation folder without a summary is skipped; an empty cell prints as "–"."""
    evidence = _evidence()
    table = evidence.claims([RESULTS], [tmp_path])
    assert table["mnist1d-mlp"][evidence.CLAIMS[2]] == [[]]
    assert evidence.cell([[]]) == "–"
