"""Row subsets for the factor statistics (``max_statistics_rows``): capture cost and error.

    .venv/bin/python benchmarks/statistics_rows.py [--caps 256,512,1024,2048] [--seeds 4]
        [--threads 1] [--models char-transformer,bert,mlp,conv1d] [--warmup 30] [--timing-only]

Each model is trained ``--warmup`` AdamW steps (lr 1e-3) so the statistics are not
those of the initialisation; then, on one batch, the factors of every Kronecker
block are captured from every row (``max_statistics_rows=None``, the reference)
and from row subsets of each cap (``--seeds`` draws each). Reported, per cap:

* ``A err``, ``G err``: relative Frobenius error ``‖F_c − F‖_F / ‖F‖_F`` of one
  capture's estimate against the full one (mean over draws; median and max over
  the blocks whose sum of that side was drawn: more rows in a call than the cap, a
  dense side at least ``MIN_SUBSET_WIDTH`` wide; all blocks for *other batch*);
* ``step err``: relative error of the K-FAC step of the whole model,
  ``Δ = (G + (√λ/π) I)⁻¹ V (A + π√λ I)⁻¹`` per block with the gradient ``V`` of the
  batch, all blocks concatenated, at damping λ = 0.1 (K-FAC's default) and 1e-3,
  from one capture's factors (no running average: the worst case);
* the break-even width: one call's dense sum from every row against the draw plus
  the sum of the subset (``MIN_SUBSET_WIDTH``);
* ``capture ms``: time spent computing the statistics of one capture (in the
  capture's gradient hooks, where every sum is taken, and in ``estimates()``;
  best of ``--repeats`` interleaved rounds, float32), the work a capture step adds.

The row ``other batch`` puts the subsets' error in proportion: it is the same
comparison for the full estimate of a second, independent batch, i.e. the noise
an estimate from one batch carries anyway. Float64 for the comparisons, float32
(as in training) for the timings. Models: the Tiny Shakespeare character
transformer of ``grng bench`` (4 layers, d128, batch 64 × 64 = 4096 token rows;
needs ``shared/data/tinyshakespeare.txt``), a BERT-like ``transformers``
classifier (2 layers, hidden 128, intermediate 512, 32 sequences × 128 tokens =
4096 rows), the mnist1d MLP 40-256-256-10 at batch 2048 (at its benchmark batch
of 128 every call is within any cap, so the estimate is exact) and the mnist1d
Conv1d net at batch 128 (40 + 20 + 10 positions: 5120, 2560 and 1280 rows).
"""

from __future__ import annotations

import argparse
import statistics
import time
import unittest.mock
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from _timing import best_of
from torch import Tensor, nn

import grng.curvature.capture as capture_module
from grng.curvature import CurvatureCapture, FactorEstimate, KroneckerLayer, find_kronecker_layers
from grng.linalg import pi_correction
from grng.optim.options import DEFAULT_MAX_FACTOR_DIM

Batch = tuple[Tensor, Tensor]
Loss = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class Case:
    name: str
    model: nn.Module
    batches: list[Batch]  # warm-up batches, then the measured batch, then the other one
    loss: Loss


def char_transformer(steps: int) -> Case:
    from grng.bench.tasks import get_task

    task = get_task("shakespeare-char")
    data = task.load()
    model = task.build_model(0, data=data)
    stream = task.batches(data, 64, torch.Generator().manual_seed(0))
    batches = [next(stream) for _ in range(steps + 2)]
    return Case("char-transformer", model, batches, lambda m, x, y: task.loss(m(x), y))


def bert(steps: int) -> Case:
    import transformers

    config = transformers.BertConfig(  # type: ignore[call-arg]
        vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=128, num_labels=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps + 2):
        x = torch.randint(0, 100, (32, 128), generator=g)
        batches.append((x, x[:, 0] % 4))
    return Case("bert", model, batches, lambda m, x, y: F.cross_entropy(m(input_ids=x).logits, y))


def mnist1d(arch: str, batch_size: int, steps: int) -> Case:
    from grng.bench.tasks import get_task

    task = get_task(f"mnist1d-{arch}")
    data = task.load()
    model = task.build_model(0, data=data)
    stream = task.batches(data, batch_size, torch.Generator().manual_seed(0))
    batches = [next(stream) for _ in range(steps + 2)]
    name = f"{arch} (batch {batch_size})"
    return Case(name, model, batches, lambda m, x, y: task.loss(m(x), y))


CASES: dict[str, Callable[[int], Case]] = {
    "char-transformer": char_transformer,
    "bert": bert,
    "mlp": lambda steps: mnist1d("mlp", 2048, steps),
    "conv1d": lambda steps: mnist1d("cnn", 128, steps),
}


