"""Matrix functions for Kronecker-factored natural-gradient optimizers.

Everything that touches a curvature factor numerically lives here: symmetrisation, the
factored-Tikhonov π correction, damped inverses with a defensive fallback ladder, eigen
decompositions, Kronecker-factored solves and a first-order shifted inverse.

Conventions
-----------
* A *factor* is a symmetric positive semi-definite (PSD) matrix such as the K-FAC activation
  covariance ``A = E[a aᵀ]`` or gradient covariance ``G = E[g gᵀ]``, or a *diagonal factor*
  given as the 1-D tensor of its diagonal (an embedding's token counts, a side wider than
  ``max_factor_dim``). Every function below accepts both; a diagonal factor's eigenbasis is the
  identity (returned as ``None``) and its inverse is elementwise.
* Functions documented as *no sync* never move data to the host (no ``.item()``, ``float(t)``
  or data-dependent Python control flow), so they can be queued on an accelerator stream and
  used under ``torch.vmap``. The remaining functions take data-dependent decisions (stopping
  rules, fallbacks) and therefore synchronise; they are meant to run once every few hundred
  steps, when the factors are re-inverted.
* Half-precision factors (bf16/fp16) are never inverted or decomposed in half precision: their
  rounding error (~4e-3 for bf16) is larger than any useful damping, so they are upcast to
  float32 first.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "InverseResult",
    "damped_inverse",
    "eigenbasis_solve",
    "eigh_damped_inverse",
    "eigh_factor",
    "factor_diagonal",
    "kronecker_solve_eigh",
    "kronecker_solve_inverse",
    "kronecker_tikhonov_solve_eigh",
    "newton_schulz_inverse",
    "pi_correction",
    "prefers_newton_schulz",
    "shift_error_bound",
    "shifted_inverse_first_order",
    "symmetrize",
    "tikhonov_inverse_spectrum",
]


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def symmetrize(matrix: Tensor) -> Tensor:
    """Return the symmetric part ``(M + Mᵀ) / 2`` of a (batch of) square matrix. No sync.

    Factors accumulated with floating-point sums (or updated by a non-symmetric iteration) drift
    away from exact symmetry; ``eigh`` and Cholesky only read one triangle, so an asymmetric
    input would silently be treated as a different matrix.
    """
    if matrix.dim() == 1:
        return matrix  # a diagonal factor
    if not (matrix.is_floating_point() or matrix.is_complex()):
        matrix = matrix.to(torch.get_default_dtype())  # as 0.5 * (M + Mᵀ) promotes integers
    # Mᵀ as a blocked transposing copy: adding the strided view read it with a stride of d,
    # about three times the cost of the copy at d ≥ 1024. Same values, same rounding.
    return torch.add(matrix, matrix.mT.contiguous()).mul_(0.5)


def _check_square(matrix: Tensor, name: str) -> int:
    """Raise ``ValueError`` unless ``matrix`` is a non-empty square 2-D tensor; return its size."""
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(
            f"`{name}` must be a non-empty square matrix, got shape {tuple(matrix.shape)}"
        )
    return int(matrix.shape[0])


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other real floating dtype is computed in float32."""
    if dtype == torch.float64:
        return torch.float64
    if dtype.is_floating_point:
        return torch.float32
    raise TypeError(f"expected a real floating-point tensor, got dtype {dtype}")


def _accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The promoted dtype of ``dtypes``, but never narrower than float32."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _eye_like(matrix: Tensor) -> Tensor:
    return torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)


def _residual64_tensor(matrix64: Tensor, inverse: Tensor) -> Tensor:
    """‖M X − I‖_F / sqrt(d) in float64 as a 0-d device tensor (no sync).

    Normalising by sqrt(d) makes the residual the RMS singular value of ``M X − I``: it is 1 for
    ``X = 0`` and independent of the size, so one tolerance fits every layer. It is NaN or inf
    when ``X`` is not finite, which fails every ``<= tol`` comparison.
    """
    error = matrix64 @ inverse.to(torch.float64)
    error.diagonal().sub_(1.0)  # − I without forming I: one pass over d entries, not d²
    return torch.linalg.matrix_norm(error) / math.sqrt(matrix64.shape[-1])


def _residual64(matrix64: Tensor, inverse: Tensor) -> float:
    """:func:`_residual64_tensor` as a Python float (host sync)."""
    return float(_residual64_tensor(matrix64, inverse))


def _check_damping(value: float) -> float:
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"damping must be finite and >= 0, got {value}")
    return value


# ----------------------------------------------------------------------------------------------
# π correction
# ----------------------------------------------------------------------------------------------


def pi_correction(activation_factor: Tensor, gradient_factor: Tensor, eps: float = 1e-12) -> Tensor:
    """Factored-Tikhonov split ``π = sqrt((tr A / dim A) / (tr G / dim G))``. No sync.

    Martens & Grosse (2015, §6.3) approximate ``(A ⊗ G + λ I)`` by
    ``(A + π sqrt(λ) I) ⊗ (G + sqrt(λ)/π I)``; choosing π as the ratio of the average eigenvalues
    (normalised traces) minimises the norm of the cross terms that this approximation adds.

    Both normalised traces are floored at ``eps`` so that an all-zero factor (a dead layer, or
    the first step before any statistics) yields a finite, positive π instead of 0/0 or 1/0.
    Traces are accumulated in at least float32. Returns a 0-d tensor.
    """
    dtype = _accumulation_dtype(activation_factor.dtype, gradient_factor.dtype)
    mean_a = factor_diagonal(activation_factor.to(dtype)).mean(-1)
    mean_g = factor_diagonal(gradient_factor.to(dtype)).mean(-1)
    return torch.sqrt(mean_a.clamp_min(eps) / mean_g.clamp_min(eps))


