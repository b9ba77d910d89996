"""What a refresh step and an ordinary step of K-FAC / RING cost on two transformers (CPU).

    .venv/bin/python benchmarks/refresh_cost.py [--threads 1] [--steps 3] [--models char,bert]

Models: the benchmark's 4-layer ``d_model = 128`` character transformer
(:class:`grng.bench.models.CharTransformer`, vocab 65, 32 × 64 tokens) and a BERT-like
encoder (``nn.TransformerEncoder``, 6 layers, hidden 384, 6 heads, feed-forward 1536,
vocab 1000, 16 × 128 tokens, mean-pooled 4-way classifier). Per optimizer it reports the
CPU time (``time.process_time``, so that waiting for a shared machine's cores is not
counted) of ``optimizer.step()`` alone (forward and backward excluded): the first step
(capture + the first refresh: the worst step), the mean of ``--steps`` later refresh steps
(factor capture + re-inversion, warm state), the median of steps that neither capture nor
refresh, the mean of capture-only steps, the host
synchronisations of one refresh step (calls of ``Tensor.item``/``__bool__``/``__float__``/
``__int__``/``tolist``, each of which waits for the device) and, for K-FAC, which rung of
the damped-inverse ladder produced the inverses. Timings are wall clock on whatever
machine runs it; with more than one thread the CPU time adds the threads up.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng.bench.models import CharTransformer


class BertLike(nn.Module):
    """Token + position embeddings, a post-LN ``nn.TransformerEncoder``, mean pooling, head."""

    def __init__(
        self,
        vocab: int = 1000,
        length: int = 128,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 6,
        classes: int = 4,
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(length, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, classes)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.encoder(x).mean(1))


def char_task() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=65, block_size=64, d_model=128, n_layers=4)
    x = torch.randint(0, 65, (32, 64))
    return model, x, torch.randint(0, 65, (32, 64))


def bert_task() -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = BertLike()
    return model, torch.randint(0, 1000, (16, 128)), torch.randint(0, 4, (16,))


TASKS: dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor]]] = {
    "char": char_task,
    "bert": bert_task,
}
OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "kfac": lambda m: grng.KFAC(m),
    "ring": lambda m: grng.RING(m),
    "kfac-eigh": lambda m: grng.KFAC(m, inverse="eigh"),
}


@contextmanager
def count_syncs() -> Iterator[collections.Counter[str]]:
    """Count the Tensor methods that copy a value to the host (a device sync off CPU)."""
    counter: collections.Counter[str] = collections.Counter()
    names = ("item", "__bool__", "__float__", "__int__", "tolist")
    originals = {name: getattr(Tensor, name) for name in names}

    def wrap(name: str) -> Callable[..., Any]:
        original = originals[name]

        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            counter[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name in names:
        setattr(Tensor, name, wrap(name))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)


def backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    logits = model(x)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()


def measure(task: str, name: str, steps: int) -> dict[str, Any]:
    model, x, y = TASKS[task]()
    optimizer = OPTIMIZERS[name](model)
    period = optimizer.options.inverse_update_freq  # type: ignore[attr-defined]
    first = refresh_sync = 0.0
    refresh, ordinary, capture = [], [], []
    capture_period = optimizer.options.factor_update_freq  # type: ignore[attr-defined]
    methods: collections.Counter[str] = collections.Counter()
    for step in range(steps * period + 1):
        optimizer.zero_grad()
        backward(model, x, y)
        is_refresh = step % period == 0
        with count_syncs() as syncs:
            start = time.process_time()
            optimizer.step()
            elapsed = time.process_time() - start
        if step == 0:
            first = elapsed
        elif is_refresh:
            refresh.append(elapsed)
            refresh_sync = sum(syncs.values())
        elif step % capture_period == 0:
            capture.append(elapsed)
        elif step < 2 * period:  # enough ordinary steps for a median
            ordinary.append(elapsed)
    for key, state in optimizer.state.items():
        if isinstance(key, str) and key.startswith("layer:"):
            for side in ("activation", "gradient"):
                if f"{side}_inverse_method" in state:
                    methods[state[f"{side}_inverse_method"]] += 1
    return {
        "first": first,
        "refresh": statistics.mean(refresh) if refresh else float("nan"),
        "ordinary": statistics.median(ordinary),
        "capture": statistics.mean(capture),
        "syncs": refresh_sync,
        "methods": dict(methods),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="later refresh steps to average")
    parser.add_argument("--models", default="char,bert")
    parser.add_argument("--optimizers", default="kfac,ring")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); optimizer.step() only, CPU ms")
    print(
        "| model | optimizer | first step | later refresh step | capture step | ordinary step "
        "| syncs per refresh | inverse rungs |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for task in args.models.split(","):
        for name in args.optimizers.split(","):
            r = measure(task, name, args.steps)
            print(
                f"| {task} | {name} | {1e3 * r['first']:.0f} | {1e3 * r['refresh']:.0f} | "
                f"{1e3 * r['capture']:.0f} | {1e3 * r['ordinary']:.1f} | {r['syncs']} | "
                f"{r['methods'] or '-'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
