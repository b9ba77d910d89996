"""The built-in layer adapters and their registration (see :mod:`grng.curvature.layers`).

=============================  ====================================================
module                         blocks
=============================  ====================================================
``nn.Linear``                  the weight (+ bias): K-FAC "expand", every leading
                               index of the input is a row (Eschenhagen et al. 2023)
``nn.Conv1d``, ``nn.Conv2d``   one block per group: KFC (Grosse & Martens 2016),
                               unfolded input patches × output gradients summed over
                               the positions of an example
``nn.MultiheadAttention``      ``in_proj`` as three blocks q, k, v (each from its own
                               input, so cross-attention works) and ``out_proj``
``nn.Embedding``               the table, with a *diagonal* token factor (one-hot
                               rows: ``A = diag(token counts) / rows``) and a dense
                               output-gradient factor (as in kfac-jax and ASDL)
transformers ``Conv1D``        like Linear with the weight stored ``(in, out)``;
                               recognised by structure (GPT-2's c_attn, c_proj, c_fc)
=============================  ====================================================

Everything else (norms, ``Conv3d``, ``ConvTranspose``, recurrent cells, bare
parameters) gets the diagonal fallback, which ``optimizer.coverage()`` reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from grng.curvature.layers import KroneckerLayer, LayerAdapter, Recorder, register_layer

__all__ = [
    "ConvAdapter",
    "EmbeddingAdapter",
    "LinearAdapter",
    "MultiheadAttentionAdapter",
    "TransposedLinearAdapter",
]


class LinearAdapter(LayerAdapter):
    """``y = x Wᵀ + b`` over the last dimension (``nn.Linear``): the base's defaults."""


class TransposedLinearAdapter(LayerAdapter):
    """``y = x W + b`` with ``W`` stored ``(in, out)`` (transformers' ``Conv1D``)."""

    weight_layout = "in_out"


def is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2), recognised without importing transformers."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", None)
    )


class ConvAdapter(LayerAdapter):
    """``nn.Conv1d`` / ``nn.Conv2d``, one block per group (KFC).

    Group ``j`` of ``groups`` owns output channels ``j·C_out/groups …`` (its rows of
    the weight and bias) and reads input channels ``j·C_in/groups …``: its
    activation rows are the unfolded patches of those channels at every output
    position (padding applied with the module's own mode), its gradient rows the
    output gradients of its channels at every position, summed in ``G`` per
    example, so the example count is the batch size.
    """

    def blocks(self, name: str, module: nn.Module) -> list[KroneckerLayer]:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        groups = module.groups
        bias = module.bias
        if groups == 1:
            return [KroneckerLayer(name, module, module.weight, bias, self)]
        per_group = module.out_channels // groups
        return [
            KroneckerLayer(
                f"{name}.group{j}",
                module,
                module.weight,
                bias,
                self,
                weight_rows=slice(j * per_group, (j + 1) * per_group),
                bias_rows=None if bias is None else slice(j * per_group, (j + 1) * per_group),
                part=j,
            )
            for j in range(groups)
        ]

    def activation_rows(self, layer: KroneckerLayer, module: nn.Module, inputs: Tensor) -> Tensor:
        assert isinstance(module, (nn.Conv1d, nn.Conv2d))
        if module.groups > 1:
            per_group = module.in_channels // module.groups
            j = layer.part
            inputs = inputs[:, j * per_group : (j + 1) * per_group]
        return conv_patches(module, inputs)

    def gradient_rows(
        self, layer: KroneckerLayer, module: nn.Module, grad_output: Tensor
    ) -> tuple[Tensor, int]:
        # (N, C_out, *spatial) -> (N * positions, C_out); positions of one example
        # are summed in G, so the example count is N.
        if layer.weight_rows is not None:
            grad_output = grad_output[:, layer.weight_rows]
        rows = grad_output.flatten(2).transpose(1, 2).reshape(-1, grad_output.shape[1])
        return rows, grad_output.shape[0]


