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
from the training data, or the middle 5% of the text for the LM, or SST-2's dev phrases) for
tuning, ``"test"`` (the official test split, the last 5% of the text, or for SST-2 GLUE's
872 labelled validation sentences) for the reported metric.

:data:`SUITES` names presets (tasks with the protocol sized for them) that ``grng bench
--suite NAME`` runs, one results folder per task.
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
from grng.bench.models import (
    MLP,
    CharTransformer,
    Conv1dNet,
    ResNet18,
    minilm_classifier,
    minilm_tokenizer,
)

__all__ = [
    "SUITES",
    "TASKS",
    "CharLMTask",
    "CifarTask",
    "DataNotFoundError",
    "Mnist1dTask",
    "SentenceClassificationTask",
    "Split",
    "SuiteEntry",
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
    #: ``(optimizer, lr)`` pairs: the centre of that optimizer's tuning grid on this task
    #: when it differs from the optimizer's default (e.g. fine-tuning rates for AdamW).
    lr_centres: tuple[tuple[str, float], ...] = ()

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

    def lr_centre(self, optimizer: str, default: float) -> float:
        """Centre of ``optimizer``'s learning-rate grid on this task: its entry in
        :attr:`lr_centres`, else ``default`` (the optimizer's own default rate)."""
        return dict(self.lr_centres).get(optimizer, default)

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


# --------------------------------------------------------------------------- SST-2


def _trim(ids: Tensor, pad_id: int) -> Tensor:
    """Drop the columns that are padding in every row (dynamic padding)."""
    length = int((ids != pad_id).sum(1).max()) if len(ids) else 1
    return ids[:, : max(length, 1)]


@dataclass(frozen=True)
class SentenceClassificationTask(Task):
    """SST-2 sentiment classification by fine-tuning the pretrained all-MiniLM-L6-v2.

    Inputs are ``(N, max_length)`` int64 token ids right-padded with the tokenizer's pad id
    (0); batches are cut to their longest sentence (dynamic padding). The word embedding
    is frozen (see :func:`grng.bench.models.minilm_classifier`); dropout is off.
    """

    max_length: int = 64
    #: Quick runs: the first pretrained layer only, sentences cut to 16 tokens, and this
    #: many train / dev / test sentences.
    quick_layers: int = 1
    quick_max_length: int = 16
    quick_train: int = 2000
    quick_dev: int = 200
    quick_test: int = 200
    pad_id: int = 0

    def load(
        self,
        *,
        data: PathLike | None = None,
        download: bool = False,
        quick: bool = False,
        samples: int | None = None,
        seed: int = 0,
    ) -> TaskData:
        """SST-2 from ``data`` / ``shared/data/sst2`` / cache / download (see
        :func:`grng.bench.data.resolve_sst2_dir`): ``train.tsv`` for training, ``dev.tsv``
        as the validation split (tuning), ``test.tsv`` as the test split, tokenised with
        MiniLM's WordPiece tokenizer and truncated to ``max_length`` tokens ([CLS] and
        [SEP] included; 64 keeps every sentence whole but 4 of the 60,614 training
        phrases).

        ``samples`` keeps a seeded random subset of that many training phrases. Quick:
        2,000 training phrases, and seeded subsets of 200 dev phrases and 200 test
        sentences, all cut to ``quick_max_length`` (16) tokens, for a one-layer model
        (smoke tests only). The validation and test rows are stored sorted by length
        (cheaper evaluation; the order does not change a metric).
        """
        folder, splits = D.load_sst2(data, download)
        tokenizer = minilm_tokenizer()
        if tokenizer.pad_token_id != self.pad_id:
            raise ValueError(
                f"tokenizer pads with {tokenizer.pad_token_id}, expected {self.pad_id}"
            )
        gen = torch.Generator().manual_seed(seed)
        cap = self.quick_max_length if quick else self.max_length

        def subset(n: int, keep: int | None) -> list[int]:
            if keep is None or keep >= n:
                return list(range(n))
            return sorted(torch.randperm(n, generator=gen)[:keep].tolist())

        n_train = samples if samples is not None else (self.quick_train if quick else None)
        picks = {
            "train": subset(len(splits["train"]), n_train),
            "dev": subset(len(splits["dev"]), self.quick_dev if quick else None),
            "test": subset(len(splits["test"]), self.quick_test if quick else None),
        }
        tensors: dict[str, tuple[Tensor, Tensor]] = {}
        truncated: dict[str, int] = {}
        for name, rows in picks.items():
            part = splits[name]
            enc = tokenizer([part.sentences[i] for i in rows], truncation=False)["input_ids"]
            truncated[name] = sum(len(e) > cap for e in enc)
            ids = torch.full((len(rows), cap), self.pad_id, dtype=torch.int64)
            for r, e in enumerate(enc):
                if len(e) > cap:  # keep the final [SEP]
                    e = [*e[: cap - 1], e[-1]]
                ids[r, : len(e)] = torch.tensor(e, dtype=torch.int64)
            labels = torch.tensor([part.labels[i] for i in rows], dtype=torch.int64)
            if name != "train":
                order = torch.argsort((ids != self.pad_id).sum(1), stable=True)
                ids, labels = ids[order], labels[order]
            tensors[name] = (ids, labels)
        (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = tensors["train"], tensors["dev"], tensors["test"]
        return TaskData(
            tr_x, tr_y, va_x, va_y, te_x, te_y,
            num_classes=2,
            info={"source": str(folder), "sizes": {k: len(v) for k, v in picks.items()},
                  "max_length": cap, "truncated": truncated, "seed": seed},
        )  # fmt: skip

    def _make_model(self, data: TaskData | None, quick: bool, **kw: Any) -> nn.Module:
        return minilm_classifier(**{"layers": self.quick_layers if quick else None, **kw})

    def batches(
        self, data: TaskData, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Shuffled epochs of phrases, each batch cut to its longest phrase."""
        x, y = data.train_x, data.train_y
        for idx in _epoch_batches(len(y), batch_size, generator):
            idx = idx.to(x.device)
            yield _trim(x[idx], self.pad_id), y[idx]

    def evaluate(
        self, model: nn.Module, data: TaskData, split: Split, batch_size: int = 256
    ) -> dict[str, float]:
        """As :meth:`Task.evaluate`, in chunks of 256 phrases (each cut to its longest)."""
        return super().evaluate(model, data, split, batch_size)

    def _eval_chunks(
        self, data: TaskData, split: Split, batch_size: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in super()._eval_chunks(data, split, batch_size):
            yield _trim(x, self.pad_id), y


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
# * sst2-minilm 0.80: AdamW (lr 3e-5, batch 32, a 300-step run) reaches test accuracy
#   0.807 / 0.822 / 0.822 after 100 / 200 / 300 steps, RING at its default 0.786 / 0.818 /
#   0.852; 0.80 takes 100-200 steps.
# * cifar10 0.90 / cifar100 0.65: not measured here (no GPU); from the literature, where a
#   CIFAR ResNet-18 with crop+flip reaches ~0.95 / ~0.77 after full training and passes
#   0.90 / 0.65 after a few tens of epochs with SGD + momentum.

SST2_DESCRIPTION = (
    "SST-2 (GLUE; test = its 872 validation sentences), fine-tuning pretrained "
    "all-MiniLM-L6-v2 (6 layers, d384) with the word embedding frozen"
)

# Fine-tuning a pretrained encoder wants far smaller first-order rates than training from
# scratch: AdamW's grid is centred on 3e-5 (BERT's {2, 3, 5}e-5; the 3-point grid spans
# 1e-5..1e-4), and the other first-order baselines' centres are scaled by the same ≈1/30
# (SGD and SAM 0.1 → 3e-3, SophiaG 3e-4 → 1e-5, SOAP 3e-3 → 1e-4). The GRNG methods keep
# their own defaults, chosen across tasks that include a BERT classifier (docs/tuning.md).
SST2_LR_CENTRES = (("sgd", 3e-3), ("adamw", 3e-5), ("sophia", 1e-5), ("sam", 3e-3),
                   ("soap", 1e-4))  # fmt: skip

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
        SentenceClassificationTask(
            name="sst2-minilm",
            metric="test_accuracy",
            higher_is_better=True,
            target=0.80,
            default_batch_size=32,
            description=SST2_DESCRIPTION,
            lr_centres=SST2_LR_CENTRES,
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


@dataclass(frozen=True)
class SuiteEntry:
    """One task of a suite preset and the protocol sized for it (``grng bench --suite``);
    every field but ``task`` fills the ``grng bench`` option of the same name unless the
    command line gives it. ``None``: the option's own default."""

    task: str
    steps: int
    tune_steps: int
    lr_grid: int
    seeds: int
    eval_every: int = 50
    hessian_iters: int = 20
    hessian_batch: int = 512
    batch_size: int | None = None
    timing_rounds: int | None = None


#: ``grng bench --suite NAME``: each entry runs as its own suite in ``OUT/<task>/``.
#:
#: ``language`` is sized from step times measured on the reference machine (2-core AMD EPYC
#: VM, 1 thread, CPU time per step; docs/benchmark.md has the table and the estimates):
#:
#: * sst2-minilm: one step of all ten optimizers together takes 18.5 s (AdamW 0.95 s at
#:   batch 32, ~44 tokens after dynamic padding), an evaluation of the 6,735 dev phrases
#:   24 s and of the 872 test sentences 7 s, λmax(H) (10 power iterations on 64 phrases)
#:   42 s. 200 steps (tuning 100) on a 3-point grid and 2 seeds: 700 steps per optimizer,
#:   about 4.6 h in all (steps 3.6 h, evaluations 0.5 h, λmax 0.25 h, timing 0.3 h).
#: * shakespeare-char: the full 4-layer d128 model at batch 64×64 tokens: 4.2 s per step
#:   of all ten (AdamW 0.29 s, RENG 1.1 s). 2000 steps (tuning 500) on a 3-point grid and 2
#:   seeds: 5,500 steps per optimizer, about 7 h.
SUITES: dict[str, tuple[SuiteEntry, ...]] = {
    "language": (
        SuiteEntry(
            "sst2-minilm",
            steps=200,
            tune_steps=100,
            lr_grid=3,
            seeds=2,
            eval_every=100,
            hessian_iters=10,
            hessian_batch=64,
            timing_rounds=50,
        ),
        SuiteEntry(
            "shakespeare-char",
            steps=2000,
            tune_steps=500,
            lr_grid=3,
            seeds=2,
            eval_every=100,
            hessian_iters=20,
            hessian_batch=128,
        ),
    ),
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
