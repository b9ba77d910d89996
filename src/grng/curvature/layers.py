"""Kronecker blocks, the adapters that define them, and the table of adapters.

A :class:`KroneckerLayer` is one block of parameters with a Kronecker-factored
preconditioner: rows ``weight_rows`` of a weight (all of it by default), and the
matching rows of a bias, read as the gradient *matrix* ``V`` of shape
``(d_G, d_A)`` (``d_A`` includes a bias column when the block has a bias). Its
two factors are built from two kinds of rows:

* activation rows ``a`` (what the block multiplies, with a trailing bias column:
  1 for a call that adds the block's bias, 0 for a weight-tied twin without it),
  giving ``A = E[a aᵀ]``;
* output-gradient rows ``g`` (the gradient of the loss w.r.t. the block's
  output), giving ``G = E[g gᵀ]``.

A side may be *diagonal*: the factor is kept as the vector ``E[a²]`` (or
``E[g²]``). That is exact for a side whose rows are one-hot (an embedding's
tokens), and the size cap ``max_factor_dim`` uses it for sides too wide to
factorise.

A :class:`LayerAdapter` says, for one module type, which blocks its parameters
form, how to read their rows from a call of the module, and how ``V`` is laid
out in the parameters. The adapters are registered in one table
(:func:`register_layer`, :func:`adapter_for`); :mod:`grng.curvature.adapters`
holds the built-in ones (Linear, convolutions, attention, embeddings, the
``Conv1D`` of transformers). Adding a layer type is one adapter and one call of
:func:`register_layer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from grng._warnings import warn


class Recorder(Protocol):
    """What an adapter's hooks report to (the capture engine)."""

    def recording(self) -> bool:
        """Whether statistics are being captured now (hooks may skip work otherwise)."""
        ...

    def record(
        self,
        layer: KroneckerLayer,
        module: nn.Module,
        inputs: Tensor,
        output: Tensor,
        columns: slice | None,
    ) -> None:
        """One call of ``layer``'s computation by ``module``: its input, its output (whose
        gradient gives the gradient rows), and the output's columns that are the block's
        (None: all)."""
        ...


@dataclass(eq=False)
class KroneckerLayer:
    """One Kronecker block: rows ``weight_rows`` of ``weight`` and ``bias_rows`` of ``bias``.

    Attributes:
        name: the block's name in the state (``state["layer:<name>"]``): the module's
            name, with a suffix for modules of several blocks (``.in_proj.q``, ``.group1``).
        module: the module that owns the parameters.
        weight, bias: the parameters (``bias`` is None when the block has none).
        adapter: the :class:`LayerAdapter` of ``module``'s type.
        weight_rows, bias_rows: the block's rows of ``weight`` / ``bias`` (None: all).
        part: the adapter's tag for the block (e.g. ``"q"`` or a group index).
        activation_diagonal, gradient_diagonal: whether a side is kept diagonal.
        estimate_diagonals: whether the capture estimates only the diagonal of each
            side (set by :class:`grng.curvature.CurvatureCapture` with
            ``statistics="diagonals"``, for an optimizer that reads no more of the
            factors: R-Kalman); the sides stay as they are, only the estimates are
            vectors (:attr:`activation_estimate_shape`).
    """

    name: str
    module: nn.Module
    weight: Tensor
    bias: Tensor | None
    adapter: LayerAdapter | None = None
    weight_rows: slice | None = None
    bias_rows: slice | None = None
    part: Any = None
    activation_diagonal: bool = False
    gradient_diagonal: bool = False
    estimate_diagonals: bool = False
    #: The sides ("A", "G") that ``max_factor_dim`` made diagonal (not the adapter).
    capped_sides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.adapter is None:
            adapter = adapter_for(self.module)
            if adapter is None:
                raise TypeError(f"no layer adapter is registered for {type(self.module).__name__}")
            self.adapter = adapter

    @property
    def _adapter(self) -> LayerAdapter:
        assert self.adapter is not None
        return self.adapter

    @property
    def activation_dim(self) -> int:
        return self._adapter.input_dim(self) + (1 if self.bias is not None else 0)

    @property
    def gradient_dim(self) -> int:
        return self._adapter.output_dim(self)

    @property
    def activation_shape(self) -> tuple[int, ...]:
        d = self.activation_dim
        return (d,) if self.activation_diagonal else (d, d)

    @property
    def gradient_shape(self) -> tuple[int, ...]:
        d = self.gradient_dim
        return (d,) if self.gradient_diagonal else (d, d)

    @property
    def activation_estimate_shape(self) -> tuple[int, ...]:
        """The shape of a captured activation estimate: the side's, or ``(d,)`` when
        only diagonals are estimated (:attr:`estimate_diagonals`)."""
        return (self.activation_dim,) if self.estimate_diagonals else self.activation_shape

    @property
    def gradient_estimate_shape(self) -> tuple[int, ...]:
        """The shape of a captured gradient estimate (see :attr:`activation_estimate_shape`)."""
        return (self.gradient_dim,) if self.estimate_diagonals else self.gradient_shape

    @property
    def active(self) -> bool:
        """Whether the block is captured and preconditions now: its weight requires grad."""
        return self.weight.requires_grad

    @property
    def statistics_dtype(self) -> torch.dtype:
        """Curvature is kept in float32, or float64 for a float64 weight."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    @property
    def params(self) -> list[Tensor]:
        return [self.weight] if self.bias is None else [self.weight, self.bias]

    def gradient_matrix(self, grads: Mapping[Tensor, Tensor]) -> Tensor:
        """The block's part of ``grads`` (a gradient per parameter) as ``V``, ``(d_G, d_A)``."""
        return self._adapter.gradient_matrix(self, grads)

    def scatter(self, update: Tensor, directions: dict[Tensor, Tensor]) -> None:
        """Write ``update`` (``V``-shaped) into ``directions``' tensors for the block's rows."""
        self._adapter.scatter(self, update, directions)


