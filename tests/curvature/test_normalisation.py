"""Issue #10: the scale of ``G`` for Monte-Carlo passes and for sum-reduced losses.

Ground truth is ``G = (1/M) Σ_rows g gᵀ`` with ``g = ∂ℓ_i/∂s`` the per-term output
gradients and ``M`` the number of terms the loss averages over (module
docstring of :mod:`grng.curvature.capture`), computed here by hand in float64.
"""

from __future__ import annotations

import copy
from typing import Literal

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng.curvature import CurvatureCapture, Likelihood, find_kronecker_layers
from grng.optim import KFAC

pytestmark = pytest.mark.usefixtures("float64")


# ---------------------------------------------------------------- MC Fisher
def _mc_kfac(model: nn.Module, seed: int) -> KFAC:
    opt = KFAC(model, fisher="mc", factor_update_freq=1, inverse_update_freq=1)
    # The labels are drawn from this generator; the test redraws them from its twin.
    opt._fisher_generator = torch.Generator().manual_seed(seed)
    return opt


def _term_gradients(outputs: Tensor, likelihood: str, generator: torch.Generator) -> Tensor:
    """``∂ℓ_i/∂s`` for the labels ``sampled_nll`` draws from ``generator``, by hand."""
    outputs = outputs.detach()
    if likelihood == "gaussian":
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
        return -noise  # ℓ_b = ½ Σ_{t,d} (s − (s + ε))²: ∂ℓ_b/∂s_{b,t} = −ε_{b,t}
    logits = outputs.reshape(-1, outputs.shape[-1])
    labels = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
    onehot = F.one_hot(labels.squeeze(1), logits.shape[-1]).to(logits.dtype)
    return (torch.softmax(logits, -1) - onehot).reshape(outputs.shape)


def _terms(outputs: Tensor, likelihood: str) -> int:
    """M: categorical averages over every leading index, gaussian over the batch only."""
    return outputs.shape[0] if likelihood == "gaussian" else outputs.numel() // outputs.shape[-1]