def capture(
    case: Case,
    layers: list[KroneckerLayer],
    batch: Batch,
    cap: int | None,
    seed: int,
    uniform: bool = False,
) -> tuple[dict[str, FactorEstimate], dict[Tensor, Tensor], dict[str, int]]:
    """One capture of ``batch``: the estimates, the gradients and each block's largest
    number of rows in one call. ``uniform``: draw the subsets uniformly (the row
    store's scheme) instead of the library's norm-proportional one, for comparison."""
    recorder = CurvatureCapture(case.model, layers, max_statistics_rows=cap, row_seed=seed)
    recorder.armed = True
    if uniform:

        def drawn_uniformly(rows: Tensor, k: int, salt: int) -> Tensor:
            if rows.shape[1] < capture_module.MIN_SUBSET_WIDTH:
                return rows  # the same sides as the library's scheme draw from
            return recorder._subset(rows, k, salt)

        recorder._statistics_subset = drawn_uniformly  # type: ignore[method-assign]
    largest: dict[str, int] = {}
    accumulate = recorder._accumulate

    def spy(layer: KroneckerLayer, module: nn.Module, activation: Tensor, grad: Tensor) -> None:
        rows = layer.adapter.gradient_rows(layer, module, grad)[0].shape[0]  # type: ignore[union-attr]
        largest[layer.name] = max(largest.get(layer.name, 0), rows)
        accumulate(layer, module, activation, grad)

    recorder._accumulate = spy  # type: ignore[method-assign,assignment]
    x, y = batch
    x = x.double() if x.is_floating_point() else x
    try:
        case.model.zero_grad()
        case.loss(case.model, x, y).backward()
        estimates = recorder.estimates()
    finally:
        recorder.remove()
    grads: dict[Tensor, Tensor] = {
        p: p.grad.detach().clone() for p in case.model.parameters() if p.grad is not None
    }
    return estimates, grads, largest


def relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _damped_inverse_apply(factor: Tensor, damping: Tensor, v: Tensor, left: bool) -> Tensor:
    if factor.dim() == 1:
        scale = 1 / (factor + damping)
        return scale[:, None] * v if left else v * scale
    matrix = factor + damping * torch.eye(factor.shape[0], dtype=factor.dtype)
    return torch.linalg.solve(matrix, v) if left else torch.linalg.solve(matrix, v.T).T


def kfac_step(
    layers: list[KroneckerLayer],
    estimates: dict[str, FactorEstimate],
    grads: dict[Tensor, Tensor],
    damping: float,
) -> Tensor:
    """K-FAC's factored step of every captured block, concatenated."""
    pieces = []
    for layer in layers:
        e = estimates.get(layer.name)
        if e is None:
            continue
        a, g = e.activation_factor.double(), e.gradient_factor.double()
        pi = pi_correction(a, g)
        root = torch.tensor(damping, dtype=torch.float64).sqrt()
        v = layer.gradient_matrix({p: grads[p].double() for p in layer.params if p in grads})
        step = _damped_inverse_apply(g, root / pi, v, left=True)
        pieces.append(_damped_inverse_apply(a, root * pi, step, left=False).reshape(-1))
    return torch.cat(pieces)


