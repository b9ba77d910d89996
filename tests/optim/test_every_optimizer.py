"""Promises every GRNG optimizer keeps: exact resume, non-finite steps, clean failures."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.cases import (
    ALL,
    assert_same,
    batch,
    cross_entropy,
    make,
    mc_cross_entropy,
    mlp,
    run_through_refresh,
    snapshot,
    train_step,
)


def _step(variant: str, model: nn.Module, optimizer, x, y, mc: bool = False):
    loss_fn = mc_cross_entropy(optimizer) if mc else cross_entropy
    return train_step(variant, model, optimizer, x, y, loss_fn=loss_fn)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_resume_from_state_dict_is_bit_identical(name, fisher):
    mc = fisher == "mc"
    model = mlp()
    optimizer = make(name, model, fisher=fisher)
    for i in range(5):
        _step(name, model, optimizer, *batch(i), mc=mc)
    saved_model = copy.deepcopy(model.state_dict())
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    for i in range(5, 11):
        _step(name, model, optimizer, *batch(i), mc=mc)

    fresh = mlp(seed=7)
    fresh.load_state_dict(saved_model)
    resumed = make(name, fresh, fisher=fisher)
    resumed.load_state_dict(saved_optimizer)
    for i in range(5, 11):
        _step(name, fresh, resumed, *batch(i), mc=mc)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_step_changes_nothing_counts_and_warns_once(name):
    model = mlp()
    optimizer = make(name, model)
    for i in range(3):
        _step(name, model, optimizer, *batch(i))
    x, y = batch(3)
    x[0, 0] = float("nan")  # poisons activations, statistics and gradients
    before = snapshot(model, optimizer, counters=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an ordinary step reads nothing back
        _step(name, model, optimizer, x, y)  # step 3: neither a capture nor a refresh step
    after = snapshot(model, optimizer, counters=True)
    assert_same(before[0], after[0])
    for key, entry in before[1].items():
        if key != "counters":
            assert_same(entry, after[1][key])
    assert optimizer.nonfinite_steps == 1
    # Reported once, at the end of the next refresh step (step 4; step 50 for R-Kalman).
    with pytest.warns(RuntimeWarning, match="non-finite") as caught:
        _step(name, model, optimizer, x, y)  # step 4: a capture step, skipped too
        assert optimizer.nonfinite_steps == 2
        assert_same(before[0], list(model.parameters()))
        run_through_refresh(name, model, optimizer)
    assert len([w for w in caught if "non-finite" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # warned once only
        _step(name, model, optimizer, x, y)
        run_through_refresh(name, model, optimizer)
    assert optimizer.nonfinite_steps == 3
    _step(name, model, optimizer, *batch(5))  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ALL)
def test_nonfinite_raise_policy_raises_before_changing_anything(name):
    model = mlp()
    optimizer = make(name, model, nonfinite="raise")
    _step(name, model, optimizer, *batch(0))
    x, y = batch(1)
    x[0] = float("inf")
    before = snapshot(model, optimizer, counters=True)
    with pytest.raises(FloatingPointError):
        _step(name, model, optimizer, x, y)
    after = snapshot(model, optimizer, counters=True)
    assert_same(before[0], after[0])
    assert_same(before[1], after[1])


@pytest.mark.parametrize("name", ALL)
def test_state_dict_of_another_shape_is_refused_naming_it(name):
    small, big = mlp(), mlp((5, 9, 3))
    opt_small = make(name, small)
    opt_big = make(name, big)
    _step(name, small, opt_small, *batch(0))
    _step(name, big, opt_big, *batch(0))
    before = copy.deepcopy(opt_big.state_dict())
    with pytest.raises(ValueError, match=r"0\.weight|layer '0'|2\.weight|layer '3'"):
        opt_big.load_state_dict(opt_small.state_dict())
    assert_same(before["state"], opt_big.state_dict()["state"])


@pytest.mark.parametrize("name", ["KFAC", "RING", "RKalman"])
def test_kl_clip_bounds_the_step(name):
    """ν = min(1, sqrt(κ / (lr² ⟨Δ, g⟩))): the clipped step has lr² ν² ⟨Δ, g⟩ = κ."""
    kappa, lr = 1e-4, 1.0
    x, y = batch(0)
    steps, grads = [], None
    for clip in (None, kappa):
        model = mlp()
        optimizer = make(name, model, lr=lr, momentum=0.0, kl_clip=clip)
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
