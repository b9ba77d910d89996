"""Which curvature each parameter of the model gets: :meth:`CurvatureOptimizer.coverage`.

Every parameter of the model is in one of three states:

* ``"kronecker"``: it is read by one or more Kronecker blocks (a Linear's weight and
  bias; an attention ``in_proj_weight`` is three blocks ``...in_proj.q/k/v``, a grouped
  convolution's weight one block per group) whose weight currently trains;
* ``"diagonal"``: it trains with the diagonal fallback ``d / (v + γ)`` (no adapter for
  its module, an ``exclude=``-d module, or a trainable bias whose weight is frozen);
* ``"frozen"``: it does not require a gradient now (its blocks, if any, still exist
  and start capturing once it is unfrozen).

A parameter shared by several modules (tying) is one entry, under its first name in
``model.named_parameters()`` (wrapper prefixes removed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, overload

from torch import Tensor, nn

from grng.curvature.layers import KroneckerLayer

if TYPE_CHECKING:
    from grng.optim.base import CurvatureOptimizer

CoverageKind = Literal["kronecker", "diagonal", "frozen"]
KINDS: tuple[CoverageKind, ...] = ("kronecker", "diagonal", "frozen")

#: Share of the trainable parameters (by count of scalars) on the diagonal fallback
#: above which the constructor warns (:class:`CoverageWarning`).
DIAGONAL_WARNING_SHARE = 0.10


class CoverageWarning(UserWarning):
    """A large share of the model's trainable parameters gets no Kronecker curvature."""


@dataclass(frozen=True)
class CoverageEntry:
    """One parameter of the model and the curvature it gets.

    Attributes:
        name: its name in ``model.named_parameters()``, without wrapper prefixes.
        kind: ``"kronecker"``, ``"diagonal"`` or ``"frozen"`` (module docstring).
        module_type: the type name of the module that owns it.
        numel: its number of scalars.
        shape: its shape.
        blocks: the names of the Kronecker blocks that read it (``state["layer:<name>"]``),
            also while it is frozen; empty for a parameter without a block.
        note: why it is diagonal, or which factor sides are kept diagonal.
    """

    name: str
    kind: CoverageKind
    module_type: str
    numel: int
    shape: tuple[int, ...]
    blocks: tuple[str, ...] = ()
    note: str = ""


