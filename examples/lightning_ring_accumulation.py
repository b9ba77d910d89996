"""A LightningModule trained by RING with gradient accumulation (``accumulate_grad_batches``).

Lightning divides each micro-batch's loss by ``accumulate_grad_batches``, sums the
gradients of the micro-batches and steps once; grng counts every backward pass's
examples in the curvature statistics, so 4 micro-batches of 32 give the step of one
batch of 128 (``tests/integrations/test_lightning.py`` checks that, 1e-8 in float64).

RING, KFAC and RKalman need nothing else from Lightning. The module below still mixes
in ``grng.integrations.lightning.GRNGMixin``, which is what ``--optimizer reng`` needs:
RENG's exact mode differentiates the gradient, and the mixin's ``backward`` keeps the
gradient's graph (also under ``precision="16-mixed"``, whose loss scale it handles).
Under fp16 loss scaling the mixin also hands the GradScaler to every grng optimizer.

Run it (CPU)::

    python examples/lightning_ring_accumulation.py            # 400 optimizer steps
    python examples/lightning_ring_accumulation.py --smoke    # 20 steps, seconds
    python examples/lightning_ring_accumulation.py --optimizer reng --accumulate 2
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import grng
from grng.integrations.lightning import GRNGMixin


class Classifier(GRNGMixin, L.LightningModule):
    """An MLP classifier; ``configure_optimizers`` returns a grng optimizer built on the module."""

    def __init__(self, optimizer: str = "ring", total_steps: int = 400) -> None:
        super().__init__()
        self.optimizer_name, self.total_steps = optimizer, total_steps
        self.net = nn.Sequential(
            nn.Linear(20, 64), nn.Tanh(), nn.LayerNorm(64), nn.Linear(64, 64), nn.Tanh(),
            nn.Linear(64, 4),
        )  # fmt: skip

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self.net(x).argmax(1) == y).float().mean()
        self.log("val_accuracy", accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        if self.optimizer_name == "reng":
            optimizer: grng.CurvatureOptimizer = grng.RENG(self)  # hvp="exact": needs the mixin
        else:
            optimizer = grng.RING(self)
        # grng's parameter groups take torch's schedulers; stepped every optimizer step.
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def dataset(n: int, seed: int) -> TensorDataset:
    """20 features, 4 classes given by the signs of two sums of features."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=generator)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="20 optimizer steps (a quick check)")
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--optimizer", choices=["ring", "reng"], default="ring")
    args = parser.parse_args()
    steps = 20 if args.smoke else args.steps

    L.seed_everything(0, verbose=False)
    train = DataLoader(dataset(8192, 1), batch_size=args.micro_batch, shuffle=True)
    validation = DataLoader(dataset(1024, 2), batch_size=1024)
    module = Classifier(args.optimizer, total_steps=steps)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,  # optimizer steps, each of `accumulate` micro-batches
        accumulate_grad_batches=args.accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=not args.smoke,
        enable_model_summary=False,
    )
    trainer.fit(module, train)
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, grng.CurvatureOptimizer)
    metrics = trainer.validate(module, validation, verbose=False)[0]
    print(f"{args.optimizer}: {optimizer.steps_taken} optimizer steps of {args.accumulate} "
          f"micro-batches of {args.micro_batch}; validation accuracy "
          f"{metrics['val_accuracy']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
