"""``grng bench report``: the summary of a suite or ablation folder regenerated from its
records without training, identical tables, a partial suite flagged, bad folders refused
before anything is rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from grng.bench import cli, runner

SUMMARY = ("summary.md", "summary.csv")


def report(*folders: Path) -> int:
    return cli.main(["bench", "report", *map(str, folders)])


def tables(md: str) -> list[str]:
    """summary.md without its header (the time, commit and "what this invocation did")."""
    return [line for line in md.splitlines() if line.startswith("|")]


def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("grng bench report trained a run")

    monkeypatch.setattr(runner, "train_run", forbidden)


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("suite") / "res"
    assert cli.main(["bench", "--quick", "--tasks", "mnist1d-mlp", "--optimizers", "sgd,adamw",
                     "--lr-grid", "1", "--seeds", "1", "--steps", "3", "--hessian-iters", "0",
                     "--out", str(out), "--quiet"]) == 0  # fmt: skip
    return out


def copy_of(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_suite_summary_regenerated_without_training(
    suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(suite, tmp_path / "res")
    for name in (*SUMMARY, "mnist1d-mlp.png"):
        (out / name).unlink()
    no_training(monkeypatch)
    assert report(out) == 0
    assert (out / "summary.csv").read_text() == (suite / "summary.csv").read_text()
    md = (out / "summary.md").read_text()
    assert tables(md) == tables((suite / "summary.md").read_text())
    assert "summarised by `grng bench report`, no training" in md and "Partial" not in md
    assert (out / "mnist1d-mlp.png").stat().st_size > 1000


def test_partial_suite_is_flagged(
    suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = copy_of(suite, tmp_path / "res")
    lines = (out / "runs.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 4  # sgd and adamw: one tuning run and one final each
    (out / "runs.jsonl").write_text("".join(lines[:3]))
    (out / "timing.jsonl").unlink()  # a suite still running has not timed the task yet
    no_training(monkeypatch)
    assert report(out) == 0
    md = (out / "summary.md").read_text()
    assert "**Partial: runs.jsonl holds 3 of the 4 runs planned**" in md
    assert "| sgd |" in md  # the finished pair is reported; adamw has no final run yet


def test_ablation_summary_regenerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ab"
    assert cli.main(["bench", "ablate", "--quick", "--tasks", "mnist1d-mlp", "--optimizers",
                     "ring", "--rhos", "0,0.1", "--seeds", "1", "--hessian-iters", "0",
                     "--out", str(out), "--quiet"]) == 0  # fmt: skip
    before = {name: (out / name).read_text() for name in SUMMARY}
    for name in (*SUMMARY, "ablation.png"):
        (out / name).unlink()
    no_training(monkeypatch)
    assert report(out) == 0
    assert (out / "summary.csv").read_text() == before["summary.csv"]
    assert tables((out / "summary.md").read_text()) == tables(before["summary.md"])
    assert (out / "ablation.png").stat().st_size > 1000
    # a later --resume that ran only ρ = 0 rewrote config.json's rhos: ρ = 0.1 stays
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "rhos": [0.0]}))
    assert report(out) == 0
    assert (out / "summary.csv").read_text() == before["summary.csv"]
    assert "Partial" not in (out / "summary.md").read_text()
    (out / "config.json").write_text(json.dumps(config))
    # one run missing: flagged, and its row reports what is there
    lines = (out / "runs.jsonl").read_text().splitlines(keepends=True)
    (out / "runs.jsonl").write_text(lines[0])
    assert report(out) == 0
    assert "holds 1 of the 2 runs planned" in (out / "summary.md").read_text()


def test_bad_folder_exits_2_and_rewrites_nothing(
    suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = copy_of(suite, tmp_path / "good")
    (good / "summary.md").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report(good, empty) == 2
    err = capsys.readouterr().err
    assert err.startswith("grng bench: error: ") and f"{empty}: not a results folder" in err
    assert err.count("\n") == 1
    assert not (good / "summary.md").exists()  # checked every folder before writing any
    for text in ("{not json", '{"protocol": {"stepz": 3}, "device": "cpu", "tasks": [], '
                 '"optimizers": []}'):  # fmt: skip
        broken = copy_of(suite, tmp_path / f"broken{len(text)}")
        (broken / "config.json").write_text(text)
        (broken / "summary.md").unlink()
        assert report(broken) == 2
        err = capsys.readouterr().err
        assert "does not describe a grng bench results folder" in err and err.count("\n") == 1
        assert not (broken / "summary.md").exists()


def test_a_resume_with_fewer_optimizers_keeps_the_earlier_rows(
    suite: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--resume with --optimizers adamw rewrites config.json's list; the report still shows
    sgd's runs, and counts as planned only the latest invocation's pairs."""
    out = copy_of(suite, tmp_path / "res")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "optimizers": ["adamw"]}))
    no_training(monkeypatch)
    assert report(out) == 0
    md = (out / "summary.md").read_text()
    assert "| sgd |" in md and "| adamw |" in md and "Partial" not in md
    assert len((out / "summary.csv").read_text().splitlines()) == 3  # header + 2 rows