def factor_diagonal(factor: Tensor) -> Tensor:
    """The diagonal of a dense factor, or a diagonal factor itself."""
    return factor if factor.dim() == 1 else factor.diagonal(dim1=-2, dim2=-1)


# ----------------------------------------------------------------------------------------------
# Newton–Schulz inverse
# ----------------------------------------------------------------------------------------------


def _scaled_identity(matrix: Tensor) -> Tensor:
    """``I / c`` with ``c = min(‖M‖_F, ‖M‖_∞) >= λ_max(M)``; the convergent NS start for SPD M.

    Both norms bound the spectral radius from above (the Frobenius norm is the 2-norm of the
    eigenvalues, ‖·‖_∞ is an induced norm), and taking the smaller one costs nothing: it is exact
    for diagonal matrices and at most sqrt(d)·λ_max in general.
    """
    bound = torch.minimum(
        torch.linalg.matrix_norm(matrix, ord="fro"),
        torch.linalg.matrix_norm(matrix, ord=math.inf),
    )
    return _eye_like(matrix) / bound


def _newton_schulz_update(x: Tensor, error: Tensor) -> Tensor:
    """One iteration ``X(2I − MX)`` from ``E = MX − I``.

    Written as the correction ``X − X·E``: the update is then computed to relative accuracy
    even when E is tiny, instead of as the difference of two O(1) matrices. ``2X − XMX`` is
    exactly symmetric for symmetric X and M; re-symmetrising keeps the checked residual
    honest for the symmetric result callers get: the unsymmetrised iteration only corrects
    the right residual ‖MX − I‖ (1e-9 at κ = 1e8 in float64) while ‖XM − I‖, which
    symmetrising mixes back in, stalls near 1e-3.
    """
    return symmetrize(x - x @ error)


def _newton_schulz(
    matrix: Tensor,
    initial: Tensor | None,
    tol: float,
    max_iters: int,
) -> tuple[Tensor, int, bool, float]:
    """Newton–Schulz core; returns ``(X, iterations, converged, residual)``.

    On failure the iterate with the smallest residual is returned, not the last one, since the
    last one is where the iteration started to stagnate or diverge.
    """
    eye = _eye_like(matrix)
    # Projecting a warm start onto the symmetric matrices can only bring it closer (in ‖·‖_F) to
    # the symmetric M⁻¹.
    x = _scaled_identity(matrix) if initial is None else symmetrize(initial.to(matrix.dtype))
    inv_sqrt_d = 1.0 / math.sqrt(matrix.shape[-1])
    best_x, best_res, previous = x, math.inf, math.inf
    iteration = 0
    for iteration in range(max_iters + 1):
        error = matrix @ x - eye
        # One host sync per iteration: the stopping rule is data dependent by nature.
        res = float(torch.linalg.matrix_norm(error)) * inv_sqrt_d
        if not math.isfinite(res):
            break
        if res < best_res:
            best_x, best_res = x, res
        if res <= tol:
            return x, iteration, True, res
        # E_{k+1} = E_k² makes the residual decrease monotonically in exact arithmetic; a
        # non-decrease means we hit the rounding floor of this dtype or the start was outside
        # the basin (ρ(E_0) >= 1). Either way more iterations cannot help.
        if res >= previous or iteration == max_iters:
            break
        previous = res
        x = _newton_schulz_update(x, error)
    return best_x, iteration, False, best_res


def newton_schulz_inverse(
    matrix: Tensor,
    initial: Tensor | None = None,
    *,
    tol: float = 1e-4,
    max_iters: int = 100,
) -> tuple[Tensor, int, bool]:
    """Inverse of an SPD matrix by the Newton–Schulz iteration ``X ← X(2I − M X)``.

    Convergence. With ``E_k = I − M X_k`` one has, for *any* ``X_k``,
    ``E_{k+1} = I − M X_k (2I − M X_k) = (I − M X_k)² = E_k²``, so ``E_k = E_0^(2^k)``: the
    iteration converges (quadratically) iff the spectral radius ρ(E_0) < 1, and is guaranteed to
    when ‖E_0‖ < 1 in any sub-multiplicative norm.

    Default start. For SPD M with eigenvalues ``0 < λ_1 <= … <= λ_d`` take ``X_0 = I / c`` with
    ``c = min(‖M‖_F, ‖M‖_∞)``. Both norms are >= λ_d, so ``E_0 = I − M / c`` is symmetric with
    eigenvalues ``1 − λ_i / c ∈ [0, 1 − λ_1 / c]`` and ``‖E_0‖_2 = 1 − λ_1 / c < 1``. Because
    ``c <= ‖M‖_F <= sqrt(d)·λ_d``, ``‖E_0‖_2 <= 1 − 1/(sqrt(d)·κ)`` (κ = λ_d/λ_1) and the
    residual drops below ``tol`` after about ``log2(sqrt(d)·κ) + log2(ln(1/tol))`` iterations
    (≈ 33 for d = 64, κ = 1e8, tol = 1e-4).

    Stopping. The residual ``r_k = ‖M X_k − I‖_F / sqrt(d)`` (RMS singular value of E_k; 1 for
    X = 0) is checked every iteration: stop with success once ``r_k <= tol``; stop with failure
    when it is non-finite, fails to decrease (the rounding floor of the dtype, or a start
    outside the basin), or after ``max_iters`` iterations. On failure the best iterate seen is
    returned. The floor grows faster than ``κ·eps``: with ``tol = 1e-4`` float32 converges up to
    κ ≈ 1e2–1e3 and float64 up to κ ≈ 1e6–1e7 (d <= 64).

    Symmetry. ``matrix`` and ``initial`` are symmetrised, and so is every iterate: for symmetric
    X and M the update ``2X − XMX`` is exactly symmetric, so this only removes rounding drift
    (without it only ``‖MX − I‖`` is driven down and the symmetric part of X can be much worse).

    Cost: two matmuls and one host sync per iteration. Runs in the dtype of ``matrix``.

    Returns:
        ``(X, iterations, converged)`` where ``iterations`` counts the updates performed.
    """
    _check_square(matrix, "matrix")
    if initial is not None and initial.shape != matrix.shape:
        raise ValueError(
            f"`initial` has shape {tuple(initial.shape)}, expected {tuple(matrix.shape)}"
        )
    x, iterations, converged, _ = _newton_schulz(symmetrize(matrix), initial, tol, max_iters)
    return x, iterations, converged


