"""``grng bench overhead``: what each optimizer's step costs, relative to AdamW's.

For every model (the mnist1d MLP 40-256-256-10 at batch 128 and 512, the 4-layer d128
char transformer at 64×64 tokens, a 6-layer hidden-384 BERT-like encoder at 32×64
tokens) every optimizer gets its own copy of the model (same initial weights, seed 0) and
all of them are timed **interleaved**: each round runs one step of every optimizer, in
an order shuffled every round (:func:`grng.bench.runner.round_robin`), so that a
change in the machine's load hits all of them alike. A step is what a training loop
pays: ``zero_grad``, forward, backward (RENG's exact mode: ``optimizer.backward(loss)``,
its finite-difference mode: a closure evaluated twice), and the optimizer's step.

Reported per model and optimizer, against torch's AdamW in the same rounds:

* the median step time (a typical step) and the mean (every capture and refresh step
  included: the number of timed rounds is rounded up to a multiple of every optimizer's
  refresh periods, e.g. 10 and 50, so the mean holds each periodic step in proportion);
* the peak memory: the high-water mark of the bytes torch allocates while a fresh model's
  optimizer is built and takes ``memory_steps`` steps (more when an optimizer's first
  periodic refresh comes later), from the profiler's per-op allocation records on a
  CPU (the CUDA allocator's peak on a GPU): optimizer state, activations, graphs and the
  step's temporaries; the parameters, allocated before, are not counted;
* the floor: the bare preconditioning products for the model's Kronecker blocks (the
  shapes ``grng.KFAC`` finds), timed in the same rounds with plain tensor ops: the
  K-FAC form ``G⁻¹ V A⁻¹`` (two products per block) and RING's eigenbasis form
  ``Q_G ((Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + γ)) Q_Aᵀ`` (four products and an elementwise
  division); a diagonal side is an elementwise product. Its ratio is
  ``(SGD step + floor) / AdamW step``: what an optimizer that did nothing but these
  products on top of SGD's step would cost. SGD's step, not AdamW's, is the base: a
  K-FAC-form update (grng's, ASDL's) is momentum SGD on the preconditioned gradient, and
  SGD's step is AdamW's minus Adam's moment updates (0.84× AdamW's on the MLP at batch
  128, so an AdamW base overstated that floor by 0.16).

Optimizers (:data:`CONTENDERS`): grng's KFAC, RING, RENG (exact and finite differences)
and R-Kalman, SGD, AdamW and SophiaG as the benchmark builds them, and the peers ASDL's
K-FAC and SINGD (the ``peers`` extra; both precondition ``nn.Linear`` and ``nn.Conv2d``
only) and pytorch_optimizer's Shampoo, all at their defaults. A peer that is not
installed is skipped with a note naming its pip command; kfac-pytorch, which is not on
the package index, is listed as unavailable.

Results: ``OUT/config.json`` (commit, date, machine, settings, package versions) first,
then ``OUT/overhead.md`` (tables and notes) and ``OUT/overhead.csv`` (one row per model
and optimizer), rewritten as each model finishes. :func:`profile_step` prints the ops
(and, with Python tracing, the Python functions) that cost one optimizer's step the most.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

import grng
from grng.bench.models import MLP, BertLikeEncoder, CharTransformer, Conv1dNet
from grng.bench.optimizers import (
    OPTIMIZERS,
    SOPHIA_HESSIAN_INTERVAL,
    OptimizerSpec,
    reng_step,
    standard_step,
)
from grng.bench.report import write_csv
from grng.bench.runner import git_commit, round_robin
from grng.bench.tasks import get_task

__all__ = [
    "CONTENDERS",
    "DEFAULT_OPTIMIZERS",
    "DESCRIPTION",
    "Contender",
    "ModelConfig",
    "add_arguments",
    "check_names",
    "extra_models",
    "main",
    "model_configs",
    "profile_step",
    "run",
]

#: ``Task.loss`` (mean cross-entropy over the last dimension) is the same for every task.
_LOSS = get_task("mnist1d-mlp")

#: The periods the peers are given: statistics every 10 steps, inverses (roots) every 50,
#: GRNG's defaults, so that every K-FAC-like method amortises the same way.
PEER_FACTORS_EVERY, PEER_INVERSE_EVERY = 10, 50
#: Shampoo (pytorch_optimizer) keeps a parameter whose longest side exceeds this on
#: AdamW (BERT's 30522-row token embedding: a 30522² statistic), like grng's
#: ``max_factor_dim``.
SHAMPOO_MAX_DIM = 4096
#: Damping γ of the RING-form floor (any positive value costs the same).
FLOOR_DAMPING = 1.0


Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ModelConfig:
    """One measured model: ``build()`` (seeded by the caller) and ``batch(generator)``."""

    name: str  # the --models name and the CSV's model column
    label: str  # the table's row
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], Batch]


def model_configs(widths: Sequence[int] = (256,), quick: bool = False) -> list[ModelConfig]:
    """The measured models: for every MLP hidden width ``w`` the mnist1d MLP 40-w-w-10 at
    batch 128 and 512, the char transformer (4 layers, d128, vocabulary 65) at 64
    sequences of 64 tokens, and the BERT-like encoder at 32 sequences of 64 tokens.
    ``quick``: tiny versions (width 16 at batch 16 and 32, one layer of width 32, 4
    sequences of 16 tokens), for smoke tests."""

    def classification(batch: int) -> Callable[[torch.Generator], Batch]:
        return lambda g: (torch.randn(batch, 40, generator=g), torch.randint(0, 10, (batch,), generator=g))  # fmt: skip

    def tokens(vocab: int, batch: int, length: int, classes: int | None) -> Callable[[torch.Generator], Batch]:  # fmt: skip
        def draw(g: torch.Generator) -> Batch:
            x = torch.randint(0, vocab, (batch, length), generator=g)
            shape = (batch, length) if classes is None else (batch,)
            return x, torch.randint(0, classes or vocab, shape, generator=g)

        return draw

    def mlp(width: int) -> Callable[[], nn.Module]:
        return lambda: MLP(hidden=width)

    out: list[ModelConfig] = []
    for w in [16] if quick else widths:
        for batch in (16, 32) if quick else (128, 512):
            out.append(ModelConfig(
                f"mlp{w}-b{batch}", f"MLP 40-{w}-{w}-10, batch {batch}",
                mlp(w), classification(batch),
            ))  # fmt: skip
    if quick:
        out.append(ModelConfig(
            "char-transformer", "char transformer 1×d32, 4×16 tokens",
            lambda: CharTransformer(65, block_size=16, d_model=32, n_layers=1, n_heads=2),
            tokens(65, 4, 16, None),
        ))  # fmt: skip
        out.append(ModelConfig(
            "bert-like", "BERT-like encoder 1×d32, 4×16 tokens",
            lambda: BertLikeEncoder(100, hidden=32, n_layers=1, n_heads=2, intermediate=64,
                                    max_positions=16),
            tokens(100, 4, 16, 2),
        ))  # fmt: skip
    else:
        out.append(ModelConfig(
            "char-transformer", "char transformer 4×d128, 64×64 tokens",
            lambda: CharTransformer(65, block_size=64, d_model=128, n_layers=4, n_heads=4),
            tokens(65, 64, 64, None),
        ))  # fmt: skip
        out.append(ModelConfig(
            "bert-like", "BERT-like encoder 6×d384, 32×64 tokens",
            lambda: BertLikeEncoder(max_positions=64), tokens(30522, 32, 64, 2),
        ))  # fmt: skip
    return out


def extra_models(quick: bool = False) -> list[ModelConfig]:
    """Models measured only when ``--models`` names them: the mnist1d Conv1d net (3
    convolutions of 32 channels, kernel 5, and a Linear head; ``quick``: 8 channels) at
    batch 128 (quick 16), the README's second overhead model."""
    batch = 16 if quick else 128
    return [ModelConfig(
        f"conv1d-b{batch}", f"Conv1d net 3×{8 if quick else 32}ch k5, batch {batch}",
        lambda: Conv1dNet(channels=8 if quick else 32),
        lambda g: (torch.randn(batch, 40, generator=g), torch.randint(0, 10, (batch,), generator=g)),
    )]  # fmt: skip


