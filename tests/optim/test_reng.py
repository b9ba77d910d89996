"""RENG: H∇L against autograd's HVP, finite differences, the ρ = 0 limit and misuse."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

import grng
from tests.cases import batch, mnist1d, mnist1d_mlp, tiny_mlp

pytestmark = pytest.mark.usefixtures("float64")


def _hvp_reference(model, x, y):
    """H∇L with torch.autograd.functional.hvp on the flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss_of(theta):
        tensors, offset = {}, 0
        for n, s in zip(names, shapes, strict=True):
            tensors[n] = theta[offset : offset + s.numel()].reshape(s)
            offset += s.numel()
        return F.cross_entropy(torch.func.functional_call(model, tensors, (x,)), y)

    grad = torch.autograd.grad(loss_of(flat.requires_grad_()), flat)[0].detach()
    _, hv = torch.autograd.functional.hvp(loss_of, flat.detach(), grad)
    return hv


def _search_direction(optimizer, model, x, y, *, create_graph=True, closure=None):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward(create_graph=create_graph)
    grads = {p: p.grad for p in model.parameters()}
    return optimizer._search_gradients(grads, closure)


def test_exact_hessian_gradient_product_equals_autograd_hvp():
    model = tiny_mlp()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=1.0)
    search = _search_direction(optimizer, model, x, y)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    product = torch.cat([search[p].flatten() for p in model.parameters()]) - grad
    torch.testing.assert_close(product, _hvp_reference(model, x, y), rtol=1e-10, atol=1e-12)


def test_finite_difference_agrees_with_the_exact_product():
    model = tiny_mlp()
    x, y = batch(1, features=4)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")
    before = [p.detach().clone() for p in model.parameters()]
    closure()
    grad = {p: p.grad.clone() for p in model.parameters()}
    search = optimizer._search_gradients({p: p.grad for p in model.parameters()}, closure)
    product = torch.cat([(search[p] - grad[p]).flatten() for p in model.parameters()])
    exact = _hvp_reference(model, x, y)
    assert ((product - exact).norm() / exact.norm()).item() < 1e-4
    # θ and the clean gradient are restored exactly.
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
        assert torch.equal(p.grad, grad[p])


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_rho_zero_is_kfac(hvp):
    x, y = batch(1, 32, features=4)
    models = [tiny_mlp(), tiny_mlp()]
    kfac = grng.KFAC(models[0], lr=0.1, damping=0.05, factor_update_freq=2, inverse_update_freq=4)
    reng = grng.RENG(
        models[1],
        lr=0.1,
        rho=0.0,
        damping=0.05,
        hvp=hvp,
        factor_update_freq=2,
        inverse_update_freq=4,
    )
    for i in range(10):
        xb, yb = x[(i % 4) * 8 : (i % 4 + 1) * 8], y[(i % 4) * 8 : (i % 4 + 1) * 8]
        for model, optimizer in zip(models, (kfac, reng), strict=True):

            def closure(model=model, optimizer=optimizer, xb=xb, yb=yb):
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            optimizer.step(closure)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
def test_second_order_and_perturbed_passes_do_not_pollute_the_factors(hvp):
    x, y = batch(1, features=4)
    models = [tiny_mlp(), tiny_mlp()]
    kfac = grng.KFAC(models[0], factor_update_freq=1)
    reng = grng.RENG(models[1], rho=1.0, hvp=hvp, factor_update_freq=1)
    for model, optimizer, create_graph in (
        (models[0], kfac, False),
        (models[1], reng, hvp == "exact"),
    ):

        def closure(model=model, optimizer=optimizer, create_graph=create_graph):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward(create_graph=create_graph)
            return loss

        optimizer.step(closure)
    for key in ("layer:0", "layer:2"):
        for name in ("activation_factor", "gradient_factor"):
            torch.testing.assert_close(reng.state[key][name], kfac.state[key][name], rtol=0, atol=0)