# ----------------------------------------------------------------------------------------------
# Damped inverse with a fallback ladder
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InverseResult:
    """Outcome of :func:`damped_inverse`.

    Attributes:
        inverse: the (symmetric) inverse, float32 or float64 (see :func:`damped_inverse`).
        residual: ``‖M X − I‖_F / sqrt(d)`` of the returned ``inverse`` in float64, M being the
            damped matrix. It certifies the accuracy: ``‖X − M⁻¹‖_F <= sqrt(d)·residual·‖M⁻¹‖_2``.
        method: the rung that produced ``inverse``: ``"newton_schulz"`` (from the warm start),
            ``"cholesky"`` (Cholesky inverse in the working dtype), ``"cholesky_float64"``
            (the float64 retry of a float32 factor), ``"eigh"`` (clamped eigendecomposition)
            or ``"diagonal"`` (a 1-D factor, inverted elementwise).
        iterations: Newton–Schulz iterations performed from the warm start (0 for the other
            rungs).
        ok: ``residual <= tol``.
    """

    inverse: Tensor
    residual: float
    method: str
    iterations: int
    ok: bool


def _eigh_inverse64(factor64: Tensor, damping: float) -> Tensor:
    """``Q diag(1 / max(λ + damping, floor)) Qᵀ`` in float64 — the rung that cannot fail.

    Clamping at ``damping`` is clamping the factor's eigenvalues at 0, i.e. inverting the nearest
    PSD factor. The extra floors keep the result finite when ``damping`` is 0 and the factor is
    singular: ``d·eps64·λ_max`` is the level below which float64 eigenvalues are rounding noise,
    and ``4 / finfo(float32).max`` keeps ``1 / floor`` representable after a cast to float32.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(factor64)
    scale = float(eigenvalues.abs().max())
    floor = max(
        damping,
        factor64.shape[-1] * torch.finfo(torch.float64).eps * scale,
        4.0 / torch.finfo(torch.float32).max,
    )
    inverse_eigenvalues = 1.0 / torch.clamp(eigenvalues + damping, min=floor)
    return (eigenvectors * inverse_eigenvalues) @ eigenvectors.mT


def _diagonal_inverse(factor: Tensor, damping: float | Tensor) -> InverseResult:
    """``1 / (max(f, 0) + damping)`` elementwise: the exact damped inverse of a diagonal factor."""
    # One read (host sync) for both checks.
    finite, value = torch.stack(
        [
            torch.isfinite(factor).all().to(torch.float64),
            torch.as_tensor(damping, dtype=torch.float64, device=factor.device)
            .detach()
            .reshape(()),
        ]
    ).tolist()
    if finite != 1.0:
        raise ValueError("damped_inverse: `factor` contains non-finite values (NaN or Inf)")
    _check_damping(value)
    work = factor.to(_working_dtype(factor.dtype))
    floor = max(value, 4.0 / torch.finfo(torch.float32).max)
    inverse = 1.0 / (work.clamp_min(0.0) + value).clamp_min(floor)
    return InverseResult(inverse, 0.0, "diagonal", 0, True)


def prefers_newton_schulz(device: torch.device) -> bool:
    """Whether a warm-started Newton–Schulz iteration should be tried before Cholesky.

    One iteration costs two matrix products (``X − X E``, then ``E = M X − I``), a Cholesky
    inverse about ``d³`` flops. On CPU the product is not cheaper: on the reference VM (one
    thread, float32, ``benchmarks/factor_cost.py``) an iteration took 1.0–2.5× a float32
    Cholesky inverse for d = 256–4096 (353 ms against 163 ms at 2048), and a warm start after
    a refresh needs about three, so the CPU goes straight to Cholesky. On an accelerator a product is one high-throughput kernel while
    a factorisation is a chain of small dependent ones whose status is read back, so the warm
    start is tried there; that half of the rule follows from this cost model and has not been
    measured (no accelerator was available).
    """
    return device.type != "cpu"


def _predicted_iterations(residual: float, tol: float) -> int:
    """The smallest ``k`` with ``residual^(2^k) <= tol``: when to look at Newton–Schulz next.

    With ``E_{k+1} = E_k²`` and a symmetric E (eigenvalues μ), Cauchy–Schwarz gives
    ``r(E²)² = Σμ⁴/d >= (Σμ²/d)² = r(E)⁴``, so the residual ``r`` cannot fall faster than
    ``r_k >= r_0^(2^k)`` and fewer iterations cannot reach ``tol``. ``E = I − M X`` is similar to
    the symmetric ``I − M^½ X M^½``, so this holds up to that similarity; the prediction only
    decides when the residual is read back (saving a host sync per iteration), never whether
    the result is accepted.
    """
    if residual <= tol:
        return 0
    return max(1, math.ceil(math.log2(math.log(tol) / math.log(residual))))


def _warm_newton_schulz(
    matrix: Tensor,
    matrix64: Tensor,
    x: Tensor,
    error: Tensor,
    residual: float,
    tol: float,
    max_iters: int,
) -> tuple[Tensor, int, float] | None:
    """Newton–Schulz from a warm start ``x`` (``error = M x − I``, ``residual`` its RMS).

    Runs the predicted number of iterations (:func:`_predicted_iterations`) without reading
    anything back, then reads the working-dtype residuals of the intermediate iterates and the
    float64 residual of the last one in one host sync. Returns ``(X, iterations, residual64)``
    once the float64 residual is ``<= tol``; None when the prediction exceeds ``max_iters``,
    the residual stops decreasing (the rounding floor of the dtype), or it turns non-finite.
    """
    eye = _eye_like(matrix)
    inv_sqrt_d = 1.0 / math.sqrt(matrix.shape[-1])
    done, error_is_current = 0, True
    while True:
        planned = _predicted_iterations(residual, tol)
        if done > 0 or not error_is_current:
            planned = max(planned, 1)  # the last look failed: at least one more iteration
        if done + planned > max_iters:
            return None
        residuals: list[Tensor] = []
        for i in range(planned):
            if i > 0 or not error_is_current:
                error = matrix @ x - eye
                residuals.append(torch.linalg.matrix_norm(error).to(torch.float64) * inv_sqrt_d)
            x = _newton_schulz_update(x, error)
        done += planned
        error_is_current = planned == 0
        certificate = _residual64_tensor(matrix64, x)
        values = torch.stack([*residuals, certificate]).tolist()  # the round's one host sync
        if values[-1] <= tol:
            return x, done, values[-1]
        if not all(math.isfinite(v) for v in values) or values[-1] >= 1.0:
            return None
        # E_{k+1} = E_k²: in exact arithmetic every iterate improves, so a non-decrease means
        # the iteration reached the rounding floor of the working dtype. (After a look with
        # no iteration, the float64 residual may exceed the working-dtype one it follows.)
        sequence = [residual, *values]
        if planned > 0 and any(later >= earlier for earlier, later in itertools.pairwise(sequence)):
            return None
        residual = values[-1]


def _cholesky_inverse(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(sym(M⁻¹), info)`` through ``cholesky_ex`` in ``matrix``'s dtype (no sync).

    A non-zero ``info`` means M is not numerically positive definite in that dtype; the
    factor's diagonal is then set to 1 (``cholesky_inverse`` raises on a zero pivot, and
    reading ``info`` first would cost a host sync), and callers reject the result by ``info``.
    """
    cholesky, info = torch.linalg.cholesky_ex(matrix)
    cholesky.diagonal().masked_fill_(info != 0, 1.0)  # no zero pivot left: O(d), no sync
    return symmetrize(torch.cholesky_inverse(cholesky)), info


