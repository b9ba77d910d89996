"""Kronecker curvature for a module type of your own: ``grng.register_layer``.

``ChannelMix`` below mixes the channels of a ``(batch, channels, time)`` signal with a
weight ``W`` (``channels_out × channels_in``) and a bias, at every time step:
``y[:, :, t] = W x[:, :, t] + b``. grng has no adapter for it, so at first its
parameters get only the diagonal fallback, which ``optimizer.coverage()`` shows. Its
computation is a Linear layer over dimension 1 instead of the last one, so the adapter
subclasses ``grng.LayerAdapter`` (whose defaults serve ``y = x Wᵀ + b`` over the last
dimension, ``W`` stored ``(out, in)``) and only says where the rows are: every
``(example, time)`` position is one row of the input (the activation factor ``A``)
and of the output's gradient (the gradient factor ``G``), as for a Linear layer
applied to a sequence. After ``grng.register_layer(ChannelMix, ChannelMixAdapter())``
an optimizer built on the model gives the layer a Kronecker block.

Run it (CPU, seconds)::

    python examples/custom_layer.py            # 300 steps
    python examples/custom_layer.py --smoke    # 30 steps
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng


class ChannelMix(nn.Module):
    """``y[:, :, t] = W x[:, :, t] + b`` for an input of shape ``(batch, channels, time)``."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels_out, channels_in) / channels_in**0.5)
        self.bias = nn.Parameter(torch.zeros(channels_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("oi,bit->bot", self.weight, x) + self.bias[:, None]


class ChannelMixAdapter(grng.LayerAdapter):
    """Rows of a ChannelMix call: every (example, time) position, channels last.

    The base class reads the module's ``weight`` and ``bias`` (one block), the block's
    sizes from the weight's shape, adds the bias column of ones to the activation
    rows, and captures through a forward hook; only the rows differ from a Linear's.
    """

    def activation_rows(self, layer: grng.curvature.KroneckerLayer, module: nn.Module,
                        inputs: Tensor) -> Tensor:  # fmt: skip
        return inputs.transpose(1, 2).reshape(-1, inputs.shape[1])

    def gradient_rows(self, layer: grng.curvature.KroneckerLayer, module: nn.Module,
                      grad_output: Tensor) -> tuple[Tensor, int]:  # fmt: skip
        rows = grad_output.transpose(1, 2).reshape(-1, grad_output.shape[1])
        # Every position counts as one term of the loss averaged below (as for a Linear
        # applied to a sequence), so the number of examples is the number of rows.
        return rows, rows.shape[0]


class Net(nn.Module):
    """Per-time-step classification of a 4-channel signal into 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = ChannelMix(4, 16)
        self.norm = nn.GroupNorm(1, 16)
        self.head = ChannelMix(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.mix(x))))


def data(generator: torch.Generator, n: int = 64, time: int = 20) -> tuple[Tensor, Tensor]:
    """Signals whose label at each time step is the strongest of the first 3 channels."""
    x = torch.randn(n, 4, time, generator=generator)
    return x, x[:, :3].argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="30 steps (a quick check)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    steps = 30 if args.smoke else args.steps
    torch.manual_seed(0)
    model = Net()

    print("Without an adapter, ChannelMix gets the diagonal fallback (and a CoverageWarning):")
    unregistered = grng.RING(model)
    print(unregistered.coverage())
    unregistered.capture.remove()  # detach its hooks: only the optimizer below trains

    grng.register_layer(ChannelMix, ChannelMixAdapter())
    # Built after the registration, so mix and head are Kronecker blocks; GroupNorm is
    # meant to stay on the diagonal fallback, which exclude= says (no CoverageWarning).
    optimizer = grng.RING(model, exclude=[nn.GroupNorm])
    print("\nWith ChannelMixAdapter registered:")
    print(optimizer.coverage())
    assert optimizer.coverage()["mix.weight"].kind == "kronecker"

    generator = torch.Generator().manual_seed(1)
    x_test, y_test = data(generator, 256)
    for step in range(1, steps + 1):
        x, y = data(generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)  # logits (batch, classes, time): per-step labels
        loss.backward()
        optimizer.step()
        if step % max(1, steps // 5) == 0:
            with torch.no_grad():
                accuracy = (model(x_test).argmax(1) == y_test).float().mean()
            print(f"step {step:4d}  loss {loss.item():.3f}  test accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
