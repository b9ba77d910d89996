"""grng in transformers' Trainer: grng.integrations.huggingface.GRNGTrainer.

Training runs use the tiny random-init BERT classifier of ``tests/cases.py``; the exact
comparisons a float64 two-layer MLP behind Trainer's model interface (a forward that
takes ``labels`` and returns the loss), on which every parameter is Kronecker.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from tests.cases import batch, bert_classifier, classification_tokens, make, tiny_mlp

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from grng.integrations.huggingface import GRNGTrainer  # noqa: E402

FALLS = 0.7  # a trained model's loss must fall below this fraction of the initial one
STEPS = 30


class Examples(torch.utils.data.Dataset[dict[str, Tensor]]):
    """``{"x" or "input_ids": row, "labels": label}`` per example."""

    def __init__(self, x: Tensor, y: Tensor, key: str = "x") -> None:
        self.x, self.y, self.key = x, y, key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {self.key: self.x[i], "labels": self.y[i]}


class TinyClassifier(nn.Module):
    """``tiny_mlp`` with Trainer's interface: ``forward(x, labels)`` returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp().double()

    def forward(self, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def arguments(tmp_path: Path, **overrides: Any) -> Any:
    settings: dict[str, Any] = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=16,
        max_steps=1,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return transformers.TrainingArguments(**{**settings, **overrides})


def tiny_data() -> Examples:
    x, y = batch(0, 16, features=4, dtype=torch.float64)
    return Examples(x, y)


def train_tiny(
    tmp_path: Path,
    build: Callable[[nn.Module], grng.CurvatureOptimizer],
    *,
    scaler: torch.amp.GradScaler | None = None,
    **overrides: Any,
) -> tuple[TinyClassifier, list[Tensor]]:
    """One GRNGTrainer run of TinyClassifier on ``tiny_data``: the model and its
    parameters before."""
    model = TinyClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GRNGTrainer(
        model=model,
        args=arguments(tmp_path, **overrides),
        train_dataset=tiny_data(),
        optimizers=(build(model), None),
    )
    if scaler is not None:
        # fp16 in Trainer needs a GPU for its GradScaler; this one, on the CPU and in
        # float64, scales the loss without autocast, so the steps must not change.
        trainer.accelerator.scaler = scaler
    trainer.train()
    return model, before


def steps(model: nn.Module, before: list[Tensor]) -> list[Tensor]:
    return [p.detach() - b for p, b in zip(model.parameters(), before, strict=True)]


# ------------------------------------------------------------------------- training
@pytest.mark.parametrize("optimizer_class", ["KFAC", "RING", "RENG", "RKalman"])
def test_grng_trainer_reduces_the_loss_of_a_bert_classifier(
    tmp_path: Path, optimizer_class: str
) -> None:
    """The optimizers' defaults (RENG: hvp="exact"), 30 steps of 32."""
    x, y = classification_tokens(0, 128)
    model = bert_classifier()

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(input_ids=x, labels=y).loss)

    initial = loss()
    optimizer = getattr(grng, optimizer_class)(model)
    trainer = GRNGTrainer(
        model=model,
        args=arguments(tmp_path, per_device_train_batch_size=32, max_steps=STEPS),
        train_dataset=Examples(x, y, key="input_ids"),
        optimizers=(optimizer, None),
    )
    trainer.train()
    assert optimizer.steps_taken == STEPS
    assert loss() < FALLS * initial


def test_plain_trainer_trains_ring(tmp_path: Path) -> None:
    """KFAC, RING and RKalman need nothing from GRNGTrainer (no fp16 here)."""
    x, y = classification_tokens(0, 128)
    model = bert_classifier()
    model.eval()
    with torch.no_grad():
        initial = float(model(input_ids=x, labels=y).loss)
    optimizer = grng.RING(model)
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path, per_device_train_batch_size=32, max_steps=STEPS),
        train_dataset=Examples(x, y, key="input_ids"),
        optimizers=(optimizer, None),
    )
    trainer.train()
    model.eval()
    with torch.no_grad():
        assert float(model(input_ids=x, labels=y).loss) < FALLS * initial


# ---------------------------------------------------------------------------- errors
def test_finite_difference_reng_is_refused_at_construction(tmp_path: Path) -> None:
    model = TinyClassifier()
    optimizer = grng.RENG(model, hvp="finite_difference")
    with pytest.raises(ValueError, match=r"without a closure.*hvp='exact'.*GRNGTrainer"):
        GRNGTrainer(model=model, args=arguments(tmp_path), train_dataset=tiny_data(),
                    optimizers=(optimizer, None))  # fmt: skip


