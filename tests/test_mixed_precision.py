"""Mixed precision (issue #13): bfloat16 autocast trains like float32, curvature stays float32.

* Every optimizer (KFAC, RING, RENG with finite differences, R-Kalman) trains the BERT
  classifier of the test kit under ``torch.autocast("cpu", dtype=torch.bfloat16)`` with
  its default hyperparameters, to a loss close to its float32 run, with float32 factors;
  float16 autocast with a ``GradScaler`` does too (K-FAC; RENG refuses a scaler).
* Regressions, one per defect found:

  - a ``loss.backward()`` inside the autocast block ran the capture's gradient hooks with
    autocast on, so ``aᵀa`` was a bfloat16 matmul (2.4e-3 relative error in ``A``);
  - an ``optimizer.step()`` inside the block computed inverses, eigenbases, solves and
    Kalman updates in bfloat16 (steps 0.2–0.4% off, Newton–Schulz failing over to
    Cholesky);
  - RENG's finite-difference step ε followed the parameters' dtype, not the precision
    the closure computes in, and grew with ‖θ‖: under bfloat16 autocast H∇L was mostly
    rounding noise (relative error 0.9–1.3 on small MLPs), and in float32 the step was so
    long that it crossed ReLU kinks (relative error 4.7 on the CNN);
  - with ``optimizer.step(closure)`` inside an autocast block, RENG's perturbed pass
    reused the block's cached bfloat16 copies of the unperturbed weights (H∇L relative
    error 0.6 on the BERT classifier, 0.98 on an MLP, against 0.11 and 0.19);
  - nothing silent: a closure whose precision cannot be seen gets a warning.

Before these fixes none of the optimizers diverged under bfloat16 either, on this model
or the masked-LM BERT (150 steps, 3 seeds, default hyperparameters: no non-finite step,
no loss above its start; after 30 steps the bfloat16 test loss is within 1.22× of the
float32 one). The training tests pin that down; the regression tests pin the defects.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from tests.cases import (
    MODELS,
    batch,
    bert_classifier,
    classification_tokens,
    curvature_tensors,
    logits_of,
    mlp,
)

BF16 = torch.bfloat16


def autocast(enabled: bool = True, dtype: torch.dtype = BF16) -> torch.autocast:
    return torch.autocast("cpu", dtype=dtype, enabled=enabled)


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 if it is in a lower precision (autocast's bfloat16 logits)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def loss_of(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = logits_of(model(x))
    return F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]), y.reshape(-1))


def bf16_closure(
    model: nn.Module, optimizer: grng.CurvatureOptimizer, x: Tensor, y: Tensor, *, own: bool
) -> Callable[[], Tensor]:
    """A closure whose forward runs in bfloat16: in an autocast block of its own, or
    (``own=False``) in the caller's. Its backward runs outside autocast either way
    (autocast changes backward kernels too)."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        with autocast() if own else contextlib.nullcontext():
            loss = loss_of(model, x, y)
        with torch.autocast("cpu", enabled=False):
            loss.backward()
        return loss

    return closure


# --------------------------------------------------------------------------- training
#: Each optimizer with its default hyperparameters (RENG with finite differences).
DEFAULTS: dict[str, tuple[Callable[..., grng.CurvatureOptimizer], dict[str, Any]]] = {
    "KFAC": (grng.KFAC, {}),
    "RING": (grng.RING, {}),
    "RENG-fd": (grng.RENG, {"hvp": "finite_difference"}),
    "RKalman": (grng.RKalman, {}),
}
STEPS = 30


def train_bert(name: str, precision: torch.dtype) -> tuple[float, float, grng.CurvatureOptimizer]:
    """``STEPS`` steps on fresh batches, the forward in ``precision`` (autocast unless
    float32); returns the float32 loss on a held-out batch before and after."""
    cls, kwargs = DEFAULTS[name]
    model = bert_classifier(seed=0)
    optimizer = cls(model, **kwargs)
    scaler = torch.amp.GradScaler("cpu") if precision == torch.float16 else None
    optimizer.grad_scaler = scaler
    x_test, y_test = classification_tokens(123, n=64)

    def test_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = float(loss_of(model, x_test, y_test))
        model.train()
        return loss

    before = test_loss()
    stream = torch.Generator().manual_seed(1)
    for i in range(STEPS):
        x, y = classification_tokens(stream)

        def closure(x: Tensor = x, y: Tensor = y) -> Tensor:
            optimizer.zero_grad()
            with autocast(precision != torch.float32, precision):
                loss = loss_of(model, x, y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        torch.manual_seed(i)  # the same dropout masks in every run
        if scaler is None:
            optimizer.step(closure)
        else:
            closure()
            scaler.step(optimizer)
            scaler.update()
    return before, test_loss(), optimizer


@pytest.fixture(scope="module")
def float32_runs() -> dict[str, float]:
    return {name: train_bert(name, torch.float32)[1] for name in DEFAULTS}


def assert_trains_like_float32(
    name: str, precision: torch.dtype, float32_runs: dict[str, float]
) -> None:
    before, after, optimizer = train_bert(name, precision)
    reference = float32_runs[name]
    assert optimizer.nonfinite_steps == 0
    assert after < 0.6 * before, (before, after)
    assert after < 1.5 * reference + 0.05, (after, reference)
    factors = {
        key: t
        for key, t in curvature_tensors(optimizer).items()
        if key.endswith(("_factor", "_covariance"))
    }
    assert factors
    for key, t in factors.items():
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()), key


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_bf16_autocast_trains_the_bert_classifier_like_float32(
    name: str, float32_runs: dict[str, float]
) -> None:
    assert_trains_like_float32(name, BF16, float32_runs)


