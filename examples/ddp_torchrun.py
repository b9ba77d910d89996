"""Data-parallel training with DistributedDataParallel and torchrun (gloo on CPU).

Every rank builds the same model, wraps it in ``DistributedDataParallel`` and builds
the grng optimizer on the wrapper. DDP averages the gradients; the optimizer makes the
curvature statistics global on capture steps (one all-reduce) and, by default
(``distributed="auto"``), shards the eigendecompositions/inverses of refresh steps
across the ranks and broadcasts them (``grng.distributed``). Each rank trains on its
own slice of a global batch; the parameters stay identical on every rank, and the
script prints the largest difference between ranks at the end (0). At construction the ranks compare the optimizer's settings
and raise a ValueError naming any difference instead of hanging later.

``--optimizer reng`` uses ``RENG(hvp="finite_difference")`` with a closure: DDP
averages both of its backward passes (the exact mode is refused under DDP, which does
not synchronise second-order gradients).

Run it (the same code runs as one process under plain ``python``)::

    torchrun --nproc_per_node 2 examples/ddp_torchrun.py            # 300 steps
    torchrun --nproc_per_node 2 examples/ddp_torchrun.py --smoke    # 20 steps
    python -m torch.distributed.run --standalone --nproc_per_node 2 examples/ddp_torchrun.py --smoke

With CUDA available each rank uses ``cuda:<LOCAL_RANK>`` and NCCL, else the CPU and gloo.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import grng
from grng.distributed import init_from_env, shutdown

OPTIMIZERS = {
    "ring": lambda model: grng.RING(model),
    "kfac": lambda model: grng.KFAC(model),
    "rkalman": lambda model: grng.RKalman(model),
    "reng": lambda model: grng.RENG(model, hvp="finite_difference"),
}


def global_batch(step: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The step's global batch, the same on every rank (seeded by the step)."""
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(size, 20, generator=generator)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()  # 4 classes
    return x.to(device), y.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="20 steps (a quick check)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="ring")
    args = parser.parse_args()
    steps = 20 if args.smoke else args.steps

    info = init_from_env()  # reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = nn.Sequential(
        nn.Linear(20, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 64), nn.Tanh(),
        nn.Linear(64, 4),
    ).to(info.device)  # fmt: skip
    network: nn.Module = model
    if info.world_size > 1:
        network = nn.parallel.DistributedDataParallel(model)
    optimizer = OPTIMIZERS[args.optimizer](network)
    rows = info.local_batch(args.batch)  # this rank's slice of every global batch

    for step in range(1, steps + 1):
        x, y = global_batch(step, args.batch, info.device)

        def closure(x: Tensor = x[rows], y: Tensor = y[rows]) -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(network(x), y)
            loss.backward()  # DDP averages the gradient over the ranks
            return loss

        loss = optimizer.step(closure)
        if info.is_main and step % max(1, steps // 5) == 0:
            print(f"step {step:4d}  loss on rank 0's slice {float(loss.detach()):.3f}")

    # Every rank took the same steps: the largest difference from rank 0 is 0.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    if info.world_size > 1:
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        gap = (flat - reference).abs().max()
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    else:
        gap = torch.zeros(())
    x, y = global_batch(0, 1024, info.device)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean()
    if info.is_main:
        print(f"{info.world_size} rank(s), {args.optimizer}: held-out accuracy {accuracy:.3f}, "
              f"largest parameter difference between ranks {float(gap):.1e}")  # fmt: skip
    shutdown(info)


if __name__ == "__main__":
    main()
