"""Tests of the benchmark's models and of the task-level model API."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from grng.bench import data as D
from grng.bench.models import MLP, CharTransformer, Conv1dNet, ResNet18
from grng.bench.tasks import CharLMTask, TaskData, get_task


def lm_data(n_chars: int = 20_000) -> TaskData:
    task = get_task("shakespeare-char")
    assert isinstance(task, CharLMTask)
    return task.from_text(D.synthetic_text(n_chars, seed=0), source="synthetic")


def test_mlp_and_cnn_forward_shapes() -> None:
    x = torch.randn(5, 40)
    assert MLP()(x).shape == (5, 10)
    cnn = Conv1dNet()
    assert cnn(x).shape == (5, 10)
    assert cnn(x.unsqueeze(1)).shape == (5, 10)  # (B, 1, 40) too
    assert torch.allclose(cnn(x), cnn(x.unsqueeze(1)))
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv1d)]
    assert len(convs) == 3 and all(c.out_channels == 32 and c.kernel_size == (5,) for c in convs)


def test_mlp_default_architecture_and_width_override() -> None:
    task = get_task("mnist1d-mlp")
    linears = [m for m in task.build_model(0).modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 256), (256, 256), (256, 10)]
    wide = task.build_model(0, hidden=2048)
    assert wide(torch.randn(2, 40)).shape == (2, 10)
    assert (
        sum(p.numel() for p in wide.parameters()) == 40 * 2048 + 2048**2 + 2048 * 10 + 2 * 2048 + 10
    )


def test_build_model_is_seeded_and_leaves_global_rng_alone() -> None:
    task = get_task("mnist1d-cnn")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a, b, c = task.build_model(1), task.build_model(1), task.build_model(2)
    assert torch.equal(torch.rand(3), expected)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_transformer_is_causal() -> None:
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=30, block_size=16, d_model=32, n_layers=2, n_heads=4).eval()
    idx = torch.randint(0, 30, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 30
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 30)
    assert torch.equal(a[:, :9], b[:, :9])  # earlier positions do not see the future
    assert not torch.allclose(a[:, 9:], b[:, 9:])  # later ones do see the change
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_transformer_uses_linear_projections_only() -> None:
    model = get_task("shakespeare-char").build_model(0, data=lm_data(), quick=True)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {"q", "k", "v", "out", "fc1", "fc2", "head"} <= names


@pytest.mark.parametrize("quick", [True, False])
def test_transformer_initial_loss_is_ln_vocab(quick: bool) -> None:
    task = get_task("shakespeare-char")
    d = lm_data()
    model = task.build_model(0, data=d, quick=quick)
    x, y = next(task.batches(d, 16, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        loss = task.loss(model(x), y).item()
    assert abs(loss - math.log(d.num_classes)) < 0.15
    res = task.evaluate(model, d, "val")
    assert abs(res["loss"] - math.log(d.num_classes)) < 0.15


def test_lm_evaluate_covers_every_token_and_restores_mode() -> None:
    task = get_task("shakespeare-char")
    d = lm_data(20_000)

    class Uniform(nn.Module):
        """Predicts uniformly; counts how many positions it is asked about."""

        def __init__(self, vocab: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))
            self.vocab = vocab
            self.seen = 0

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            assert idx.shape[1] <= 64
            self.seen += idx.numel()
            return torch.zeros(*idx.shape, self.vocab) + self.w

    model = Uniform(d.num_classes).train()
    res = task.evaluate(model, d, "test", batch_size=7)
    assert model.training  # mode restored
    assert model.seen == len(d.test_x)
    assert res["loss"] == pytest.approx(math.log(d.num_classes))


def test_classification_evaluate_restores_mode() -> None:
    task = get_task("mnist1d-mlp")
    d = task.load(quick=True)
    model = task.build_model(0, quick=True).eval()
    res = task.evaluate(model, d, "val", batch_size=33)
    assert not model.training and set(res) == {"loss", "accuracy"}
    assert 0.0 <= res["accuracy"] <= 1.0


@pytest.mark.parametrize(("name", "classes"), [("cifar10", 10), ("cifar100", 100)])
def test_resnet18_forward(name: str, classes: int) -> None:
    model = get_task(name).build_model(0)
    assert sum(p.numel() for p in model.parameters()) == 11_168_832 + 513 * classes
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert len([m for m in model.modules() if type(m).__name__ == "BasicBlock"]) == 8


def test_resnet18_quick_trains_a_step() -> None:
    model = ResNet18(num_classes=10, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