def test_fp16_autocast_with_a_grad_scaler_trains_the_bert_classifier_like_float32(
    float32_runs: dict[str, float],
) -> None:
    """K-FAC only: float16 matmuls are slow on CPU; ``tests/test_reliability.py`` checks
    that every optimizer's factors and steps are unscaled exactly with a GradScaler."""
    assert_trains_like_float32("KFAC", torch.float16, float32_runs)


# -------------------------------------------------- statistics under an autocast backward
def test_statistics_stay_float32_when_the_backward_runs_inside_autocast() -> None:
    """Regression: the capture's gradient hooks ran under the caller's autocast, so the
    activation sum ``aᵀa`` was a bfloat16 matmul (2.4e-3 relative error in ``A`` on the
    BERT classifier). The same bfloat16 forward must give the same factors whether its
    backward runs inside the autocast block or after it."""
    x, y = batch(0, 64, features=16, classes=4)
    factors = []
    for backward_inside in (False, True):
        model = mlp((16, 32, 4), seed=0)
        optimizer = grng.KFAC(model, factor_update_freq=1)
        with autocast():
            loss = loss_of(model, x, y)
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        factors.append(optimizer.capture.estimates())
    plain, inside = factors
    assert plain.keys() == inside.keys() and plain
    for name in plain:
        for side in ("activation_factor", "gradient_factor"):
            a, b = getattr(plain[name], side), getattr(inside[name], side)
            assert b.dtype == torch.float32
            assert torch.equal(a, b), (name, side)


# ----------------------------------------------------------- a step inside autocast
STEP_VARIANTS: dict[str, tuple[Callable[..., grng.CurvatureOptimizer], dict[str, Any]]] = {
    "KFAC": (grng.KFAC, {"inverse_update_freq": 1}),  # Newton–Schulz inverses
    "KFAC-eigh": (grng.KFAC, {"inverse_update_freq": 1, "inverse": "eigh"}),
    "RING": (grng.RING, {"inverse_update_freq": 1}),
    "RENG-fd": (grng.RENG, {"inverse_update_freq": 1, "hvp": "finite_difference"}),
    "RKalman": (grng.RKalman, {}),
}


def _run_steps(name: str, step_inside: bool) -> list[Tensor]:
    """Four steps of ``STEP_VARIANTS[name]`` on an MLP whose forward runs in bfloat16 and
    whose backward runs outside autocast; the step inside an autocast block or not."""
    cls, kwargs = STEP_VARIANTS[name]
    model = mlp((16, 32, 4), seed=0)
    optimizer = cls(model, factor_update_freq=1, **kwargs)
    for i in range(4):
        # Inside: the forward inherits the caller's autocast; outside: its own.
        closure = bf16_closure(
            model, optimizer, *batch(i, 64, features=16, classes=4), own=not step_inside
        )
        if name != "RENG-fd":
            with autocast():  # the same bfloat16 forward in both runs
                closure()
        with autocast() if step_inside else contextlib.nullcontext():
            optimizer.step(closure if name == "RENG-fd" else None)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(STEP_VARIANTS))
def test_a_step_inside_autocast_equals_the_step_outside(name: str) -> None:
    """Regression: ``optimizer.step()`` inside an autocast block computed its inverses,
    eigenbases, solves and Kalman updates as bfloat16 matmuls (0.2–0.4% off on the BERT
    classifier; Newton–Schulz stalled and fell back to Cholesky). The same gradients
    must give the same parameters whether the step runs inside the block or outside.
    RENG's closure runs its forward in bfloat16 in both runs, from the caller's autocast
    or from its own, so this also checks that the perturbed re-evaluation inside the step
    runs in the caller's autocast state."""
    for outside, inside in zip(_run_steps(name, False), _run_steps(name, True), strict=True):
        assert torch.equal(outside, inside)