def damped_inverse(
    factor: Tensor,
    damping: float | Tensor,
    warm_start: Tensor | None = None,
    *,
    tol: float = 1e-4,
    max_iters: int = 5,
) -> InverseResult:
    """``(F + damping·I)⁻¹`` for a symmetric PSD factor F, through a defensive ladder.

    The input is symmetrised and the damped matrix ``M = sym(F) + damping·I`` is formed in
    float64, then rounded once to the working dtype (float64 for float64 factors, float32
    otherwise). Each rung's candidate is accepted only when its residual
    ``‖M X − I‖_F / sqrt(d)``, computed in float64 against the float64 M, is ``<= tol``:

    1. Newton–Schulz from ``warm_start`` (typically the previous inverse), only when one is
       given. Skipped when its initial residual is >= 1 (the residual of ``X = 0``: no better
       than nothing, and ρ(E_0) < 1, which convergence needs, is then unlikely), when it is
       non-finite, or when the cheap bound ``κ_bound = ‖M‖_∞ / damping ≥ κ(M)`` times the
       working dtype's epsilon exceeds ``tol`` (the iteration stagnates near ``κ·eps``).
       Abandoned when it is predicted to need more than ``max_iters`` iterations, or stops
       improving. Residuals are read back once per batch of predicted iterations, not once per
       iteration (:func:`_predicted_iterations`). Callers pass a warm start only where an
       iteration is cheaper than a factorisation (:func:`prefers_newton_schulz`).
    2. Cholesky inverse in the working dtype (``cholesky_ex`` + ``cholesky_inverse``). For a
       float32 factor this is the float32 factorisation, about 2× cheaper than float64 on the
       reference CPU. Its residual was measured at about ``1.3e-8·κ(M)`` (d = 128–1024), so it
       meets ``tol = 1e-4`` up to κ ≈ 7e3; every factor of the two transformers of
       ``benchmarks/refresh_cost.py`` at K-FAC's default damping had κ ≤ 171 and a residual
       ≤ 2.1e-6.
    3. For a float32 factor only: Cholesky inverse in float64, rounded to float32. Accepted
       when the float64 inverse itself meets ``tol``; its ``residual`` is that of the rounded
       float32 matrix, measured at about ``1.4e-9·κ(M)`` (rounding X alone leaves ``MX − I``
       of that order), so beyond κ ≈ 7e4 no float32 matrix meets ``tol = 1e-4`` and the
       rounded inverse is returned with ``ok=False``, the best a float32 inverse can be.
    4. ``eigh`` in float64 with the eigenvalues of M clamped at >= ``damping`` (i.e. the factor's
       at >= 0): always finite, exact inverse of the nearest PSD-damped matrix. Reached when
       M is not numerically positive definite (an indefinite factor) or so ill-conditioned
       that even the float64 Cholesky inverse misses ``tol``.

    Host syncs: one per rung tried (a rung reads its status and float64 certificate together;
    the input checks, finiteness and damping, ride along with the first read) plus one per
    batch of Newton–Schulz iterations. A cold inversion that rung 2 accepts reads back once;
    a warm start that converges reads back twice (its initial residual, then its iterations).

    Args:
        factor: symmetric PSD matrix, any real floating dtype. bf16/fp16 are upcast to float32.
        damping: non-negative Python float or 0-d tensor.
        warm_start: optional approximate inverse; ignored (skipped) when non-finite.
        tol: residual tolerance.
        max_iters: cap on the Newton–Schulz iterations from the warm start.

    Returns:
        :class:`InverseResult` whose ``inverse`` is symmetric, finite, on ``factor.device``, in
        float64 for float64 factors and float32 otherwise.

    Raises:
        ValueError: if ``factor`` is not square or contains NaN/Inf, if ``damping`` is negative
            or non-finite, or if ``warm_start`` has the wrong shape.

    Cost (``docs/performance.md``): the Cholesky rung is ``d³/3`` flops for the factorisation
    and ``2d³/3`` for the inverse; every certificate is one float64 product (``2d³`` flops),
    which on CPU costs more than the float32 Cholesky inverse it certifies (299 ms against
    163 ms at d = 2048 on the reference VM) and is the price of the guarantee.
    """
    if factor.dim() == 1:
        return _diagonal_inverse(factor, damping)
    d = _check_square(factor, "factor")
    if warm_start is not None and warm_start.shape != factor.shape:
        raise ValueError(
            f"`warm_start` has shape {tuple(warm_start.shape)}, expected {tuple(factor.shape)}"
        )
    if not isinstance(damping, Tensor):
        _check_damping(float(damping))  # a Python number is checked now, without a sync
    work_dtype = _working_dtype(factor.dtype)
    float64 = torch.float64

    damping64 = torch.as_tensor(damping, dtype=float64, device=factor.device).detach().reshape(())
    matrix64 = symmetrize(factor.to(float64))  # sym(F) until the damping is added in place
    matrix64.diagonal().add_(damping64)
    matrix = matrix64.to(work_dtype)

    # The inputs are validated by the first read of device values, which also carries what
    # the rungs decide on: with a warm start, before rung 1; without one, with rung 2's
    # status (a cold inversion reads back once). The work done on an invalid input before it
    # raises is wasted, which only an error case pays.
    validation = [damping64, torch.isfinite(factor).all().to(float64)]

    def validated(values: list[float]) -> float:
        if values[1] != 1.0:
            raise ValueError("damped_inverse: `factor` contains non-finite values (NaN or Inf)")
        return _check_damping(values[0])

    # Rung 1: Newton–Schulz from the warm start.
    damping_value: float | None = None
    if warm_start is not None:
        x0 = symmetrize(warm_start.to(device=factor.device, dtype=work_dtype))
        error0 = matrix @ x0 - _eye_like(matrix)
        values = torch.stack(
            [
                *validation,
                torch.linalg.matrix_norm(matrix64, ord=math.inf),
                torch.linalg.matrix_norm(error0).to(float64) / math.sqrt(d),
            ]
        ).tolist()
        damping_value = validated(values)
        kappa_bound = values[2] / max(damping_value, 1e-300)
        if 0.0 <= values[3] < 1.0 and kappa_bound * torch.finfo(work_dtype).eps <= tol:
            found = _warm_newton_schulz(matrix, matrix64, x0, error0, values[3], tol, max_iters)
            if found is not None:
                x, iterations, residual = found
                return InverseResult(x, residual, "newton_schulz", iterations, True)

    # Rung 2: Cholesky in the working dtype; its status and certificate in one read.
    x, info = _cholesky_inverse(matrix)
    status = [info.to(float64), _residual64_tensor(matrix64, x)]
    if damping_value is None:
        values = torch.stack([*validation, *status]).tolist()
        damping_value = validated(values)
        info_value, residual = values[2:]
    else:
        info_value, residual = torch.stack(status).tolist()
    if info_value == 0 and residual <= tol:
        return InverseResult(x, residual, "cholesky", 0, True)

    # Rung 3: the float64 retry of a float32 factor.
    if work_dtype != float64:
        x64, info = _cholesky_inverse(matrix64)
        x = x64.to(work_dtype)
        info_value, residual64, residual = torch.stack(
            [
                info.to(float64),
                _residual64_tensor(matrix64, x64),
                _residual64_tensor(matrix64, x),
            ]
        ).tolist()
        if info_value == 0 and residual64 <= tol and math.isfinite(residual):
            return InverseResult(x, residual, "cholesky_float64", 0, residual <= tol)

    # Rung 4: clamped eigendecomposition, always finite. sym(F) is M − damping·I.
    factor64 = matrix64.clone()
    factor64.diagonal().sub_(damping64)
    x = symmetrize(_eigh_inverse64(factor64, damping_value)).to(work_dtype)
    residual = _residual64(matrix64, x)
    return InverseResult(x, residual, "eigh", 0, residual <= tol)


