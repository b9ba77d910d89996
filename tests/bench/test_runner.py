"""Tests of the benchmark protocol pieces: LR grid and schedule, the optimizer registry's
loops, the Hessian eigenvalue, memory accounting, LR choice and the run log."""

from __future__ import annotations

import inspect
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import grng
from grng.bench import optimizers as O
from grng.bench import runner as R
from grng.bench.tasks import get_task


def test_lr_grid_is_log_spaced_around_the_default() -> None:
    grid = R.lr_grid(2.0, 5)
    expected = [0.2, 2 / math.sqrt(10), 2.0, 2 * math.sqrt(10), 20.0]
    assert grid == pytest.approx(expected)
    assert R.lr_grid(3e-4, 1) == [3e-4]
    # Fixed half-decade spacing: more values widen the search rather than refine it.
    assert R.lr_grid(1.0, 3) == pytest.approx([10**-0.5, 1.0, 10**0.5])
    assert R.lr_grid(1.0, 7) == pytest.approx([10 ** (e / 2) for e in range(-3, 4)])
    with pytest.raises(ValueError):
        R.lr_grid(1.0, 0)


def test_warmup_then_cosine() -> None:
    f = R.warmup_cosine(100, 0.05)  # 5 warm-up steps
    assert [f(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    decay = [f(s) for s in range(5, 100)]
    assert decay[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert decay[-1] < 1e-3 and f(100) == pytest.approx(0.0)
    assert R.warmup_cosine(10, 0.0)(0) == 1.0


def test_registry_lists_only_present_grng_methods() -> None:
    for name, cls in (("kfac", "KFAC"), ("ring", "RING"), ("reng", "RENG"),
                      ("rkalman", "RKalman")):  # fmt: skip
        assert (name in O.OPTIMIZERS) == hasattr(grng, cls)
    # The factored-damping variant needs RING's damping_form keyword.
    has_form = hasattr(grng, "RING") and "damping_form" in inspect.signature(grng.RING).parameters
    assert ("ring-factored" in O.OPTIMIZERS) == has_form
    assert {"sgd", "adamw", "sophia", "sam", "soap"} <= set(O.OPTIMIZERS)
    with pytest.raises(ValueError, match="valid optimizers: sgd, adamw"):
        O.get_optimizer("lion")


def test_ring_factored_passes_damping_form_and_follows_ring(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against a stand-in RING with the new keyword, so this holds before it lands too."""
    made: list[dict[str, Any]] = []

    class FakeRING(torch.optim.SGD):
        def __init__(self, model: nn.Module, lr: float = 0.05, rho: float = 1e-3,
                     damping: float = 1e-3, *, damping_form: str = "exact") -> None:  # fmt: skip
            made.append({"lr": lr, "damping_form": damping_form})
            super().__init__(model.parameters(), lr=lr)

    monkeypatch.setattr(grng, "RING", FakeRING)
    registry = O._build_registry()
    names = list(registry)
    assert names.index("ring-factored") == names.index("ring") + 1
    factored, ring = registry["ring-factored"], registry["ring"]
    assert factored.default_lr == ring.default_lr == 0.05
    assert factored.train_step is ring.train_step
    ring.factory(nn.Linear(2, 2), 0.1)
    factored.factory(nn.Linear(2, 2), 0.1)
    assert made == [{"lr": 0.1, "damping_form": "exact"}, {"lr": 0.1, "damping_form": "factored"}]


def test_git_commit_is_unknown_without_git_or_checkout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path))  # no git executable anywhere
        assert R.git_commit() == "unknown"
    # grng imported from a folder that is no git checkout (an installed wheel)
    fake = tmp_path / "site-packages" / "grng"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    monkeypatch.setattr(grng, "__file__", str(fake / "__init__.py"))
    assert R.git_commit() == "unknown"


def test_run_log_stamps_every_record(tmp_path: Path) -> None:
    stamp = {"commit": "abc1234-dirty", "grng_version": "9.9"}
    log = R.RunLog(tmp_path / "runs.jsonl", stamp=stamp)
    log.append({"task": "t", "optimizer": "o", "lr": 0.1, "seed": 1, "phase": "final"})
    assert json.loads((tmp_path / "runs.jsonl").read_text()).items() >= stamp.items()


@pytest.mark.parametrize("name", list(O.OPTIMIZERS))
def test_every_optimizer_trains_under_the_shared_schedule(name: str) -> None:
    """LambdaLR scales every optimizer's lr (SAM's base included) and a few steps of each
    strategy lower the loss on a fixed batch."""
    torch.manual_seed(0)
    task = get_task("mnist1d-mlp")
    spec = O.get_optimizer(name)
    model = task.build_model(0, quick=True)
    opt = spec.factory(model, spec.default_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, R.warmup_cosine(40, 0.25))
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))
    with torch.no_grad():
        before = float(task.loss(model(x), y))
    assert all(g["lr"] == pytest.approx(spec.default_lr * 0.1) for g in opt.param_groups)
    for _ in range(10):
        loss = spec.train_step(model, opt, task, x, y)
        assert loss.requires_grad is False and torch.isfinite(loss)
        sched.step()
    if name == "sam":
        assert all(g["lr"] == pytest.approx(spec.default_lr)
                   for g in opt.base_optimizer.param_groups)  # type: ignore[attr-defined]  # fmt: skip
    with torch.no_grad():
        assert float(task.loss(model(x), y)) < before


def test_sophia_refreshes_its_hessian_every_k_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("mnist1d-mlp")
    model = task.build_model(0, quick=True)
    spec = O.get_optimizer("sophia")
    opt = spec.factory(model, 1e-3)
    calls = []
    real = opt.update_hessian  # type: ignore[attr-defined]

    def counting() -> None:
        calls.append(1)
        real()

    monkeypatch.setattr(opt, "update_hessian", counting)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    for _ in range(25):
        spec.train_step(model, opt, task, x, y)
    assert len(calls) == 25 // O.SOPHIA_HESSIAN_INTERVAL
    hess = [opt.state[p]["hessian"] for p in model.parameters()]
    assert all(float(h.abs().sum()) > 0 for h in hess)


class _Quadratic:
    """A stand-in task whose loss is ½‖out − y‖², so the Hessian of a bias-free linear
    model is XᵀX."""

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return 0.5 * ((out - y) ** 2).sum()


def test_hessian_top_eigenvalue_matches_dense() -> None:
    torch.manual_seed(0)
    x = torch.randn(50, 6, dtype=torch.float64) * torch.tensor([3.0, 1, 1, 0.5, 0.2, 0.1])
    model = nn.Linear(6, 1, bias=False).double()
    y = torch.randn(50, 1, dtype=torch.float64)
    top = float(torch.linalg.eigvalsh(x.T @ x)[-1])
    est = R.hessian_top_eigenvalue(model, _Quadratic(), x, y, iters=60)  # type: ignore[arg-type]
    assert est == pytest.approx(top, rel=1e-6)


def test_state_bytes_counts_adamw_moments() -> None:
    model = nn.Linear(10, 5)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 10)).sum().backward()
    opt.step()
    b = R.state_bytes(model, opt)
    n = 55 * 4
    assert b["param_bytes"] == b["grad_bytes"] == n
    assert 2 * n <= b["optimizer_state_bytes"] <= 2 * n + 2 * 8  # + the two step counters


def test_choose_lr_by_validation_score() -> None:
    up, down = get_task("mnist1d-mlp"), get_task("shakespeare-char")
    recs: list[dict[str, Any]] = [{"lr": 0.1, "val_score": 0.5}, {"lr": 1.0, "val_score": 0.7},
            {"lr": 10.0, "val_score": None}, {"lr": 0.01, "val_score": 0.7}]  # fmt: skip
    assert R.choose_lr(recs, up) == 0.01  # tie: the smaller rate
    assert R.choose_lr(recs, down) == 0.1  # a loss: lower is better
    assert R.choose_lr([{"lr": 1.0, "val_score": None}], up) is None


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_diverged_run_is_marked_and_unscored(tmp_path: Path) -> None:
    task = get_task("mnist1d-mlp")
    data = task.load(quick=True)

    def nan_step(model: nn.Module, opt: Any, task: Any, x: Tensor, y: Tensor) -> Tensor:
        return torch.tensor(float("nan"))

    spec = O.OptimizerSpec("nan", O._sgd, 0.1, nan_step)
    proto = R.Protocol(steps=30, eval_every=10, quick=True)
    rec = R.train_run(R.RunSpec(task.name, "nan", 0.1, 1, "final"), task, spec, data, proto,
                      torch.device("cpu"))  # fmt: skip
    assert rec["status"] == "diverged" and rec["val_score"] is None and rec["test_score"] is None
    log = R.RunLog(tmp_path / "runs.jsonl")
    log.append(rec)  # a diverged record (NaN in its curves) is still strict JSON
    back = json.loads((tmp_path / "runs.jsonl").read_text())
    assert back["curves"]["train_loss"][-1] is None and back["status"] == "diverged"


def test_train_run_records_the_protocol() -> None:
    task = get_task("mnist1d-mlp")
    data = task.load(quick=True)
    proto = R.Protocol(steps=40, eval_every=10, quick=True, batch_size=16, hessian_iters=2,
                       hessian_batch=32)  # fmt: skip
    spec = O.get_optimizer("adamw")
    tune = R.train_run(R.RunSpec(task.name, "adamw", 1e-3, 0, "tune"), task, spec, data, proto,
                       torch.device("cpu"))  # fmt: skip
    assert tune["test_score"] is None and tune["curves"]["test_score"] == []
    assert tune["hessian_top"] is None and tune["curves"]["eval_step"] == [10, 20, 30, 40]
    fin = R.train_run(R.RunSpec(task.name, "adamw", 1e-3, 1, "final"), task, spec, data, proto,
                      torch.device("cpu"))  # fmt: skip
    assert fin["test_score"] == fin["curves"]["test_score"][-1]
    assert fin["hessian_top"] is not None and fin["mean_grad_norm"] > 0
    reached = [s for s, v in zip(fin["curves"]["eval_step"], fin["curves"]["test_score"],
                                 strict=True) if v >= task.target]  # fmt: skip
    assert fin["steps_to_target"] == (reached[0] if reached else None)


def test_run_log_skips_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "runs.jsonl"
    log = R.RunLog(path)
    rec = {"task": "t", "optimizer": "o", "lr": 0.1, "seed": 1, "phase": "final"}
    log.append(rec)
    with path.open("a") as f:
        f.write('{"task": "t", "optim')  # killed mid-write
    again = R.RunLog(path)
    assert again.records == [rec]
    assert again.finished() == {("t", "o", "0.1", 1, "final")}


def test_round_robin_interleaves_and_drops_a_failing_step() -> None:
    calls: list[tuple[str, int]] = []

    def step(name: str) -> Any:
        return lambda i: calls.append((name, i))

    def failing(i: int) -> None:
        calls.append(("bad", i))
        if i == 2:
            raise ValueError("broken at round 2")

    rounds: list[int] = []
    steps = {"a": step("a"), "b": step("b"), "c": step("c"), "bad": failing}
    times, errors = R.round_robin(steps, rounds=6, warmup=2, device=torch.device("cpu"),
                                  seed=3, on_round=lambda: rounds.append(1))  # fmt: skip
    assert errors == {"bad": "ValueError: broken at round 2"} and set(times) == {"a", "b", "c"}
    assert all(len(t) == 6 and min(t) >= 0 for t in times.values())  # warm-up untimed
    assert len(rounds) == 8
    per_round = [[n for n, i in calls if i == r] for r in range(8)]
    assert per_round[0] == per_round[1] == ["a", "b", "c", "bad"]  # warm-up: given order
    assert all(sorted(r) == ["a", "b", "c"] for r in per_round[3:])  # once each, bad dropped
    assert len({tuple(r) for r in per_round[3:]}) > 1  # timed rounds: shuffled


def test_time_task_times_every_optimizer_in_the_same_rounds() -> None:
    task = get_task("mnist1d-mlp")
    data = task.load(quick=True)
    proto = R.Protocol(quick=True, batch_size=16, timing_rounds=4, timing_warmup=1)
    entries = [(O.get_optimizer("adamw"), 1e-3), (O.get_optimizer("sgd"), 0.05)]
    records = R.time_task(task, data, entries, proto, torch.device("cpu"))
    assert [r["optimizer"] for r in records] == ["adamw", "sgd"]
    assert len({r["timing_group"] for r in records}) == 1
    for r in records:
        assert r["status"] == "ok" and r["phase"] == "timing" and len(r["step_seconds"]) == 4
        assert r["median_step_seconds"] == statistics.median(r["step_seconds"])
        assert (r["rounds"], r["warmup_rounds"], r["batch_size"]) == (4, 1, 16)
    assert records[1]["lr"] == 0.05
    assert R.latest_timing(records, task.name) == {r["optimizer"]: r for r in records}
    assert R.Protocol().rounds_for_timing == R.TIMING_ROUNDS
    assert R.Protocol(quick=True).rounds_for_timing == R.QUICK_TIMING_ROUNDS


def test_suite_appends_one_timing_per_task_and_resume_keeps_it(tmp_path: Path) -> None:
    task = get_task("mnist1d-mlp")
    tasks = {task.name: (task, task.load(quick=True))}
    proto = R.Protocol(steps=4, lr_grid=1, seeds=1, eval_every=2, hessian_iters=0, quick=True,
                       batch_size=16, timing_rounds=3, timing_warmup=0)  # fmt: skip
    log = R.RunLog(tmp_path / "runs.jsonl", stamp={"commit": "abc"})
    specs = [O.get_optimizer("sgd")]
    steps: list[int] = []
    records = R.run_suite(tasks, specs, proto, log, torch.device("cpu"), steps.append)
    assert sum(steps) == R.total_steps(1, 1, proto) == 4 + 4 + 3
    timing = [json.loads(line) for line in (tmp_path / "timing.jsonl").read_text().splitlines()]
    # AdamW, the reference, is timed though it is not compared; runs.jsonl holds runs only.
    assert [r["optimizer"] for r in timing] == ["adamw", "sgd"]
    assert all(r["commit"] == "abc" and r["lr"] for r in timing)
    assert timing[1]["lr"] == records[0]["lr"]  # the chosen rate
    assert [r["phase"] for r in records] == ["tune", "final", "timing", "timing"]
    assert all(r["phase"] != "timing" for r in R.RunLog(tmp_path / "runs.jsonl").records)
    again = R.run_suite(tasks, specs, proto, R.RunLog(tmp_path / "runs.jsonl"),
                        torch.device("cpu"))  # fmt: skip
    assert len((tmp_path / "timing.jsonl").read_text().splitlines()) == 2  # not redone
    assert [r["timing_group"] for r in again if r["phase"] == "timing"] == [
        timing[0]["timing_group"]
    ] * 2
    # timing_rounds=0: no timing, and the progress total has none.
    off = R.Protocol(steps=4, lr_grid=1, seeds=1, quick=True, timing_rounds=0)
    assert R.total_steps(1, 1, off) == 8