# ----------------------------------------------------------- RENG's finite difference
def _exact_product(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """H∇L of the same parameters by double backpropagation in float64."""
    twin = copy.deepcopy(model).double()
    params = list(twin.parameters())
    grads = torch.autograd.grad(loss_of(twin, x.double(), y), params, create_graph=True)
    product = torch.autograd.grad(0.5 * torch.stack([g.pow(2).sum() for g in grads]).sum(), params)
    return torch.cat([h.flatten() for h in product])


@contextlib.contextmanager
def _recording_products(optimizer: grng.RENG) -> Iterator[list[dict[Tensor, Tensor]]]:
    products: list[dict[Tensor, Tensor]] = []
    compute = optimizer._finite_difference_product

    def record(grads: dict[Tensor, Tensor], closure: Any) -> dict[Tensor, Tensor]:
        products.append(compute(grads, closure))
        return products[-1]

    optimizer._finite_difference_product = record  # type: ignore[method-assign]
    yield products


def _finite_difference_error(
    model: nn.Module, x: Tensor, y: Tensor, precision: torch.dtype
) -> float:
    """Relative error of the H∇L that one RENG(hvp="finite_difference") step computes."""
    exact = _exact_product(model, x, y)
    optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")

    def closure() -> Tensor:
        optimizer.zero_grad()
        with autocast(precision != torch.float32, precision):
            loss = loss_of(model, x, y)
        loss.backward()
        return loss

    with _recording_products(optimizer) as products:
        optimizer.step(closure)
    (product,) = products
    actual = torch.cat([product[p].double().flatten() for p in model.parameters()])
    return float((actual - exact).norm() / exact.norm())


@pytest.mark.parametrize("sizes", [(5, 8, 3), (20, 32, 32, 4)])
def test_finite_difference_step_follows_the_precision_the_closure_computes_in(
    sizes: tuple[int, ...],
) -> None:
    """Regression: ε = sqrt(eps(parameter dtype))·(1 + ‖θ‖) ignored that the closure
    computes in bfloat16 under autocast: the perturbation was below bfloat16's rounding
    and H∇L mostly noise (relative error 1.3 and 0.92 on these tanh/LayerNorm MLPs, where
    the best fixed ε reaches 0.12 and 0.08). With ε from bfloat16's epsilon: 0.15, 0.19
    (``benchmarks/finite_difference_epsilon.py``)."""
    model = mlp(sizes, seed=0).eval()
    x, y = batch(3, 64, features=sizes[0], classes=sizes[-1], learnable=True)
    assert _finite_difference_error(model, x, y, BF16) < 0.4


def test_finite_difference_step_does_not_cross_relu_kinks_in_float32() -> None:
    """Regression: ε grew with ‖θ‖ (2e-3 on the test kit's CNN), long enough for the
    perturbation to switch ReLUs on and off: H∇L had a relative error of 4.7 in float32
    (1.3 on the ResNet). With ε = 0.2·sqrt(eps)·(1 + mean|θ_i|) ≈ 7e-5: 1.3e-3."""
    case = MODELS["CNN-BatchNorm"]
    model = case.build(0).eval()
    x, y = case.batch(10)
    assert _finite_difference_error(model, x, y, torch.float32) < 0.02


def test_finite_difference_inside_an_autocast_block_sees_the_perturbed_weights() -> None:
    """Regression: with ``optimizer.step(closure)`` inside an autocast block, the
    perturbed pass ran in the same open block as the clean one, whose cast cache still
    held the bfloat16 copies of the unperturbed weights: the perturbation of every
    autocast layer was invisible. The product must be the one computed by a closure
    that opens its own autocast block (a fresh cache per call)."""
    x, y = batch(3, 64, features=20, classes=4, learnable=True)
    products = []
    for step_inside in (False, True):
        model = mlp((20, 32, 32, 4), seed=0).eval()
        optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")
        closure = bf16_closure(model, optimizer, x, y, own=not step_inside)
        outer = autocast() if step_inside else contextlib.nullcontext()
        with _recording_products(optimizer) as recorded, outer:
            optimizer.step(closure)
        products.append(torch.cat([recorded[0][p].flatten() for p in model.parameters()]))
    assert torch.equal(products[0], products[1])


def test_finite_difference_warns_when_no_module_output_was_seen() -> None:
    """Nothing silent: the precision is read from the outputs of the modules that hold
    parameters; a closure that runs none of them (here: a loss on the weights alone)
    leaves it unknown, and the step says that it assumed the parameters' precision."""
    model = nn.Linear(4, 3)
    optimizer = grng.RENG(model, rho=1.0, hvp="finite_difference")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = model.weight.pow(4).sum() + model.bias.pow(4).sum()
        loss.backward()
        return loss

    with pytest.warns(RuntimeWarning, match="no module holding parameters ran"):
        optimizer.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step(closure)  # once