@pytest.mark.parametrize("likelihood", ["gaussian", "categorical"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_mc_fisher_on_sequences_scales_g_by_the_loss_terms(
    likelihood: Likelihood, micro_batches: int
) -> None:
    """Deep linear net on (B, T, D): G = (1/ΣM_p) Σ_p Σ_rows g gᵀ for the sampled labels.

    With two micro-batches each ``backward_fisher`` is its own mean, and the
    result must be what one batch of the union gives.
    """
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    x = torch.randn(4, 6, 4)
    opt = _mc_kfac(model, seed=3)
    twin = torch.Generator().manual_seed(3)
    rows: dict[str, list[Tensor]] = {"0": [], "1": []}
    terms = 0
    for chunk in x.chunk(micro_batches):
        out = model(chunk)
        opt.backward_fisher(out, likelihood)
        g = _term_gradients(out, likelihood, twin).reshape(-1, 3)
        rows["1"].append(g)
        second = model[1]
        assert isinstance(second, nn.Linear)
        rows["0"].append(g @ second.weight.detach())  # ∂ℓ/∂h = W₂ᵀ ∂ℓ/∂s
        terms += _terms(out, likelihood)
    est = opt.capture.estimates()
    for name, parts in rows.items():
        g = torch.cat(parts)
        expected = g.T @ g / terms
        torch.testing.assert_close(est[name].gradient_factor, expected, rtol=1e-12, atol=1e-12)


def _dense_gaussian_ggn(layer: nn.Linear, x: Tensor) -> Tensor:
    """GGN of ``(1/B) Σ_b ½‖s_b − y_b‖²`` (sum over T and D) w.r.t. ``[W | b]`` row-major."""
    weight, bias = layer.weight.detach(), layer.bias.detach()
    flat = torch.cat([weight, bias[:, None]], 1).reshape(-1)

    def outputs(v: Tensor) -> Tensor:
        v = v.reshape(weight.shape[0], -1)
        return F.linear(x, v[:, :-1], v[:, -1])

    jac = torch.autograd.functional.jacobian(outputs, flat)  # (B, T, D, P)
    jac = jac.reshape(-1, flat.numel())
    return jac.T @ jac / x.shape[0]  # the Gaussian's Hessian is I


def test_mc_gaussian_fisher_on_sequences_matches_the_dense_ggn_in_expectation() -> None:
    """Single Linear on (B, T, D): K-FAC expand is exact in expectation, G → T·I."""
    torch.manual_seed(11)
    layer = nn.Linear(4, 3)
    x = torch.randn(4, 6, 4)
    opt = _mc_kfac(layer, seed=5)
    out = layer(x)
    for _ in range(300):  # 300 passes since the last clear: G averages them
        opt.backward_fisher(out, "gaussian")
    est = opt.capture.estimates()["Linear"]
    kfac = torch.kron(est.gradient_factor, est.activation_factor)
    dense = _dense_gaussian_ggn(layer, x)
    error = torch.linalg.matrix_norm(kfac - dense) / torch.linalg.matrix_norm(dense)
    assert error < 0.1, f"relative error {float(error):.3f}"


# ---------------------------------------------------------- sum-reduced losses
class _Net(nn.Module):
    """A Conv, a Linear and two fallback parameters (LayerNorm weight, bare Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.norm = nn.LayerNorm(15)
        self.head = nn.Linear(15, 4)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(torch.tanh(self.conv(x)).flatten(1))
        return self.head(h) * self.scale


def _factors_after_one_step(
    net: nn.Module,
    reduction: Literal["mean", "sum"],
    x: Tensor,
    y: Tensor,
    micro_batches: int = 1,
) -> dict[str, Tensor]:
    opt = KFAC(net, loss_reduction=reduction, factor_update_freq=1, inverse_update_freq=1)
    opt.zero_grad()
    for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
        loss = F.cross_entropy(net(xs), ys, reduction=reduction)
        # A mean loss over micro-batches is divided by their number; a sum is not.
        (loss / micro_batches if reduction == "mean" else loss).backward()
    opt.step()
    out: dict[str, Tensor] = {}
    for key, state in opt.state.items():
        if isinstance(key, str) and key.startswith(("layer:", "diagonal:")):
            for stat in ("activation_factor", "gradient_factor", "fisher_diagonal"):
                if stat in state:
                    out[f"{key}/{stat}"] = state[stat]
    return out


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_sum_reduced_loss_gives_the_factors_of_the_mean_loss(micro_batches: int) -> None:
    torch.manual_seed(12)
    net = _Net()
    x, y = torch.randn(8, 2, 5), torch.randint(0, 4, (8,))
    mean = _factors_after_one_step(copy.deepcopy(net), "mean", x, y)
    summed = _factors_after_one_step(copy.deepcopy(net), "sum", x, y, micro_batches)
    assert sorted(mean) == sorted(summed)
    assert {k.split("/")[0] for k in mean} >= {
        "layer:conv",
        "layer:head",
        "diagonal:norm.weight",
        "diagonal:scale",
    }
    for key, value in mean.items():
        torch.testing.assert_close(summed[key], value, rtol=1e-12, atol=1e-12, msg=key)


def test_sum_reduced_loss_keeps_gradient_rows_consistent_with_g() -> None:
    """R-Kalman's row store: U_Gᵀ U_G = G (nothing dropped) under either reduction."""
    torch.manual_seed(13)
    net = _Net()
    x, y = torch.randn(8, 2, 5), torch.randint(0, 4, (8,))
    estimates = {}
    for reduction in ("mean", "sum"):
        layers = find_kronecker_layers(net, set(net.parameters()))
        capture = CurvatureCapture(net, layers, loss_reduction=reduction, keep_rows=1000)
        capture.armed = True
        F.cross_entropy(net(x), y, reduction=reduction).backward()
        estimates[reduction] = capture.estimates()
        capture.remove()
    for name, est in estimates["sum"].items():
        reference = estimates["mean"][name].gradient_factor
        torch.testing.assert_close(est.gradient_factor, reference, rtol=1e-12, atol=1e-12)
        assert est.gradient_rows is not None
        rows = est.gradient_rows
        torch.testing.assert_close(rows.T @ rows, reference, rtol=1e-12, atol=1e-12)