def test_step_after_create_graph_backward_and_graph_is_released():
    model = tiny_mlp()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    optimizer.step()
    assert all(p.grad.grad_fn is None for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    ("hvp", "match"), [("exact", "create_graph=True"), ("finite_difference", "step\\(closure\\)")]
)
def test_unusable_call_raises_and_changes_nothing(hvp, match):
    model = tiny_mlp()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5, hvp=hvp)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()  # no second-order graph, no closure
    params = copy.deepcopy(list(model.parameters()))
    state = copy.deepcopy(optimizer.state_dict())
    with pytest.raises(RuntimeError, match=match):
        optimizer.step()
    for p, q in zip(model.parameters(), params, strict=True):
        assert torch.equal(p, q)
    assert optimizer.state_dict()["state"]["counters"]["step"] == state["state"]["counters"]["step"]
    assert "activation_factor" not in optimizer.state_dict()["state"].get("layer:0", {})


class _DistanceLayer(nn.Module):
    """Distances to learned centres (an RBF layer); cdist has no double backward."""

    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.randn(6, 6))

    def forward(self, x):
        return -torch.cdist(x, self.centres)


def test_layer_without_double_backward_is_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _DistanceLayer(), nn.Linear(6, 3))
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5)
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"module '1'.*finite_difference"):
        optimizer.step()


class _SquareOnceDifferentiable(torch.autograd.Function):
    """x ↦ x² whose backward may not be differentiated again."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (a,) = ctx.saved_tensors
        return 2 * a * grad_output


class _Square(nn.Module):
    def forward(self, a):
        return _SquareOnceDifferentiable.apply(a)


def test_once_differentiable_op_is_refused_and_named():
    # autograd prunes the @once_differentiable error node from torch.autograd.grad
    # (its inputs are detached leaves), so without RENG's check H∇L would silently
    # lose the first layer's part instead of raising.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), _Square(), nn.Linear(6, 3))
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5)
    before = copy.deepcopy(list(model.parameters()))
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    with pytest.raises(RuntimeError, match=r"module '0'.*module '1'.*once_differentiable"):
        optimizer.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert optimizer.steps_taken == 0


def test_exact_mode_with_a_plain_closure_raises_and_changes_nothing():
    model = tiny_mlp()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=0.5)
    before = copy.deepcopy(list(model.parameters()))

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()  # exact mode needs create_graph=True here
        return loss

    with pytest.raises(RuntimeError, match="create_graph=True"):
        optimizer.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert optimizer.steps_taken == 0 and "layer:0" not in optimizer.state_dict()["state"]


def test_finite_difference_with_a_closure_that_does_not_zero_the_gradients():
    x, y = batch(1, features=4)
    searches = []
    for zero_inside in (True, False):
        model = tiny_mlp()
        optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")

        def closure(model=model, optimizer=optimizer, zero_inside=zero_inside):
            if zero_inside:
                optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.zero_grad()
        closure()
        search = optimizer._search_gradients({p: p.grad for p in model.parameters()}, closure)
        searches.append(torch.cat([search[p].flatten() for p in model.parameters()]))
    torch.testing.assert_close(searches[1], searches[0], rtol=0, atol=0)


def test_reng_trains_mnist1d_mlp_above_chance():
    x, y, x_test, y_test = mnist1d()
    model = mnist1d_mlp(128).float()  # the module runs in float64 by default
    optimizer = grng.RENG(model)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        index = torch.randint(0, len(x), (128,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward(create_graph=True)
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.4, accuracy


# --------------------------------------------- finite differences with dropout and batch norm
# Issue #10: the perturbed pass of hvp="finite_difference" drew new dropout masks (so
# "H∇L" was the difference of two networks' gradients) and moved BatchNorm's running
# statistics a second time.


def _noisy_net(seed: int = 0) -> nn.Sequential:
    """Dropout and batch norm, both in train mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(p=0.3), nn.Linear(6, 3)
    ).train()


def _batch_norm(model: nn.Sequential) -> nn.BatchNorm1d:
    batch_norm = model[1]
    assert isinstance(batch_norm, nn.BatchNorm1d)
    return batch_norm


def _closure_for(
    model: nn.Module,
    optimizer: grng.RENG | grng.KFAC,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    create_graph: bool = False,
) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=create_graph)
        return loss

    return closure


