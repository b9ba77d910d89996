"""Fingerprints of optimizer trajectories, to show that a refactor changed no number.

    .venv/bin/python benchmarks/trajectory_fingerprint.py --out before.json
    (change the code)
    .venv/bin/python benchmarks/trajectory_fingerprint.py --compare before.json

Every grng optimizer variant (K-FAC with Cholesky or eigh inverses and the MC Fisher;
RING exact, factored, with Newton–Schulz inverses and with the layer gradient norm; RENG
by finite differences and by double backprop; R-Kalman) takes 62 float32 steps on each
model (statistics every 10 steps, refreshes at steps 0 and 50, row subsets of 64 rows),
from one seed and one batch stream. The fingerprint of a run is the SHA-256 of its
parameters and buffers after the last step, so two code versions compute the same
trajectory exactly when their fingerprints agree (on one machine and torch build: another
CPU's kernels may round differently). Models: ``char`` (a 2-layer character transformer),
``cnn`` (Conv1d + BatchNorm, the diagonal fallback), ``bert-like`` (embeddings, attention,
LayerNorm), and ``sst2-minilm`` (the benchmark's pretrained MiniLM cut to 2 layers, with
the benchmark's optimizer settings; needs the ``language`` extra, about 2 minutes).
``--compare`` exits with status 1 when a fingerprint differs.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import grng
from grng.bench.models import BertLikeEncoder, CharTransformer

STEPS = 62
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac": ("KFAC", {}),
    "kfac-eigh": ("KFAC", {"inverse": "eigh"}),
    "kfac-mc": ("KFAC", {"fisher": "mc"}),
    "ring": ("RING", {}),
    "ring-factored": ("RING", {"damping_form": "factored"}),
    "ring-ns": ("RING", {"inverse": "newton_schulz", "damping_form": "factored"}),
    "ring-layer": ("RING", {"grad_norm": "layer"}),
    "reng-fd": ("RENG", {"hvp": "finite_difference"}),
    "reng-exact": ("RENG", {}),
    "rkalman": ("RKalman", {}),
}
Batch = tuple[Tensor, Tensor]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 38, 10),
    )  # fmt: skip


#: model name -> (build, batch from a generator, whether it has a double backward)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.Generator], Batch], bool]] = {
    "char": (
        lambda: CharTransformer(65, block_size=16, d_model=32, n_layers=2, n_heads=2),
        lambda g: (torch.randint(0, 65, (8, 16), generator=g),
                   torch.randint(0, 65, (8, 16), generator=g)),
        False,  # CPU scaled-dot-product attention has no double backward
    ),
    "cnn": (
        _cnn,
        lambda g: (torch.randn(16, 1, 40, generator=g), torch.randint(0, 10, (16,), generator=g)),
        True,
    ),
    "bert-like": (
        lambda: BertLikeEncoder(vocab_size=100, hidden=32, n_layers=2, n_heads=2,
                                intermediate=64, max_positions=16, num_classes=2),
        lambda g: (torch.randint(0, 100, (8, 12), generator=g),
                   torch.randint(0, 2, (8,), generator=g)),
        False,
    ),
}  # fmt: skip


def _digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for t in [*model.parameters(), *model.buffers()]:
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _closure(model: nn.Module, optimizer: Any, x: Tensor, y: Tensor) -> Tensor:
    """Zero the gradients, back-propagate the loss (RENG exact: with the graph; the MC
    Fisher: its sampled pass first) and return it."""
    optimizer.zero_grad()
    logits = model(x).flatten(0, -2)
    if optimizer.options.fisher == "mc":
        optimizer.backward_fisher(logits)
    loss = nn.functional.cross_entropy(logits, y.flatten())
    if isinstance(optimizer, grng.RENG) and optimizer.hvp == "exact":
        optimizer.backward(loss)
    else:
        loss.backward()
    return loss


def _train(model_name: str, variant: str) -> str:
    build, batch, double_backward = MODELS[model_name]
    cls, options = VARIANTS[variant]
    if cls == "RENG" and "hvp" not in options and not double_backward:
        return "skipped: no double backward"
    torch.manual_seed(0)
    model = build()
    kwargs = dict(options)
    if cls != "RKalman":
        kwargs["max_statistics_rows"] = 64
    optimizer = getattr(grng, cls)(model, **kwargs)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = batch(generator)
        optimizer.step(functools.partial(_closure, model, optimizer, x, y))
    return _digest(model)


def _sst2() -> dict[str, str]:
    """The benchmark's GRNG optimizers at their benchmark settings on MiniLM (2 layers)."""
    from grng.bench.optimizers import get_optimizer
    from grng.bench.tasks import get_task

    task = get_task("sst2-minilm")
    out = {}
    for name in ("kfac", "ring", "ring-factored", "reng", "rkalman"):
        model = task.build_model(0, layers=2)
        spec = get_optimizer(name)
        optimizer = spec.factory(model, spec.default_lr)
        generator = torch.Generator().manual_seed(1)
        for _ in range(52):
            x = torch.randint(1000, 5000, (8, 20), generator=generator)
            x[:, 0], x[:, -1] = 101, 102  # [CLS] ... [SEP]
            y = torch.randint(0, 2, (8,), generator=generator)
            spec.train_step(model, optimizer, task, x, y)
        out[f"sst2-minilm/{name}"] = _digest(model)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="char,cnn,bert-like",
                        help="comma-separated, of char, cnn, bert-like, sst2-minilm")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the fingerprints here")
    parser.add_argument("--compare", type=Path, default=None,
                        help="fingerprints of another version to compare with")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # coverage warnings of the small models
    prints: dict[str, str] = {}
    for name in args.models.split(","):
        if name == "sst2-minilm":
            prints.update(_sst2())
            continue
        for variant in VARIANTS:
            prints[f"{name}/{variant}"] = _train(name, variant)
    if args.out is not None:
        args.out.write_text(json.dumps(prints, indent=1) + "\n", encoding="utf-8")
    if args.compare is None:
        print(json.dumps(prints, indent=1))
        return 0
    before = json.loads(args.compare.read_text(encoding="utf-8"))
    shared = [k for k in prints if k in before]
    differ = [k for k in shared if prints[k] != before[k]]
    for k in differ:
        print(f"differs: {k}")
    print(f"{len(shared) - len(differ)} of {len(shared)} trajectories identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