def capture_ms(case: Case, configs: dict[str, dict[str, Any]], repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` ms per capture spent computing the statistics (in the capture's
    gradient hooks, where every sum is taken, and in ``estimates()``), per configuration
    (``CurvatureCapture`` arguments), float32 model."""
    model = case.model.float()
    x, y = case.batches[-2]
    trainable: set[Tensor] = {p for p in model.parameters() if p.requires_grad}
    spent: dict[str, list[float]] = {label: [] for label in configs}
    recorders = {}
    for label, kwargs in configs.items():
        layers = find_kronecker_layers(model, trainable, max_factor_dim=DEFAULT_MAX_FACTOR_DIM)
        recorder = CurvatureCapture(model, layers, row_seed=1, **kwargs)
        accumulate = recorder._accumulate

        def timed(
            *args: object, accumulate: Callable[..., None] = accumulate, label: str = label
        ) -> None:
            start = time.perf_counter()
            accumulate(*args)
            spent[label][-1] += time.perf_counter() - start

        recorder._accumulate = timed  # type: ignore[method-assign,assignment]
        recorders[label] = recorder
    for _ in range(repeats + 1):  # the first round warms up
        for label in configs:
            for other, recorder in recorders.items():
                recorder.armed = other == label
                recorder.clear()
            spent[label].append(0.0)
            model.zero_grad()
            case.loss(model, x, y).backward()
            start = time.perf_counter()
            recorders[label].estimates()
            spent[label][-1] += time.perf_counter() - start
    for recorder in recorders.values():
        recorder.remove()
    # The least time: a shared machine only ever adds to it.
    return {label: 1e3 * min(times[1:]) for label, times in spent.items()}


def break_even(
    rows: int = 4096, cap: int = 1024, widths: tuple[int, ...] = (32, 64, 96, 128, 256)
) -> None:
    """Dense sum of ``rows`` rows against the draw of ``cap`` of them plus their sum, per
    width: where drawing starts to pay (``MIN_SUBSET_WIDTH``)."""
    recorder = CurvatureCapture(nn.Linear(1, 1), [])
    print(f"\none call of {rows} rows, cap {cap}: dense sum vs draw + sum (ms, best of 30)")
    for width in widths:
        r = torch.randn(rows, width, generator=torch.Generator().manual_seed(0))

        def every(r: Tensor = r) -> Tensor:
            return r.T @ r

        def drawn(r: Tensor = r) -> Tensor:
            subset = recorder._statistics_subset(r, cap, 1)
            return subset.T @ subset

        full = best_of(every, 30)
        print(
            f"  d = {width:<4} every row {1e3 * full:6.3f}   drawn {1e3 * best_of(drawn, 30):6.3f}"
        )


def run_case(
    case: Case, caps: list[int], seeds: int, repeats: int, warmup: int, errors: bool = True
) -> None:
    model = case.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for x, y in case.batches[:warmup]:
        optimizer.zero_grad()
        case.loss(model, x, y).backward()
        optimizer.step()
    trainable: set[Tensor] = {p for p in model.parameters() if p.requires_grad}
    layers = find_kronecker_layers(model, trainable, max_factor_dim=DEFAULT_MAX_FACTOR_DIM)
    configs: dict[str, dict[str, Any]] = {"all rows": {"max_statistics_rows": None}}
    configs.update({str(cap): {"max_statistics_rows": cap} for cap in caps})
    # R-Kalman's capture: 32 kept rows with full factors (before), diagonals only (now).
    configs["rkalman factors"] = {"keep_rows": 32, "max_statistics_rows": None}
    configs["rkalman diagonals"] = {"keep_rows": 32, "statistics": "diagonals"}
    timing = capture_ms(case, configs, repeats)
    cells = ", ".join(f"{label}: {ms:.1f}" for label, ms in timing.items())
    print(f"\n{case.name}: capture ms: {cells}")
    if not errors:
        return
    model.double()
    batch, other = case.batches[-2], case.batches[-1]
    full, grads, largest = capture(case, layers, batch, None, 0)
    other_full, _, _ = capture(case, layers, other, None, 0)
    dampings = (0.1, 1e-3)
    reference = {lam: kfac_step(layers, full, grads, lam) for lam in dampings}
    print(f"\n{case.name}: {len(layers)} blocks, rows per call: {sorted(set(largest.values()))}")
    print(
        f"  {'cap':>12}  {'A err med/max':>17}  {'G err med/max':>17}  "
        f"{'step err λ=0.1':>14}  {'λ=1e-3':>8}  {'capture ms':>10}"
    )

    by_name = {layer.name: layer for layer in layers}

    def drawn(cap: int | None, side: str) -> list[str]:
        """The blocks whose ``side`` sum is drawn at ``cap`` (all blocks for None)."""
        out = []
        for name, rows in largest.items():
            layer = by_name[name]
            width = layer.activation_dim if side == "activation" else layer.gradient_dim
            diagonal = getattr(layer, f"{side}_diagonal")
            if cap is None or (
                rows > cap and width >= capture_module.MIN_SUBSET_WIDTH and not diagonal
            ):
                out.append(name)
        return out

    def row(label: str, runs: list[dict[str, FactorEstimate]], cap: int | None, ms: str) -> None:
        errors = {}
        for side in ("activation", "gradient"):
            errors[side] = [
                statistics.mean(
                    relative(getattr(r[n], f"{side}_factor"), getattr(full[n], f"{side}_factor"))
                    for r in runs
                )
                for n in drawn(cap, side)
            ]
        steps = [
            statistics.mean(
                relative(kfac_step(layers, r, grads, lam), reference[lam]) for r in runs
            )
            for lam in dampings
        ]
        cells = [
            f"{statistics.median(e):8.4f}/{max(e):7.4f}" if e else f"{'none drawn':>17}"
            for e in errors.values()
        ]
        print(f"  {label:>12}  {cells[0]}  {cells[1]}  {steps[0]:14.4f}  {steps[1]:8.4f}  {ms:>10}")

    print(f"  {'all rows':>12}  {'exact':>17}  {'exact':>17}  {'0':>14}  {'0':>8}  "
          f"{timing['all rows']:10.1f}")  # fmt: skip
    for cap in caps:
        for uniform in (True, False):
            runs = [
                capture(case, layers, batch, cap, seed, uniform)[0] for seed in range(1, seeds + 1)
            ]
            label = f"{cap} uniform" if uniform else str(cap)
            row(label, runs, cap, "" if uniform else f"{timing[str(cap)]:.1f}")
    row("other batch", [other_full], None, "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--caps", default="256,512,1024,2048")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--timing-only", action="store_true", help="skip the error tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    caps = [int(c) for c in args.caps.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s); errors in float64")
    with unittest.mock.patch.object(capture_module, "MIN_SUBSET_WIDTH", 1):
        break_even()
    for name in args.models.split(","):
        case = CASES[name](args.warmup)
        run_case(case, caps, args.seeds, args.repeats, args.warmup, not args.timing_only)


if __name__ == "__main__":
    main()