# ----------------------------------------------------------------------------------------------
# Eigendecomposition
# ----------------------------------------------------------------------------------------------


def _eigh_or_none(matrix: Tensor) -> tuple[Tensor, Tensor] | None:
    """``torch.linalg.eigh`` that returns None instead of raising or returning NaN/Inf."""
    try:
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        return None
    finite = torch.isfinite(eigenvalues).all() & torch.isfinite(eigenvectors).all()
    return (eigenvalues, eigenvectors) if bool(finite) else None


def eigh_factor(factor: Tensor) -> tuple[Tensor, Tensor | None]:
    """Eigendecomposition ``F = Q diag(λ) Qᵀ`` of a symmetric PSD factor, ``λ`` clamped at >= 0.

    The input is symmetrised first. If ``torch.linalg.eigh`` fails (``LinAlgError``, which the
    iterative solvers raise on ill-conditioned float32 input, or non-finite output) it is retried
    in float64 and cast back. Negative eigenvalues of a PSD factor are rounding noise, hence the
    clamp. Half-precision inputs are upcast and the outputs are float32.

    A diagonal factor (1-D) is its own spectrum: ``(max(f, 0), None)``, eigenvectors the identity.

    Returns:
        ``(eigenvalues, eigenvectors)``, ascending eigenvalues, eigenvectors in the columns.

    Raises:
        ValueError: if ``factor`` is not square or the decomposition fails because ``factor``
            contains NaN/Inf.
        torch.linalg.LinAlgError: if even the float64 retry fails on a finite input.
    """
    if factor.dim() == 1:
        if not bool(torch.isfinite(factor).all()):
            raise ValueError("eigh_factor: `factor` contains non-finite values (NaN or Inf)")
        return factor.to(_working_dtype(factor.dtype)).clamp_min(0.0), None
    _check_square(factor, "factor")
    work_dtype = _working_dtype(factor.dtype)
    matrix = symmetrize(factor.to(work_dtype))
    decomposition = _eigh_or_none(matrix)
    if decomposition is None and work_dtype != torch.float64:
        retry = _eigh_or_none(matrix.to(torch.float64))
        if retry is not None:
            decomposition = (retry[0].to(work_dtype), retry[1].to(work_dtype))
    if decomposition is None:
        if not bool(torch.isfinite(factor).all()):
            raise ValueError("eigh_factor: `factor` contains non-finite values (NaN or Inf)")
        raise torch.linalg.LinAlgError("eigh_factor: eigh failed, also in float64")
    eigenvalues, eigenvectors = decomposition
    return eigenvalues.clamp_min(0.0), eigenvectors


