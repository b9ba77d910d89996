"""The shared step's bookkeeping: foreach updates, no host reads on ordinary steps,
the denormal guard, and tensor learning rates."""

from __future__ import annotations

import copy
import math
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import grng
from grng.optim.base import (
    flushes_denormals,
    flushing_denormals,
    running_average,
    running_averages,
)
from tests.cases import ALL, ONE_EACH, assert_same, batch, make, mlp, train_step

# ----------------------------------------------------------------------- host reads
#: Tensor methods that copy a value to the host: each one waits for the device to
#: finish its queued work (a synchronisation) when the tensor is on an accelerator.
HOST_READS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__complex__",
)


class HostReads:
    """Records the host reads (``HOST_READS``) made while ``armed``, with the grng line
    that made them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.calls: list[str] = []
        for name in HOST_READS:
            monkeypatch.setattr(
                torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name))
            )

    def _counting(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            if self.armed:
                frames = [f for f in traceback.extract_stack()[:-1] if "/grng/" in f.filename]
                where = frames[-1] if frames else traceback.extract_stack()[-2]
                self.calls.append(f"{name} at {where.filename}:{where.lineno}")
            return original(tensor, *args, **kwargs)

        return counted

    def arm_ordinary_steps(self, optimizer: grng.CurvatureOptimizer) -> None:
        """Count during ``optimizer.step`` on steps that neither capture nor refresh."""
        step = optimizer.step

        def counted_step(closure: Any = None) -> Any:
            k = optimizer.steps_taken
            self.armed = not optimizer.is_capture_step(k) and not optimizer.is_refresh_step(k)
            try:
                return step(closure)
            finally:
                self.armed = False

        optimizer.step = counted_step  # type: ignore[method-assign]


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> HostReads:
    return HostReads(monkeypatch)


def test_host_read_counter_counts() -> None:
    """The counter sees the reads it is meant to (else a zero below would prove nothing)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        reads = HostReads(monkeypatch)
        reads.armed = True
        t = torch.ones(())
        bool(t), int(t), float(t), t.item(), t.tolist(), t.cpu()
        reads.armed = False
        bool(t)
    assert len(reads.calls) == 6, reads.calls


