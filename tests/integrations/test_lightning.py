"""grng in PyTorch Lightning: grng.integrations.lightning.GRNGMixin.

Lightning's automatic optimization passes a closure to ``optimizer.step``, zeroes the
gradients after the first micro-batch's ``training_step`` and calls the LightningModule,
which calls the network inside it. The float64 comparisons use the MLP of
``tests/cases.py`` (Linear, Tanh, LayerNorm, Linear).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import grng
from tests.cases import batch, make, mlp

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from grng.integrations.lightning import GRNGMixin  # noqa: E402

pytestmark = [
    # Tiny CPU runs: Lightning's advice on workers and logging intervals does not apply.
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
]

Build = Callable[[nn.Module], torch.optim.Optimizer]


class Plain(L.LightningModule):
    """A LightningModule around ``net`` whose optimizer ``build(self)`` makes."""

    def __init__(self, net: nn.Module, build: Build) -> None:
        super().__init__()
        self.net = net
        self.build = build
        self.perturbed: list[bool] = []  # grng_perturbed_pass per training_step call
        self.losses: list[float] = []  # the loss of every training_step call
        self.outputs: list[float] = []  # the loss Lightning reports per batch

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        self.perturbed.append(bool(getattr(self, "grng_perturbed_pass", False)))
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.outputs.append(float(outputs["loss"]))

    def configure_optimizers(self) -> Any:
        return self.build(self)


class Mixed(GRNGMixin, Plain):
    pass


def fit(module: L.LightningModule, loader: DataLoader[Any], **kwargs: Any) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip
    trainer.fit(module, loader)
    return trainer


def loader(x: Tensor, y: Tensor, batch_size: int) -> DataLoader[Any]:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def learnable(n: int = 256) -> tuple[Tensor, Tensor]:
    return batch(0, n, learnable=True)


# ------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", ["KFAC", "RING", "RENG-exact", "RENG-fd", "RKalman"])
@pytest.mark.usefixtures("no_create_graph_warning")
def test_lightning_reduces_the_loss(variant: str) -> None:
    x, y = learnable()
    module = Mixed(mlp(), lambda m: make(variant, m))
    with torch.no_grad():
        initial = float(F.cross_entropy(module.net(x), y))
    fit(module, loader(x, y, 32), max_steps=40)
    with torch.no_grad():
        assert float(F.cross_entropy(module.net(x), y)) < 0.7 * initial


def test_plain_lightning_module_trains_ring() -> None:
    """KFAC, RING and RKalman need nothing from the mixin."""
    x, y = learnable()
    module = Plain(mlp(), lambda m: make("RING", m))
    with torch.no_grad():
        initial = float(F.cross_entropy(module.net(x), y))
    fit(module, loader(x, y, 32), max_steps=40)
    with torch.no_grad():
        assert float(F.cross_entropy(module.net(x), y)) < 0.7 * initial


# --------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("variant", ["KFAC", "RING", "RENG-exact", "RKalman"])
@pytest.mark.usefixtures("float64")
def test_accumulate_grad_batches_gives_the_full_batch_step(variant: str) -> None:
    """4 micro-batches of 4 per step against batches of 16: the same parameters (a plain
    LightningModule but for exact RENG, which needs the mixin)."""
    x, y = batch(0, 48, dtype=torch.float64)
    module = Mixed if variant == "RENG-exact" else Plain
    whole = module(mlp(dtype=torch.float64), lambda m: make(variant, m))
    split = module(mlp(dtype=torch.float64), lambda m: make(variant, m))
    fit(whole, loader(x, y, 16), max_steps=3)
    fit(split, loader(x, y, 4), max_steps=3, accumulate_grad_batches=4)
    optimizer = split.trainer.optimizers[0]
    assert isinstance(optimizer, grng.CurvatureOptimizer) and optimizer.steps_taken == 3
    for p, q in zip(whole.parameters(), split.parameters(), strict=True):
        assert p.dtype == torch.float64
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10)


def test_finite_differences_refuse_accumulate_grad_batches() -> None:
    x, y = batch(0, 16)
    module = Mixed(mlp(), lambda m: make("RENG-fd", m))
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(RuntimeError, match=r"3 backward pass\(es\).*accumulate_grad_batches"):
        fit(module, loader(x, y, 4), max_steps=1, accumulate_grad_batches=4)
    assert all(torch.equal(b, p) for b, p in zip(before, module.parameters(), strict=True))


# -------------------------------------------------------------- finite differences
def test_finite_differences_run_training_step_twice_and_say_which_is_perturbed() -> None:
    x, y = batch(0, 16)
    module = Mixed(mlp(), lambda m: make("RENG-fd", m))
    fit(module, loader(x, y, 8), max_steps=2)
    assert module.perturbed == [False, True, False, True]
    # What the mixin's docstring says: Lightning keeps the perturbed call's outputs.
    assert module.outputs == module.losses[1::2] != module.losses[0::2]


def test_finite_differences_refuse_gradient_clipping() -> None:
    x, y = batch(0, 16)
    module = Mixed(mlp(), lambda m: make("RENG-fd", m))
    with pytest.raises(RuntimeError, match=r"gradient_clip_val=1\.0.*hvp='exact'"):
        fit(module, loader(x, y, 8), max_steps=1, gradient_clip_val=1.0)


# --------------------------------------------------------------------------- errors
def test_exact_reng_without_the_mixin_raises_naming_it() -> None:
    x, y = batch(0, 16)
    module = Plain(mlp(), lambda m: make("RENG-exact", m))
    with pytest.raises(RuntimeError, match=r"autograd graph.*GRNGMixin"):
        fit(module, loader(x, y, 8), max_steps=1)


# ------------------------------------------------------------------- loss scaling
class ScaledOnly(MixedPrecision):
    """16-mixed's GradScaler without autocast, so that only the loss scaling differs
    from a float64 run without a scaler (on the CPU, in float64)."""

    def __init__(self) -> None:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        super().__init__("16-mixed", "cpu", scaler=scaler)

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        yield


@pytest.mark.parametrize("variant", ["RING", "RENG-exact"])
@pytest.mark.usefixtures("float64")
def test_loss_scaling_leaves_the_steps_unchanged(variant: str) -> None:
    """The mixin hands the scaler to grng (gradient factors unscaled) and gives exact
    RENG the graph of the unscaled gradient; with accumulation and clipping."""
    x, y = batch(0, 32, dtype=torch.float64)
    settings: dict[str, Any] = dict(max_steps=2, accumulate_grad_batches=2, gradient_clip_val=0.05)
    build: Build = lambda m: make(variant, m, factor_update_freq=1)  # noqa: E731
    plain = Mixed(mlp(dtype=torch.float64), build)
    fit(plain, loader(x, y, 8), **settings)
    plugin = ScaledOnly()
    scaled = Mixed(mlp(dtype=torch.float64), build)
    fit(scaled, loader(x, y, 8), plugins=[plugin], **settings)
    assert plugin.scaler is not None and plugin.scaler.get_scale() == 2.0**10  # no skipped step
    for p, q in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)


def test_finite_differences_refuse_a_grad_scaler() -> None:
    x, y = batch(0, 16)
    module = Mixed(mlp(), lambda m: make("RENG-fd", m))
    with pytest.raises(RuntimeError, match=r"'16-mixed' precision.*without the closure"):
        fit(module, loader(x, y, 8), max_steps=1, plugins=[ScaledOnly()])
