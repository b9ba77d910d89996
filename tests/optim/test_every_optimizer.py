"""Promises every GRNG optimizer keeps: exact resume, non-finite steps, clean failures."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng

# Inverses refreshed every 2 steps, so that every captured statistic reaches the update.
OPTIMIZERS = {
    "KFAC": lambda m, **kw: grng.KFAC(m, inverse_update_freq=2, **kw),
    "RING": lambda m, **kw: grng.RING(m, rho=0.05, inverse_update_freq=2, **kw),
    "RENG-exact": lambda m, **kw: grng.RENG(m, rho=0.05, inverse_update_freq=2, **kw),
    "RENG-fd": lambda m, **kw: grng.RENG(
        m, rho=0.05, hvp="finite_difference", inverse_update_freq=2, **kw
    ),
    "RKalman": lambda m, **kw: grng.RKalman(m, rho=0.05, **kw),
}
FAST = dict(factor_update_freq=2)


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.LayerNorm(8), nn.Linear(8, 3))


def _batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def _step(name: str, model: nn.Module, optimizer, x, y, mc: bool = False):
    def closure():
        optimizer.zero_grad()
        logits = model(x)
        if mc:
            optimizer.backward_fisher(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward(create_graph=name == "RENG-exact")
        return loss

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward.. with create_graph")
        return optimizer.step(closure)


def _snapshot(model, optimizer):
    return copy.deepcopy(list(model.parameters())), copy.deepcopy(optimizer.state_dict()["state"])


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_resume_from_state_dict_is_bit_identical(name, fisher):
    mc = fisher == "mc"
    model = _net()
    optimizer = OPTIMIZERS[name](model, fisher=fisher, **FAST)
    for i in range(5):
        _step(name, model, optimizer, *_batch(i), mc=mc)
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    for i in range(5, 11):
        _step(name, model, optimizer, *_batch(i), mc=mc)

    fresh = _net(seed=7)
    fresh.load_state_dict(saved_model)
    resumed = OPTIMIZERS[name](fresh, fisher=fisher, **FAST)
    resumed.load_state_dict(saved_optimizer)
    for i in range(5, 11):
        _step(name, fresh, resumed, *_batch(i), mc=mc)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_step_changes_nothing_counts_and_warns_once(name):
    model = _net()
    optimizer = OPTIMIZERS[name](model, **FAST)
    for i in range(3):
        _step(name, model, optimizer, *_batch(i))
    x, y = _batch(3)
    x[0, 0] = float("nan")  # poisons activations, statistics and gradients
    before = _snapshot(model, optimizer)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _step(name, model, optimizer, x, y)  # step 3: not a capture step
    after = _snapshot(model, optimizer)
    _assert_same(before[0], after[0])
    for key, entry in before[1].items():
        if key != "counters":
            _assert_same(entry, after[1][key])
    assert optimizer.nonfinite_steps == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _step(name, model, optimizer, x, y)  # step 4: a capture step, no second warning
    assert optimizer.nonfinite_steps == 2
    _assert_same(before[0], list(model.parameters()))
    _step(name, model, optimizer, *_batch(5))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nonfinite_raise_policy_raises_before_changing_anything(name):
    model = _net()
    optimizer = OPTIMIZERS[name](model, nonfinite="raise", **FAST)
    _step(name, model, optimizer, *_batch(0))
    x, y = _batch(1)
    x[0] = float("inf")
    before = _snapshot(model, optimizer)
    with pytest.raises(FloatingPointError):
        _step(name, model, optimizer, x, y)
    after = _snapshot(model, optimizer)
    _assert_same(before[0], after[0])
    _assert_same(before[1], after[1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_of_another_shape_is_refused_naming_it(name):
    small, big = _net(), nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 3))
    opt_small = OPTIMIZERS[name](small, **FAST)
    opt_big = OPTIMIZERS[name](big, **FAST)
    _step(name, small, opt_small, *_batch(0))
    _step(name, big, opt_big, *_batch(0))
    before = copy.deepcopy(opt_big.state_dict())
    with pytest.raises(ValueError, match=r"0\.weight|layer '0'|2\.weight|layer '3'"):
        opt_big.load_state_dict(opt_small.state_dict())
    _assert_same(before["state"], opt_big.state_dict()["state"])


@pytest.mark.parametrize("name", ["KFAC", "RING", "RKalman"])
def test_kl_clip_bounds_the_step(name):
    """ν = min(1, sqrt(κ / (lr² ⟨Δ, g⟩))): the clipped step has lr² ν² ⟨Δ, g⟩ = κ."""
    kappa, lr = 1e-4, 1.0
    x, y = _batch(0)
    steps, grads = [], None
    for clip in (None, kappa):
        model = _net()
        optimizer = OPTIMIZERS[name](model, lr=lr, momentum=0.0, kl_clip=clip, **FAST)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        steps.append(
            torch.cat(
                [
                    (b - p.detach()).flatten()
                    for b, p in zip(before, model.parameters(), strict=True)
                ]
            )
        )
    g = torch.cat([t.flatten() for t in grads])
    unclipped, clipped = steps  # lr·Δ and lr·ν·Δ
    nu = (clipped.norm() / unclipped.norm()).item()
    kl = nu**2 * lr * (unclipped @ g).item()
    assert nu < 1  # the clip is active at this κ
    assert kl == pytest.approx(kappa, rel=1e-4)
