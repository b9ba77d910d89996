"""The captured factors equal hand-computed E[a aᵀ] and E[g gᵀ]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grng.curvature import CurvatureCapture, find_kronecker_layers

pytestmark = pytest.mark.usefixtures("float64")


def _capture(model: nn.Module, loss_fn, fisher: str = "empirical") -> CurvatureCapture:
    params = {p for p in model.parameters() if p.requires_grad}
    capture = CurvatureCapture(model, find_kronecker_layers(model, params), fisher)
    capture.armed = True
    loss_fn().backward()
    return capture


def _per_example_output_grads(model, layer_module, x, y, loss):
    """∂ℓ_i/∂(layer output of example i), by a separate backward per example."""
    grads = []
    for i in range(x.shape[0]):
        store: dict = {}
        handle = layer_module.register_forward_hook(
            lambda m, a, o, store=store: store.setdefault("out", o)
        )
        out = model(x[i : i + 1])
        handle.remove()
        (g,) = torch.autograd.grad(loss(out, y[i : i + 1]), store["out"])
        grads.append(g[0])
    return torch.stack(grads)


def test_linear_factors_equal_hand_computed_expectations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    capture = _capture(model, lambda: F.cross_entropy(model(x), y))
    est = capture.estimates()

    first = model[0]
    a = torch.cat([x, torch.ones(7, 1)], 1)
    torch.testing.assert_close(est["0"].activation_factor, a.T @ a / 7, rtol=1e-12, atol=1e-12)
    d = _per_example_output_grads(model, first, x, y, F.cross_entropy)
    torch.testing.assert_close(est["0"].gradient_factor, d.T @ d / 7, rtol=1e-10, atol=1e-12)

    hidden = torch.tanh(first(x)).detach()
    a2 = torch.cat([hidden, torch.ones(7, 1)], 1)
    torch.testing.assert_close(est["2"].activation_factor, a2.T @ a2 / 7, rtol=1e-12, atol=1e-12)
    d2 = _per_example_output_grads(model, model[2], x, y, F.cross_entropy)
    torch.testing.assert_close(est["2"].gradient_factor, d2.T @ d2 / 7, rtol=1e-10, atol=1e-12)


def test_linear_on_sequences_treats_every_position_as_an_example():
    torch.manual_seed(1)
    layer = nn.Linear(3, 2, bias=False)
    x = torch.randn(4, 5, 3)
    target = torch.randn(4, 5, 2)
    capture = _capture(layer, lambda: F.mse_loss(layer(x), target, reduction="mean"))
    est = capture.estimates()[type(layer).__name__]
    rows = x.reshape(-1, 3)
    torch.testing.assert_close(est.activation_factor, rows.T @ rows / 20)
    # ℓ_t = mean over the 2 outputs of the squared error; ∂ℓ_t/∂out = (out − target)·2/2
    residual = (layer(x) - target).detach().reshape(-1, 2)
    d = residual
    torch.testing.assert_close(est.gradient_factor, d.T @ d / 20)


def _conv_patches_by_loops(x, weight_shape, stride, padding, dilation):
    """Patches of a Conv1d input by explicit indexing (independent of F.unfold)."""
    n, _c, length = x.shape
    k = weight_shape[-1]
    xp = F.pad(x, (padding, padding))
    out_len = (length + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    rows = []
    for i in range(n):
        for t in range(out_len):
            start = t * stride
            rows.append(
                torch.stack([xp[i, :, start + j * dilation] for j in range(k)], 1).reshape(-1)
            )
    return torch.stack(rows), out_len


def test_conv1d_factors_follow_kfc():
    torch.manual_seed(2)
    conv = nn.Conv1d(2, 3, kernel_size=3, stride=2, padding=1, dilation=2)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(5, 2, 11)
    model(x)  # materialise the lazy layer
    y = torch.randint(0, 4, (5,))
    capture = _capture(model, lambda: F.cross_entropy(model(x), y))
    est = capture.estimates()["0"]

    patches, positions = _conv_patches_by_loops(x, conv.weight.shape, 2, 1, 2)
    a = torch.cat([patches, torch.ones(len(patches), 1)], 1)
    torch.testing.assert_close(est.activation_factor, a.T @ a / len(a))
    # KFC: outer products of every position of an example summed, averaged over examples.
    d = _per_example_output_grads(model, conv, x, y, F.cross_entropy)  # (N, C_out, T)
    rows = d.permute(0, 2, 1).reshape(-1, 3)
    assert rows.shape[0] == 5 * positions
    torch.testing.assert_close(est.gradient_factor, rows.T @ rows / 5)


@pytest.mark.parametrize(
    "make_conv",
    [
        lambda: nn.Conv2d(2, 3, kernel_size=(3, 2), stride=(1, 2), padding=1),
        lambda: nn.Conv2d(2, 3, kernel_size=3, padding="same", padding_mode="reflect", bias=False),
        lambda: nn.Conv2d(2, 3, kernel_size=3, dilation=2, padding=2, padding_mode="circular"),
        lambda: nn.Conv1d(2, 3, kernel_size=4, padding="same", padding_mode="replicate"),
    ],
)
def test_conv_rows_reproduce_the_weight_gradient(make_conv):
    """Σ_rows g aᵀ from the captured geometry equals autograd's weight gradient."""
    from grng.curvature.layers import KroneckerLayer

    torch.manual_seed(3)
    conv = make_conv()
    shape = (3, 2, 7, 6) if isinstance(conv, nn.Conv2d) else (3, 2, 9)
    x = torch.randn(*shape)
    out = conv(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    layer = KroneckerLayer("conv", conv, conv.weight, conv.bias)
    adapter = layer.adapter
    _, _, a = adapter.activation_statistic(layer, conv, x, False, x.dtype)
    g, examples = adapter.gradient_rows(layer, conv, upstream)
    assert examples == shape[0]
    directions = {}
    layer.scatter(g.T @ a, directions)
    torch.testing.assert_close(directions[conv.weight], conv.weight.grad)
    if conv.bias is not None:
        torch.testing.assert_close(directions[conv.bias], conv.bias.grad)


def test_gradient_accumulation_counts_each_example_once():
    torch.manual_seed(4)
    model = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    whole = _capture(model, lambda: F.mse_loss(model(x), y)).estimates()["Linear"]

    params = set(model.parameters())
    capture = CurvatureCapture(model, find_kronecker_layers(model, params))
    capture.armed = True
    for chunk in (slice(0, 4), slice(4, 8)):
        (F.mse_loss(model(x[chunk]), y[chunk]) / 2).backward()
    split = capture.estimates()["Linear"]
    torch.testing.assert_close(split.activation_factor, whole.activation_factor)
    torch.testing.assert_close(split.gradient_factor, whole.gradient_factor)
    assert split.examples == whole.examples == 8


def test_layer_used_twice_in_one_forward_counts_examples_once():
    torch.manual_seed(5)
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(6, 3)
    capture = _capture(model, lambda: model(x).pow(2).sum(1).mean())
    est = capture.estimates()["0"]
    assert est.examples == 6
    first_in = torch.cat([x, torch.ones(6, 1)], 1)
    second_in = torch.cat([torch.tanh(shared(x)).detach(), torch.ones(6, 1)], 1)
    rows = torch.cat([first_in, second_in])
    torch.testing.assert_close(est.activation_factor, rows.T @ rows / 12)


@pytest.mark.parametrize("twin_bias", [False, True], ids=["bias_free_twin", "own_bias_twin"])
def test_tied_twin_without_the_owners_bias_gets_a_zero_bias_column(twin_bias):
    """Issue #10: a tied twin's rows carry 1 in the bias column only if the owner's bias acts."""
    torch.manual_seed(7)
    owner = nn.Linear(3, 3)
    twin = nn.Linear(3, 3, bias=twin_bias)
    twin.weight = owner.weight
    model = nn.Sequential(owner, nn.Tanh(), twin)
    x = torch.randn(6, 3)
    capture = _capture(model, lambda: model(x).pow(2).sum(1).mean())
    est = capture.estimates()["0"]
    hidden = torch.tanh(owner(x)).detach()
    rows = torch.cat(
        [torch.cat([x, torch.ones(6, 1)], 1), torch.cat([hidden, torch.zeros(6, 1)], 1)]
    )
    torch.testing.assert_close(est.activation_factor, rows.T @ rows / 12, rtol=1e-12, atol=1e-12)
    assert est.activation_factor[-1, -1] == 0.5


def test_nothing_is_captured_when_disarmed_paused_or_without_grad():
    model = nn.Linear(3, 2)
    capture = CurvatureCapture(model, find_kronecker_layers(model, set(model.parameters())))
    x = torch.randn(4, 3)
    model(x).sum().backward()  # not armed
    assert not capture.has_statistics
    capture.armed = True
    with capture.paused():
        model(x).sum().backward()
    with torch.no_grad():
        model(x)
    assert not capture.has_statistics
    out = model(x)
    with capture.paused():  # a forward recorded, but its backward paused
        out.sum().backward()
    assert not capture.has_statistics
    model(x).sum().backward()
    assert capture.has_statistics


def test_double_backward_does_not_pollute_the_factors():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    params = list(model.parameters())
    capture = CurvatureCapture(model, find_kronecker_layers(model, set(params)))
    capture.armed = True
    loss = model(x).pow(2).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    clean = {k: v.gradient_factor.clone() for k, v in capture.estimates().items()}
    with capture.paused():
        torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params)
    after = capture.estimates()
    for k, v in clean.items():
        torch.testing.assert_close(after[k].gradient_factor, v, rtol=0, atol=0)


def test_mc_mode_takes_gradients_only_inside_the_fisher_pass():
    model = nn.Linear(3, 2)
    capture = CurvatureCapture(model, find_kronecker_layers(model, set(model.parameters())), "mc")
    capture.armed = True
    out = model(torch.randn(4, 3))
    out.sum().backward(retain_graph=True)
    assert not capture.has_statistics
    with capture.fisher_pass():
        torch.autograd.grad(out.pow(2).sum(), model.weight)
    assert capture.has_statistics


def test_frozen_layers_are_skipped_and_grouped_convolutions_get_a_block_per_group():
    model = nn.Sequential(nn.Linear(3, 3), nn.Conv1d(4, 4, 3, groups=2), nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    layers = find_kronecker_layers(model, {p for p in model.parameters() if p.requires_grad})
    assert [layer.name for layer in layers] == ["1.group0", "1.group1"]
    assert [(layer.activation_dim, layer.gradient_dim) for layer in layers] == [(7, 2), (7, 2)]