class LayerAdapter:
    """How the parameters of one module type form Kronecker blocks.

    The defaults serve a module computing ``y = x Wᵀ + b`` over the last dimension
    with ``W`` stored ``(out, in...)`` (``weight_layout = "out_in"``, like
    ``nn.Linear``) or ``(in, out)`` (``"in_out"``, like transformers' ``Conv1D``),
    captured by a forward hook on the module. Override what differs:

    * :meth:`blocks`: the blocks the module's own parameters form;
    * :meth:`input_dim`, :meth:`output_dim`: ``d_A`` without the bias column, ``d_G``;
    * :meth:`activation_rows`, :meth:`gradient_rows`: rows from one call;
    * :meth:`activation_statistic`: when rows would be wasteful (one-hot tokens); an
      override takes the ``select`` argument (the capture's row subset, which it may
      ignore: its statistic is then exact);
    * :meth:`attach`: when the block's input and output are not the module's own
      (attention's projections run inside one functional call);
    * :meth:`uses_bias`: whether a call of ``module`` adds the block's bias.
    """

    weight_layout: str = "out_in"

    # ------------------------------------------------------------- structure
    def blocks(self, name: str, module: nn.Module) -> list[KroneckerLayer]:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            return []
        bias = getattr(module, "bias", None)
        bias = bias if isinstance(bias, nn.Parameter) else None
        return [KroneckerLayer(name, module, weight, bias, self)]

    def input_dim(self, layer: KroneckerLayer) -> int:
        w = layer.weight
        return int(w.shape[0]) if self.weight_layout == "in_out" else int(w[0].numel())

    def output_dim(self, layer: KroneckerLayer) -> int:
        w = layer.weight
        size = int(w.shape[1] if self.weight_layout == "in_out" else w.shape[0])
        return size if layer.weight_rows is None else len(range(size)[layer.weight_rows])

    # ------------------------------------------------------------- capture
    def attach(
        self, module: nn.Module, layers: list[KroneckerLayer], recorder: Recorder
    ) -> list[RemovableHandle]:
        """Hooks that report every call of ``module`` to ``recorder`` (default: a forward hook)."""

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not inputs or not isinstance(output, Tensor) or not recorder.recording():
                return
            for layer in layers:
                recorder.record(layer, mod, inputs[0], output, None)

        return [module.register_forward_hook(hook)]

    def uses_bias(self, layer: KroneckerLayer, module: nn.Module) -> bool:
        """Whether a call of ``module`` adds ``layer``'s bias (False for a bias-free tied twin)."""
        return getattr(module, "bias", None) is layer.bias

    def activation_rows(self, layer: KroneckerLayer, module: nn.Module, inputs: Tensor) -> Tensor:
        """Rows ``a`` of one call, ``(rows, input_dim)``, without the bias column."""
        return inputs.reshape(-1, inputs.shape[-1])

    def gradient_rows(
        self, layer: KroneckerLayer, module: nn.Module, grad_output: Tensor
    ) -> tuple[Tensor, int]:
        """Rows ``g`` of one call and the number of examples they come from."""
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        return rows, rows.shape[0]

    def activation_statistic(
        self,
        layer: KroneckerLayer,
        module: nn.Module,
        inputs: Tensor,
        diagonal: bool,
        dtype: torch.dtype,
        select: Callable[[Tensor], Tensor] | None = None,
    ) -> tuple[Tensor, int, Tensor | None]:
        """``(Σ a aᵀ, or Σ a² when diagonal; number of rows; the rows, or None)`` in ``dtype``.

        The rows include the bias column; they are returned (all of them) for the
        optional row store (R-Kalman) and may be None when an adapter sums without
        them. ``select``, given when the capture bounds the rows behind a dense sum
        (``max_statistics_rows``), maps the rows to a reweighted random subset with
        ``E[select(R)ᵀ select(R)] = Rᵀ R``: the dense sum is taken over it. A diagonal
        sum (linear in the rows) always uses every row, and an adapter that sums
        without rows may ignore ``select`` (its statistic is then exact).
        """
        rows = self.activation_rows(layer, module, inputs.to(dtype))
        if layer.bias is not None:
            value = 1.0 if self.uses_bias(layer, module) else 0.0
            rows = torch.cat([rows, rows.new_full((rows.shape[0], 1), value)], dim=1)
        if diagonal:
            total = rows.pow(2).sum(0)
        else:
            subset = rows if select is None else select(rows)
            total = subset.T @ subset
        return total, rows.shape[0], rows

    # ------------------------------------------------------------- gradient matrix
    def gradient_matrix(self, layer: KroneckerLayer, grads: Mapping[Tensor, Tensor]) -> Tensor:
        weight_grad = grads.get(layer.weight)
        if weight_grad is None:
            weight_grad = torch.zeros_like(layer.weight)
        if self.weight_layout == "in_out":
            matrix = weight_grad.reshape(weight_grad.shape[0], -1).T
        else:
            matrix = weight_grad.reshape(weight_grad.shape[0], -1)
        if layer.weight_rows is not None:
            matrix = matrix[layer.weight_rows]
        if layer.bias is not None:
            bias_grad = grads.get(layer.bias)
            if bias_grad is None:
                bias_grad = torch.zeros_like(layer.bias)
            bias_grad = bias_grad.reshape(-1)
            if layer.bias_rows is not None:
                bias_grad = bias_grad[layer.bias_rows]
            matrix = torch.cat([matrix, bias_grad[:, None].to(matrix.dtype)], dim=1)
        return matrix

    def scatter(
        self, layer: KroneckerLayer, update: Tensor, directions: dict[Tensor, Tensor]
    ) -> None:
        weight_update = update[:, :-1] if layer.bias is not None else update
        target = _direction(directions, layer.weight, update.dtype)
        view = target.reshape(target.shape[0], -1)
        if self.weight_layout == "in_out":
            view = view.T
        if layer.weight_rows is not None:
            view = view[layer.weight_rows]
        view.copy_(weight_update)
        if layer.bias is not None:
            bias = _direction(directions, layer.bias, update.dtype).reshape(-1)
            if layer.bias_rows is not None:
                bias = bias[layer.bias_rows]
            bias.copy_(update[:, -1])