def test_finite_difference_reng_created_by_trainer_is_refused_at_the_first_step(
    tmp_path: Path,
) -> None:
    class Creating(GRNGTrainer):  # type: ignore[misc]
        def create_optimizer(self, model: nn.Module | None = None) -> Any:
            self.optimizer = grng.RENG(self.model, hvp="finite_difference")
            return self.optimizer

    model = TinyClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Creating(model=model, args=arguments(tmp_path), train_dataset=tiny_data())
    with pytest.raises(ValueError, match=r"without a closure.*hvp='exact'.*GRNGTrainer"):
        trainer.train()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("setting", ["processes", "DEEPSPEED"])
def test_exact_reng_is_refused_where_second_order_gradients_are_not_synchronised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    model = TinyClassifier()
    trainer = GRNGTrainer(model=model, args=arguments(tmp_path), train_dataset=tiny_data(),
                          optimizers=(grng.RENG(model), None))  # fmt: skip
    if setting == "processes":
        monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
        message = r"under 2 processes.*not synchronised"
    else:
        monkeypatch.setattr(
            Accelerator, "distributed_type", property(lambda self: DistributedType.DEEPSPEED)
        )
        message = r"under DeepSpeed.*not synchronised"
    example = tiny_data()[0]
    with pytest.raises(ValueError, match=message):
        trainer.training_step(model, {k: v[None] for k, v in example.items()})


def test_plain_trainer_with_exact_reng_raises_naming_grng_trainer(tmp_path: Path) -> None:
    model = TinyClassifier()
    trainer = transformers.Trainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=tiny_data(),
        optimizers=(grng.RENG(model), None),
    )
    with pytest.raises(RuntimeError, match=r"autograd graph.*GRNGTrainer"):
        trainer.train()


# ------------------------------------------------------------------- exact behaviour
@pytest.mark.usefixtures("no_create_graph_warning")
def test_reng_gradient_accumulation_gives_the_full_batch_step(tmp_path: Path) -> None:
    """4 micro-batches of 4 accumulate graph-carrying gradients: the step of one batch of 16."""
    reng = lambda m: make("RENG-exact", m)  # noqa: E731
    whole, before = train_tiny(tmp_path, reng, max_grad_norm=0.0)
    split, _ = train_tiny(
        tmp_path, reng, max_grad_norm=0.0, per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
    )  # fmt: skip
    for a, b in zip(steps(split, before), steps(whole, before), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_clipping_scales_renges_whole_direction(tmp_path: Path) -> None:
    """Trainer's in-place clipping of graph-carrying gradients: the RENG step is ``c``
    times the unclipped one (``c·(∇L + ρH∇L)`` preconditioned), ``c`` the clip factor."""

    def reng(m: nn.Module) -> grng.CurvatureOptimizer:
        return grng.RENG(m, rho=0.5, kl_clip=None, factor_update_freq=1)

    free, before = train_tiny(tmp_path, reng, max_grad_norm=0.0)
    clipped, _ = train_tiny(tmp_path, reng, max_grad_norm=0.05)
    reference = TinyClassifier()
    x, y = tiny_data().x, tiny_data().y
    grads = torch.autograd.grad(reference(x, y)["loss"], list(reference.parameters()))
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    c = 0.05 / (norm + 1e-6)
    assert c < 0.5  # the clip acts
    for a, b in zip(steps(clipped, before), steps(free, before), strict=True):
        torch.testing.assert_close(a, c * b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("variant", ["RING", "RENG-exact"])
def test_loss_scaling_leaves_the_steps_unchanged(tmp_path: Path, variant: str) -> None:
    """A GradScaler (fp16's) with accumulation: grng gets the scaler (gradient factors
    unscaled) and exact RENG's graph is that of the unscaled gradient. Without clipping:
    on the CPU accelerate unscales only in the optimizer step (clipping after unscaling:
    ``tests/integrations/test_graph.py``)."""
    build = lambda m: make(variant, m, factor_update_freq=1)  # noqa: E731
    accumulate = dict(
        per_device_train_batch_size=4, gradient_accumulation_steps=4, max_steps=2, max_grad_norm=0.0
    )
    plain, before = train_tiny(tmp_path, build, **accumulate)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    scaled, _ = train_tiny(tmp_path, build, scaler=scaler, **accumulate)
    assert scaler.get_scale() == 2.0**10  # no overflow: every step was taken
    for a, b in zip(steps(scaled, before), steps(plain, before), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_learning_rate_follows_trainers_scheduler(tmp_path: Path) -> None:
    """Trainer's default linear decay, from the optimizer's own lr (not args.learning_rate)."""
    seen: list[float] = []

    class Record(transformers.TrainerCallback):  # type: ignore[misc]
        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            seen.append(optimizer.param_groups[0]["lr"])

    model = TinyClassifier()
    optimizer = grng.RING(model, lr=0.2)
    trainer = GRNGTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=4, per_device_train_batch_size=4, learning_rate=1.0),
        train_dataset=tiny_data(),
        optimizers=(optimizer, None),
        callbacks=[Record()],
    )
    trainer.train()
    assert seen == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert optimizer.steps_taken == 4
