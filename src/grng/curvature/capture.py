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
dtype autocast computes the layer in, and are computed in it too: the gradient
hook switches autocast off, since a ``loss.backward()`` inside a
``torch.autocast`` block runs it with autocast on, and there ``aᵀa`` was a
bfloat16 matmul (2.4e-3 relative error in ``A`` on a BERT classifier).

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

Row subsets (``max_statistics_rows=c``; the optimizers' default is
``CurvatureOptions.max_statistics_rows``): a dense sum ``Σ r rᵀ`` over the
``n > c`` rows of one call (activation rows, or output-gradient rows ``ĝ``) is
estimated from at most ``c`` of them. Row ``i`` is drawn with probability
``π_i = min(1, κ‖r_i‖²)``, ``κ`` such that ``Σ π = c``
(:func:`inclusion_probabilities`), by systematic sampling over the rows in a
random order (each row is drawn at most once, with probability exactly
``π_i``), and weighted by ``1/π_i``::

    Σ_{i ∈ S} r_i r_iᵀ / π_i,      E_S[·] = Σ_i π_i r_i r_iᵀ / π_i = Σ_i r_i r_iᵀ

(Horvitz–Thompson). The sum itself results when ``n ≤ c``, when at most ``c``
rows are nonzero (they all get ``π = 1``, zero rows are never drawn; e.g. the
gradient rows of the positions a classifier's loss reads), and for a side
narrower than ``MIN_SUBSET_WIDTH`` (below). Drawing
proportionally to ``‖r‖²`` (length-squared sampling, which minimises the
expected squared Frobenius error of such a sum among draws with replacement;
Drineas, Kannan & Mahoney 2006) and not uniformly: on a BERT classifier the
gradient rows that carry the loss are 32 of 4096 (its ``[CLS]`` positions), and
a uniform 1024 of them gave ``G`` with a relative error of about 1
(``docs/algorithms.md``, "Capture cost"). The counts (``rows_A``, examples,
uses, ``M_p``) are those of every row, so the normalisation above is unchanged
and the estimated ``A`` and ``G`` are unbiased; so is accumulation, a sum of
unbiased per-call estimates. The draw is over the call's whole flattened batch
(every example and position of a sequence or convolution). The activation and
gradient subsets are drawn independently: no statistic here pairs activation
row ``i`` with gradient row ``i`` (``A`` and ``G`` are separate sums), and
independent draws make ``Â`` and ``Ĝ`` independent, so that
``E[Â ⊗ Ĝ] = A ⊗ G`` also holds (a shared subset would add their covariance).
A diagonal sum (``Σ a²``, linear in the rows like the draw itself) uses every
row, and so does an adapter's own statistic (an embedding's token counts) and a
side narrower than ``MIN_SUBSET_WIDTH`` = 128: the draw costs about 75 ns per row
(a row norm, a sort, a ``randperm``, a gather), as much as the dense sum's ``2d²``
flops per row at ``d`` ≈ 64–100 (``benchmarks/statistics_rows.py``, "break-even",
on the CPU of ``docs/algorithms.md``), so a narrower side would not get cheaper. A
non-finite row makes the estimate non-finite, drawn or not, so the step's
finiteness check still sees it. The draw is seeded by ``row_seed`` (the
optimizers set it per step), the layer, the call and the side, in a stream
apart from the row store's, so a run is reproducible and a resumed run draws
the same subsets. It costs a row norm (``O(n·d)``), a sort and a ``randperm``
of ``n`` per call and side, and makes a dense sum ``O(c·d²)`` instead of
``O(n·d²)``; the error it adds is measured in ``docs/algorithms.md``.

What is computed (``statistics``): ``"factors"`` (default) as above;
``"diagonals"`` estimates only the diagonal of every side, ``Σ a²`` and
``Σ ĝ²`` over every row, normalised as above (``O(rows·d)``, no dense sum), for
an optimizer that reads no more of the factors: R-Kalman reads their traces
(π, the finiteness check), the full diagonal of a diagonal side and the row
store. ``FactorEstimate``'s factors are then vectors: the diagonals of the
factors that ``"factors"`` gives, up to the order of summation.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from grng._precision import autocast_disabled
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