# --------------------------------------------------------------------------- contenders

Step = Callable[[Tensor, Tensor], object]


@dataclass
class Built:
    """A contender made ready on one model: ``step(x, y)`` takes one training step."""

    step: Step
    #: Every period (in steps) of the contender's periodic work (statistics, inverses).
    periods: tuple[int, ...] = ()
    #: 0-based step by which every kind of periodic work has run once (memory window).
    first_cycle: int = 0


@dataclass(frozen=True)
class Contender:
    """One column of the tables: how to build it on a model, or why it cannot run."""

    name: str
    label: str
    build: Callable[[nn.Module, Batch], Built] | None
    kind: str = "optimizer"  # "optimizer", "peer", "floor"
    #: ``(module, pip command)``: the import that must work, and what installs it.
    requires: tuple[str, str] | None = None
    #: Why it is never measured (not installable here), else None.
    unavailable: str | None = None
    note: str = ""

    def missing(self) -> str | None:
        """Why this contender is skipped here (one line), or None when it can run."""
        if self.unavailable is not None:
            return self.unavailable
        if self.requires is not None:
            module, pip = self.requires
            try:
                importlib.import_module(module)
            except ImportError:
                return f"not installed: {pip} (or pip install -e '.[peers]')"
        return None


def _periods(optimizer: Optimizer) -> tuple[int, ...]:
    options = getattr(optimizer, "options", None)  # the grng optimizers' CurvatureOptions
    periods = [getattr(options, k, 0) for k in ("factor_update_freq", "inverse_update_freq")]
    periods.append(int(optimizer.defaults.get("precondition_frequency", 0)))  # SOAP
    return tuple(p for p in periods if p > 1)


def _from_spec(spec: OptimizerSpec) -> Callable[[nn.Module, Batch], Built]:
    """A bench registry optimizer at its default rate, stepped with its ``train_step``."""

    def build(model: nn.Module, batch: Batch) -> Built:
        optimizer = spec.factory(model, spec.default_lr)

        def step(x: Tensor, y: Tensor) -> None:
            spec.train_step(model, optimizer, _LOSS, x, y)

        if spec.name == "sophia":  # its Hessian estimate on every 10th call (9, 19, ...)
            return Built(step, (SOPHIA_HESSIAN_INTERVAL,), SOPHIA_HESSIAN_INTERVAL - 1)
        # grng: the first step captures statistics and computes the inverses.
        return Built(step, _periods(optimizer), 0)

    return build


