"""Tests of ``grng bench overhead``: the quick run end to end (files, reference and floor
rows, skipped peers), the floors' shapes, the BERT-like encoder, profiling and bad input.
No assertion is about timings: they depend on the machine."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import grng
from grng.bench import cli
from grng.bench import overhead as O
from grng.bench.models import MLP, BertLikeEncoder


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_every_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ov"
    names = "kfac,reng,reng-fd,sgd,asdl-kfac,singd,shampoo,kfac-pytorch"
    assert cli.main(["bench", "overhead", "--quick", "--optimizers", names, "--models",
                     "mlp16-b16,bert-like", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    rows = read_csv(out / "overhead.csv")
    models = ["mlp16-b16", "bert-like"]
    assert list(dict.fromkeys(r["model"] for r in rows)) == models
    installed = {n for n in ("asdl-kfac", "singd", "shampoo") if O.CONTENDERS[n].missing() is None}
    measured = ["adamw", "kfac", "reng", "reng-fd", *sorted(installed), "sgd"]
    for model in models:
        mine = {r["optimizer"]: r for r in rows if r["model"] == model}
        # AdamW, SGD and both floors always; kfac-pytorch never (not on the package index).
        assert set(mine) == {*measured, "floor-kfac", "floor-ring"}
        assert all(r["status"] == "ok" for r in mine.values()), [r["note"] for r in rows]
        assert float(mine["adamw"]["median_rel"]) == float(mine["adamw"]["mean_rel"]) == 1.0
        assert float(mine["adamw"]["peak_rel"]) == 1.0
        ms = {name: (float(r["median_ms"]), float(r["mean_ms"])) for name, r in mine.items()}
        for floor in ("floor-kfac", "floor-ring"):  # (SGD step + floor) / AdamW step
            assert mine[floor]["peak_mib"] == ""
            for i, key in enumerate(("median_rel", "mean_rel")):
                expected = (ms["sgd"][i] + ms[floor][i]) / ms["adamw"][i]
                assert float(mine[floor][key]) == pytest.approx(expected, rel=1e-6)
        assert all(int(r["rounds"]) == O.QUICK_ROUNDS for r in mine.values())
        assert float(mine["kfac"]["peak_mib"]) > 0
    md = (out / "overhead.md").read_text(encoding="utf-8")
    assert "| model | rounds | AdamW ms | KFAC | RENG exact | RENG FD |" in md
    assert "floor G⁻¹VA⁻¹ | floor RING |" in md and "Peak memory ×AdamW" in md
    assert "kfac-pytorch (kfac-pytorch) skipped: not installable from the package index" in md
    for name in installed:
        if name != "shampoo":
            assert "preconditions nn.Linear and nn.Conv2d only" in md
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["grng_version"] == grng.__version__ and config["commit"]
    assert config["date"] and config["machine"]["threads"] == 1 and config["machine"]["cpu"]
    assert config["contenders"]["kfac-pytorch"]["skipped"]
    printed = capsys.readouterr().out
    assert "| BERT-like encoder 1×d32, 4×16 tokens |" in printed


def test_a_missing_peer_is_skipped_with_its_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ghost = O.Contender("ghost", "Ghost", O.CONTENDERS["sgd"].build, "peer",
                        ("grng_no_such_module", "pip install ghost-optimizer"))  # fmt: skip
    assert (
        ghost.missing()
        == "not installed: pip install ghost-optimizer (or pip install -e '.[peers]')"
    )
    monkeypatch.setitem(O.CONTENDERS, "ghost", ghost)
    rows = O.run(["ghost"], O.model_configs(quick=True)[:1], rounds=2, warmup=0, memory_steps=0,
                 device=torch.device("cpu"), out=tmp_path, progress=False,
                 full_cycles=False)  # fmt: skip
    assert {r["optimizer"] for r in rows} == {"adamw", "sgd", "floor-kfac", "floor-ring"}
    md = (tmp_path / "overhead.md").read_text(encoding="utf-8")
    assert "Ghost (ghost) skipped: not installed: pip install ghost-optimizer" in md
    assert "Peak memory ×AdamW" not in md and "Peak memory not measured" in md
    assert "pip install ghost-optimizer" in capsys.readouterr().err


def test_a_failing_optimizer_shows_error_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(model: nn.Module, batch: O.Batch) -> O.Built:
        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            raise RuntimeError("boom")

        return O.Built(step)

    monkeypatch.setitem(O.CONTENDERS, "broken", O.Contender("broken", "Broken", broken))
    rows = O.run(["broken", "sgd"], O.model_configs(quick=True)[:1], rounds=2, warmup=1,
                 memory_steps=1, device=torch.device("cpu"), out=tmp_path, progress=False,
                 full_cycles=False)  # fmt: skip
    status = {r["optimizer"]: (r["status"], r["note"]) for r in rows}
    assert status["broken"] == ("error", "RuntimeError: boom")
    assert status["sgd"][0] == "ok"
    md = (tmp_path / "overhead.md").read_text(encoding="utf-8")
    assert "| error |" in md and "Broken on mlp16-b16: RuntimeError: boom" in md


def test_rounds_cover_every_refresh_period(tmp_path: Path) -> None:
    """Full cycles: the timed rounds are a multiple of every period (KFAC: 10 and 50)."""
    config = O.ModelConfig("tiny", "tiny", lambda: MLP(4, 4, 1, 2),
                           lambda g: (torch.randn(3, 4, generator=g), torch.randint(0, 2, (3,))))  # fmt: skip
    rows = O.run(["kfac"], [config], rounds=7, warmup=0, memory_steps=0,
                 device=torch.device("cpu"), out=tmp_path, progress=False)  # fmt: skip
    assert {int(r["rounds"]) for r in rows} == {50}


def test_floor_blocks_are_grng_kronecker_blocks() -> None:
    blocks = O._kronecker_blocks(MLP(hidden=256))
    assert [(b.g, b.a, b.g_diagonal, b.a_diagonal) for b in blocks] == [
        (256, 41, False, False), (256, 257, False, False), (10, 257, False, False)
    ]  # fmt: skip
    # The BERT-sized token embedding's 30522-wide side is kept diagonal (max_factor_dim).
    bert = BertLikeEncoder(30522, hidden=8, n_layers=1, n_heads=2, intermediate=16)
    embedding = [(b.g, b.a, b.g_diagonal, b.a_diagonal) for b in O._kronecker_blocks(bert)]
    assert (8, 30522, False, True) in embedding
    for form in ("floor-kfac", "floor-ring"):
        build = O.CONTENDERS[form].build
        assert build is not None
        build(bert, (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))).step(
            torch.zeros(1), torch.zeros(1)
        )


def test_bert_like_encoder() -> None:
    torch.manual_seed(0)
    model = BertLikeEncoder(50, hidden=16, n_layers=2, n_heads=4, intermediate=32,
                              max_positions=8, num_classes=3)  # fmt: skip
    ids = torch.randint(0, 50, (5, 8))
    assert model(ids).shape == (5, 3)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert {"layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v", "layers.0.attn.o"} <= set(
        linears
    )
    coverage = grng.KFAC(model).coverage()
    kron = {e.name for e in coverage.entries if e.kind == "kronecker"}
    assert {f"layers.1.attn.{p}.weight" for p in "qkvo"} <= kron
    # Full size: MiniLM-L6's shape, ~22.7M parameters.
    full = BertLikeEncoder(max_positions=64)
    assert sum(p.numel() for p in full.parameters()) == pytest.approx(22.7e6, rel=0.02)


def test_profile_names_the_top_ops(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "overhead", "--quick", "--profile", "ring", "--profile-steps", "2",
                     "--models", "mlp16-b16"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert text.startswith("RING on MLP 40-16-16-10, batch 16: 2 profiled steps")
    assert "| torch op | aten::" in text and "Top five, the profiler's own entries aside:" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "kfac,lion"], "unknown optimizer 'lion'; valid for overhead: adamw"),
        (["--models", "resnet"], "--models: unknown model 'resnet'; valid: mlp16-b16"),
        (["--widths", "x"], "--widths: expected comma-separated integers"),
        (["--rounds", "0"], "--rounds: expected an integer >= 1, got 0"),
        (["--profile", "nope"], "unknown optimizer 'nope'"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "overhead", "--quick", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grng bench: error: ") and message in err and err.count("\n") == 1