#: Sides narrower than this sum every row even above ``max_statistics_rows``: the draw
#: costs about as much per row as a dense sum of width 64–100 (module docstring).
MIN_SUBSET_WIDTH = 128


def inclusion_probabilities(weight: Tensor, k: int) -> Tensor:
    """``π_i = min(1, κ w_i)`` with ``κ`` such that ``Σ π = k``, for weights ``w ≥ 0``.

    The rows of the ``m`` largest weights get ``π = 1`` and the others
    ``(k − m) w_i / Σ_{rest} w``, where ``m`` is the least count for which that is
    ``≤ 1`` (the capped set is a prefix of the weights in decreasing order). When fewer
    than ``k`` weights are positive, ``π = 1`` for each of them and 0 for the rest
    (``Σ π`` is then their number). No host synchronisation.
    """
    n = weight.shape[0]
    ordered, order = weight.sort(descending=True)
    tail = ordered.flip(0).cumsum(0).flip(0)  # Σ_{i ≥ j} w_i in decreasing order
    j = torch.arange(n, device=weight.device, dtype=weight.dtype)
    capped = ((k - j) * ordered >= tail) & (j < k) & (ordered > 0)
    m = capped.sum()
    rest = tail[m.clamp_max(n - 1)]
    rate = torch.where(rest > 0, (k - m) / rest, 0.0)
    sorted_probability = torch.where(capped, 1.0, (rate * ordered).clamp_max(1.0))
    return torch.empty_like(weight).scatter_(0, order, sorted_probability)


def _statistics_salt(salt: int, side: int) -> int:
    """The seed salt of a statistics subset: a stream apart from the row store's ``2·salt + side``."""
    return 2 * salt + side + (1 << 40)