def _direction(directions: dict[Tensor, Tensor], param: Tensor, dtype: torch.dtype) -> Tensor:
    """The direction tensor of ``param`` (zeros in ``dtype`` until a block writes its rows)."""
    out = directions.get(param)
    if out is None:
        out = torch.zeros(param.shape, dtype=dtype, device=param.device)
        directions[param] = out
    return out


# ------------------------------------------------------------------ the table
#: Adapters by module type (looked up along the type's MRO), most recent first.
_BY_TYPE: dict[type[nn.Module], LayerAdapter] = {}
#: Adapters by structure, for module types this library cannot import (transformers).
_BY_STRUCTURE: list[tuple[Callable[[nn.Module], bool], LayerAdapter]] = []


def register_layer(
    module_type: type[nn.Module] | Callable[[nn.Module], bool], adapter: LayerAdapter
) -> None:
    """Give ``module_type`` (or every module a predicate accepts) Kronecker curvature.

    ``adapter`` is a :class:`LayerAdapter` describing the blocks, rows and layout
    (see its docstring). A later registration of the same type replaces the
    earlier one, and a type's own registration wins over a base class's::

        class Scale(nn.Module):                  # y = x Wᵀ, W of shape (out, in)
            def __init__(self, d_in, d_out):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(d_out, d_in))
            def forward(self, x):
                return x @ self.weight.T

        grng.register_layer(Scale, grng.LayerAdapter())
    """
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a grng.LayerAdapter, got {type(adapter).__name__}")
    if isinstance(module_type, type):
        if not issubclass(module_type, nn.Module):
            raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
        _BY_TYPE[module_type] = adapter
    elif callable(module_type):
        _BY_STRUCTURE.insert(0, (module_type, adapter))
    else:
        raise TypeError(f"module_type must be a type or a predicate, got {module_type!r}")


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The registered adapter of ``module``'s type (nearest in its MRO), or None."""
    for klass in type(module).__mro__:
        adapter = _BY_TYPE.get(klass)
        if adapter is not None:
            return adapter
    for accepts, adapter in _BY_STRUCTURE:
        if accepts(module):
            return adapter
    return None


