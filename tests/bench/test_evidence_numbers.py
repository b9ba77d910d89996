"""The Evidence section of docs/benchmark.md quotes the published result files: every
number ``benchmarks/evidence.py`` reads from ``results/`` (steps and seconds to the target,
test metrics, the ablation's ρ = 0 → 1 changes, R-Kalman's state and step time) appears
there as it prints it. Regenerated results without updated docs fail here."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


def _evidence() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evidence", ROOT / "benchmarks" / "evidence.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _evidence_section() -> str:
    text = (ROOT / "docs" / "benchmark.md").read_text(encoding="utf-8")
    start = text.index("## Evidence")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_every_published_number_is_quoted() -> None:
    evidence = _evidence()
    suites = [RESULTS, *sorted(p for p in (RESULTS / "language").glob("*") if p.is_dir())]
    suites = [s for s in suites if (s / "summary.csv").exists()]
    ablations = sorted(RESULTS.glob("ablate-*"))
    table = evidence.claims(suites, ablations)
    assert {"mnist1d-mlp", "mnist1d-cnn"} <= set(table)
    section = _evidence_section()
    missing = []
    for task, cells in table.items():
        for claim, groups in cells.items():
            items = [i for g in groups for i in g]
            if claim == evidence.CLAIMS[4]:  # the tuning and ablation counts are prose
                items = [i for i in items if i.startswith(("state ", "step "))]
            missing += [f"{task}: {item}" for item in items if item not in section]
    assert not missing, "docs/benchmark.md Evidence lacks:\n" + "\n".join(missing)


def test_a_changed_number_is_caught(tmp_path: Path) -> None:
    """The check can fail: a summary with one test metric changed is not quoted."""
    evidence = _evidence()
    folder = tmp_path / "suite"
    folder.mkdir()
    text = (RESULTS / "summary.csv").read_text(encoding="utf-8")
    assert ",0.7203333333333334," in text
    (folder / "summary.csv").write_text(text.replace(",0.7203333333333334,", ",0.7213,"))
    items = [i for g in evidence.claims([folder], [])["mnist1d-mlp"][evidence.CLAIMS[1]] for i in g]
    assert "SGD 0.721" in items and "SGD 0.721" not in _evidence_section()


def test_partial_folders_read(tmp_path: Path) -> None:
    """An ablation folder without a summary is skipped; absent optimizers are left out."""
    evidence = _evidence()
    table = evidence.claims([RESULTS], [tmp_path])
    assert table["mnist1d-mlp"][evidence.CLAIMS[2]] == [[]]
    assert evidence.cell([[]]) == "–"
