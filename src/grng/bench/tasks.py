"""The benchmark's tasks: each one is a model factory, its data and its metric.

This module is the contract between the task definitions and the benchmark runner::

    task = get_task("mnist1d-mlp")
    data = task.load(data=None, download=False, quick=False, samples=None, seed=0)
    model = task.build_model(seed=0, data=data)
    gen = torch.Generator().manual_seed(0)
    for step, (x, y) in zip(range(n_steps), task.batches(data, task.default_batch_size, gen)):
        loss = task.loss(model(x), y)
        ...
    val = task.evaluate(model, data, "val")     # learning-rate tuning: never the test split
    test = task.evaluate(model, data, "test")   # reporting
    score = task.score(test)                    # the task's metric; compare with task.target

Splits are used consistently for every task: ``"train"`` for optimisation, ``"val"`` (carved
from the training data, or the middle 5% of the text for the LM) for tuning, ``"test"``
(the official test split, or the last 5% of the text) for the reported metric.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grng.bench import data as D
from grng.bench.models import MLP, CharTransformer, Conv1dNet, ResNet18

__all__ = [
    "TASKS",
    "CharLMTask",
    "CifarTask",
    "DataNotFoundError",
    "Mnist1dTask",
    "Split",
    "Task",
    "TaskData",
    "get_task",
]

DataNotFoundError = D.DataNotFoundError
Split = Literal["train", "val", "test"]
PathLike = str | os.PathLike[str]


@dataclass(frozen=True, eq=False)
class TaskData:
    """A task's data, split three ways; tensors on one device (CPU after :meth:`Task.load`).

    Classification: ``*_x`` are inputs (float32) and ``*_y`` int64 labels.
    Character LM: ``*_x`` is a split's token stream without its last token and ``*_y`` the
    same stream shifted by one (``y[i]`` is the character after ``x[i]``); both 1-D int64.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int  # number of classes, or the vocabulary size for the LM
    vocab: tuple[str, ...] | None = None  # LM only: the characters, id order
    info: dict[str, Any] = field(default_factory=dict)  # provenance, for the run record

    def split(self, name: Split) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; valid: 'train', 'val', 'test'")
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")

    def to(self, device: torch.device | str) -> TaskData:
        """A copy with every tensor on ``device`` (e.g. to keep a small data set on the GPU)."""
        return replace(
            self,
            **{
                f"{s}_{k}": getattr(self, f"{s}_{k}").to(device)
                for s in ("train", "val", "test")
                for k in ("x", "y")
            },
        )


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Task(ABC):
    """A benchmark task. Subclasses fill in data loading, the model and batching."""

    name: str
    metric: str  # what :meth:`score` returns, e.g. "test_accuracy"
    higher_is_better: bool
    target: float  # fixed threshold for "steps / seconds to target" on the test split
    default_batch_size: int
    description: str = ""

    # ------------------------------------------------------------------ to implement
    @abstractmethod
    def load(
        self,
        *,
        data: PathLike | None = None,
        download: bool = False,
        quick: bool = False,
        samples: int | None = None,
        seed: int = 0,
    ) -> TaskData:
        """Load (or generate) the data. ``seed`` chooses the validation split / subsets."""

    @abstractmethod
    def _make_model(self, data: TaskData | None, quick: bool, **kw: Any) -> nn.Module: ...

    @abstractmethod
    def batches(
        self, data: TaskData, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Infinite stream of training batches, on ``data``'s device, drawn from ``generator``
        (a CPU generator: the stream is the same on every device for one seed)."""

    # ------------------------------------------------------------------ shared
    def build_model(
        self, seed: int, *, data: TaskData | None = None, quick: bool = False, **kw: Any
    ) -> nn.Module:
        """A freshly initialised model, identical for equal ``seed`` and arguments.

        ``kw`` overrides the model's constructor arguments (e.g. ``hidden=2048`` for the MLP).
        The global RNG is forked, so building a model never perturbs other randomness.
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._make_model(data, quick, **kw)

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        """Mean cross-entropy (over all tokens for the LM), in nats."""
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    def score(self, results: dict[str, float]) -> float:
        """The task's metric out of an :meth:`evaluate` result."""
        return results["accuracy" if self.metric.endswith("accuracy") else "loss"]

    def reached(self, value: float) -> bool:
        """Whether a metric value meets :attr:`target`."""
        return value >= self.target if self.higher_is_better else value <= self.target

    def evaluate(
        self, model: nn.Module, data: TaskData, split: Split, batch_size: int = 1000
    ) -> dict[str, float]:
        """``{"loss", "accuracy"}`` on a whole split: no grad, eval mode, mode restored after.

        ``loss`` is the mean cross-entropy in nats (per character for the LM), ``accuracy``
        the fraction of correct top-1 predictions (next-character accuracy for the LM).
        """
        was_training = model.training
        model.eval()
        device = _model_device(model)
        total_loss, correct, count = 0.0, 0, 0
        try:
            with torch.no_grad():
                for x, y in self._eval_chunks(data, split, batch_size):
                    x, y = x.to(device), y.to(device)
                    logits = model(x)
                    logits = logits.reshape(-1, logits.shape[-1]).float()
                    y = y.reshape(-1)
                    total_loss += F.cross_entropy(logits, y, reduction="sum").item()
                    correct += int((logits.argmax(-1) == y).sum().item())
                    count += y.numel()
        finally:
            model.train(was_training)
        if count == 0:
            raise ValueError(f"split {split!r} is empty")
        return {"loss": total_loss / count, "accuracy": correct / count}

    def _eval_chunks(
        self, data: TaskData, split: Split, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = data.split(split)
        for i in range(0, len(y), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]


def _epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Index batches sampled without replacement, reshuffled every epoch; the incomplete
    last batch of an epoch is dropped so every step sees exactly ``batch_size`` examples."""
    if n <= 0:
        raise ValueError("no training examples")
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


# --------------------------------------------------------------------------- MNIST-1D


@dataclass(frozen=True)
class Mnist1dTask(Task):
    """MNIST-1D (generated locally) with an MLP or a Conv1d network."""

    arch: Literal["mlp", "cnn"] = "mlp"

    def load(
        self,
        *,
        data: PathLike | None = None,
        download: bool = False,
        quick: bool = False,
        samples: int | None = None,
        seed: int = 0,
    ) -> TaskData:
        """``samples`` examples in total (default 5000, quick 1000): 80% train / 20% test as
        the mnist1d package splits them, then 10% of train held out (seeded) for validation.
        ``data`` and ``download`` are ignored: the data is always generated locally."""
        n = samples if samples is not None else (1000 if quick else 5000)
        a = D.load_mnist1d(num_samples=n, seed=seed)
        return TaskData(
            a.train_x, a.train_y, a.val_x, a.val_y, a.test_x, a.test_y,
            num_classes=10,
            info={"source": "mnist1d.make_dataset", "num_samples": n, "seed": seed},
        )  # fmt: skip

    def _make_model(self, data: TaskData | None, quick: bool, **kw: Any) -> nn.Module:
        if self.arch == "mlp":
            return MLP(**{"hidden": 64 if quick else 256, **kw})
        return Conv1dNet(**{"channels": 8 if quick else 32, **kw})

    def batches(
        self, data: TaskData, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        x, y = data.train_x, data.train_y
        for idx in _epoch_batches(len(y), batch_size, generator):
            idx = idx.to(x.device)
            yield x[idx], y[idx]


# --------------------------------------------------------------------------- char LM


@dataclass(frozen=True)
class CharLMTask(Task):
    """Character-level language modelling of Tiny Shakespeare with a small transformer."""

    block_size: int = 64

    def load(
        self,
        *,
        data: PathLike | None = None,
        download: bool = False,
        quick: bool = False,
        samples: int | None = None,
        seed: int = 0,
    ) -> TaskData:
        """Text from ``data`` / ``shared/data`` / cache / download (see
        :func:`grng.bench.data.resolve_text_path`), split 90/5/5 by position.

        ``samples`` keeps only the first that many characters (quick: 100,000). The
        vocabulary is built from the characters kept. ``seed`` is unused (splits are
        positional); batches draw their windows from the generator given to :meth:`batches`.
        """
        path = D.resolve_text_path(data, download)
        text = path.read_text(encoding="utf-8")
        return self.from_text(text, quick=quick, samples=samples, source=str(path))

    def from_text(
        self, text: str, *, quick: bool = False, samples: int | None = None, source: str = ""
    ) -> TaskData:
        """Build the task's data from a string (e.g. :func:`grng.bench.data.synthetic_text`)."""
        limit = samples if samples is not None else (100_000 if quick else None)
        if limit is not None:
            text = text[:limit]
        vocab = D.CharVocab.from_text(text)
        parts = D.split_tokens(vocab.encode(text))
        for name, part in zip(("train", "val", "test"), parts, strict=True):
            if len(part) < self.block_size + 1:
                raise ValueError(
                    f"text too short: the {name} split has {len(part)} characters, needs "
                    f"at least block_size + 1 = {self.block_size + 1}"
                )
        tr, va, te = parts
        return TaskData(
            tr[:-1], tr[1:], va[:-1], va[1:], te[:-1], te[1:],
            num_classes=len(vocab),
            vocab=vocab.chars,
            info={"source": source, "num_chars": len(text), "block_size": self.block_size},
        )  # fmt: skip

    def _make_model(self, data: TaskData | None, quick: bool, **kw: Any) -> nn.Module:
        if data is None:
            raise ValueError(f"{self.name}: build_model needs data= (for the vocabulary size)")
        if kw.get("block_size", self.block_size) != self.block_size:
            raise ValueError(f"{self.name}: block_size is fixed at {self.block_size}")
        kw.pop("block_size", None)
        size = (
            {"d_model": 32, "n_layers": 1, "n_heads": 2}
            if quick
            else {"d_model": 128, "n_layers": 4, "n_heads": 4}
        )
        return CharTransformer(data.num_classes, block_size=self.block_size, **{**size, **kw})

    def batches(
        self, data: TaskData, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Random windows of ``block_size`` characters: ``(B, T)`` inputs and targets."""
        x, y = data.train_x, data.train_y
        offsets = torch.arange(self.block_size)
        n_starts = len(x) - self.block_size + 1
        while True:
            starts = torch.randint(0, n_starts, (batch_size,), generator=generator)
            idx = (starts[:, None] + offsets).to(x.device)
            yield x[idx], y[idx]

    def _eval_chunks(
        self, data: TaskData, split: Split, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        # Non-overlapping windows covering every position of the split once, so the loss is
        # the exact mean over the split's characters (each predicted from up to block_size
        # characters of context within its window). batch_size counts windows here.
        x, y = data.split(split)
        t = self.block_size
        n_full = len(x) // t
        xw, yw = x[: n_full * t].view(n_full, t), y[: n_full * t].view(n_full, t)
        for i in range(0, n_full, batch_size):
            yield xw[i : i + batch_size], yw[i : i + batch_size]
        if len(x) > n_full * t:
            yield x[n_full * t :].unsqueeze(0), y[n_full * t :].unsqueeze(0)


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class CifarTask(Task):
    """CIFAR-10/100 with a from-scratch CIFAR ResNet-18, crop+flip augmentation."""

    variant: D.CifarVariant = "cifar10"
    val_fraction: float = 0.1

    def load(
        self,
        *,
        data: PathLike | None = None,
        download: bool = False,
        quick: bool = False,
        samples: int | None = None,
        seed: int = 0,
    ) -> TaskData:
        """Read the official tarball (see :func:`grng.bench.data.resolve_cifar_path`).

        ``samples`` keeps a seeded random subset of that many training images (quick: 2,000,
        and the first 1,000 test images), before 10% of them are held out (seeded) for
        validation. Images are normalised with the per-channel mean/std of the official
        training set (all of it, so the statistics do not depend on ``seed``).
        """
        arrays = D.load_cifar(self.variant, data, download)
        mean, std = D.channel_stats(arrays.train_x)
        gen = torch.Generator().manual_seed(seed)
        train_x, train_y = arrays.train_x, arrays.train_y
        test_x, test_y = arrays.test_x, arrays.test_y
        n_keep = samples if samples is not None else (2000 if quick else None)
        if n_keep is not None and n_keep < len(train_y):
            keep = torch.randperm(len(train_y), generator=gen)[:n_keep]
            train_x, train_y = train_x[keep], train_y[keep]
        if quick:
            test_x, test_y = test_x[:1000], test_y[:1000]
        perm = torch.randperm(len(train_y), generator=gen)
        n_val = max(1, round(len(train_y) * self.val_fraction))
        val_idx, tr_idx = perm[:n_val], perm[n_val:]

        def norm(x: Tensor) -> Tensor:
            return D.normalize_images(x, mean, std)

        return TaskData(
            norm(train_x[tr_idx]), train_y[tr_idx],
            norm(train_x[val_idx]), train_y[val_idx],
            norm(test_x), test_y,
            num_classes=D.CIFAR_SPECS[self.variant].num_classes,
            info={"variant": self.variant, "mean": mean.tolist(), "std": std.tolist(),
                  "seed": seed},
        )  # fmt: skip

    def _make_model(self, data: TaskData | None, quick: bool, **kw: Any) -> nn.Module:
        num_classes = D.CIFAR_SPECS[self.variant].num_classes
        return ResNet18(**{"num_classes": num_classes, "width": 16 if quick else 64, **kw})

    def batches(
        self, data: TaskData, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled epochs of augmented images (random 4-pixel-padded crop, horizontal flip)."""
        x, y = data.train_x, data.train_y
        for idx in _epoch_batches(len(y), batch_size, generator):
            idx = idx.to(x.device)
            yield D.augment_cifar_batch(x[idx], generator), y[idx]


# --------------------------------------------------------------------------- registry

_LN_NOTE = "nats/char on the held-out last 5% of the text"

# Targets (on the test split), fixed so that "steps / seconds to target" is comparable
# across optimizers and runs. Chosen to be reachable by a well-tuned baseline at the
# default sizes, well before it plateaus:
# * mnist1d-mlp 0.60: Adam (lr 1e-3 / 3e-3, batch 128) reaches 0.62-0.65 test accuracy
#   within 1000 steps and then overfits; 0.60 is reached by any reasonable optimizer.
# * mnist1d-cnn 0.85: Adam reaches 0.85 (lr 1e-3) / 0.91 (lr 3e-3) within 1000 steps and
#   plateaus at 0.89-0.91.
# * shakespeare-char 1.80 nats/char: AdamW (lr 2e-3, batch 64) gives test loss 1.96 / 1.78
#   / 1.72 / 1.71 after 500 / 1000 / 1500 / 2000 steps (the test split, the end of the
#   text, is harder than val: 1.56 at 2000 steps); 1.80 takes ~1000 steps, a CPU-sized run.
# * cifar10 0.90 / cifar100 0.65: not measured here (no GPU); from the literature, where a
#   CIFAR ResNet-18 with crop+flip reaches ~0.95 / ~0.77 after full training and passes
#   0.90 / 0.65 after a few tens of epochs with SGD + momentum.

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Mnist1dTask(
            name="mnist1d-mlp",
            metric="test_accuracy",
            higher_is_better=True,
            target=0.60,
            default_batch_size=128,
            description="MNIST-1D (5000 samples), MLP 40-256-256-10",
            arch="mlp",
        ),
        Mnist1dTask(
            name="mnist1d-cnn",
            metric="test_accuracy",
            higher_is_better=True,
            target=0.85,
            default_batch_size=128,
            description="MNIST-1D (5000 samples), 3×Conv1d(32, k5) + Linear",
            arch="cnn",
        ),
        CharLMTask(
            name="shakespeare-char",
            metric="test_loss",
            higher_is_better=False,
            target=1.80,
            default_batch_size=64,
            description=f"Tiny Shakespeare char LM, 4-layer d128 transformer; loss in {_LN_NOTE}",
            block_size=64,
        ),
        CifarTask(
            name="cifar10",
            metric="test_accuracy",
            higher_is_better=True,
            target=0.90,
            default_batch_size=128,
            description="CIFAR-10, ResNet-18, crop+flip augmentation",
            variant="cifar10",
        ),
        CifarTask(
            name="cifar100",
            metric="test_accuracy",
            higher_is_better=True,
            target=0.65,
            default_batch_size=128,
            description="CIFAR-100, ResNet-18, crop+flip augmentation",
            variant="cifar100",
        ),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


# ln(vocab) is the loss of a uniform predictor; exposed for tests and sanity checks.
def uniform_loss(vocab_size: int) -> float:
    """Cross-entropy (nats) of the uniform distribution over ``vocab_size`` symbols."""
    return math.log(vocab_size)