def find_kronecker_layers(
    model: nn.Module,
    trainable: set[Tensor],
    *,
    excluded: Callable[[str, nn.Module], bool] | None = None,
    max_factor_dim: int | None = None,
) -> list[KroneckerLayer]:
    """The Kronecker blocks of ``model`` whose parameters are trainable, each parameter once.

    Modules are visited in ``named_modules`` order (parents before children, so an
    attention module claims its ``out_proj``). A weight shared by two modules
    (tying) is claimed by the first; the other's calls still contribute
    statistics (:func:`modules_using`). A bias that is frozen or already claimed
    is left out of the block (its weight's block has no bias column); a trainable
    bias whose weight is frozen falls back to the diagonal preconditioner. A
    module for which ``excluded(name, module)`` holds is skipped (its parameters
    fall back to the diagonal). A side wider than ``max_factor_dim`` is kept
    diagonal.
    """
    layers: list[KroneckerLayer] = []
    claimed: dict[Tensor, KroneckerLayer] = {}
    untied: list[str] = []
    for name, module in model.named_modules():
        adapter = adapter_for(module)
        if adapter is None or (excluded is not None and excluded(name, module)):
            continue
        own: list[KroneckerLayer] = []
        for block in adapter.blocks(name or type(module).__name__, module):
            owner = claimed.get(block.weight)
            # A submodule whose parameters its parent's adapter claimed (attention's
            # out_proj) is not a tie: it never runs on its own.
            inside_owner = owner is not None and any(m is module for m in owner.module.modules())
            if owner is not None and owner.adapter is not adapter and not inside_owner:
                # Tied across module types (GPT-2's lm_head and wte): the owner's
                # factors have another layout, so this module's calls cannot feed them.
                untied.append(
                    f"{name!r} ({type(module).__name__}) shares its weight with "
                    f"{owner.name!r} ({type(owner.module).__name__})"
                )
            if block.weight not in trainable or owner is not None:
                continue
            # A bias that is frozen while its weight trains, or claimed already, stays out
            # of the block (no bias column; it gets the diagonal fallback if it ever trains).
            if block.bias is not None and (
                block.bias not in trainable
                or block.bias in claimed
                or (block.weight.requires_grad and not block.bias.requires_grad)
            ):
                block.bias, block.bias_rows = None, None
            if max_factor_dim is not None:
                block.capped_sides = tuple(
                    side
                    for side, dim, diagonal in (
                        ("A", block.activation_dim, block.activation_diagonal),
                        ("G", block.gradient_dim, block.gradient_diagonal),
                    )
                    if dim > max_factor_dim and not diagonal
                )
                block.activation_diagonal |= "A" in block.capped_sides
                block.gradient_diagonal |= "G" in block.capped_sides
            own.append(block)
        # Claimed after the module's own blocks: attention's q, k and v share a weight.
        for block in own:
            claimed.update(dict.fromkeys(block.params, block))
        layers += own
    if untied:
        warn(
            "weights tied across module types get curvature from their first module's "
            f"calls only: {'; '.join(untied)}. The other module's calls still contribute "
            "to the gradient, not to the factors."
        )
    return layers


def modules_using(model: nn.Module, layer: KroneckerLayer) -> Iterator[nn.Module]:
    """Every module of ``layer``'s adapter that computes with ``layer``'s weight (tying)."""
    for module in model.modules():
        if module is layer.module or (
            adapter_for(module) is layer.adapter and getattr(module, "weight", None) is layer.weight
        ):
            yield module


def parameters_of(layers: Iterable[KroneckerLayer]) -> dict[Tensor, list[KroneckerLayer]]:
    """Every parameter a block reads, with the blocks that read it."""
    out: dict[Tensor, list[KroneckerLayer]] = {}
    for layer in layers:
        for p in layer.params:
            out.setdefault(p, []).append(layer)
    return out