# ----------------------------------------------------------------------------------------------
# Kronecker-factored solves
# ----------------------------------------------------------------------------------------------


def _check_kronecker_shapes(gradient_matrix: Tensor, dim_g: int, dim_a: int) -> None:
    if gradient_matrix.shape[-2:] != (dim_g, dim_a):
        raise ValueError(
            f"gradient_matrix has shape {tuple(gradient_matrix.shape)}, expected (..., {dim_g}, {dim_a})"
        )


def _rotate(
    matrix: Tensor, q_g: Tensor | None, q_a: Tensor | None, *, back: bool = False
) -> Tensor:
    """``Q_Gᵀ M Q_A`` (``back``: ``Q_G M Q_Aᵀ``), skipping an identity (None) basis."""
    if q_g is not None:
        matrix = (q_g if back else q_g.mT) @ matrix
    if q_a is not None:
        matrix = matrix @ (q_a.mT if back else q_a)
    return matrix


def kronecker_solve_eigh(
    gradient_matrix: Tensor,
    gradient_eig: tuple[Tensor, Tensor | None],
    activation_eig: tuple[Tensor, Tensor | None],
    gradient_damping: Tensor | float,
    activation_damping: Tensor | float,
) -> Tensor:
    """``(G + d_G I)⁻¹ V (A + d_A I)⁻¹`` through the eigenbases of G and A. No sync.

    With ``G = Q_G diag(g) Q_Gᵀ`` and ``A = Q_A diag(a) Q_Aᵀ`` (Q orthogonal),
    ``G + d_G I = Q_G diag(g + d_G) Q_Gᵀ``, so

        ``(G + d_G I)⁻¹ V (A + d_A I)⁻¹ = Q_G [ (Q_Gᵀ V Q_A) ⊘ ((g + d_G)(a + d_A)ᵀ) ] Q_Aᵀ``

    (⊘ elementwise division). This is exact for *any* damping, so the damping can change every
    step without refactorising. In Kronecker form it is the solve of
    ``((G + d_G I) ⊗ (A + d_A I)) vec(V)`` with row-major ``vec``.

    Args:
        gradient_matrix: ``V`` of shape ``(..., dim G, dim A)``.
        gradient_eig: ``(g, Q_G)`` as returned by :func:`eigh_factor` (``Q_G`` None: identity,
            a diagonal factor).
        activation_eig: ``(a, Q_A)`` likewise.
        gradient_damping: ``d_G``, a float or (0-d) tensor; ``g + d_G`` must be > 0.
        activation_damping: ``d_A``, a float or (0-d) tensor; ``a + d_A`` must be > 0.

    Returns:
        A tensor of ``V``'s shape and dtype, computed in at least float32.
    """
    (g, q_g), (a, q_a) = gradient_eig, activation_eig
    dtype = _eigenbasis_dtype(gradient_matrix, g.shape[-1], a.shape[-1], g.dtype, a.dtype)
    g, a = g.to(dtype), a.to(dtype)
    spectrum = (g + gradient_damping)[..., :, None] * (a + activation_damping)[..., None, :]
    return _eigenbasis_solve(gradient_matrix, q_g, q_a, spectrum, dtype, divide=True)


