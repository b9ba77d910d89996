"""KFAC and RING against dense float64 ground truth, and the Optimizer contract."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng
from grng.linalg import pi_correction

pytestmark = pytest.mark.usefixtures("float64")


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


PLAIN = dict(momentum=0.0, kl_clip=None, factor_update_freq=1, inverse_update_freq=1)


@pytest.mark.parametrize("inverse", ["eigh", "newton_schulz"])
@pytest.mark.parametrize("cls", [grng.KFAC, grng.RING])
def test_first_step_equals_dense_factored_tikhonov_solve(cls, inverse):
    model = _net()
    x, y = _data()
    kwargs = dict(lr=1.0, damping=0.1, inverse=inverse, inverse_tol=1e-12, **PLAIN)
    if cls is grng.RING:
        kwargs["rho"] = 0.3
    optimizer = cls(model, **kwargs)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    gamma = 0.1 + (0.3 * sum(g.pow(2).sum() for g in grads) if cls is grng.RING else 0.0)

    # Dense ground truth from hand-computed factors.
    hidden = torch.tanh(model[0](x)).detach()  # model changed: recompute from `before`
    w0, b0, w1, b1 = before
    hidden = torch.tanh(x @ w0.T + b0)
    inputs = [torch.cat([x, torch.ones(16, 1)], 1), torch.cat([hidden, torch.ones(16, 1)], 1)]
    out_grads = []
    s0 = (x @ w0.T + b0).requires_grad_()
    logits = torch.tanh(s0) @ w1.T + b1
    logits.retain_grad()
    F.cross_entropy(logits, y).backward()
    out_grads = [s0.grad * 16, logits.grad * 16]
    for layer, (a_rows, g_rows, w_grad, b_grad, w_old, b_old) in enumerate(
        [
            (inputs[0], out_grads[0], grads[0], grads[1], w0, b0),
            (inputs[1], out_grads[1], grads[2], grads[3], w1, b1),
        ]
    ):
        A = a_rows.T @ a_rows / 16
        G = g_rows.T @ g_rows / 16
        pi = pi_correction(A, G)
        V = torch.cat([w_grad, b_grad[:, None]], 1)
        eye_a, eye_g = torch.eye(A.shape[0]), torch.eye(G.shape[0])
        delta = torch.linalg.solve(
            G + gamma.sqrt() / pi * eye_g
            if torch.is_tensor(gamma)
            else G + gamma**0.5 / pi * eye_g,
            V,
        )
        delta = torch.linalg.solve(A + pi * gamma**0.5 * eye_a, delta.T).T
        new_w, new_b = list(model.parameters())[2 * layer : 2 * layer + 2]
        torch.testing.assert_close(w_old - new_w.detach(), delta[:, :-1], rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(b_old - new_b.detach(), delta[:, -1], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("inverse", ["eigh", "newton_schulz"])
def test_ring_with_rho_zero_is_kfac(inverse):
    x, y = _data(n=32)
    models = [_net(), _net()]
    kfac = grng.KFAC(
        models[0],
        lr=0.1,
        damping=0.05,
        inverse=inverse,
        factor_update_freq=2,
        inverse_update_freq=4,
    )
    ring = grng.RING(
        models[1],
        lr=0.1,
        rho=0.0,
        damping=0.05,
        inverse=inverse,
        factor_update_freq=2,
        inverse_update_freq=4,
    )
    for i in range(12):
        xb, yb = x[(i % 4) * 8 : (i % 4 + 1) * 8], y[(i % 4) * 8 : (i % 4 + 1) * 8]
        _step(models[0], kfac, xb, yb)
        _step(models[1], ring, xb, yb)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("grad_norm", ["global", "layer"])
def test_larger_rho_never_lengthens_the_step(grad_norm):
    x, y = _data()
    lengths = []
    for rho in [0.0, 0.01, 0.1, 1.0, 10.0]:
        model = _net()
        optimizer = grng.RING(model, lr=1.0, rho=rho, damping=1e-3, grad_norm=grad_norm, **PLAIN)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        _step(model, optimizer, x, y)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        lengths.append((after - before).norm().item())
    assert all(a >= b for a, b in itertools.pairwise(lengths)), lengths
    assert lengths[-1] < 0.5 * lengths[0]  # and ρ has an effect at all


def test_newton_schulz_first_order_shift_error_is_small_and_measured():
    """RING between refreshes: the first-order shifted inverse against an exact solve."""
    x, y = _data(n=64)
    exact_model, approx_model = _net(), _net()
    # Factors captured once (step 0), so the only difference is how the damping is applied.
    common = dict(
        lr=0.05, rho=0.05, damping=0.05, momentum=0.0, kl_clip=None, factor_update_freq=100
    )
    exact = grng.RING(exact_model, inverse="eigh", inverse_update_freq=1, **common)
    approx = grng.RING(
        approx_model, inverse="newton_schulz", inverse_update_freq=10, inverse_tol=1e-12, **common
    )
    errors = []
    for i in range(10):
        xb, yb = x[(i % 8) * 8 : (i % 8 + 1) * 8], y[(i % 8) * 8 : (i % 8 + 1) * 8]
        before = [p.detach().clone() for p in approx_model.parameters()]
        exact_model.load_state_dict(approx_model.state_dict())
        _step(approx_model, approx, xb, yb)
        # exact: same factors and damping, eigenbasis solve
        exact.state.update(
            {
                k: copy.deepcopy(v)
                for k, v in approx.state.items()
                if isinstance(k, str) and k.startswith("layer:")
            }
        )
        for key in [k for k in exact.state if isinstance(k, str) and k.startswith("layer:")]:
            exact.state[key] = {
                k: v
                for k, v in exact.state[key].items()
                if not k.endswith(("inverse", "damping", "method"))
            }
        _step(exact_model, exact, xb, yb)
        d_approx = torch.cat(
            [
                (b - p.detach()).flatten()
                for b, p in zip(before, approx_model.parameters(), strict=True)
            ]
        )
        d_exact = torch.cat(
            [
                (b - p.detach()).flatten()
                for b, p in zip(before, exact_model.parameters(), strict=True)
            ]
        )
        errors.append(((d_approx - d_exact).norm() / d_exact.norm()).item())
    assert errors[0] < 1e-8  # refresh step: exact
    # |ε|/c_ref ≤ 1/2 per factor bounds each side's relative error by 2r² ≤ 1/2; in practice:
    assert max(errors) < 0.05, errors
    print("relative step error of the first-order shift, steps 0..9:", errors)


def test_state_dict_round_trip_continues_bit_identically():
    x, y = _data(n=64)
    model = _net()
    optimizer = grng.RING(model, lr=0.05, factor_update_freq=3, inverse_update_freq=5)
    for i in range(7):
        _step(model, optimizer, x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    for i in range(7, 14):
        _step(model, optimizer, x[(i % 8) * 8 : (i % 8) * 8 + 8], y[(i % 8) * 8 : (i % 8) * 8 + 8])

    fresh = _net(seed=123)
    fresh.load_state_dict(saved_model)
    resumed = grng.RING(fresh, lr=0.05, factor_update_freq=3, inverse_update_freq=5)
    resumed.load_state_dict(saved_opt)
    for i in range(7, 14):
        _step(fresh, resumed, x[(i % 8) * 8 : (i % 8) * 8 + 8], y[(i % 8) * 8 : (i % 8) * 8 + 8])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_from_another_shape_is_refused_and_changes_nothing():
    x, y = _data()
    small, big = _net(), nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3))
    opt_small, opt_big = grng.KFAC(small), grng.KFAC(big)
    _step(small, opt_small, x, y)
    _step(big, opt_big, x, y)
    before = copy.deepcopy(opt_big.state_dict())
    with pytest.raises(ValueError, match=r"0\.weight|layer '0'"):
        opt_big.load_state_dict(opt_small.state_dict())
    after = opt_big.state_dict()
    assert after["state"]["counters"]["step"] == before["state"]["counters"]["step"]
    torch.testing.assert_close(
        after["state"]["layer:0"]["activation_factor"],
        before["state"]["layer:0"]["activation_factor"],
    )


def test_lr_scheduler_and_param_groups_work():
    model = _net()
    optimizer = grng.RING(model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = _data()
    _step(model, optimizer, x, y)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    extra = nn.Parameter(torch.zeros(3))
    optimizer.add_param_group({"params": [extra], "lr": 0.01})
    optimizer.zero_grad()
    (F.cross_entropy(model(x), y) + extra.sum()).backward()
    optimizer.step()
    assert (extra < 0).all()  # fallback (diagonal) step on the added parameter


def test_model_without_supported_layers_trains_on_the_diagonal_fallback():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(10, 4),
        nn.LayerNorm(4),
        nn.Flatten(),
        nn.Bilinear(8, 8, 2) if False else nn.Identity(),
    )
    head = nn.Parameter(torch.randn(8, 3) * 0.1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model
            self.head = head

        def forward(self, tokens):
            return self.body(tokens) @ self.head

    net = Net()
    optimizer = grng.RING(net, lr=0.05)
    assert optimizer.layers == []
    tokens = torch.randint(0, 10, (32, 2))
    labels = tokens[:, 0] % 3
    first = _step(net, optimizer, tokens, labels).item()
    for _ in range(60):
        last = _step(net, optimizer, tokens, labels).item()
    assert last < 0.7 * first


def test_frozen_parameters_are_skipped_and_tied_weights_updated_once():
    model = _net()
    model[0].weight.requires_grad_(False)
    optimizer = grng.KFAC(model)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(p is not model[0].weight for p in params)
    tied = nn.Linear(3, 3)
    net = nn.Sequential(tied, nn.Tanh(), tied)
    optimizer = grng.KFAC(net)
    assert len([p for g in optimizer.param_groups for p in g["params"]]) == 2
    assert len(optimizer.layers) == 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(damping=0.0), "damping"),
        (dict(damping=float("inf")), "damping"),
        (dict(rho=-0.1), "rho"),
        (dict(rho=float("nan")), "rho"),
        (dict(factor_decay=1.0), "factor_decay"),
        (dict(factor_decay=-0.1), "factor_decay"),
        (dict(factor_update_freq=0), "factor_update_freq"),
        (dict(inverse_update_freq=0), "inverse_update_freq"),
        (dict(momentum=1.5), "momentum"),
        (dict(inverse="cholesky"), "inverse"),
        (dict(fisher="true"), "fisher"),
        (dict(grad_norm="both"), "grad_norm"),
        (dict(lr="0.1"), "lr"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, name):
    model = _net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=name):
        grng.RING(model, **kwargs)
    assert not model[0]._forward_hooks  # no hook left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_model_with_no_trainable_parameters_is_refused():
    model = _net().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        grng.KFAC(model)


def test_mc_fisher_feeds_the_factors_and_trains():
    x, y = _data(n=64)
    model = _net()
    optimizer = grng.KFAC(model, fisher="mc", lr=0.05)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        logits = model(x)
        optimizer.backward_fisher(logits)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert "activation_factor" in optimizer.state["layer:0"]
    assert loss.item() < first
    with pytest.raises(RuntimeError, match="fisher='mc'"):
        grng.KFAC(_net()).backward_fisher(logits)