def _fixed_mask_hvp(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    """H∇L by double backprop on one forward, whose dropout masks come from ``seed``."""
    model = copy.deepcopy(model)  # keep the caller's batch-norm statistics
    params = list(model.parameters())
    torch.manual_seed(seed)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    product = torch.autograd.grad(0.5 * torch.stack([g.pow(2).sum() for g in grads]).sum(), params)
    return torch.cat([h.flatten() for h in product])


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def test_finite_difference_replays_dropout_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _noisy_net()
    x, y = batch(1, features=4)
    optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")
    products: list[dict[torch.Tensor, torch.Tensor]] = []
    compute = optimizer._finite_difference_product

    def record(
        grads: dict[torch.Tensor, torch.Tensor], closure: Callable[[], torch.Tensor]
    ) -> dict[torch.Tensor, torch.Tensor]:
        products.append(compute(grads, closure))
        return products[-1]

    monkeypatch.setattr(optimizer, "_finite_difference_product", record)
    expected = _fixed_mask_hvp(model, x, y, seed=5)
    torch.manual_seed(5)
    optimizer.step(_closure_for(model, optimizer, x, y))
    (product,) = products
    actual = torch.cat([product[p].flatten() for p in model.parameters()])
    assert _relative_error(actual, expected) < 1e-6


def test_finite_difference_step_with_dropout_matches_the_exact_step() -> None:
    x, y = batch(1, features=4)
    updates = []
    for hvp in ("finite_difference", "exact"):
        model = _noisy_net()
        optimizer = grng.RENG(model, rho=1.0, hvp=hvp, kl_clip=None, momentum=0.0)
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(5)  # the same dropout masks for both
        optimizer.step(_closure_for(model, optimizer, x, y, create_graph=hvp == "exact"))
        steps = zip(model.parameters(), before, strict=True)
        updates.append(torch.cat([(p - b).flatten() for p, b in steps]))
    assert _relative_error(updates[0], updates[1]) < 1e-6


def test_finite_difference_continues_the_random_stream_as_one_closure_call() -> None:
    x, y = batch(1, features=4)
    draws = []
    for make in (
        lambda m: grng.KFAC(m),
        lambda m: grng.RENG(m, rho=1.0, hvp="finite_difference"),
    ):
        model = _noisy_net()
        optimizer = make(model)
        torch.manual_seed(5)
        optimizer.step(_closure_for(model, optimizer, x, y))
        draws.append(torch.rand(8))
    assert torch.equal(draws[1], draws[0])


def test_finite_difference_leaves_batchnorm_statistics_alone() -> None:
    x, y = batch(1, features=4)
    reference = _noisy_net()
    torch.manual_seed(5)
    reference(x)  # one forward in train mode: what one closure call does to the statistics
    model = _noisy_net()
    optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")
    torch.manual_seed(5)
    optimizer.step(_closure_for(model, optimizer, x, y))
    batch_norm, expected = _batch_norm(model), _batch_norm(reference)
    assert batch_norm.num_batches_tracked == 1
    torch.testing.assert_close(batch_norm.running_mean, expected.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(batch_norm.running_var, expected.running_var, rtol=0, atol=0)


def test_finite_difference_pass_that_raises_restores_rng_and_buffers() -> None:
    x, y = batch(1, features=4)
    reference = _noisy_net()
    torch.manual_seed(5)
    reference(x)  # what the first closure call does to the RNG and the statistics
    expected_draw = torch.rand(8)
    model = _noisy_net()
    optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")
    calls: list[None] = []

    def closure() -> torch.Tensor:
        calls.append(None)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if len(calls) == 2:
            # The perturbed pass moved the statistics and drew past the first call's draws.
            torch.rand(3)
            raise KeyboardInterrupt
        loss.backward()
        return loss

    torch.manual_seed(5)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step(closure)
    batch_norm, expected = _batch_norm(model), _batch_norm(reference)
    assert batch_norm.num_batches_tracked == 1
    torch.testing.assert_close(batch_norm.running_mean, expected.running_mean, rtol=0, atol=0)
    assert torch.equal(torch.rand(8), expected_draw)