def _grng_variant(
    cls: str, options: dict[str, Any], train_step: Any = standard_step
) -> Callable[[nn.Module, Batch], Built]:
    def factory(model: nn.Module, lr: float) -> Optimizer:
        return cast(Optimizer, getattr(grng, cls)(model, lr=lr, **options))

    lr = OPTIMIZERS[cls.lower()].default_lr if cls.lower() in OPTIMIZERS else 0.1
    return _from_spec(OptimizerSpec(cls.lower(), factory, lr, train_step))


def _cross_entropy(output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """``F.cross_entropy`` over the last dimension (ASDL calls it with ``reduction``)."""
    return F.cross_entropy(
        output.reshape(-1, output.shape[-1]), target.reshape(-1), reduction=reduction
    )


def _linear_params(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(parameters of nn.Linear / nn.Conv2d modules, every other trainable parameter)."""
    inside: list[Tensor] = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              for p in m.parameters(recurse=False) if p.requires_grad]  # fmt: skip
    ids = {id(p) for p in inside}
    return inside, [p for p in model.parameters() if p.requires_grad and id(p) not in ids]


class _NoNvtx:
    """``torch.cuda.nvtx`` for a CPU-only torch build: ranges that mark nothing."""

    @staticmethod
    def range(*args: Any, **kwargs: Any) -> contextlib.nullcontext[None]:
        return contextlib.nullcontext()


def _nvtx_noop_without_cuda() -> None:
    """ASDL wraps every inverse update in a ``torch.cuda.nvtx`` range (a profiler
    annotation), which raises on a CPU-only torch build; there it gets ranges that mark
    nothing, which is what an nvtx range costs with no profiler attached."""
    import asdl.precondition.natural_gradient as natural_gradient

    try:
        with torch.cuda.nvtx.range("grng-probe"):
            pass
    except RuntimeError:
        natural_gradient.nvtx = _NoNvtx


#: ASDL's damping: K-FAC's default damping (0.1). At 1e-3 ASDL's own inverse update
#: raised (Cholesky: not positive definite) at its first refresh after step 0 on the
#: mnist1d MLP, alone in its process as well as interleaved.
ASDL_DAMPING = 0.1
#: ASDL's SGD rate. At 0.01 its K-FAC (which has no KL clip) diverged on the char
#: transformer within 80 steps (loss 4.1 → 980 → NaN), and its Cholesky then raised on the
#: NaN factors at the next inverse update (step 100); at 1e-3 it stays finite there. The
#: rate does not change what a step costs as long as it stays finite.
ASDL_LR = 1e-3


def _asdl_kfac(model: nn.Module, batch: Batch) -> Built:
    """ASDL's ``KfacGradientMaker`` (empirical Fisher, factor EMA 0.05 every 10 steps,
    inverses every 50) on nn.Linear / nn.Conv2d only, feeding SGD (momentum 0.9), its
    documented loop: ``setup_model_call``, ``setup_loss_call``, ``forward_and_backward``."""
    from asdl.precondition import KfacGradientMaker, PreconditioningConfig

    _nvtx_noop_without_cuda()
    config = PreconditioningConfig(
        data_size=len(batch[0]),
        damping=ASDL_DAMPING,
        curvature_upd_interval=PEER_FACTORS_EVERY,
        preconditioner_upd_interval=PEER_INVERSE_EVERY,
        ema_decay=1 - 0.95,
        ignore_modules=[nn.Embedding, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d],
    )
    maker = KfacGradientMaker(model, config, fisher_type="fisher_emp")
    optimizer = torch.optim.SGD(model.parameters(), lr=ASDL_LR, momentum=0.9)

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        dummy = maker.setup_model_call(model, x)
        maker.setup_loss_call(_cross_entropy, dummy, y)
        maker.forward_and_backward()
        optimizer.step()

    return Built(step, (PEER_FACTORS_EVERY, PEER_INVERSE_EVERY), 0)


def _singd(model: nn.Module, batch: Batch) -> Built:
    """SINGD (dense structures, its defaults: preconditioner update every T = 10 steps) on
    nn.Linear / nn.Conv2d, AdamW on the other parameters."""
    from singd.optim.optimizer import SINGD

    inside, rest = _linear_params(model)
    loss_average = "batch+sequence" if batch[1].dim() > 1 else "batch"
    singd = SINGD(model, params=inside, lr=1e-3, loss_average=loss_average,
                  warn_unsupported=False)  # fmt: skip
    others = [singd] + ([torch.optim.AdamW(rest, lr=1e-3)] if rest else [])

    def step(x: Tensor, y: Tensor) -> None:
        for o in others:
            o.zero_grad(set_to_none=True)
        _LOSS.loss(model(x), y).backward()
        for o in others:
            o.step()

    return Built(step, (int(singd.defaults["T"]),), 0)


def _shampoo(model: nn.Module, batch: Batch) -> Built:
    """pytorch_optimizer's ``Shampoo`` (inverse roots every 50 steps, statistics every
    step) on every parameter with no side longer than :data:`SHAMPOO_MAX_DIM`, AdamW on
    the others."""
    from pytorch_optimizer import Shampoo

    params = [p for p in model.parameters() if p.requires_grad]
    small = [p for p in params if max(p.shape) <= SHAMPOO_MAX_DIM]
    large = [p for p in params if max(p.shape) > SHAMPOO_MAX_DIM]
    optimizers: list[Optimizer] = [
        Shampoo(small, lr=1e-3, preconditioning_compute_steps=PEER_INVERSE_EVERY)
    ]
    if large:
        optimizers.append(torch.optim.AdamW(large, lr=1e-3))

    def step(x: Tensor, y: Tensor) -> None:
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        _LOSS.loss(model(x), y).backward()
        for o in optimizers:
            o.step()

    # Its step counter starts at 1: the first root is computed on the 50th step.
    return Built(step, (PEER_INVERSE_EVERY,), PEER_INVERSE_EVERY - 1)


@dataclass
class _Block:
    g: int  # gradient side (rows of V)
    a: int  # activation side (columns of V)
    g_diagonal: bool
    a_diagonal: bool


def _kronecker_blocks(model: nn.Module) -> list[_Block]:
    """The Kronecker blocks ``grng.KFAC`` builds for ``model`` at its defaults (sides wider
    than its ``max_factor_dim`` kept diagonal), read from a throw-away copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage notes: the KFAC column shows them
        layers = grng.KFAC(copy.deepcopy(model)).layers
    return [_Block(x.gradient_dim, x.activation_dim, x.gradient_diagonal, x.activation_diagonal)
            for x in layers if x.active]  # fmt: skip