class Coverage(Sequence[CoverageEntry]):
    """The entries of every parameter of the model, in ``named_parameters`` order.

    Index by position or by parameter name; ``str()`` is a table with a total per kind.
    """

    def __init__(self, entries: Sequence[CoverageEntry]) -> None:
        self.entries: tuple[CoverageEntry, ...] = tuple(entries)
        self._by_name = {e.name: e for e in self.entries}

    @overload
    def __getitem__(self, index: int) -> CoverageEntry: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[CoverageEntry]: ...
    @overload
    def __getitem__(self, index: str) -> CoverageEntry: ...
    def __getitem__(self, index: int | slice | str) -> CoverageEntry | Sequence[CoverageEntry]:
        if isinstance(index, str):
            try:
                return self._by_name[index]
            except KeyError:
                raise KeyError(f"no parameter named {index!r} in the model") from None
        return self.entries[index]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[CoverageEntry]:
        return iter(self.entries)

    def __contains__(self, item: object) -> bool:
        return item in self._by_name if isinstance(item, str) else item in self.entries

    def of_kind(self, kind: CoverageKind) -> list[CoverageEntry]:
        return [e for e in self.entries if e.kind == kind]

    @property
    def totals(self) -> dict[CoverageKind, int]:
        """Scalars per kind."""
        return {kind: sum(e.numel for e in self.of_kind(kind)) for kind in KINDS}

    def __repr__(self) -> str:
        totals = ", ".join(f"{k}={v}" for k, v in self.totals.items())
        return f"Coverage({len(self)} parameters: {totals})"

    def __str__(self) -> str:
        header = ("parameter", "kind", "module", "shape", "numel", "blocks / note")
        rows = [
            (
                e.name,
                e.kind,
                e.module_type,
                "×".join(map(str, e.shape)) or "scalar",
                f"{e.numel:,}",
                "; ".join(x for x in (", ".join(e.blocks), e.note) if x),
            )
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def line(row: Sequence[str]) -> str:
            cells = [
                row[i].rjust(widths[i]) if i == 4 else row[i].ljust(widths[i])
                for i in range(len(row))
            ]
            return "  ".join(cells).rstrip()

        rule = "-" * len(line(["-" * w for w in widths]))
        out = [line(header), rule, *map(line, rows), rule]
        totals = self.totals
        everything = sum(totals.values())
        for kind, count in totals.items():
            share = 100.0 * count / everything if everything else 0.0
            n = len(self.of_kind(kind))
            out.append(f"{kind:<9}  {count:>12,} scalars ({share:5.1f}%) in {n} parameter(s)")
        out.append(f"{'total':<9}  {everything:>12,} scalars in {len(self)} parameter(s)")
        return "\n".join(out)


def owners(model: nn.Module) -> dict[Tensor, nn.Module]:
    """The module that owns each parameter (the first one, for a shared parameter)."""
    out: dict[Tensor, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            out.setdefault(p, module)
    return out


def _side_note(layers: list[KroneckerLayer]) -> str:
    """The factor sides kept diagonal (``max_factor_dim``, an embedding's tokens), once each."""
    sides: dict[str, None] = {}
    for layer in layers:
        if layer.activation_diagonal:
            sides[f"A ({layer.activation_dim})"] = None
        if layer.gradient_diagonal:
            sides[f"G ({layer.gradient_dim})"] = None
    return f"diagonal side {', '.join(sides)}" if sides else ""


def coverage_of(optimizer: CurvatureOptimizer) -> Coverage:
    """The :class:`Coverage` of ``optimizer``'s model, as the next step would treat it."""
    model = optimizer.model
    owner = owners(model)
    blocks = optimizer._blocks_of
    entries = []
    for _, p in model.named_parameters():
        layers = blocks.get(p, [])
        active = [layer for layer in layers if layer.active]
        if not p.requires_grad:
            kind: CoverageKind = "frozen"
        elif active:
            kind = "kronecker"
        else:
            kind = "diagonal"
        if kind == "diagonal":
            if layers:
                note = "its block's weight is frozen"
            elif owner[p] in optimizer.excluded_modules:
                note = "excluded"
            elif any(layer.module is owner[p] for layer in optimizer.layers):
                note = "bias frozen at construction (diagonal fallback)"
            else:
                note = f"no adapter for {type(owner[p]).__name__}"
        else:
            note = _side_note(layers)
        entries.append(
            CoverageEntry(
                name=optimizer._name(p),
                kind=kind,
                module_type=type(owner[p]).__name__,
                numel=p.numel(),
                shape=tuple(p.shape),
                blocks=tuple(layer.name for layer in layers),
                note=note,
            )
        )
    return Coverage(entries)


def diagonal_warning(optimizer: CurvatureOptimizer, coverage: Coverage) -> str | None:
    """The :class:`CoverageWarning` message, or None when at most 10% of the trainable
    scalars are on the diagonal fallback (parameters of ``exclude=``-d modules, asked
    for by the user, do not count)."""
    trainable = sum(e.numel for e in coverage if e.kind != "frozen")
    diagonal = [e for e in coverage.of_kind("diagonal") if e.note != "excluded"]
    count = sum(e.numel for e in diagonal)
    if trainable == 0 or count <= DIAGONAL_WARNING_SHARE * trainable:
        return None
    largest = sorted(diagonal, key=lambda e: -e.numel)[:5]
    named = ", ".join(f"{e.name} ({e.module_type}, {e.numel:,})" for e in largest)
    more = f" and {len(diagonal) - len(largest)} more" if len(diagonal) > len(largest) else ""
    return (
        f"{type(optimizer).__name__}: {count:,} of {trainable:,} trainable scalars "
        f"({100.0 * count / trainable:.0f}%) get only the diagonal fallback, no Kronecker "
        f"curvature; the largest: {named}{more}. See optimizer.coverage() for every "
        "parameter; give a module type Kronecker curvature with grng.register_layer, or "
        "pass exclude=[...] for modules meant to stay diagonal (which also silences this)."
    )


def capped_sides_warning(optimizer: CurvatureOptimizer) -> str | None:
    """The :class:`CoverageWarning` message naming the factor sides that ``max_factor_dim``
    made diagonal, or None when it made none."""
    cap = optimizer.options.max_factor_dim
    if cap is None:
        return None
    # Only the cap's doing (an embedding's token side is diagonal by design), and only
    # blocks that train now (a frozen block collects nothing).
    capped = [
        f"{layer.name} {side} ({dim})"
        for layer in optimizer.layers
        if layer.active
        for side, dim in (("A", layer.activation_dim), ("G", layer.gradient_dim))
        if side in layer.capped_sides
    ]
    if not capped:
        return None
    return (
        f"{type(optimizer).__name__}: max_factor_dim={cap} keeps {len(capped)} factor side(s) "
        f"diagonal, dropping their cross-coordinate curvature: {', '.join(capped[:5])}"
        f"{' and more' if len(capped) > 5 else ''}. Pass max_factor_dim=None (or a larger "
        "cap) to keep them dense, at an O(d³) eigendecomposition or inverse per refresh "
        "(at d = 4608 on one core of the reference CPU: eigh 9.7 s, K-FAC's Cholesky route "
        "5.2 s; docs/performance.md)."
    )


def expensive_sides_warning(
    optimizer: CurvatureOptimizer,
    refresh_seconds: Callable[[int], float],
    threshold: float,
    basis: str,
) -> str | None:
    """The :class:`CoverageWarning` message naming the dense factor sides of CPU layers whose
    estimated refresh takes more than ``threshold`` seconds, or None when there is none.

    ``refresh_seconds(d)`` estimates one refresh of one dense side of width ``d`` on one CPU
    core (``basis`` says from what). Layers off CPU are not counted: the estimates are CPU
    figures. The message states the estimates, the whole refresh's and its share per step
    (the refresh runs every ``inverse_update_freq`` steps), and the cap that would keep the
    expensive sides diagonal.
    """
    sides = [
        (layer.name, side, dim)
        for layer in optimizer.layers
        if layer.weight.device.type == "cpu"
        for side, dim, diagonal in (
            ("A", layer.activation_dim, layer.activation_diagonal),
            ("G", layer.gradient_dim, layer.gradient_diagonal),
        )
        if not diagonal
    ]
    expensive = sorted(
        ((name, side, dim) for name, side, dim in sides if refresh_seconds(dim) > threshold),
        key=lambda entry: -entry[2],
    )
    if not expensive:
        return None
    total = sum(refresh_seconds(dim) for _, _, dim in sides)
    period = optimizer.options.inverse_update_freq
    named = ", ".join(f"{n} {s} ({d}) ≈ {refresh_seconds(d):.1f} s" for n, s, d in expensive[:5])
    more = f" and {len(expensive) - 5} more" if len(expensive) > 5 else ""
    cap = min(dim for _, _, dim in expensive) - 1
    return (
        f"{type(optimizer).__name__}: {len(expensive)} dense factor side(s) take more than "
        f"{threshold:g} s each to refresh on CPU: {named}{more}; one refresh of every layer "
        f"≈ {total:.1f} s, every inverse_update_freq={period} steps (≈ {total / period:.2f} s "
        f"per step). Estimated for one core of the reference CPU ({basis}; "
        "docs/performance.md). Pass max_factor_dim="
        f"{cap} to keep them diagonal (dropping their cross-coordinate curvature), a larger "
        "inverse_update_freq, or move the model to an accelerator first (not measured)."
    )


__all__ = [
    "Coverage",
    "CoverageEntry",
    "CoverageKind",
    "CoverageWarning",
    "capped_sides_warning",
    "coverage_of",
    "diagonal_warning",
    "expensive_sides_warning",
]