def conv_patches(module: nn.Conv1d | nn.Conv2d, inputs: Tensor) -> Tensor:
    """Unfolded input patches of a Conv1d/Conv2d call, shape ``(N * positions, C·k)``.

    Padding is applied explicitly with the module's own mode (and ``padding="same"``
    resolved by the module itself), so reflect/circular padding is honoured.
    """
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


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding``: ``V = Wᵀ`` (``dim × num_embeddings``), tokens as one-hot rows.

    A one-hot row's outer product is diagonal, so the token factor is exactly the
    diagonal ``A = diag(count of each token) / rows``, computed by ``bincount``
    (never as rows). The output-gradient factor is dense over the embedding
    dimension, and every token is an example (as every leading index of a Linear).
    """

    weight_layout = "in_out"

    def blocks(self, name: str, module: nn.Module) -> list[KroneckerLayer]:
        assert isinstance(module, nn.Embedding)
        return [KroneckerLayer(name, module, module.weight, None, self, activation_diagonal=True)]

    def activation_statistic(
        self,
        layer: KroneckerLayer,
        module: nn.Module,
        inputs: Tensor,
        diagonal: bool,
        dtype: torch.dtype,
        select: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, int, Tensor | None]:
        # Exact from every token (a bincount), so ``select`` is not needed.
        if not diagonal:
            raise ValueError(f"{layer.name}: an embedding's token factor is diagonal")
        tokens = inputs.reshape(-1)
        counts = torch.bincount(tokens, minlength=layer.activation_dim).to(dtype)
        return counts, tokens.numel(), None


class MultiheadAttentionAdapter(LayerAdapter):
    """``nn.MultiheadAttention``: ``in_proj`` as blocks q, k, v and ``out_proj``.

    The projections run inside ``F.multi_head_attention_forward``, not as modules,
    so no module hook sees them. While capture records, the adapter wraps
    ``torch.nn.functional.linear`` for the duration of the attention call (restored
    by a forward hook that runs even when the call raises) and attributes each
    ``linear(x, W, b)`` to the blocks whose rows ``W`` holds: the packed
    self-attention projection (one call, all three blocks, split by output
    column), the separate q and kv (or q, k, v) calls of cross-attention, and the
    output projection. On other steps nothing is wrapped.
    """

    def blocks(self, name: str, module: nn.Module) -> list[KroneckerLayer]:
        assert isinstance(module, nn.MultiheadAttention)
        e = module.embed_dim
        bias = module.in_proj_bias
        if module._qkv_same_embed_dim:
            assert module.in_proj_weight is not None
            weights = [module.in_proj_weight] * 3
            rows: list[slice | None] = [slice(i * e, (i + 1) * e) for i in range(3)]
        else:
            weights = [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]
            rows = [None, None, None]
        blocks = [
            KroneckerLayer(
                f"{name}.in_proj.{part}",
                module,
                weight,
                bias,
                self,
                weight_rows=weight_rows,
                bias_rows=None if bias is None else slice(i * e, (i + 1) * e),
                part=part,
            )
            for i, (part, weight, weight_rows) in enumerate(zip("qkv", weights, rows, strict=True))
            if isinstance(weight, nn.Parameter)
        ]
        out = module.out_proj
        blocks.append(
            KroneckerLayer(f"{name}.out_proj", module, out.weight, out.bias, self, part="out")
        )
        return blocks

    def uses_bias(self, layer: KroneckerLayer, module: nn.Module) -> bool:
        return layer.bias is not None

    def attach(
        self, module: nn.Module, layers: list[KroneckerLayer], recorder: Recorder
    ) -> list[RemovableHandle]:
        saved: list[Any] = []

        def spy_linear(original: Any, mod: nn.Module) -> Any:
            def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
                out = original(x, weight, bias)
                for layer, columns in _blocks_computed_by(layers, weight):
                    recorder.record(layer, mod, x, out, columns)
                return out

            return linear

        def before(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not recorder.recording():
                return
            saved.append(F.linear)
            F.linear = spy_linear(F.linear, mod)

        def after(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if saved:
                F.linear = saved.pop()

        return [
            module.register_forward_pre_hook(before),
            module.register_forward_hook(after, always_call=True),
        ]


def _blocks_computed_by(
    layers: list[KroneckerLayer], weight: Tensor
) -> list[tuple[KroneckerLayer, slice | None]]:
    """The blocks whose rows ``weight`` (a parameter or a row-slice view of one) holds,
    with their output columns in ``x @ weightᵀ``."""
    out: list[tuple[KroneckerLayer, slice | None]] = []
    for layer in layers:
        param = layer.weight
        if weight is param and layer.weight_rows is None:
            out.append((layer, None))
            continue
        if weight.untyped_storage().data_ptr() != param.untyped_storage().data_ptr():
            continue
        row_stride = param.stride(0)
        first = (weight.storage_offset() - param.storage_offset()) // row_stride
        rows = layer.weight_rows or slice(0, param.shape[0])
        start, stop = rows.start or 0, rows.stop
        if first <= start and stop <= first + weight.shape[0]:
            columns = slice(start - first, stop - first)
            out.append((layer, None if columns == slice(0, weight.shape[0]) else columns))
    return out


register_layer(nn.Linear, LinearAdapter())
register_layer(nn.Conv1d, ConvAdapter())
register_layer(nn.Conv2d, ConvAdapter())
register_layer(nn.Embedding, EmbeddingAdapter())
register_layer(nn.MultiheadAttention, MultiheadAttentionAdapter())
register_layer(is_transformers_conv1d, TransposedLinearAdapter())
