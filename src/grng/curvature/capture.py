"""Hooks that capture Kronecker-factor statistics, and only when asked to.

:class:`CurvatureCapture` asks each block's adapter (:mod:`grng.curvature.layers`)
to hook the modules that compute it (a forward hook by default; attention wraps
its projections). The hooks report each call through :meth:`CurvatureCapture.record`,
which does nothing unless capture is *armed* for the current step (the
optimizer arms it for steps that refresh the factors), autograd is recording,
and no :meth:`CurvatureCapture.paused` block is open. When it does act, it
registers a gradient hook on the block's output that receives ``∂L/∂output``
during the backward pass and folds the pair (input, output gradient) into
running sums (a diagonal side sums squares only). Pairing inside one closure means a forward whose output is never
back-propagated contributes nothing, and a layer used twice in one forward
contributes both calls, each matched with its own gradient.

Sums are kept in float32 (float64 if the parameters are float64), whatever
dtype autocast computes the layer in.

Normalisation. ``G`` estimates ``(1/M) Σ_rows g gᵀ``, where ``g = ∂ℓ_i/∂s`` are
the output gradients of the individual terms of a loss ``(1/M) Σ_i ℓ_i`` (or
``Σ_i ℓ_i``) and the rows are those of every term::

    A = Σ a aᵀ / rows_A
    G = n · Σ ĝ ĝᵀ       loss_reduction="mean" (default): ĝ = g / M
    G = Σ ĝ ĝᵀ / n       loss_reduction="sum":            ĝ = g
    n = examples / uses

where ``ĝ`` are the captured output gradients, ``examples`` the layer's examples
(every leading index of a Linear's input, the batch of a convolution; see
:mod:`grng.curvature.layers`) summed over every backward since the last clear
(gradient accumulation: a mean loss over ``k`` micro-batches is divided by
``k`` as usual, a summed one is not), and ``uses`` how many times the layer ran
per forward: its calls divided by the backward passes that reached it (a reused
layer sees each example several times, but the loss still averages over it
once). Counting backward passes, not calls of ``model``, makes accumulation
independent of the caller's order: the forward may go through ``model`` or a
submodule of it (Lightning's ``training_step``), and ``zero_grad`` may come
before or after it (it discards the statistics of backward passes already run,
never those of a forward still waiting for its backward). For the training loss the library
cannot know ``M``, so it takes ``M = n``: one loss term per example the layer
counts, as for cross-entropy over ``(B, T, C)`` logits or a per-image loss
after a convolution. A loss with fewer terms, e.g. a sum over the ``T``
positions averaged over ``B``, gets a Linear layer's ``G`` ``T`` times too
large.

Monte-Carlo passes (``fisher="mc"``): the library builds the loss of
:meth:`CurvatureCapture.fisher_pass` (:func:`grng.curvature.sampled_nll`, always
a mean, whatever ``loss_reduction`` says) and passes its number of terms
``M_p`` (:func:`grng.curvature.fisher.loss_terms`), which replaces ``n``. Each
pass ``p`` since the last clear is its own mean (``ĝ = g / M_p``), so::

    G = Σ_p M_p² Σ_{rows of p} ĝ ĝᵀ / Σ_p M_p  =  Σ_p Σ_{rows of p} g gᵀ / Σ_p M_p

(both sums over the passes that reached the layer): ``k`` micro-batch passes
of ``b`` terms give the ``G`` of one pass over ``k·b`` terms. The Gaussian
likelihood has one term per batch example (summing over its positions, pixels
and outputs, the natural loss for conv/image outputs), the categorical one a
term per leading index of the logits. A pass without ``terms`` is normalised
like the training loss; a layer's passes since the last clear should all give
``terms`` or all omit it.

Row store (opt-in, ``keep_rows=k``): besides the sums, each call keeps ``k`` of
its rows (a uniformly random subset, seeded by ``row_seed``, the layer and the
call, so a run is reproducible and a resumed run draws the same rows), scaled
by ``sqrt(rows / kept)`` so that ``Σ kept kept·keptᵀ`` is an unbiased estimate
of the call's ``Σ r rᵀ``, and exactly it when nothing was dropped.
:meth:`CurvatureCapture.estimates` returns them as ``activation_rows`` ``U_A``
and ``gradient_rows`` ``U_G`` (at most ``k`` each, re-subsampled the same way
if several calls kept more), normalised like the factors (``U_A`` by
``1/√rows_A``, ``U_G`` by the square root of ``G``'s factor above: ``√n``,
``1/√n`` or ``1/√Σ_p M_p``, the rows of a Monte-Carlo pass having been scaled
by ``M_p``)::

    U_Aᵀ U_A ≈ A,   U_Gᵀ U_G ≈ G.

A random subset rather than the first ``k`` rows: convolution and sequence rows
are ordered example-major, so the first rows would be the positions of one
example.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from grng.curvature.layers import KroneckerLayer, modules_using


@dataclass
class _LayerSums:
    activation: Tensor
    gradient: Tensor
    activation_rows: int = 0
    examples: int = 0
    calls: int = 0
    #: Backward passes (autograd graph tasks) that reached the layer, and the last one.
    passes: int = 0
    last_task: int = -1
    #: Σ_p M_p over the Monte-Carlo passes with known terms that reached the layer.
    terms: int = 0
    last_pass: int = 0
    activation_kept: list[Tensor] = field(default_factory=list)
    gradient_kept: list[Tensor] = field(default_factory=list)


@dataclass(frozen=True)
class FactorEstimate:
    """One step's estimate of a layer's two Kronecker factors."""

    activation_factor: Tensor
    gradient_factor: Tensor
    examples: float
    #: With ``keep_rows``: rows ``U`` (``(≤ k, dim)``) with ``Uᵀ U`` ≈ the factor.
    activation_rows: Tensor | None = None
    gradient_rows: Tensor | None = None


@dataclass
class CurvatureCapture:
    """Captures Kronecker-factor statistics for ``layers`` of ``model``.

    Args:
        model: the network; a forward pre-hook counts its batch examples (the
            diagonal fallback's scale when no layer was captured) and empty batches.
        layers: the layers to capture.
        fisher: ``"empirical"`` to take output gradients from any backward
            (the training loss's own), ``"mc"`` to take them only inside
            :meth:`fisher_pass` (a backward of labels sampled from the model).
        keep_rows: ``None`` (default: sums only), or keep up to this many
            rows per layer per step (see "Row store" in the module docstring).
        row_seed: seeds the choice of kept rows; a caller sets it per step.
        loss_reduction: ``"mean"`` or ``"sum"``, how the training loss reduces
            over its terms (the scale of ``G``, see "Normalisation" in the
            module docstring); Monte-Carlo passes are always means.
    """

    model: nn.Module
    layers: list[KroneckerLayer]
    fisher: str = "empirical"
    armed: bool = False
    loss_reduction: str = "mean"
    keep_rows: int | None = None
    row_seed: int = 0
    _paused: int = 0
    _in_fisher_pass: bool = False
    _fisher_terms: int | None = None
    _fisher_passes: int = 0
    _forwards: int = 0
    _leading_examples: int = 0
    _empty_forwards: int = 0
    _sums: dict[str, _LayerSums] = field(default_factory=dict)
    _handles: list[RemovableHandle] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        # Each module reports the blocks it computes: its own, and a tied twin's.
        computed_by: dict[nn.Module, list[KroneckerLayer]] = {}
        for layer in self.layers:
            for module in modules_using(self.model, layer):
                computed_by.setdefault(module, []).append(layer)
        for module, layers in computed_by.items():
            assert layers[0].adapter is not None
            self._handles += layers[0].adapter.attach(module, layers, self)
        self._handles.append(self.model.register_forward_pre_hook(self._count_forward))

    def remove(self) -> None:
        """Detach every hook from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def recording(self) -> bool:
        """Whether statistics are captured now: armed, not paused, autograd recording."""
        return self.armed and self._paused == 0 and torch.is_grad_enabled()

    def _count_forward(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not self.recording():
            return
        first = next((a for a in args if isinstance(a, Tensor) and a.dim() > 0), None)
        if first is not None and first.shape[0] == 0:
            # An empty batch: no statistics, and not a forward that a reused layer's
            # call count is divided by.
            self._empty_forwards += 1
            return
        self._forwards += 1
        if first is not None:
            self._leading_examples += first.shape[0]

    def record(
        self,
        layer: KroneckerLayer,
        module: nn.Module,
        inputs: Tensor,
        output: Tensor,
        columns: slice | None,
    ) -> None:
        """Pair one call's input with its output gradient (adapters call this).

        A block whose weight does not require a gradient (frozen) is not recorded."""
        if not self.recording() or not output.requires_grad or not layer.active:
            return
        activation = inputs.detach()

        def on_gradient(grad_output: Tensor) -> None:
            wanted = self._in_fisher_pass if self.fisher == "mc" else True
            if wanted and self._paused == 0:
                if columns is not None:
                    grad_output = grad_output[..., columns]
                self._accumulate(layer, module, activation, grad_output.detach())

        output.register_hook(on_gradient)

    def _accumulate(
        self, layer: KroneckerLayer, module: nn.Module, activation: Tensor, grad_output: Tensor
    ) -> None:
        dtype = layer.statistics_dtype
        if activation.numel() == 0:
            return  # an empty batch carries no statistics (and would make A = 0/0)
        adapter = layer.adapter
        assert adapter is not None
        # ``module`` may be a tied twin of layer.module; its own geometry counts.
        a_sum, a_count, a_rows = adapter.activation_statistic(
            layer, module, activation, layer.activation_diagonal, dtype
        )
        g_rows, examples = adapter.gradient_rows(layer, module, grad_output.to(dtype))
        terms = self._fisher_terms if self._in_fisher_pass else None
        sums = self._sums.get(layer.name)
        if sums is None:
            sums = _LayerSums(
                activation=torch.zeros_like(a_sum),
                gradient=g_rows.new_zeros(layer.gradient_shape),
            )
            self._sums[layer.name] = sums
        if terms is not None:
            # A Monte-Carlo pass is the mean of its own M_p terms: M_p ĝ = g, the
            # per-term gradients; M_p counts once per pass, however often the layer ran.
            g_rows = g_rows * terms
            if sums.last_pass != self._fisher_passes:
                sums.terms += terms
                sums.last_pass = self._fisher_passes
        sums.activation.add_(a_sum)
        if layer.gradient_diagonal:
            sums.gradient.add_(g_rows.pow(2).sum(0))
        else:
            sums.gradient.addmm_(g_rows.T, g_rows)
        if self.keep_rows is not None:
            salt = zlib.crc32(layer.name.encode()) + 1_000_003 * sums.calls
            if a_rows is not None and not layer.activation_diagonal:
                sums.activation_kept.append(self._keep(a_rows, 2 * salt))
            if not layer.gradient_diagonal:
                sums.gradient_kept.append(self._keep(g_rows, 2 * salt + 1))
        sums.activation_rows += a_count
        sums.examples += examples
        sums.calls += 1
        task = torch._C._current_graph_task_id()
        if task != sums.last_task or task < 0:
            sums.passes += 1
            sums.last_task = task

    def _keep(self, rows: Tensor, salt: int) -> Tensor:
        """``keep_rows`` random rows scaled by ``sqrt(n / kept)`` (all rows if ``n ≤ k``)."""
        n, k = rows.shape[0], self.keep_rows
        assert k is not None
        if n <= k:
            return rows
        generator = torch.Generator(device=rows.device)
        generator.manual_seed((self.row_seed * 2_147_483_647 + salt) % (2**63))
        index = torch.randperm(n, generator=generator, device=rows.device)[:k]
        return rows.index_select(0, index) * (n / k) ** 0.5

    @property
    def is_paused(self) -> bool:
        return self._paused > 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No statistics are recorded inside (second-order or perturbed passes)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextmanager
    def fisher_pass(self, terms: int | None = None) -> Iterator[None]:
        """In ``fisher="mc"`` mode, output gradients are taken only inside this block.

        Args:
            terms: ``M_p``, the number of terms the block's loss averages over
                (:func:`grng.curvature.fisher.loss_terms`); ``None`` normalises
                the pass like the training loss (module docstring).
        """
        self._in_fisher_pass = True
        self._fisher_terms = terms
        self._fisher_passes += 1
        try:
            yield
        finally:
            self._in_fisher_pass = False
            self._fisher_terms = None

    @property
    def only_empty_batches(self) -> bool:
        """Whether every forward since the last clear had an empty batch (0 rows)."""
        return self._empty_forwards > 0 and self._forwards == 0

    @property
    def has_statistics(self) -> bool:
        return bool(self._sums)

    @property
    def examples(self) -> int:
        """Examples behind the captured statistics (for the diagonal fallback's scale)."""
        per_layer = [s.examples / self._uses(s) for s in self._sums.values()]
        return round(max(per_layer)) if per_layer else self._leading_examples

    @staticmethod
    def _uses(sums: _LayerSums) -> float:
        # Calls per backward pass: a layer run r times in one forward is reached r
        # times by that forward's backward. Counting passes rather than forwards of
        # ``model`` keeps this right whatever module the caller runs (Lightning calls
        # a submodule) and whenever it zeroes the gradients (before or after the forward).
        return max(1.0, sums.calls / max(1, sums.passes))

    def _gradient_scale(self, sums: _LayerSums, examples: float) -> float:
        """What ``Σ ĝ ĝᵀ`` is multiplied by to give ``G`` (``examples`` is ``n``)."""
        if sums.terms:
            return 1.0 / sums.terms  # Monte-Carlo passes, rows already scaled by M_p
        if self.loss_reduction == "sum":
            return 1.0 / examples  # ĝ = g, the per-term gradients
        return examples  # ĝ = g / n

    def estimates(self) -> dict[str, FactorEstimate]:
        """This step's factor estimates per layer name (see the module docstring)."""
        out = {}
        for name, s in self._sums.items():
            examples = s.examples / self._uses(s)
            scale = self._gradient_scale(s, examples)
            a_rows = g_rows = None
            if self.keep_rows is not None:
                # Diagonal sides keep no rows: their factor is the estimate itself.
                salt = zlib.crc32(name.encode())
                if s.activation_kept:
                    a_rows = self._keep(torch.cat(s.activation_kept), 2 * salt)
                    a_rows = a_rows / s.activation_rows**0.5
                if s.gradient_kept:
                    g_rows = self._keep(torch.cat(s.gradient_kept), 2 * salt + 1)
                    g_rows = g_rows * scale**0.5
            out[name] = FactorEstimate(
                activation_factor=s.activation / s.activation_rows,
                gradient_factor=s.gradient * scale,
                examples=examples,
                activation_rows=a_rows,
                gradient_rows=g_rows,
            )
        return out

    def clear(self) -> None:
        """Forget everything captured since the last clear."""
        self._sums.clear()
        self._forwards = 0
        self._leading_examples = 0
        self._empty_forwards = 0
