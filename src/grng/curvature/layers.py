"""Kronecker-factored views of the layers that K-FAC understands.

A :class:`KroneckerLayer` knows how to turn one call of its module into the two
kinds of rows that Kronecker factors are built from, and how to move between
the module's parameters and the gradient *matrix* ``V`` of shape
``(d_out, d_in [+1])`` that the factored preconditioner acts on:

* activation rows ``a`` (the layer's input, with a trailing bias column when
  the layer has a bias, so the bias is folded in as an extra input column: 1
  for a call of a module whose bias *is* the layer's, 0 for a weight-tied twin
  without it), giving ``A = E[a aᵀ]``;
* output-gradient rows ``g`` (the gradient of the loss w.r.t. the layer's
  output), giving ``G = E[g gᵀ]``.

Linear layers treat every leading index as a separate example (K-FAC
"expand", Eschenhagen et al. 2023): a ``(B, T, d)`` input gives ``B·T`` rows of
both kinds. Convolutions follow KFC (Grosse & Martens 2016): the activation
rows are the unfolded input patches at every output position, and the output
gradients of the positions of one example are summed in ``G`` (so the number of
examples for ``G`` is the batch size, not batch × positions).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(eq=False)
class KroneckerLayer:
    """One module whose weight gets a Kronecker-factored preconditioner."""

    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: nn.Parameter | None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, (nn.Conv1d, nn.Conv2d))

    @property
    def activation_dim(self) -> int:
        return self.weight[0].numel() + (1 if self.bias is not None else 0)

    @property
    def gradient_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def activation_rows(self, inputs: Tensor) -> Tensor:
        """Rows ``a`` of the activation factor, shape ``(rows, activation_dim)``."""
        if self.is_conv:
            rows = _conv_patches(self.module, inputs)
        else:
            rows = inputs.reshape(-1, inputs.shape[-1])
        if self.bias is not None:
            # The bias column is 1 where this call adds the layer's bias. A tied twin
            # without it (no bias, or its own) shares only the weight: its rows get 0,
            # so that Σ g aᵀ still reproduces the owner's bias gradient.
            acts = getattr(self.module, "bias", None) is self.bias
            column = rows.new_full((rows.shape[0], 1), 1.0 if acts else 0.0)
            rows = torch.cat([rows, column], dim=1)
        return rows

    def gradient_rows(self, grad_output: Tensor) -> tuple[Tensor, int]:
        """Rows ``g`` of the gradient factor and the number of examples they come from."""
        if self.is_conv:
            # (N, C_out, *spatial) -> (N * positions, C_out); positions of one example
            # are summed in G, so the example count is N.
            rows = grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])
            return rows, grad_output.shape[0]
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        return rows, rows.shape[0]

    def gradient_matrix(self, weight_grad: Tensor, bias_grad: Tensor | None) -> Tensor:
        """The layer's gradient as the matrix ``V`` of shape ``(d_out, activation_dim)``."""
        matrix = weight_grad.reshape(weight_grad.shape[0], -1)
        if self.bias is not None:
            if bias_grad is None:
                bias_grad = torch.zeros_like(self.bias)
            matrix = torch.cat([matrix, bias_grad.reshape(-1, 1)], dim=1)
        return matrix

    def split_matrix(self, matrix: Tensor) -> tuple[Tensor, Tensor | None]:
        """Inverse of :meth:`gradient_matrix`: ``V`` back to (weight-shaped, bias-shaped)."""
        if self.bias is None:
            return matrix.reshape(self.weight.shape), None
        return matrix[:, :-1].reshape(self.weight.shape), matrix[:, -1].reshape(self.bias.shape)


def _conv_patches(module: nn.Module, inputs: Tensor) -> Tensor:
    """Unfolded input patches of a Conv1d/Conv2d call, shape ``(N * positions, C_in·k)``.

    Padding is applied explicitly with the module's own mode (and ``padding="same"``
    resolved by the module itself), so reflect/circular padding is honoured.
    """
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
    if isinstance(module, nn.Conv1d):
        # A 1-d convolution is a 2-d one of height 1.
        padded = padded.unsqueeze(2)
        kernel, dilation, stride = (
            (1, *module.kernel_size),
            (1, *module.dilation),
            (1, *module.stride),
        )
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = F.unfold(padded, kernel_size=kernel, dilation=dilation, stride=stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


def _supported(module: nn.Module) -> bool:
    if not isinstance(module, SUPPORTED_MODULES):
        return False
    # Grouped convolutions have a block-diagonal weight that one Kronecker
    # product over all channels does not describe; they use the diagonal fallback.
    return not (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1)


def find_kronecker_layers(model: nn.Module, trainable: set[nn.Parameter]) -> list[KroneckerLayer]:
    """The supported layers of ``model`` whose weight is trainable, each weight once.

    A weight shared by two modules (tying) is claimed by the first module that
    owns it; the other module's calls still contribute statistics, because
    hooks are attached to every module that uses the weight (see
    :func:`modules_using`). A bias that is frozen while its weight trains is left
    out of the factor, and a trainable bias whose weight is frozen falls back to
    the diagonal preconditioner.
    """
    layers: list[KroneckerLayer] = []
    claimed: set[nn.Parameter] = set()
    for name, module in model.named_modules():
        if not _supported(module):
            continue
        weight = module.weight
        if weight not in trainable or weight in claimed:
            continue
        bias = getattr(module, "bias", None)
        if bias is not None and (bias not in trainable or bias in claimed):
            bias = None
        layer = KroneckerLayer(name or type(module).__name__, module, weight, bias)
        claimed.update(layer.params)
        layers.append(layer)
    return layers


def modules_using(model: nn.Module, layer: KroneckerLayer) -> Iterator[nn.Module]:
    """Every supported module that computes with ``layer``'s parameters (weight tying)."""
    for module in model.modules():
        if _supported(module) and module.weight is layer.weight:
            yield module