def kronecker_tikhonov_solve_eigh(
    gradient_matrix: Tensor,
    gradient_eig: tuple[Tensor, Tensor | None],
    activation_eig: tuple[Tensor, Tensor | None],
    damping: Tensor | float,
) -> Tensor:
    """``(G ⊗ A + γ I)⁻¹ vec(V)`` (row-major ``vec``) through the eigenbases of G and A. No sync.

    The Kronecker product of ``G = Q_G diag(g) Q_Gᵀ`` and ``A = Q_A diag(a) Q_Aᵀ`` has the
    eigenbasis ``Q_G ⊗ Q_A`` with eigenvalues ``g_i a_j``, and adding ``γ I`` shifts every one of
    them by γ, so the damped solve is exact at the cost of the factored one::

        ``Q_G [ (Q_Gᵀ V Q_A) ⊘ (g aᵀ + γ) ] Q_Aᵀ``

    (⊘ elementwise division; ``g aᵀ + γ`` is one fused ``addcmul``, divided into the rotated
    matrix in place). Unlike factored damping (:func:`kronecker_solve_eigh` with
    ``d_G d_A = γ``), no cross terms ``d_G I ⊗ A + G ⊗ d_A I`` are added.

    Args:
        gradient_matrix: ``V`` of shape ``(..., dim G, dim A)``.
        gradient_eig: ``(g, Q_G)`` as returned by :func:`eigh_factor` (``g >= 0``; ``Q_G``
            None: identity, a diagonal factor).
        activation_eig: ``(a, Q_A)`` likewise.
        damping: ``γ > 0``, a float or 0-d tensor.

    Returns:
        A tensor of ``V``'s shape and dtype, computed in at least float32.
    """
    (g, q_g), (a, q_a) = gradient_eig, activation_eig
    dtype = _eigenbasis_dtype(gradient_matrix, g.shape[-1], a.shape[-1], g.dtype, a.dtype)
    g, a = g.to(dtype), a.to(dtype)
    gamma = torch.as_tensor(damping, dtype=dtype, device=g.device)
    spectrum = torch.addcmul(gamma, g[..., :, None], a[..., None, :])
    return _eigenbasis_solve(gradient_matrix, q_g, q_a, spectrum, dtype, divide=True)


def eigh_damped_inverse(
    eigenvalues: Tensor, eigenvectors: Tensor | None, damping: Tensor | float
) -> Tensor:
    """``(F + damping·I)⁻¹ = Q diag(1/(λ + damping)) Qᵀ`` from ``F``'s eigendecomposition. No sync.

    ``(eigenvalues, eigenvectors)`` as returned by :func:`eigh_factor` (eigenvectors None: a
    diagonal factor, whose inverse is returned as the 1-D ``1/(λ + damping)``). One product
    of two d × d matrices; ``λ + damping`` must be > 0. Computed in at least float32. Exact
    up to rounding for any damping, so with the two sides' dampings fixed K-FAC's factored
    solve ``(G + d_G I)⁻¹ V (A + d_A I)⁻¹`` needs two products per step
    (:func:`kronecker_solve_inverse`) instead of the four of :func:`kronecker_solve_eigh`.
    """
    dtype = _accumulation_dtype(eigenvalues.dtype)
    scale = torch.reciprocal(eigenvalues.to(dtype) + damping)
    if eigenvectors is None:
        return scale
    q = eigenvectors.to(dtype)
    return symmetrize((q * scale[..., None, :]) @ q.mT)


def tikhonov_inverse_spectrum(
    gradient_eigenvalues: Tensor, activation_eigenvalues: Tensor, damping: Tensor | float
) -> Tensor:
    """``1 / (g aᵀ + γ)``, the spectrum :func:`kronecker_tikhonov_solve_eigh` divides by. No sync.

    Computed in at least float32. With :func:`eigenbasis_solve` it lets a caller whose damping
    does not change between refreshes build it once per refresh.
    """
    dtype = _accumulation_dtype(gradient_eigenvalues.dtype, activation_eigenvalues.dtype)
    g = gradient_eigenvalues.to(dtype)
    a = activation_eigenvalues.to(dtype)
    gamma = torch.as_tensor(damping, dtype=dtype, device=g.device)
    return torch.reciprocal(torch.addcmul(gamma, g[..., :, None], a[..., None, :]))


def eigenbasis_solve(
    gradient_matrix: Tensor,
    gradient_basis: Tensor | None,
    activation_basis: Tensor | None,
    inverse_spectrum: Tensor,
) -> Tensor:
    """``Q_G [(Q_Gᵀ V Q_A) ⊙ S] Q_Aᵀ`` with a precomputed inverse spectrum ``S``. No sync.

    With ``S`` = :func:`tikhonov_inverse_spectrum` of the bases' eigenvalues this computes what
    :func:`kronecker_tikhonov_solve_eigh` computes, except that it multiplies by the stored
    reciprocal instead of dividing (a last-bit rounding difference). A basis of None is the
    identity (a diagonal factor). Computed in at least float32, returned in ``V``'s dtype.
    """
    dim_g, dim_a = inverse_spectrum.shape[-2:]
    dtype = _eigenbasis_dtype(gradient_matrix, dim_g, dim_a, inverse_spectrum.dtype)
    return _eigenbasis_solve(
        gradient_matrix, gradient_basis, activation_basis, inverse_spectrum, dtype, divide=False
    )


def _eigenbasis_dtype(
    gradient_matrix: Tensor, dim_g: int, dim_a: int, *dtypes: torch.dtype
) -> torch.dtype:
    """The dtype of an eigenbasis solve (at least float32), after checking ``V``'s shape."""
    _check_kronecker_shapes(gradient_matrix, dim_g, dim_a)
    return _accumulation_dtype(gradient_matrix.dtype, *dtypes)