@dataclass(frozen=True)
class FactorEstimate:
    """One step's estimate of a layer's two Kronecker factors.

    A factor is a ``(d, d)`` matrix, or its diagonal ``(d,)`` for a diagonal side or
    when the capture estimates diagonals only (``statistics="diagonals"``).
    """

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
        max_statistics_rows: ``None`` (every row), or the most rows of one call
            behind a dense sum (see "Row subsets" in the module docstring).
        statistics: ``"factors"`` (default) estimates the factors; ``"diagonals"``
            only their diagonals, for an optimizer that reads no more (see
            "What is computed" in the module docstring; :meth:`set_statistics`).
    """

    model: nn.Module
    layers: list[KroneckerLayer]
    fisher: str = "empirical"
    armed: bool = False
    loss_reduction: str = "mean"
    keep_rows: int | None = None
    row_seed: int = 0
    max_statistics_rows: int | None = None
    statistics: str = "factors"
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
        cap = self.max_statistics_rows
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_statistics_rows must be None or an int >= 1, got {cap!r}")
        self.set_statistics(self.statistics)
        # Each module reports the blocks it computes: its own, and a tied twin's.
        computed_by: dict[nn.Module, list[KroneckerLayer]] = {}
        for layer in self.layers:
            for module in modules_using(self.model, layer):
                computed_by.setdefault(module, []).append(layer)
        for module, layers in computed_by.items():
            assert layers[0].adapter is not None
            self._handles += layers[0].adapter.attach(module, layers, self)
        self._handles.append(self.model.register_forward_pre_hook(self._count_forward))

    def set_statistics(self, statistics: str) -> None:
        """Estimate the ``"factors"`` or only their ``"diagonals"`` from the next call on.

        Sets every captured block's :attr:`KroneckerLayer.estimate_diagonals`, which
        says what shape its estimates have (also to :mod:`grng.distributed`).
        """
        if statistics not in ("factors", "diagonals"):
            raise ValueError(f"statistics must be 'factors' or 'diagonals', got {statistics!r}")
        self.statistics = statistics
        for layer in self.layers:
            layer.estimate_diagonals = statistics == "diagonals"

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
                # Sums in float32 even for a backward run inside torch.autocast.
                with autocast_disabled(grad_output.device.type):
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
        sums = self._sums.get(layer.name)
        calls = 0 if sums is None else sums.calls
        salt = zlib.crc32(layer.name.encode()) + 1_000_003 * calls
        # ``module`` may be a tied twin of layer.module; its own geometry counts.
        a_sum, a_count, a_rows = adapter.activation_statistic(
            layer,
            module,
            activation,
            layer.activation_diagonal or layer.estimate_diagonals,
            dtype,
            self._selector(salt, 0),
        )
        g_rows, examples = adapter.gradient_rows(layer, module, grad_output.to(dtype))
        terms = self._fisher_terms if self._in_fisher_pass else None
        if sums is None:
            sums = _LayerSums(
                activation=torch.zeros_like(a_sum),
                gradient=g_rows.new_zeros(layer.gradient_estimate_shape),
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
        if layer.gradient_diagonal or layer.estimate_diagonals:
            sums.gradient.add_(g_rows.pow(2).sum(0))
        else:
            select = self._selector(salt, 1)
            subset = g_rows if select is None else select(g_rows)
            sums.gradient.addmm_(subset.T, subset)
        if self.keep_rows is not None:
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

    def _generator(self, device: torch.device, salt: int) -> torch.Generator:
        """The generator of one draw of rows, seeded by ``row_seed`` and ``salt``."""
        generator = torch.Generator(device=device)
        generator.manual_seed((self.row_seed * 2_147_483_647 + salt) % (2**63))
        return generator

    def _keep(self, rows: Tensor, salt: int) -> Tensor:
        """``k = keep_rows`` rows drawn uniformly without replacement, scaled by
        ``sqrt(n / k)`` so that ``E[keptᵀ kept] = rowsᵀ rows``; all rows, unscaled, if
        ``n ≤ k``."""
        k = self.keep_rows
        assert k is not None
        n = rows.shape[0]
        if n <= k:
            return rows
        generator = self._generator(rows.device, salt)
        index = torch.randperm(n, generator=generator, device=rows.device)[:k]
        return rows.index_select(0, index) * (n / k) ** 0.5

    def _selector(self, salt: int, side: int) -> Callable[[Tensor], Tensor] | None:
        """The ``select`` of :meth:`LayerAdapter.activation_statistic` (None: every row)."""
        cap = self.max_statistics_rows
        if cap is None:
            return None
        return lambda rows: self._statistics_subset(rows, cap, _statistics_salt(salt, side))

    def _statistics_subset(self, rows: Tensor, k: int, salt: int) -> Tensor:
        """At most ``k`` rows, row ``i`` drawn with probability ``π_i ∝ ‖r_i‖²`` (capped at
        1) and scaled by ``1/√π_i``, so ``E[subsetᵀ subset] = rowsᵀ rows``; ``(k, d)``, unused
        slots zero. All rows if ``n ≤ k`` or ``d < MIN_SUBSET_WIDTH``. See "Row subsets" in
        the module docstring."""
        n = rows.shape[0]
        if n <= k or rows.shape[1] < MIN_SUBSET_WIDTH:
            return rows
        generator = self._generator(rows.device, salt)
        # ‖r_i‖² in float64 (the probabilities are cumulated to k); the norm without a
        # float64 copy of the rows.
        weight = torch.linalg.vector_norm(rows, dim=1).to(torch.float64).square()
        probability = inclusion_probabilities(weight, k)
        order = torch.randperm(n, generator=generator, device=rows.device)
        # Systematic sampling in a random order: points u, u + 1, …, u + k − 1 on the
        # cumulated probabilities; row i's interval has length π_i ≤ 1, so it holds a
        # point with probability π_i exactly, and never two.
        edges = probability[order].cumsum(0)
        start = torch.rand((), generator=generator, device=rows.device, dtype=torch.float64)
        points = start + torch.arange(k, device=rows.device, dtype=torch.float64)
        slot = torch.searchsorted(edges, points, right=True)
        valid = slot < n  # fewer than k points land when fewer than k rows are nonzero
        chosen = order[slot.clamp_max(n - 1)]
        scale = torch.where(valid, probability[chosen].rsqrt(), 0.0)
        # A non-finite row must make the estimate non-finite, drawn or not (the step's
        # finiteness check reads the estimate): 0 · (inf or nan) = nan.
        scale = scale + 0.0 * weight.sum()
        return rows.index_select(0, chosen) * scale.to(rows.dtype)[:, None]

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