#: RING with Newton–Schulz inverses checks, per layer and step, whether the first-order
#: shift of its inverses to the step's damping is within ``inverse_tol`` and re-inverts
#: otherwise (``grng/optim/kfac.py``, documented there: one host sync per layer and step).
_HOST_SIDE_SHIFT_CHECK = pytest.mark.xfail(
    reason="adaptive damping with Newton–Schulz inverses checks the shift's error bound "
    "on the host (kfac.py); strict: passes once that check moves to the device",
    strict=True,
)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=_HOST_SIDE_SHIFT_CHECK) if n == "RING-ns" else n for n in ALL],
)
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_ordinary_steps_read_nothing_back_from_the_device(
    name: str, tensor_lr: bool, host_reads: HostReads
) -> None:
    """No ``.item()``, ``bool(tensor)``, ``int(tensor)``, ... during a step that neither
    captures nor refreshes, for every variant (closures and RENG's finite-difference pass
    included): on an accelerator each would stall the host until the device is idle.
    (Reads inside torch's own kernels are not seen here; on CUDA see the test below.)"""
    model = mlp()
    lr = torch.tensor(0.05) if tensor_lr else 0.05
    optimizer = make(name, model, lr=lr, weight_decay=0.01)
    host_reads.arm_ordinary_steps(optimizer)
    ordinary = 0
    for i in range(6):
        ordinary += not optimizer.is_capture_step() and not optimizer.is_refresh_step()
        train_step(name, model, optimizer, *batch(i))
    assert ordinary >= 2
    assert host_reads.calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_ordinary_cuda_steps_do_not_synchronise(name: str) -> None:
    """torch's own sync detector: an ordinary step raises if anything in it synchronises."""
    model = mlp().cuda()
    optimizer = make(name, model)
    for i in range(4):
        x, y = batch(i)
        if not optimizer.is_capture_step() and not optimizer.is_refresh_step():
            if name == "RING-ns":
                continue  # the documented host-side shift check (see above)
            torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(name, model, optimizer, x.cuda(), y.cuda())
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------- the update
class MixedModel(nn.Module):
    """A float32 Linear (Kronecker), a float64 Linear and a LayerNorm and a float64
    parameter on the diagonal fallback: two dtypes in one group."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.b = nn.Linear(4, 2).double()
        self.extra = nn.Parameter(torch.randn(5, dtype=torch.float64))


def _mixed_optimizer(kl_clip: float | None = 1e-6) -> tuple[MixedModel, grng.KFAC]:
    model = MixedModel()
    optimizer = grng.KFAC(
        model,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.01,
        kl_clip=kl_clip,
        param_groups=[
            {"params": ["b.weight", "b.bias"], "lr": 0.05, "momentum": 0.0, "weight_decay": 0.1},
            {"params": ["norm.weight", "norm.bias"], "lr": torch.tensor(0.2), "momentum": 0.5},
        ],
    )
    return model, optimizer


def _directions(model: nn.Module, seed: int) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    directions: dict[Tensor, Tensor] = {
        p: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
        for p in model.parameters()
    }
    # ⟨Δ, d⟩ > 0, as for a positive definite preconditioner.
    search: dict[Tensor, Tensor] = {
        p: d * 2 + 0.1 * torch.randn_like(d) for p, d in directions.items()
    }
    return directions, search


def test_foreach_update_matches_the_per_parameter_formulas() -> None:
    """ν = min(1, sqrt(κ / Σ lr² ⟨Δ, d⟩)), b ← μ b + ν Δ, θ ← θ (1 − lr·wd) − lr b per
    parameter, with per-group lr (one a tensor), momentum (one group without) and weight
    decay, and float32 and float64 parameters in one group; computed here in float64."""
    model, optimizer = _mixed_optimizer()
    assert len(optimizer._current_layout().buckets) == 4  # 2 dtypes in the default group
    finite = torch.ones((), dtype=torch.bool)
    expected = {p: p.detach().double().clone() for p in model.parameters()}
    buffers = {p: torch.zeros_like(e) for p, e in expected.items()}
    for seed in range(3):
        directions, search = _directions(model, seed)
        quadratic = sum(
            float(group["lr"]) ** 2 * float((directions[p].double() * search[p].double()).sum())
            for group in optimizer.param_groups
            for p in group["params"]
        )
        nu = min(1.0, math.sqrt(1e-6 / quadratic))
        assert nu < 1  # the clip binds
        scale = optimizer._kl_clip_scale(directions, search)
        assert scale is not None and scale.dtype == torch.float64  # float64 params present
        assert float(scale) == pytest.approx(nu, rel=1e-6)  # float32 dots in the sum
        nu = float(scale)  # the update below is checked to float64 precision
        for group in optimizer.param_groups:
            lr, mu, wd = float(group["lr"]), group["momentum"], group["weight_decay"]
            for p in group["params"]:
                update = directions[p].double() * nu
                if mu > 0:
                    buffers[p] = mu * buffers[p] + update
                    update = buffers[p]
                expected[p] = expected[p] * (1 - lr * wd) - lr * update
        with torch.no_grad():  # as inside step()
            optimizer._apply(directions, scale, finite)
    for group in optimizer.param_groups:
        for p in group["params"]:
            tol = 1e-12 if p.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(p.detach().double(), expected[p], rtol=tol, atol=tol)
            state = optimizer.state.get(p, {})
            assert ("momentum_buffer" in state) == (group["momentum"] > 0)


def test_skipped_update_changes_nothing_even_with_nan_and_inf_directions() -> None:
    model, optimizer = _mixed_optimizer()
    directions, search = _directions(model, 0)
    with torch.no_grad():  # as inside step()
        scale = optimizer._kl_clip_scale(directions, search)
        optimizer._apply(directions, scale, torch.tensor(True))
    before = copy.deepcopy(([p.detach() for p in model.parameters()], optimizer.state_dict()))
    directions, search = _directions(model, 1)
    for i, d in enumerate(directions.values()):
        d.view(-1)[0] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    with torch.no_grad():
        scale = optimizer._kl_clip_scale(directions, search)  # NaN
        optimizer._apply(directions, scale, torch.tensor(False))
    assert_same(before[0], [p.detach() for p in model.parameters()])
    assert_same(before[1]["state"], optimizer.state_dict()["state"])


@pytest.mark.parametrize("finite", [True, False])
def test_running_averages_give_the_numbers_of_running_average(finite: bool) -> None:
    """The foreach blend is bitwise the per-tensor formula ``β old + (1 − β) estimate``:
    a state with history, an empty one (the first estimate replaces it), a skipped
    update; one state at a time (``running_average``) and several at once alike."""
    g = torch.Generator().manual_seed(0)
    estimates = [torch.rand(4, 3, generator=g), torch.rand(5, generator=g)]
    old = torch.rand(4, 3, generator=g)
    one = [{"v": old.clone(), "v_updates": torch.tensor(3)}, {}]
    many = copy.deepcopy(one)
    flag = torch.tensor(finite)
    for state, estimate in zip(one, estimates, strict=True):
        running_average(state, "v", estimate, 0.95, flag)
    running_averages(many, "v", estimates, 0.95, flag)
    blended = old * 0.95 + estimates[0] * (1 - 0.95)
    expected = [
        {"v": blended if finite else old, "v_updates": torch.tensor(3 + finite)},
        {"v": estimates[1] if finite else torch.zeros(5), "v_updates": torch.tensor(int(finite))},
    ]
    assert_same(one, expected)
    assert_same(many, expected)


def test_half_precision_gradients_are_squared_in_float32() -> None:
    """300² overflows float16: the norms and the finiteness check are float32, so the
    step is taken, not skipped as non-finite."""
    model = mlp(dtype=torch.float16)
    optimizer = grng.RING(model, factor_update_freq=1)
    for p in model.parameters():
        p.grad = torch.full_like(p, 300.0)
    grads: dict[Tensor, Tensor] = {p: p.grad for p in model.parameters() if p.grad is not None}
    grad_sq, total, finite = optimizer._gradient_norms(grads, grads, {})
    assert bool(finite) and total.dtype == torch.float32
    assert all(v.dtype == torch.float32 and float(v) == 9e4 * p.numel() for p, v in grad_sq.items())
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert optimizer.nonfinite_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_layout_follows_added_groups_and_loaded_state() -> None:
    """The precomputed buckets and group map are rebuilt when param_groups change."""
    model = mlp()
    optimizer = make("KFAC", model)
    train_step("KFAC", model, optimizer, *batch(0))
    extra = nn.Parameter(torch.ones(3))
    optimizer.add_param_group({"params": [extra], "lr": 0.5, "momentum": 0.0})
    assert optimizer._group_of(extra) is optimizer.param_groups[-1]
    extra.grad = torch.ones(3)
    optimizer.step()
    assert not torch.equal(extra.detach(), torch.ones(3))
    saved = copy.deepcopy(optimizer.state_dict())
    saved["param_groups"][-1]["lr"] = 0.0
    optimizer.load_state_dict(saved)
    assert optimizer._group_of(extra) is optimizer.param_groups[-1]
    moved = extra.detach().clone()
    extra.grad = torch.ones(3)
    optimizer.step()
    assert torch.equal(extra.detach(), moved)  # the loaded lr 0 applies


def test_loaded_momentum_is_not_shared_with_the_callers_state_dict() -> None:
    """The step reads a loaded momentum buffer and stores a new one: the caller's
    state_dict is not written."""
    model = mlp()
    optimizer = make("KFAC", model)
    for i in range(2):
        train_step("KFAC", model, optimizer, *batch(i))
    saved = optimizer.state_dict()
    other_model = copy.deepcopy(model)
    other = make("KFAC", other_model)
    other.load_state_dict(saved)
    momentum = {k: v for k, v in saved["state"].items() if isinstance(k, int)}
    assert momentum and all("momentum_buffer" in v for v in momentum.values())
    kept = copy.deepcopy(momentum)
    train_step("KFAC", other_model, other, *batch(2))
    assert_same(kept, momentum)


# ---------------------------------------------------------------------- denormals
needs_flush = pytest.mark.skipif(
    not torch.set_flush_denormal(False), reason="this CPU cannot flush denormals"
)


@needs_flush
@pytest.mark.parametrize("flushing_before", [False, True])
def test_step_flushes_denormals_and_restores_the_previous_mode(flushing_before: bool) -> None:
    model = mlp()
    optimizer = make("RING", model)
    seen: list[bool] = []
    apply = optimizer._apply

    def recording_apply(*args: Any) -> None:
        seen.append(flushes_denormals())
        apply(*args)

    optimizer._apply = recording_apply  # type: ignore[method-assign, assignment]
    torch.set_flush_denormal(flushing_before)
    try:
        assert flushes_denormals() == flushing_before
        train_step("RING", model, optimizer, *batch(0))
        assert seen == [True]
        assert flushes_denormals() == flushing_before
        x, y = batch(1)
        x[0, 0] = float("nan")
        raising = make("RING", mlp(), nonfinite="raise")
        with pytest.raises(FloatingPointError):
            train_step("RING", raising.model, raising, x, y)
        assert flushes_denormals() == flushing_before  # restored on an exception too
        optimizer.flush_denormal = False
        train_step("RING", model, optimizer, *batch(2))
        assert seen == [True, flushing_before]
    finally:
        torch.set_flush_denormal(False)


@needs_flush
def test_denormal_updates_are_flushed_to_zero() -> None:
    """A denormal gradient of a parameter at 0 (diagonal fallback, γ = lr = 1): the
    update −g/γ is a denormal, flushed to 0 by the guard and kept without it."""
    tiny = 1e-39  # a float32 denormal
    assert 0 < torch.tensor(tiny).item() < torch.finfo(torch.float32).tiny
    for flush in (True, False):
        model = nn.LayerNorm(3)
        nn.init.zeros_(model.bias)
        optimizer = grng.KFAC(model, lr=1.0, damping=1.0, momentum=0.0, kl_clip=None)
        optimizer.flush_denormal = flush
        for p in model.parameters():
            p.grad = torch.full_like(p, tiny)
        optimizer.step()
        expected = 0.0 if flush else -torch.tensor(tiny).item()
        assert model.bias.detach().tolist() == [expected] * 3, flush


@pytest.mark.parametrize("name", ONE_EACH)
def test_flushing_denormals_leaves_normal_numbers_unchanged(name: str) -> None:
    """With ordinary (normal) gradients and statistics the guard changes no bit."""
    runs = []
    for flush in (True, False):
        model = mlp()
        optimizer = make(name, model)
        optimizer.flush_denormal = flush
        for i in range(6):
            train_step(name, model, optimizer, *batch(i))
        runs.append(([p.detach() for p in model.parameters()], optimizer.state_dict()["state"]))
    assert_same(runs[0], runs[1])


def test_flushing_denormals_context_is_a_no_op_when_disabled() -> None:
    before = flushes_denormals()
    with flushing_denormals(enabled=False):
        assert flushes_denormals() == before
    assert flushes_denormals() == before


# ------------------------------------------------------------------- tensor lr
def test_tensor_lr_was_refused_by_check_real() -> None:
    """Regression: ``lr=torch.tensor(0.01)`` (as torch.optim accepts) raised TypeError
    "lr must be a real number"; it now trains as the float lr does."""
    results = []
    for lr in (0.01, torch.tensor(0.01)):
        model = mlp()
        optimizer = grng.RING(model, lr=lr, weight_decay=0.01, factor_update_freq=2)
        for i in range(5):
            train_step("RING", model, optimizer, *batch(i))
        results.append([p.detach() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("lr", "error", "message"),
    [
        (torch.tensor([0.01, 0.02]), ValueError, r"lr must be a number or a one-element tensor"),
        (torch.tensor(1), TypeError, r"lr must be a real number or a one-element floating"),
        (torch.tensor(-0.01), ValueError, r"lr must be in \[0.0, inf\)"),
        (torch.tensor(float("nan")), ValueError, r"lr must be finite"),
        ("0.01", TypeError, r"lr must be a real number or a one-element tensor"),
    ],
)
def test_tensor_lr_is_validated_like_a_float(lr: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        grng.KFAC(mlp(), lr=lr)
    with pytest.raises(error, match=message):
        grng.KFAC(mlp(), param_groups=[{"params": ["0.weight"], "lr": lr}])
    with pytest.raises(TypeError, match=r"damping must be a real number, got Tensor"):
        grng.KFAC(mlp(), damping=torch.tensor(0.1))  # type: ignore[arg-type]  # only lr


def test_one_element_tensor_lr_of_any_shape_is_accepted() -> None:
    model = mlp()
    optimizer = grng.KFAC(model, lr=torch.tensor([0.01]), factor_update_freq=2)
    for i in range(3):
        train_step("KFAC", model, optimizer, *batch(i))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ONE_EACH)
def test_tensor_lr_in_param_groups_and_state_dict_round_trip(name: str) -> None:
    model = mlp()
    groups = [{"params": ["0.weight", "0.bias"], "lr": torch.tensor(0.02)}]
    optimizer = make(name, model, lr=torch.tensor(0.05), param_groups=groups)
    for i in range(3):
        train_step(name, model, optimizer, *batch(i))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    assert [type(g["lr"]) for g in saved["param_groups"]] == [Tensor, Tensor]
    for i in range(3, 6):
        train_step(name, model, optimizer, *batch(i))
    fresh = mlp(seed=3)
    fresh.load_state_dict(saved_model)
    resumed = make(name, fresh, lr=torch.tensor(0.05), param_groups=groups)
    resumed.load_state_dict(saved)
    assert [float(g["lr"]) for g in resumed.param_groups] == pytest.approx([0.05, 0.02])
    for i in range(3, 6):
        train_step(name, fresh, resumed, *batch(i))
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_tensor_lr_follows_a_step_lr_scheduler() -> None:
    """StepLR writes a tensor lr in place (``fill_``); the step reads the new value, and
    training matches the float lr under the same schedule."""
    results = []
    for lr in (0.05, torch.tensor(0.05)):
        model = mlp()
        optimizer = grng.KFAC(model, lr=lr, factor_update_freq=2)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        for i in range(6):
            train_step("KFAC", model, optimizer, *batch(i))
            scheduler.step()
        assert float(optimizer.param_groups[0]["lr"]) == pytest.approx(0.05 * 0.5**3)
        assert isinstance(optimizer.param_groups[0]["lr"], type(lr))
        results.append([p.detach() for p in model.parameters()])
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_tensor_lr_enters_the_kl_clip() -> None:
    """With the clip binding, the step length follows lr through lr² in ν: doubling a
    tensor lr (in place) leaves lr·ν, and so the step, unchanged."""
    steps = []
    for value in (0.5, 1.0):
        model = mlp()
        optimizer = grng.KFAC(model, lr=torch.tensor(0.5), kl_clip=1e-8, momentum=0.0)
        optimizer.param_groups[0]["lr"].fill_(value)
        before = [p.detach().clone() for p in model.parameters()]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_step("KFAC", model, optimizer, *batch(0))
        steps.append([p.detach() - q for p, q in zip(model.parameters(), before, strict=True)])
    for a, b in zip(*steps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
