"""Would preconditioning same-shaped layers together (batched matmuls) pay? Measured per group.

    .venv/bin/python benchmarks/batched_solve.py [--threads 1] [--device cpu] [--repeats 30]

A transformer has many identical blocks, so its Kronecker layers fall into a few groups of
equal ``(d_G, d_A)``. This script takes the groups of the two models of
``benchmarks/refresh_cost.py`` (the 4-layer ``d_model = 128`` character transformer and the
6-layer hidden-384 BERT-like encoder) and times, per group, the per-step solve of every
layer one after the other (what ``CurvatureOptimizer._precondition`` does) against one
batched solve of the whole group (``torch.matmul`` on stacked ``(n, d, d)`` operands), for

* RING's exact eigenbasis solve ``Q_G [(Q_Gᵀ V Q_A) ⊘ (g aᵀ + γ)] Q_Aᵀ`` (four products);
* K-FAC's solve with stored inverses ``X_G V X_A`` (two products).

The batched side is charged for stacking the gradient matrices (they arrive one per layer)
but not for stacking the bases, which a batched implementation would keep stacked between
refreshes. It also reports whether the batched float64 result equals the per-layer one bit
for bit. Times are the median CPU time (``time.process_time``) on CPU, and wall time after
``torch.cuda.synchronize`` on CUDA.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor

#: (model, d_G, d_A, layers): the Kronecker blocks of the two benchmark models by shape.
GROUPS = [
    ("char", 128, 129, 16),  # q, k, v, out of 4 blocks
    ("char", 512, 129, 4),  # fc1
    ("char", 128, 513, 4),  # fc2
    ("bert", 384, 385, 24),  # q, k, v, out_proj of 6 layers
    ("bert", 1536, 385, 6),  # linear1
    ("bert", 384, 1537, 6),  # linear2
]


def ring_solve(v: Tensor, qg: Tensor, qa: Tensor, g: Tensor, a: Tensor, gamma: Tensor) -> Tensor:
    rotated = (qg.mT @ v) @ qa
    rotated.div_(torch.addcmul(gamma, g[..., :, None], a[..., None, :]))
    return (qg @ rotated) @ qa.mT


def inverse_solve(v: Tensor, xg: Tensor, xa: Tensor) -> Tensor:
    return (xg @ v) @ xa


def timer(device: torch.device, repeats: int) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                fn()
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            else:
                start = time.process_time()
                fn()
                times.append(time.process_time() - start)
        return sorted(times)[len(times) // 2]

    return measure


def solvers(
    dg: int, da: int, n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator
) -> list[Callable[[], list[Tensor]]]:
    """RING per layer, RING batched, K-FAC per layer, K-FAC batched, on random operands."""

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    v = [rand(dg, da) for _ in range(n)]
    qg, qa = torch.linalg.qr(rand(n, dg, dg)).Q, torch.linalg.qr(rand(n, da, da)).Q
    g, a = rand(n, dg).abs(), rand(n, da).abs()
    xg, xa = qg @ qg.mT / 3, qa @ qa.mT / 2
    gamma = torch.tensor(0.1, dtype=dtype, device=device)
    return [
        lambda: [ring_solve(v[i], qg[i], qa[i], g[i], a[i], gamma) for i in range(n)],
        lambda: list(ring_solve(torch.stack(v), qg, qa, g, a, gamma).unbind(0)),
        lambda: [inverse_solve(v[i], xg[i], xa[i]) for i in range(n)],
        lambda: list(inverse_solve(torch.stack(v), xg, xa).unbind(0)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    measure = timer(device, args.repeats)
    print(f"torch {torch.__version__}, {device}, {args.threads} thread(s); ms per group, float32")
    print("| model | layers × (d_G, d_A) | RING per layer | RING batched | K-FAC per layer "
          "| K-FAC batched | float64 batched == per layer |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|")
    gen = torch.Generator().manual_seed(0)
    for model, dg, da, n in GROUPS:
        times = [measure(f) for f in solvers(dg, da, n, torch.float32, device, gen)]
        ring_loop, ring_batched, kfac_loop, kfac_batched = solvers(
            dg, da, n, torch.float64, device, gen
        )
        equal = all(
            torch.equal(x, y)
            for loop, batched in ((ring_loop, ring_batched), (kfac_loop, kfac_batched))
            for x, y in zip(loop(), batched(), strict=True)
        )
        cells = " | ".join(f"{1e3 * t:.2f}" for t in times)
        print(f"| {model} | {n} × ({dg}, {da}) | {cells} | {equal} |", flush=True)


if __name__ == "__main__":
    main()