def _floor(form: str) -> Callable[[nn.Module, Batch], Built]:
    """The bare preconditioning products of ``form`` ("kfac" or "ring") for every block."""

    def build(model: nn.Module, batch: Batch) -> Built:
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device)

        blocks = []
        for b in _kronecker_blocks(model):
            side_g = rand(b.g) if b.g_diagonal else rand(b.g, b.g)
            side_a = rand(b.a) if b.a_diagonal else rand(b.a, b.a)
            blocks.append((b, rand(b.g, b.a), side_g, side_a, rand(b.g).abs(), rand(b.a).abs()))

        def left(m: Tensor, v: Tensor, diagonal: bool, transpose: bool = False) -> Tensor:
            if diagonal:
                return m[:, None] * v
            return (m.T if transpose else m) @ v

        def right(v: Tensor, m: Tensor, diagonal: bool, transpose: bool = False) -> Tensor:
            if diagonal:
                return v * m[None, :]
            return v @ (m.T if transpose else m)

        def kfac(x: Tensor, y: Tensor) -> None:  # G⁻¹ V A⁻¹
            for b, v, g_inv, a_inv, _, _ in blocks:
                right(left(g_inv, v, b.g_diagonal), a_inv, b.a_diagonal)

        def ring(x: Tensor, y: Tensor) -> None:  # Q_G ((Q_Gᵀ V Q_A) / (λ_G λ_Aᵀ + γ)) Q_Aᵀ
            for b, v, q_g, q_a, e_g, e_a in blocks:
                rotated = right(left(q_g, v, b.g_diagonal, True), q_a, b.a_diagonal)
                scaled = rotated / (e_g[:, None] * e_a[None, :] + FLOOR_DAMPING)
                right(left(q_g, scaled, b.g_diagonal), q_a, b.a_diagonal, True)

        return Built(kfac if form == "kfac" else ring)

    return build


_LINEAR_ONLY = (
    "preconditions nn.Linear and nn.Conv2d only; every other parameter (embeddings, norms, "
    "Conv1d) {rest}"
)

#: Every contender by name, in the tables' column order.
CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender("adamw", "AdamW", _from_spec(OPTIMIZERS["adamw"]), note="the reference"),
        *[
            Contender(name, label, _from_spec(OPTIMIZERS[name]))
            for name, label in [("kfac", "KFAC"), ("ring", "RING"), ("reng", "RENG exact")]
            if name in OPTIMIZERS
        ],
        Contender("reng-fd", "RENG FD",
                  _grng_variant("RENG", {"hvp": "finite_difference"}, reng_step)),
        *[
            Contender(name, label, _from_spec(OPTIMIZERS[name]))
            for name, label in [("rkalman", "R-Kalman")]
            if name in OPTIMIZERS
        ],
        Contender("asdl-kfac", "ASDL K-FAC", _asdl_kfac, "peer",
                  ("asdl.precondition", "pip install asdfghjkl"),
                  note="ASDL K-FAC " + _LINEAR_ONLY.format(rest="gets its raw gradient in SGD")
                       + "; on a CPU-only torch its nvtx ranges are no-ops"),
        Contender("singd", "SINGD", _singd, "peer", ("singd.optim.optimizer", "pip install singd"),
                  note="SINGD " + _LINEAR_ONLY.format(rest="steps with AdamW")),
        Contender("kfac-pytorch", "kfac-pytorch", None, "peer", unavailable=(
            "not installable from the package index: no kfac-pytorch, kfac_pytorch, "
            "torch-kfac, kfac-torch or pytorch-kfac there (PyPI's `kfac` is TensorFlow's "
            "K-FAC); gpauloski/kfac-pytorch installs from a clone of its repository only, "
            "so it is not measured")),
        Contender("shampoo", "Shampoo", _shampoo, "peer",
                  ("pytorch_optimizer", "pip install pytorch-optimizer"),
                  note=f"Shampoo (pytorch_optimizer): roots every {PEER_INVERSE_EVERY} steps; "
                       f"parameters with a side over {SHAMPOO_MAX_DIM} on AdamW"),
        Contender("sophia", "SophiaG", _from_spec(OPTIMIZERS["sophia"]),
                  requires=("sophia_opt", "pip install sophia-opt"),
                  note=f"SophiaG: Hessian estimate every {SOPHIA_HESSIAN_INTERVAL} steps"),
        Contender("sgd", "SGD", _from_spec(OPTIMIZERS["sgd"])),
        Contender("ring-newton-schulz", "RING (Newton–Schulz)", _grng_variant(
            "RING", {"inverse": "newton_schulz", "damping_form": "factored"})),
        *[
            Contender(name, name, _from_spec(spec), requires=(
                ("pytorch_optimizer", "pip install pytorch-optimizer")
                if name in ("sam", "soap") else None))
            for name, spec in OPTIMIZERS.items()
            if name in ("ring-factored", "sam", "soap")
        ],
        Contender("floor-kfac", "floor G⁻¹VA⁻¹", _floor("kfac"), "floor"),
        Contender("floor-ring", "floor RING", _floor("ring"), "floor"),
    ]
}  # fmt: skip

