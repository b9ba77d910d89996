"""KFAC and RING against dense float64 ground truth, and the Optimizer contract."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grng
from grng.linalg import pi_correction
from tests.cases import batch, mlp, tiny_mlp

pytestmark = pytest.mark.usefixtures("float64")


def _step(model, optimizer, x, y):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss


def _update(model, optimizer, x, y):
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer, x, y)
    return torch.cat(
        [(b - p.detach()).flatten() for b, p in zip(before, model.parameters(), strict=True)]
    )


PLAIN = dict(momentum=0.0, kl_clip=None, factor_update_freq=1, inverse_update_freq=1)


@pytest.mark.parametrize("inverse", ["eigh", "newton_schulz"])
@pytest.mark.parametrize("cls", [grng.KFAC, grng.RING])
def test_first_step_equals_dense_factored_tikhonov_solve(cls, inverse):
    model = tiny_mlp()
    x, y = batch(1, features=4)
    kwargs = dict(lr=1.0, damping=0.1, inverse=inverse, inverse_tol=1e-12, **PLAIN)
    if cls is grng.RING:
        kwargs.update(rho=0.3, damping_form="factored")
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


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(12, 3),
    )  # fmt: skip


@pytest.mark.parametrize("grad_norm", ["global", "layer"])
@pytest.mark.parametrize("architecture", [tiny_mlp, _cnn])
def test_ring_step_equals_dense_exact_tikhonov_solve(architecture, grad_norm):
    """Regression: RING stated δ = −(F + γI)⁻¹g with F = G ⊗ A but computed K-FAC's factored
    damping (0.49–0.69 relative difference). Ground truth: a dense solve with the factors."""
    model = architecture()
    x, y = batch(1, features=4)
    lam, rho = 0.02, 0.3
    optimizer = grng.RING(model, lr=1.0, rho=rho, damping=lam, grad_norm=grad_norm, **PLAIN)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    total_sq = sum(g.pow(2).sum() for g in grads)
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv1d))]
    assert [layer.name for layer in optimizer.layers] == [
        n for n, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv1d))
    ]
    for i, (layer, module) in enumerate(zip(optimizer.layers, layers, strict=True)):
        state = optimizer.state[f"layer:{layer.name}"]
        A, G = state["activation_factor"], state["gradient_factor"]
        w_grad, b_grad = grads[2 * i], grads[2 * i + 1]
        V = torch.cat([w_grad.reshape(w_grad.shape[0], -1), b_grad[:, None]], 1)
        block_sq = w_grad.pow(2).sum() + b_grad.pow(2).sum()
        gamma = lam + rho * (total_sq if grad_norm == "global" else block_sq)
        dense = torch.kron(G, A) + gamma * torch.eye(G.shape[0] * A.shape[0])
        delta = torch.linalg.solve(dense, V.reshape(-1)).reshape(V.shape)
        w_old, b_old = before[2 * i], before[2 * i + 1]
        torch.testing.assert_close(
            w_old - module.weight.detach(),
            delta[:, :-1].reshape(w_old.shape),
            rtol=1e-10,
            atol=1e-12,
        )
        torch.testing.assert_close(
            b_old - module.bias.detach(), delta[:, -1], rtol=1e-10, atol=1e-12
        )


def test_exact_and_factored_damping_differ_as_the_audit_measured():
    """The two forms are different methods: on the MLP the factored step is about half as long."""
    x, y = batch(1, features=4)
    lengths = {}
    for form in ("exact", "factored"):
        model = tiny_mlp()
        optimizer = grng.RING(model, lr=1.0, rho=0.0, damping=0.01, damping_form=form, **PLAIN)
        lengths[form] = _update(model, optimizer, x, y).norm().item()
    assert lengths["factored"] < 0.8 * lengths["exact"], lengths


def test_kfac_with_exact_damping_is_ring_with_rho_zero():
    x, y = batch(1, features=4)
    updates = []
    for cls, extra in ((grng.KFAC, {}), (grng.RING, {"rho": 0.0})):
        model = tiny_mlp()
        optimizer = cls(model, lr=1.0, damping=0.01, damping_form="exact", inverse="eigh",
                        **extra, **PLAIN)  # fmt: skip
        updates.append(_update(model, optimizer, x, y))
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("inverse", ["eigh", "newton_schulz"])
def test_ring_with_rho_zero_is_kfac(inverse):
    x, y = batch(1, 32, features=4)
    models = [tiny_mlp(), tiny_mlp()]
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
        damping_form="factored",
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
    x, y = batch(1, features=4)
    lengths = []
    for rho in [0.0, 0.01, 0.1, 1.0, 10.0]:
        model = tiny_mlp()
        optimizer = grng.RING(model, lr=1.0, rho=rho, damping=1e-3, grad_norm=grad_norm, **PLAIN)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        _step(model, optimizer, x, y)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        lengths.append((after - before).norm().item())
    assert all(a >= b for a, b in itertools.pairwise(lengths)), lengths
    assert lengths[-1] < 0.5 * lengths[0]  # and ρ has an effect at all


def test_newton_schulz_shift_error_stays_within_inverse_tol_when_grad_norm_varies():
    """Regression: the first-order damping shift was served up to |ε|/c_ref = 1/2 (measured
    step errors up to 0.37 when ‖g‖ varies 2.5×); now it re-inverts once its error bound
    r_G² + r_A² + r_G² r_A² passes inverse_tol."""
    x, y = batch(1, 64, features=4)
    tol = 1e-3
    common = dict(
        lr=0.05, rho=0.5, damping=0.05, damping_form="factored", factor_update_freq=100, **{}
    )
    common.update(momentum=0.0, kl_clip=None)
    approx_model, exact_model = tiny_mlp(), tiny_mlp()
    approx = grng.RING(
        approx_model, inverse="newton_schulz", inverse_update_freq=50, inverse_tol=tol, **common
    )
    exact = grng.RING(exact_model, inverse="eigh", inverse_update_freq=50, **common)
    errors = []
    for i in range(12):
        # The gradient norm varies about 2.5× from batch to batch.
        scale = 1.0 + 1.5 * (i % 2)
        xb, yb = scale * x[(i % 8) * 8 : (i % 8 + 1) * 8], y[(i % 8) * 8 : (i % 8 + 1) * 8]
        d_approx = _update(approx_model, approx, xb, yb)
        d_exact = _update(exact_model, exact, xb, yb)
        errors.append(((d_approx - d_exact).norm() / d_exact.norm()).item())
        exact_model.load_state_dict(approx_model.state_dict())
    # The shift's bound plus the residual of the inverses themselves (both ≤ tol per side).
    assert max(errors) < 5 * tol, errors


@pytest.mark.parametrize("cls", [grng.KFAC, grng.RENG])
def test_newton_schulz_inverses_follow_a_damping_change(cls):
    """Regression: with constant damping the stored inverses were used unconditionally, so
    damping 1e-3 → 10 in param_groups left the step ~800× too long until the next refresh."""
    x, y = batch(1, 32, features=4)
    models = [tiny_mlp(), tiny_mlp()]
    kwargs = dict(lr=1.0, damping=1e-3, momentum=0.0, kl_clip=None, inverse_update_freq=100)
    if cls is grng.RENG:
        kwargs["rho"] = 0.0
    newton_schulz = cls(models[0], inverse="newton_schulz", inverse_tol=1e-10, **kwargs)
    eigh = cls(models[1], inverse="eigh", **kwargs)
    first = [_update(m, o, x, y) for m, o in zip(models, (newton_schulz, eigh), strict=True)]
    for optimizer in (newton_schulz, eigh):
        optimizer.param_groups[0]["damping"] = 10.0
    updates = [_update(m, o, x, y) for m, o in zip(models, (newton_schulz, eigh), strict=True)]
    torch.testing.assert_close(updates[0], updates[1], rtol=1e-6, atol=1e-12)
    assert updates[0].norm() < 0.1 * first[0].norm()


@pytest.mark.parametrize("cls", [grng.KFAC, grng.RING, grng.RENG])
def test_exact_tikhonov_form_needs_eigenbases(cls):
    with pytest.raises(ValueError, match="damping_form='exact' needs inverse='eigh'"):
        cls(tiny_mlp(), damping_form="exact", inverse="newton_schulz")


def test_kfac_refuses_rho_instead_of_ignoring_it():
    """Regression: KFAC(rho=0.1) was accepted and ignored."""
    with pytest.raises(TypeError, match="'rho'"):
        grng.KFAC(tiny_mlp(), rho=0.1)
    optimizer = grng.KFAC(tiny_mlp())
    with pytest.raises(TypeError, match="'rho'"):
        optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "rho": 0.1})
    assert len(optimizer.param_groups) == 1
    # RING, RENG and R-Kalman have it; a typo is still refused by name.
    for cls in (grng.RING, grng.RENG, grng.RKalman):
        cls(tiny_mlp(), rho=0.1)
        with pytest.raises(TypeError, match="'rhoo'"):
            cls(tiny_mlp(), rhoo=0.1)


def test_state_dict_round_trip_continues_bit_identically():
    x, y = batch(1, 64, features=4)
    model = tiny_mlp()
    optimizer = grng.RING(model, lr=0.05, factor_update_freq=3, inverse_update_freq=5)
    for i in range(7):
        _step(model, optimizer, x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    for i in range(7, 14):
        _step(model, optimizer, x[(i % 8) * 8 : (i % 8) * 8 + 8], y[(i % 8) * 8 : (i % 8) * 8 + 8])

    fresh = tiny_mlp(seed=123)
    fresh.load_state_dict(saved_model)
    resumed = grng.RING(fresh, lr=0.05, factor_update_freq=3, inverse_update_freq=5)
    resumed.load_state_dict(saved_opt)
    for i in range(7, 14):
        _step(fresh, resumed, x[(i % 8) * 8 : (i % 8) * 8 + 8], y[(i % 8) * 8 : (i % 8) * 8 + 8])
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_dict_from_another_shape_is_refused_and_changes_nothing():
    x, y = batch(1, features=4)
    small, big = tiny_mlp(), mlp((4, 7, 3), layer_norm=False)
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
    model = tiny_mlp()
    optimizer = grng.RING(model, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    x, y = batch(1, features=4)
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
    # An EmbeddingBag and a LayerNorm have no adapter; the head is a bare parameter.
    model = nn.Sequential(nn.EmbeddingBag(10, 8, mode="sum"), nn.LayerNorm(8))
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
    model = tiny_mlp()
    model[0].weight.requires_grad_(False)
    optimizer = grng.KFAC(model)
    # Frozen parameters stay in the groups (to train once unfrozen) but are not stepped.
    before = model[0].weight.detach().clone()
    x, y = batch(1, features=4)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    assert torch.equal(model[0].weight, before) and model[0].weight.grad is None
    assert optimizer.coverage()["0.weight"].kind == "frozen"
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
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises((ValueError, TypeError), match=name):
        grng.RING(model, **kwargs)
    assert not model[0]._forward_hooks  # no hook left behind
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_model_with_no_trainable_parameters_is_refused():
    model = tiny_mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        grng.KFAC(model)


def test_mc_fisher_feeds_the_factors_and_trains():
    x, y = batch(1, 64, features=4)
    model = tiny_mlp()
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
        grng.KFAC(tiny_mlp()).backward_fisher(logits)


# ------------------------------------------------------- refresh and preconditioning costs
@pytest.mark.parametrize("damping_form", ["factored", "exact"])
def test_stored_inverse_spectrum_changes_nothing(damping_form):
    """inverse="eigh" with constant damping divides by a spectrum built once per refresh; a
    twin that rebuilds it every step (the cache emptied) moves the parameters bit for bit
    alike, through refreshes (new eigenvalues) and a damping change (new γ)."""
    models = [tiny_mlp(), tiny_mlp()]
    kwargs = dict(
        lr=0.5, damping=0.1, inverse="eigh", damping_form=damping_form,
        factor_update_freq=1, inverse_update_freq=3, kl_clip=None,
    )  # fmt: skip
    cached, rebuilt = (grng.KFAC(m, **kwargs) for m in models)
    for step in range(10):
        if step == 5:
            for optimizer in (cached, rebuilt):
                optimizer.param_groups[0]["damping"] = 0.02
        rebuilt._spectra.clear()
        for model, optimizer in zip(models, (cached, rebuilt), strict=True):
            _step(model, optimizer, *batch(step, 32, features=4))
        for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
            assert torch.equal(p, q), step
    assert set(cached._spectra) == {"0", "2"}


def test_warm_started_newton_schulz_where_preferred(monkeypatch):
    """Off CPU the refresh warm-starts Newton–Schulz from the previous inverses (forced here):
    after the first refresh the dense factors are inverted that way, each inverse meets
    inverse_tol against the dense float64 inverse of the damped running factor, and the
    steps agree with the CPU route (Cholesky) to that accuracy."""
    import grng.optim.kfac as kfac_module

    tol = 1e-9
    kwargs = dict(lr=0.5, damping=0.1, factor_update_freq=1, inverse_update_freq=2,
                  inverse="newton_schulz", inverse_tol=tol, kl_clip=None)  # fmt: skip
    models = [tiny_mlp(), tiny_mlp()]
    cholesky = grng.KFAC(models[0], **kwargs)
    warm = grng.KFAC(models[1], **kwargs)
    methods = []
    for step in range(7):
        xb, yb = batch(step, 32, features=4)
        d_cholesky = _update(models[0], cholesky, xb, yb)
        with monkeypatch.context() as patch:
            patch.setattr(kfac_module, "prefers_newton_schulz", lambda device: True)
            d_warm = _update(models[1], warm, xb, yb)
        torch.testing.assert_close(d_warm, d_cholesky, rtol=1e-6, atol=1e-12)
        if step % 2 == 0:
            for name in ("0", "2"):
                state = warm.named_state(f"layer:{name}")
                methods.append(state["activation_inverse_method"])
                gamma = torch.tensor(0.1)
                root = gamma.sqrt()
                for side, damping in (("activation", root * state["pi"]),
                                      ("gradient", root / state["pi"])):  # fmt: skip
                    factor = state[f"{side}_factor"]
                    exact = torch.linalg.inv(factor + damping * torch.eye(factor.shape[0]))
                    error = torch.linalg.matrix_norm(state[f"{side}_inverse"] - exact)
                    bound = factor.shape[0] ** 0.5 * tol * torch.linalg.matrix_norm(exact, ord=2)
                    assert error <= bound * 1.01
    assert methods[:2] == ["cholesky", "cholesky"]  # no previous inverse at the first refresh
    assert set(methods[2:]) == {"newton_schulz"}
    for state_method in (cholesky.named_state("layer:0")["activation_inverse_method"],):
        assert state_method == "cholesky"


def test_newton_schulz_refresh_reads_back_once_per_dense_factor(monkeypatch):
    """A refresh on CPU (Cholesky route) costs one host read per dense factor, plus two for
    the whole refresh (its finiteness flag, the blocks' update counters). Before, every
    factor took one read per Newton–Schulz iteration (601 reads per refresh on the 4-layer
    character transformer; benchmarks/refresh_cost.py)."""
    model = mlp((5, 8, 8, 3), layer_norm=False)
    optimizer = grng.KFAC(model, factor_update_freq=1, inverse_update_freq=2)
    reads = {"count": 0, "inside": False}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(t, *args, _original=original):
            reads["count"] += reads["inside"]
            return _original(t, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    refresh = optimizer._refresh_curvature

    def counted_refresh(*args):
        reads["inside"] = True
        try:
            refresh(*args)
        finally:
            reads["inside"] = False

    monkeypatch.setattr(optimizer, "_refresh_curvature", counted_refresh)
    counts = []
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(batch(step, 16)[0]), batch(step, 16)[1]).backward()
        reads["count"] = 0
        optimizer.step()
        counts.append(reads["count"])
    monkeypatch.undo()
    assert counts == [2 * len(optimizer.layers) + 2, 0, 2 * len(optimizer.layers) + 2]


def test_construction_states_the_refresh_cost_of_expensive_dense_sides():
    """A dense side estimated to take over a second to refresh on one CPU core is named with
    its estimate (c·d³, c measured by benchmarks/factor_cost.py) and the cap that would
    make it diagonal; sides below that, or kept diagonal by the cap, are not."""
    model = nn.Sequential(nn.Linear(3000, 8), nn.Linear(8, 4))  # A of the first: 3001 wide
    with pytest.warns(grng.CoverageWarning, match=r"RING: 1 dense factor side.*0 A \(3001\) ≈ 2\.4 s") as record:  # fmt: skip
        optimizer = grng.RING(model)
    (message,) = [str(w.message) for w in record if "refresh" in str(w.message)]
    assert "max_factor_dim=3000" in message
    assert optimizer.refresh_seconds(3001) == pytest.approx(9e-11 * 3001**3)
    kfac = grng.KFAC(model)  # the Cholesky route: 6.5e-11·d³ ≈ 1.8 s
    assert kfac.refresh_seconds(3001) == pytest.approx(1.757, rel=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grng.RING(model, max_factor_dim=2048)  # the side is diagonal: nothing to refresh
        grng.RING(nn.Linear(2000, 8))  # 2001³·9e-11 ≈ 0.72 s: not expensive
    assert not [w for w in caught if "to refresh on CPU" in str(w.message)]
