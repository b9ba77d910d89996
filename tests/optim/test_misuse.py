"""Silent misuse becomes a clear message (issue #12, item 4).

* ``fisher="mc"`` without ``optimizer.backward_fisher(outputs)`` warns once;
* a RENG closure that does not back-propagate raises, changing nothing;
* RENG's documented exact loop (``optimizer.backward(loss)``) does not trigger
  torch's create_graph reference-cycle warning, steps as
  ``loss.backward(create_graph=True)`` does, and its graph is freed by the step.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from tests.cases import batch, tiny_mlp

_CYCLE_WARNING = "create_graph=True will create a reference cycle"


def _recorded(run: Callable[[], object]) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return caught


# ------------------------------------------------------------- MC Fisher, not fed
def _mc_steps(optimizer: grng.CurvatureOptimizer, model: nn.Module, *, feed: bool) -> None:
    for i in range(3):
        x, y = batch(i, features=4)
        optimizer.zero_grad()
        logits = model(x)
        if feed:
            optimizer.backward_fisher(logits)
        loss = F.cross_entropy(logits, y)
        if isinstance(optimizer, grng.RENG):
            optimizer.backward(loss)
        else:
            loss.backward()
        optimizer.step()  # the warning must point at this line, in this file


def _missing_fisher(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if "backward_fisher(logits)" in str(w.message)]


@pytest.mark.parametrize("cls", [grng.KFAC, grng.RING, grng.RENG])
def test_mc_fisher_without_backward_fisher_warns_once_at_the_users_line(cls):
    model = tiny_mlp()
    optimizer = cls(model, fisher="mc", factor_update_freq=1)
    caught = _missing_fisher(_recorded(lambda: _mc_steps(optimizer, model, feed=False)))
    assert len(caught) == 1, [str(w.message) for w in caught]
    warning = caught[0]
    assert warning.category is RuntimeWarning
    assert "loss.backward()" in str(warning.message)
    assert "fisher='empirical'" in str(warning.message)
    assert warning.filename == __file__


@pytest.mark.parametrize("cls", [grng.KFAC, grng.RING, grng.RENG])
def test_mc_fisher_fed_by_backward_fisher_does_not_warn(cls):
    model = tiny_mlp()
    optimizer = cls(model, fisher="mc", factor_update_freq=1)
    caught = _recorded(lambda: _mc_steps(optimizer, model, feed=True))
    assert not _missing_fisher(caught)
    assert "activation_factor" in optimizer.state["layer:0"]


def test_empirical_fisher_never_warns_about_backward_fisher():
    model = tiny_mlp()
    optimizer = grng.KFAC(model, factor_update_freq=1)
    assert not _missing_fisher(_recorded(lambda: _mc_steps(optimizer, model, feed=False)))


# --------------------------------------------------------- RENG closures, no backward
def _snapshot(model: nn.Module, optimizer: grng.RENG) -> tuple[list[Tensor], list, dict]:
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    return params, grads, copy.deepcopy(optimizer.state_dict())


def _assert_unchanged(model: nn.Module, optimizer: grng.RENG, snapshot) -> None:
    params, grads, state = snapshot
    for p, before, grad in zip(model.parameters(), params, grads, strict=True):
        assert torch.equal(p, before)
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)
    assert optimizer.steps_taken == state["state"]["counters"]["step"]
    assert str(optimizer.state_dict()) == str(state)


def test_finite_difference_closure_without_backward_raises_and_changes_nothing():
    """The gradients come from a backward outside the closure: the clean pass finds
    them, the perturbed pass none (formerly read as zeros: H∇L ≈ −∇L·‖∇L‖/ε)."""
    model = tiny_mlp()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5, hvp="finite_difference")
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    snapshot = _snapshot(model, optimizer)

    def closure() -> Tensor:
        return F.cross_entropy(model(x), y)  # no zero_grad, no backward

    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match=r"perturbed.*loss\.backward\(\)"):
        optimizer.step(closure)
    _assert_unchanged(model, optimizer, snapshot)
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_closure_that_never_backpropagates_raises_and_changes_nothing(hvp):
    """No gradient at all: the base step would return early and silently do nothing."""
    model = tiny_mlp()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5, hvp=hvp)
    snapshot = _snapshot(model, optimizer)

    def closure() -> Tensor:
        optimizer.zero_grad()
        return F.cross_entropy(model(x), y)

    fix = r"optimizer\.backward\(loss\)" if hvp == "exact" else r"loss\.backward\(\)"
    with pytest.raises(RuntimeError, match=rf"no parameter has a gradient.*{fix}"):
        optimizer.step(closure)
    _assert_unchanged(model, optimizer, snapshot)


def test_proper_finite_difference_closure_still_steps():
    model = tiny_mlp()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5, hvp="finite_difference")
    before = [p.detach().clone() for p in model.parameters()]

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert optimizer.steps_taken == 1
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


# ------------------------------------------------ RENG's exact loop, without the warning
def _exact_steps(model: nn.Module, optimizer: grng.RENG, *, helper: bool, chunks: int) -> None:
    for i in range(3):
        x, y = batch(i, features=4)
        optimizer.zero_grad()
        for xs, ys in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            loss = F.cross_entropy(model(xs), ys) / chunks
            if helper:
                optimizer.backward(loss)
            else:
                loss.backward(create_graph=True)
        optimizer.step()


def test_documented_exact_loop_does_not_warn_about_a_reference_cycle():
    model = tiny_mlp()
    optimizer = grng.RENG(model, rho=0.5)
    caught = _recorded(lambda: _exact_steps(model, optimizer, helper=True, chunks=1))
    assert not [w for w in caught if _CYCLE_WARNING in str(w.message)]
    assert optimizer.steps_taken == 3


@pytest.mark.parametrize("chunks", [1, 2])
def test_backward_helper_steps_as_create_graph_backward(chunks):
    """Same parameters, curvature and momentum as loss.backward(create_graph=True),
    with gradient accumulation over micro-batches too."""
    models = [tiny_mlp(), tiny_mlp()]
    optimizers = [
        grng.RENG(m, rho=0.5, momentum=0.9, factor_update_freq=1, inverse_update_freq=2)
        for m in models
    ]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{_CYCLE_WARNING}")
        for model, optimizer, helper in zip(models, optimizers, (True, False), strict=True):
            _exact_steps(model, optimizer, helper=helper, chunks=chunks)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    states = [o.state_dict()["state"] for o in optimizers]
    assert states[0].keys() == states[1].keys()
    for key, entry in states[1].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                torch.testing.assert_close(states[0][key][name], value, rtol=0, atol=0)
            else:
                assert states[0][key][name] == value


def test_backward_helper_graph_is_freed_by_the_step():
    """optimizer.backward(loss) leaves .grad holding the graph (which keeps the hidden
    activation alive); step() detaches .grad, after which nothing holds it."""
    model = tiny_mlp()
    optimizer = grng.RENG(model, rho=0.5)
    x, y = batch(1, features=4)
    hidden: list[weakref.ref[Tensor]] = []
    handle = model[1].register_forward_hook(lambda m, i, out: hidden.append(weakref.ref(out)))
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    optimizer.backward(loss)
    handle.remove()
    del loss
    gc.collect()
    assert hidden[0]() is not None  # held by the graph in .grad: the test can see a leak
    assert all(p.grad.grad_fn is not None for p in model.parameters() if p.dim() > 1)
    optimizer.step()
    gc.collect()
    assert all(p.grad.grad_fn is None for p in model.parameters())
    assert hidden[0]() is None