#: What ``grng bench overhead`` compares by default (AdamW, SGD and both floors are
#: always in).
DEFAULT_OPTIMIZERS = [
    n for n in ("kfac", "ring", "reng", "reng-fd", "rkalman", "asdl-kfac", "singd",
                "kfac-pytorch", "shampoo", "sophia", "sgd") if n in CONTENDERS
]  # fmt: skip


def check_names(names: Sequence[str]) -> None:
    """``ValueError`` naming the valid contenders when a name is unknown."""
    valid = [n for n, c in CONTENDERS.items() if c.kind != "floor"]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(
            f"unknown optimizer {unknown[0]!r}; valid for overhead: {', '.join(valid)}"
        )


# --------------------------------------------------------------------------- measuring


def _peak_bytes(
    contender: Contender, config: ModelConfig, batches: list[Batch], steps: int,
    device: torch.device,
) -> int:  # fmt: skip
    """High-water mark of the bytes torch allocates while ``contender`` is built on a fresh
    model and takes ``steps`` steps (see the module docstring)."""
    assert contender.build is not None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = config.build().to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        built = contender.build(model, batches[0])
        for i in range(steps):
            built.step(*batches[i % len(batches)])
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        built = contender.build(model, batches[0])
        for i in range(steps):
            built.step(*batches[i % len(batches)])
    events = sorted(
        (e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    current = peak = 0
    for event in events:
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def _batches(config: ModelConfig, device: torch.device, n: int = 4) -> list[Batch]:
    """``n`` batches of ``config``'s shape (random content: it does not change the cost),
    used in turn; the same for every contender."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        x, y = config.batch(generator)
        out.append((x.to(device), y.to(device)))
    return out


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def _measure_model(
    config: ModelConfig,
    contenders: Sequence[Contender],
    rounds: int,
    warmup: int,
    memory_steps: int,
    device: torch.device,
    full_cycles: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """One model: build every contender on its own copy, time them in the same rounds,
    then each one's peak memory; a row per contender (see :data:`CSV_FIELDS`)."""
    batches = _batches(config, device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = config.build()
    built: dict[str, Built] = {}
    errors: dict[str, str] = {}
    for c in contenders:
        assert c.build is not None
        try:
            torch.manual_seed(0)
            built[c.name] = c.build(copy.deepcopy(base).to(device), batches[0])
        except Exception as exc:
            errors[c.name] = f"{type(exc).__name__}: {exc}"
    periods = sorted({p for b in built.values() for p in b.periods})
    used = rounds
    if full_cycles and periods:
        cycle = _lcm(periods)
        used = math.ceil(rounds / cycle) * cycle
    steps = {name: (lambda i, s=b.step: s(*batches[i % len(batches)])) for name, b in built.items()}
    from tqdm import tqdm

    with tqdm(total=warmup + used, desc=config.name, file=sys.stderr, disable=not progress,
              leave=False) as bar:  # fmt: skip
        times, failed = round_robin(steps, used, warmup, device, 0, lambda: bar.update(1))
    errors.update(failed)
    memory: dict[str, int] = {}
    memory_n: dict[str, int] = {}
    if memory_steps > 0:
        for c in contenders:
            if c.kind == "floor" or c.name in errors:
                continue
            n = memory_steps
            if full_cycles:  # up to the step after its first periodic refresh
                n = max(n, built[c.name].first_cycle + 2)
            memory_n[c.name] = n
            try:
                memory[c.name] = _peak_bytes(c, config, batches, n, device)
            except Exception as exc:
                errors[c.name] = f"{type(exc).__name__}: {exc}"
    del built, steps

    ref = times.get("adamw")
    sgd = times.get("sgd")  # the floors' base (always measured)
    base_median = statistics.median(sgd) if sgd else None
    base_mean = statistics.fmean(sgd) if sgd else None
    ref_median = statistics.median(ref) if ref else None
    ref_mean = statistics.fmean(ref) if ref else None
    ref_memory = memory.get("adamw")
    rows = []
    for c in contenders:
        row: dict[str, Any] = {
            "model": config.name, "model_label": config.label, "optimizer": c.name,
            "label": c.label, "kind": c.kind, "status": "ok", "rounds": used,
            "warmup_rounds": warmup, "note": c.note,
        }  # fmt: skip
        if c.name in errors:
            row.update(status="error", note=errors[c.name])
            rows.append(row)
            continue
        t = times[c.name]
        median, mean = statistics.median(t), statistics.fmean(t)
        row.update(median_ms=median * 1e3, mean_ms=mean * 1e3)
        if ref_median and ref_mean:
            if c.kind == "floor":  # (SGD step + floor) / AdamW step
                if base_median and base_mean:
                    row.update(median_rel=(base_median + median) / ref_median,
                               mean_rel=(base_mean + mean) / ref_mean)  # fmt: skip
            else:
                row.update(median_rel=median / ref_median, mean_rel=mean / ref_mean)
        if c.name in memory:
            row.update(peak_mib=memory[c.name] / 2**20, memory_steps=memory_n[c.name])
            if ref_memory:
                row["peak_rel"] = memory[c.name] / ref_memory
        rows.append(row)
    return rows


CSV_FIELDS = [
    "model", "model_label", "optimizer", "label", "kind", "status", "median_ms", "mean_ms",
    "median_rel", "mean_rel", "peak_mib", "peak_rel", "rounds", "warmup_rounds",
    "memory_steps", "note",
]  # fmt: skip


# --------------------------------------------------------------------------- output


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("torch", "asdfghjkl", "singd", "pytorch-optimizer", "sophia-opt"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
    }


def _cell(row: dict[str, Any] | None, keys: tuple[str, str], fmt: str = ".2f") -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return "error"
    vals = [row.get(k) for k in keys]
    if any(v is None for v in vals):
        return "—"
    return " / ".join(format(v, fmt) for v in vals)


def _markdown(
    rows: list[dict[str, Any]], contenders: Sequence[Contender], skipped: dict[str, str],
    header: str,
) -> str:  # fmt: skip
    columns = [c for c in contenders if c.name != "adamw" and c.kind != "floor"]
    floors = [c for c in contenders if c.kind == "floor"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["optimizer"]): r for r in rows}
    label = {r["model"]: r["model_label"] for r in rows}
    heads = ["model", "rounds", "AdamW ms", *[c.label for c in columns],
             *[c.label for c in floors]]  # fmt: skip
    lines = [header, "", "Step time: median / mean ×AdamW's in the same rounds; floors: "
             "(SGD step + floor) / AdamW step, median / mean.", "",
             "| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]  # fmt: skip
    for m in models:
        ref = by.get((m, "adamw"))
        rounds = str(ref["rounds"]) if ref is not None else "—"
        cells = [label[m], rounds, _cell(ref, ("median_ms", "mean_ms"))]
        cells += [_cell(by.get((m, c.name)), ("median_rel", "mean_rel")) for c in columns]
        cells += [_cell(by.get((m, c.name)), ("median_rel", "mean_rel")) for c in floors]
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("peak_mib") is not None for r in rows):
        lines += ["", "Peak memory ×AdamW's (AdamW: MiB):", "",
                  "| " + " | ".join(["model", "AdamW MiB", *[c.label for c in columns]]) + " |",
                  "|---|" + "---:|" * (len(columns) + 1)]  # fmt: skip
        for m in models:
            cells = [label[m], _cell(by.get((m, "adamw")), ("peak_mib", "peak_mib"), ".3g")]
            cells[-1] = cells[-1].split(" / ")[0]
            cells += [_cell(by.get((m, c.name)), ("peak_rel", "peak_rel"), ".2f").split(" / ")[0]
                      for c in columns]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    notes = [f"* {c.note}." for c in contenders if c.kind == "peer" and c.note
             and c.name not in skipped]  # fmt: skip
    notes += [f"* {CONTENDERS[n].label} ({n}) skipped: {why}." for n, why in skipped.items()]
    notes += [f"* {r['label']} on {r['model']}: {r['note']}" for r in rows if r["status"] != "ok"]
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


def _write(out: Path, rows: list[dict[str, Any]], text: str) -> None:
    (out / "overhead.md").write_text(text, encoding="utf-8")
    write_csv(rows, out / "overhead.csv", CSV_FIELDS)


def run(
    names: Sequence[str],
    models: Sequence[ModelConfig],
    rounds: int,
    warmup: int,
    memory_steps: int,
    device: torch.device,
    out: Path,
    progress: bool = True,
    full_cycles: bool = True,
) -> list[dict[str, Any]]:
    """Measure every model (see the module docstring); write ``config.json`` first, then
    ``overhead.md`` and ``overhead.csv`` after each model; print each model's table row as
    it finishes and the whole table at the end. AdamW (the reference), SGD (the floors'
    base) and both floors are always measured. A contender that is not installed is
    skipped with a note naming its pip command; one that fails on a model shows ``error``
    there, with the message in the notes. ``full_cycles`` (off for smoke tests): round ``rounds`` up to a multiple of every
    refresh period, and extend a contender's memory window past its first periodic
    refresh when that comes after ``memory_steps`` (Shampoo's first root: step 50)."""
    check_names(names)
    commit = git_commit()  # before measuring: the checkout may change meanwhile
    chosen = {"adamw", "sgd", *names, "floor-kfac", "floor-ring"}
    contenders = [c for n, c in CONTENDERS.items() if n in chosen]  # the tables' order
    skipped = {c.name: why for c in contenders if (why := c.missing()) is not None}
    for name, why in skipped.items():
        print(f"{CONTENDERS[name].label} ({name}) skipped: {why}", file=sys.stderr)
    runnable = [c for c in contenders if c.name not in skipped]
    date = datetime.now(timezone.utc)
    config: dict[str, Any] = {
        "command": "grng bench overhead", "date": date.isoformat(timespec="seconds"),
        "commit": commit, "grng_version": grng.__version__, "machine": _machine(device),
        "versions": _versions(), "rounds": rounds, "full_cycles": full_cycles,
        "warmup_rounds": warmup, "memory_steps": memory_steps,
        "models": {m.name: m.label for m in models},
        "contenders": {c.name: {"label": c.label, "kind": c.kind, "note": c.note,
                                "skipped": skipped.get(c.name)} for c in contenders},
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    machine = config["machine"]
    if memory_steps == 0:
        memory = "Peak memory not measured (0 memory steps)."
    else:
        memory = f"Peak memory: over {memory_steps} steps from construction" + (
            " (more for an optimizer whose first periodic refresh comes later: Shampoo's "
            "first root, step 50)." if full_cycles else "."
        )  # fmt: skip
    header = (
        f"# grng bench overhead — {date:%Y-%m-%d %H:%M} UTC — grng {grng.__version__}, "
        f"commit {commit}\n\n{machine['cpu']} ({machine['cores']} cores), device {device}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}. Interleaved: "
        f"{warmup} untimed rounds, then {rounds} timed rounds"
        + (" (rounded up to a multiple of every refresh period)" if full_cycles else "")
        + "; each round steps every optimizer once, on its own copy of the model, in a "
        f"shuffled order. {memory}"
    )
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for config_ in models:
        rows += _measure_model(config_, runnable, rounds, warmup, memory_steps, device,
                               full_cycles, progress)  # fmt: skip
        text = _markdown(rows, runnable, skipped, header)
        _write(out, rows, text)
        print(next(line for line in text.splitlines() if line.startswith(f"| {config_.label}")))
    print(f"\n{text}\nresults in {out}/ ({time.perf_counter() - started:.0f} s)")
    return rows


# --------------------------------------------------------------------------- profiling


def _kind(name: str) -> str:
    if "_record_function_" in name or "torch/autograd/profiler.py" in name:
        return "profiler"  # entering and leaving the profiler's own labelled ranges
    if re.search(r"\.py\(\d+\): ", name):
        return "python"
    if name.startswith("<built-in"):
        return "python built-in"
    if "::" in name:
        return "torch op"
    return "label"  # record_function ranges, e.g. Optimizer.step#RING.step


def profile_step(
    name: str, config: ModelConfig, steps: int, warmup: int, device: torch.device, top: int = 15
) -> str:
    """Profile ``steps`` steps of contender ``name`` on ``config``'s model (after ``warmup``
    untimed ones) with ``torch.profiler`` and Python tracing (``with_stack=True``); return
    the ``top`` entries by self CPU time per step, each marked as a torch op, a Python
    function (its self time: the time spent in its own lines, outside the ops and
    functions it calls), a Python built-in, a label (a ``record_function`` range such as
    ``Optimizer.step#RING.step``) or the profiler's own work (entering those ranges), and
    a closing line counting the torch ops and Python entries among the top five, the
    profiler's own entries aside. Python tracing slows Python code, so the Python
    entries are upper bounds."""
    from torch.profiler import ProfilerActivity, profile

    check_names([name])
    contender = CONTENDERS[name]
    if (why := contender.missing()) is not None:
        raise ValueError(f"{name}: {why}")
    assert contender.build is not None
    batches = _batches(config, device)
    torch.manual_seed(0)
    built = contender.build(config.build().to(device), batches[0])
    for i in range(warmup):
        built.step(*batches[i % len(batches)])
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, with_stack=True) as prof:
        start = time.perf_counter()
        for i in range(steps):
            built.step(*batches[(warmup + i) % len(batches)])
        wall = (time.perf_counter() - start) / steps
    averages = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    lines = [
        f"{contender.label} on {config.label}: {steps} profiled steps after {warmup} "
        f"(steps {warmup}..{warmup + steps - 1}), {wall * 1e3:.2f} ms per step under the "
        f"profiler, {torch.get_num_threads()} thread(s). Top {top} by self CPU time:",
        "",
        "| # | self CPU ms/step | % | calls/step | kind | name |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for i, e in enumerate(averages[:top], 1):
        lines.append(
            f"| {i} | {e.self_cpu_time_total / 1e3 / steps:.3f} | "
            f"{100 * e.self_cpu_time_total / total:.1f} | {e.count / steps:g} | {_kind(e.key)} "
            f"| {e.key[:90]} |"
        )
    own = [e for e in averages if _kind(e.key) != "profiler"][:5]
    python = [e.key for e in own if _kind(e.key).startswith("python")]
    ops = sum(_kind(e.key) == "torch op" for e in own)
    lines += ["", f"Top five, the profiler's own entries aside: {ops} torch op(s), "
              f"{len(python)} Python entr{'y' if len(python) == 1 else 'ies'}"
              + (f" ({'; '.join(python)})" if python else "") + "."]  # fmt: skip
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line

DESCRIPTION = (
    "Step time and peak memory of every optimizer relative to torch's AdamW, measured "
    "interleaved: each round runs one step of every optimizer (each on its own copy of the "
    "model, in a shuffled order), so machine load hits all alike. Models: the mnist1d MLP "
    "40-W-W-10 (--widths) at batch 128 and 512, the 4-layer d128 char transformer at 64x64 "
    "tokens, a 6-layer hidden-384 BERT-like encoder at 32x64 tokens. Cells: median / mean "
    "step time ×AdamW (the mean includes capture and refresh steps); floors: (SGD step + "
    "the bare preconditioning products) / AdamW step. Peers not installed are skipped with "
    "the pip command. Writes OUT/overhead.md, OUT/overhead.csv, OUT/config.json as each "
    "model finishes. --profile NAME instead prints the top ops of NAME's step."
)
DEFAULT_ROUNDS, DEFAULT_WARMUP, DEFAULT_MEMORY_STEPS = 100, 3, 12
QUICK_ROUNDS, QUICK_WARMUP, QUICK_MEMORY_STEPS = 3, 1, 2


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return v

    return parse


def _list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return list(dict.fromkeys(names))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``grng bench overhead``."""
    valid = ", ".join(n for n, c in CONTENDERS.items() if c.kind != "floor")
    p.add_argument("--optimizers", type=_list, default=None, metavar="A,B,...",
                   help=f"optimizers to compare with AdamW (default: {','.join(DEFAULT_OPTIMIZERS)}"
                        f"); valid: {valid}")  # fmt: skip
    p.add_argument("--models", type=_list, default=None, metavar="A,B,...",
                   help="models to measure (default: mlp<W>-b128, mlp<W>-b512 for every "
                        "width, char-transformer, bert-like; also conv1d-b128, the mnist1d "
                        "Conv1d net)")  # fmt: skip
    p.add_argument("--widths", type=str, default="256",
                   help="MLP hidden widths, one MLP pair (batch 128, 512) per width (default 256)")  # fmt: skip
    p.add_argument("--rounds", type=_count(1), default=None,
                   help=f"timed rounds per model (default {DEFAULT_ROUNDS}, rounded up to a "
                        f"multiple of every refresh period; --quick: {QUICK_ROUNDS}, as given)")  # fmt: skip
    p.add_argument("--warmup", type=_count(0), default=None,
                   help=f"untimed rounds first (default {DEFAULT_WARMUP}; --quick: {QUICK_WARMUP})")  # fmt: skip
    p.add_argument("--memory-steps", type=_count(0), default=None,
                   help=f"steps of the peak-memory window, 0 skips it (default "
                        f"{DEFAULT_MEMORY_STEPS}; --quick: {QUICK_MEMORY_STEPS})")  # fmt: skip
    p.add_argument(
        "--threads", type=_count(1), default=1, help="torch intra-op threads (default 1)"
    )
    p.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)"
    )
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default runs/overhead-<timestamp>)")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="tiny models and few rounds (a smoke test; the mean is then not "
                        "proportional to the refresh periods)")  # fmt: skip
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="instead of the tables: profile NAME's step on the first of --models "
                        "(default mlp256-b128) and print the top ops by self CPU time")  # fmt: skip
    p.add_argument("--profile-steps", type=_count(1), default=10,
                   help="steps profiled with --profile (10 hold one statistics capture; 50 "
                        "hold an inverse refresh too; default 10)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run ``grng bench overhead`` from parsed :func:`add_arguments` options; bad input
    raises ``ValueError`` with a one-line message."""
    names = list(args.optimizers) if args.optimizers else list(DEFAULT_OPTIMIZERS)
    check_names(names + ([args.profile] if args.profile else []))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
    device = torch.device(args.device)
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise ValueError(
            f"--widths: expected comma-separated integers, got {args.widths!r}"
        ) from None
    if not widths or min(widths) <= 0:
        raise ValueError(f"--widths: expected positive integers, got {args.widths!r}")
    configs = model_configs(widths, args.quick)
    if args.models:
        every = configs + extra_models(args.quick)
        valid = [c.name for c in every]
        unknown = [m for m in args.models if m not in valid]
        if unknown:
            raise ValueError(f"--models: unknown model {unknown[0]!r}; valid: {', '.join(valid)}")
        configs = [c for c in every if c.name in args.models]
    torch.set_num_threads(args.threads)

    def pick(value: int | None, default: int, quick: int) -> int:
        return value if value is not None else (quick if args.quick else default)

    warmup = pick(args.warmup, DEFAULT_WARMUP, QUICK_WARMUP)
    if args.profile:
        print(profile_step(args.profile, configs[0], args.profile_steps, warmup, device))
        return 0
    run(
        names,
        configs,
        rounds=pick(args.rounds, DEFAULT_ROUNDS, QUICK_ROUNDS),
        warmup=warmup,
        memory_steps=pick(args.memory_steps, DEFAULT_MEMORY_STEPS, QUICK_MEMORY_STEPS),
        device=device,
        out=args.out or Path("runs") / f"overhead-{datetime.now():%Y%m%d-%H%M%S}",
        progress=not args.quiet,
        full_cycles=not args.quick,
    )
    return 0