def _eigenbasis_solve(
    gradient_matrix: Tensor,
    q_g: Tensor | None,
    q_a: Tensor | None,
    spectrum: Tensor,
    dtype: torch.dtype,
    *,
    divide: bool,
) -> Tensor:
    """``Q_G [(Q_Gᵀ V Q_A) ⊘ spectrum] Q_Aᵀ`` (``divide``) or ``⊙`` (not), in ``dtype``
    (at least float32), back in V's dtype; a basis of None is the identity."""
    q_g = None if q_g is None else q_g.to(dtype)
    q_a = None if q_a is None else q_a.to(dtype)
    matrix = gradient_matrix.to(dtype)
    rotated = _rotate(matrix, q_g, q_a)
    scale = spectrum.to(dtype)
    if rotated is matrix or rotated.shape != scale.shape:
        # Both bases are identities (the input itself: not to be overwritten) or the
        # spectrum broadcasts over a batch: out of place.
        rotated = rotated / scale if divide else rotated * scale
    elif divide:
        rotated.div_(scale)  # in place: saves allocating a fourth d_G × d_A temporary
    else:
        rotated.mul_(scale)
    return _rotate(rotated, q_g, q_a, back=True).to(gradient_matrix.dtype)


def _left(inverse: Tensor, matrix: Tensor) -> Tensor:
    """``X M`` for a dense or diagonal (1-D) ``X``."""
    return inverse[:, None] * matrix if inverse.dim() == 1 else inverse @ matrix


def _right(matrix: Tensor, inverse: Tensor) -> Tensor:
    """``M X`` for a dense or diagonal (1-D) ``X``."""
    return matrix * inverse if inverse.dim() == 1 else matrix @ inverse


def kronecker_solve_inverse(
    gradient_matrix: Tensor, gradient_inverse: Tensor, activation_inverse: Tensor
) -> Tensor:
    """``G⁻¹ V A⁻¹`` with precomputed (already damped) inverses, dense or diagonal. No sync.

    Equivalent to ``(G ⊗ A)⁻¹ vec(V)`` for row-major ``vec`` and symmetric A. ``V`` has shape
    ``(dim G, dim A)``; the result has ``V``'s dtype and is computed in at least float32.
    """
    _check_kronecker_shapes(
        gradient_matrix, gradient_inverse.shape[-1], activation_inverse.shape[-1]
    )
    dtype = _accumulation_dtype(
        gradient_matrix.dtype, gradient_inverse.dtype, activation_inverse.dtype
    )
    out = _right(
        _left(gradient_inverse.to(dtype), gradient_matrix.to(dtype)), activation_inverse.to(dtype)
    )
    return out.to(gradient_matrix.dtype)


# ----------------------------------------------------------------------------------------------
# First-order shifted inverse
# ----------------------------------------------------------------------------------------------


def shifted_inverse_first_order(
    inverse: Tensor, shift: Tensor | float, vector_or_matrix: Tensor, side: str
) -> Tensor:
    """Apply ``(M + εI)⁻¹ ≈ X − εX²`` (``X = M⁻¹``, ``ε = shift``) to ``B``. No sync.

    ``side="left"`` returns ``(X − εX²) B`` computed as ``XB − ε X (XB)``; ``side="right"``
    returns ``B (X − εX²)`` as ``BX − ε (BX) X``. ``X²`` is never formed: two products with B
    instead of a d³ matrix square. ``B`` may be a vector (``(d,)``) or a matrix.

    Error bound (Neumann series). Let ``r = |ε|·‖X‖₂ < 1``. Since ``M + εI = M(I + εX)``,

        ``(M + εI)⁻¹ = (I + εX)⁻¹ X = Σ_{k>=0} (−ε)^k X^{k+1}``,

    and the first-order truncation leaves the tail ``R = Σ_{k>=2} (−ε)^k X^{k+1}``, so
    ``‖R‖₂ <= ‖X‖₂ Σ_{k>=2} r^k = r²/(1−r)·‖X‖₂``: the relative error of the first-order
    correction in the spectral norm is at most ``r²/(1−r)``. Summing the tail in closed form,
    ``R = (εX)² (M + εI)⁻¹``, which gives the sharper statement relative to the exact result,
    ``‖R B‖ <= r²·‖(M + εI)⁻¹ B‖`` (and ``‖B R‖ <= r²·‖B (M + εI)⁻¹‖``; X and ``(M + εI)⁻¹``
    commute), with equality for B an eigenvector of X at its largest-magnitude eigenvalue when X
    is symmetric. With ``ε = 0`` the result is exactly ``XB`` (resp. ``BX``).
    """
    if inverse.dim() == 1:  # a diagonal inverse: the same, elementwise
        scale = inverse - shift * inverse * inverse
        if side == "left":
            return _left(scale, vector_or_matrix)
        if side == "right":
            return _right(vector_or_matrix, scale)
    if side == "left":
        xb = inverse @ vector_or_matrix
        return xb - shift * (inverse @ xb)
    if side == "right":
        bx = vector_or_matrix @ inverse
        return bx - shift * (bx @ inverse)
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def shift_error_bound(shift: Tensor, reference_damping: Tensor) -> Tensor:
    """Bound ``r²`` on the relative error of :func:`shifted_inverse_first_order`. No sync.

    For ``X = (F + c I)⁻¹`` with F PSD and damping ``c > 0``, ``‖X‖₂ <= 1/c``, so
    ``r = |ε|·‖X‖₂ <= |ε|/c``. The first-order result is exactly
    ``X − εX² = (I − (εX)²)(M + εI)⁻¹`` (``M = F + cI``), so its error relative to the exact
    shifted inverse is at most ``r²`` in the spectral norm, applied from either side. For a
    Kronecker solve ``X̃_G V X̃_A`` with both sides shifted the relative error is at most
    ``(1 + r_G²)(1 + r_A²) − 1 = r_G² + r_A² + r_G² r_A²``.
    """
    return (shift.abs() / reference_damping) ** 2
