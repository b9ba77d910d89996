"""Tests for grng.linalg against dense float64 ground truth.

Accuracy checks use the certificate a residual gives: if ``E = M X − I`` then
``X − M⁻¹ = M⁻¹ E`` and ``‖X − M⁻¹‖_F <= ‖M⁻¹‖₂ ‖E‖_F = ‖M⁻¹‖₂ sqrt(d) residual``. So a reported
residual that is too optimistic, or an inverse of the wrong matrix, fails the test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from grng.linalg import (
    InverseResult,
    damped_inverse,
    eigenbasis_solve,
    eigh_damped_inverse,
    eigh_factor,
    kronecker_solve_eigh,
    kronecker_solve_inverse,
    kronecker_tikhonov_solve_eigh,
    newton_schulz_inverse,
    pi_correction,
    prefers_newton_schulz,
    shifted_inverse_first_order,
    symmetrize,
    tikhonov_inverse_spectrum,
)

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # Tiny matmuls with 2 OpenMP threads on a shared 2-core box spin for ~20 ms each.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _orthogonal(d: int, gen: torch.Generator) -> Tensor:
    q, r = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=gen))
    return q * torch.sign(torch.diagonal(r))


def _psd(eigenvalues: Tensor, gen: torch.Generator) -> Tensor:
    q = _orthogonal(eigenvalues.shape[0], gen)
    return symmetrize((q * eigenvalues) @ q.T)


def _spd_with_condition(d: int, log10_cond: float, gen: torch.Generator) -> Tensor:
    """Q diag(logspace(0, -log10_cond)) Qᵀ in float64."""
    return _psd(torch.logspace(0.0, -log10_cond, d, dtype=F64), gen)


def _damped64(factor: Tensor, damping: float) -> Tensor:
    """The matrix damped_inverse inverts, formed in float64 from the factor as given."""
    f = symmetrize(factor.to(F64))
    return f + damping * torch.eye(f.shape[0], dtype=F64)


def _residual(matrix64: Tensor, inverse: Tensor) -> float:
    d = matrix64.shape[0]
    error = matrix64 @ inverse.to(F64) - torch.eye(d, dtype=F64)
    return float(torch.linalg.matrix_norm(error)) / math.sqrt(d)


def _relative_error(inverse: Tensor, exact: Tensor) -> float:
    """‖X − M⁻¹‖_F / ‖M⁻¹‖₂."""
    diff = torch.linalg.matrix_norm(inverse.to(F64) - exact)
    return float(diff / torch.linalg.matrix_norm(exact, ord=2))


def _condition(matrix64: Tensor) -> float:
    eigenvalues = torch.linalg.eigvalsh(matrix64)
    return float(eigenvalues[-1] / eigenvalues[0])


def _truth_slack(d: int, cond: float) -> float:
    """Error allowance for the float64 dense ground truth itself (backward stable inverse)."""
    return 10.0 * d * cond * EPS64


# ----------------------------------------------------------------------------------------------
# symmetrize / pi_correction
# ----------------------------------------------------------------------------------------------


def test_symmetrize_returns_symmetric_part() -> None:
    m = torch.arange(9.0).reshape(3, 3)
    s = symmetrize(m)
    assert torch.equal(s, s.T)
    assert torch.equal(s, (m + m.T) / 2)
    assert torch.equal(symmetrize(s), s)  # idempotent on symmetric input


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    dim_a=st.integers(1, 16),
    dim_g=st.integers(1, 16),
    scale_a=st.floats(1e-6, 1e6),
    scale_g=st.floats(1e-6, 1e6),
)
def test_pi_correction_matches_formula(
    seed: int, dim_a: int, dim_g: int, scale_a: float, scale_g: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = _psd(scale_a * torch.rand(dim_a, dtype=F64, generator=gen), gen)
    g = _psd(scale_g * torch.rand(dim_g, dtype=F64, generator=gen), gen)
    pi = pi_correction(a, g)
    assert pi.ndim == 0
    mean_a = max(sum(float(a[i, i]) for i in range(dim_a)) / dim_a, 1e-12)
    mean_g = max(sum(float(g[i, i]) for i in range(dim_g)) / dim_g, 1e-12)
    assert float(pi) == pytest.approx(math.sqrt(mean_a / mean_g), rel=1e-12)
    # π(cA, G) = sqrt(c) π(A, G): the correction is the ratio of the factor scales.
    assert float(pi_correction(4.0 * a, g)) == pytest.approx(2.0 * float(pi), rel=1e-12)


def test_pi_correction_zero_factor_is_finite() -> None:
    g = torch.eye(3) * 2.0
    zero = torch.zeros(4, 4)
    assert float(pi_correction(zero, zero)) == pytest.approx(1.0)
    pi = pi_correction(zero, g)
    assert math.isfinite(float(pi)) and float(pi) == pytest.approx(math.sqrt(1e-12 / 2.0), rel=1e-5)
    pi = pi_correction(g, zero)
    assert math.isfinite(float(pi)) and float(pi) == pytest.approx(math.sqrt(2.0 / 1e-12), rel=1e-5)


def test_pi_correction_half_precision_accumulates_in_float32() -> None:
    a = torch.eye(300, dtype=torch.bfloat16) * 3.0
    g = torch.eye(2, dtype=torch.bfloat16) * 12.0
    pi = pi_correction(a, g)
    assert pi.dtype == torch.float32
    assert float(pi) == pytest.approx(0.5, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# newton_schulz_inverse
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(1, 64),
    log10_cond=st.floats(0.0, 8.0),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_newton_schulz_random_spd(seed: int, d: int, log10_cond: float, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    matrix = _spd_with_condition(d, log10_cond, gen).to(dtype)
    m64 = matrix.to(F64)
    tol = 1e-4
    x, iterations, converged = newton_schulz_inverse(matrix, tol=tol)
    assert x.dtype == dtype
    assert bool(torch.isfinite(x).all())
    cond = _condition(m64) if d > 1 else 1.0
    # Theory for the scaled-identity start: ‖E_0‖₂ <= 1 − 1/(sqrt(d) κ) and E_k = E_0^(2^k).
    predicted = math.ceil(math.log2(math.sqrt(d) * cond * math.log(1.0 / tol))) + 1
    # Stagnation/divergence detection must stop a failing run early too, not burn max_iters.
    assert iterations <= predicted + 3
    if dtype == torch.float64 and cond <= 1e5:
        assert converged
        assert iterations <= predicted
    if converged:
        residual = _residual(m64, x)
        # float32 computes its own residual in float32; allow that rounding.
        allowance = tol if dtype == F64 else tol + 10 * d * cond * torch.finfo(dtype).eps
        assert residual <= allowance
        exact = torch.linalg.inv(m64)
        bound = math.sqrt(d) * residual * (1 + 1e-6) + _truth_slack(d, cond)
        assert _relative_error(x, exact) <= bound


def test_newton_schulz_warm_start_converges_fast() -> None:
    gen = torch.Generator().manual_seed(0)
    matrix = _spd_with_condition(32, 2.0, gen)
    perturbation = 1e-3 * symmetrize(torch.randn(32, 32, dtype=F64, generator=gen)) / 32
    warm = torch.linalg.inv(matrix + perturbation)
    _, cold_iterations, cold_ok = newton_schulz_inverse(matrix, tol=1e-10)
    x, warm_iterations, warm_ok = newton_schulz_inverse(matrix, warm, tol=1e-10)
    assert cold_ok and warm_ok
    assert warm_iterations <= 3 < cold_iterations
    assert _residual(matrix, x) <= 1e-10


def test_newton_schulz_reports_divergence_quickly() -> None:
    matrix = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=F64))
    # E_0 = I − M(3M⁻¹) = −2I: residual 2, then 4, ... — outside the basin.
    x, iterations, converged = newton_schulz_inverse(matrix, 3.0 * torch.linalg.inv(matrix))
    assert not converged and iterations <= 1 and bool(torch.isfinite(x).all())
    # Indefinite input: the scaled-identity start diverges along the negative eigenvalue.
    x, iterations, converged = newton_schulz_inverse(torch.diag(torch.tensor([1.0, -1.0])))
    assert not converged and iterations <= 2 and bool(torch.isfinite(x).all())
    # A zero matrix has no inverse; its non-finite start must not loop.
    _, iterations, converged = newton_schulz_inverse(torch.zeros(3, 3))
    assert not converged and iterations == 0


# ----------------------------------------------------------------------------------------------
# damped_inverse
# ----------------------------------------------------------------------------------------------

METHODS = {"newton_schulz", "cholesky", "cholesky_float64", "eigh"}


def _check_inverse_result(
    result: InverseResult, factor: Tensor, damping: float, tol: float, max_iters: int = 100
) -> None:
    """Invariants every InverseResult must satisfy, checked against dense float64."""
    d = factor.shape[0]
    m64 = _damped64(factor, damping)
    x = result.inverse
    expected_dtype = F64 if factor.dtype == F64 else torch.float32
    assert x.dtype == expected_dtype
    assert bool(torch.isfinite(x).all())
    assert torch.equal(x, x.T)
    # The residual field is the residual of the returned matrix, and ok is its comparison.
    residual = _residual(m64, x)
    assert result.residual == pytest.approx(residual, rel=1e-6, abs=1e-15)
    assert result.ok == (result.residual <= tol)
    assert result.method in METHODS
    if result.method == "newton_schulz":
        assert 0 <= result.iterations <= max_iters
    else:
        assert result.iterations == 0
    cond = _condition(m64) if d > 1 else 1.0
    exact = torch.linalg.inv(m64)
    error = _relative_error(x, exact)
    if result.ok:
        assert error <= math.sqrt(d) * residual * (1 + 1e-6) + _truth_slack(d, cond)
    else:
        # Only a float32 result may miss tol on an SPD matrix: the float64 Cholesky succeeded
        # and rounding to float32 alone costs ~κ·6e-8 of residual. The answer is still the
        # rounded float64 inverse.
        assert expected_dtype == torch.float32
        assert result.method == "cholesky_float64"
        assert cond * torch.finfo(torch.float32).eps > tol / 100
        eps32 = torch.finfo(torch.float32).eps
        assert error <= math.sqrt(d) * (tol + eps32) + _truth_slack(d, cond)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(1, 64),
    log10_cond=st.floats(0.0, 8.0),
    log10_damping=st.one_of(st.none(), st.floats(-8.0, 0.0)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    warm=st.sampled_from(["none", "good", "random"]),
)
def test_damped_inverse_random_spd(
    seed: int,
    d: int,
    log10_cond: float,
    log10_damping: float | None,
    dtype: torch.dtype,
    warm: str,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    factor = _spd_with_condition(d, log10_cond, gen).to(dtype)
    damping = 0.0 if log10_damping is None else 10.0**log10_damping
    # Rounding to float32 can push the tiniest eigenvalues below zero; keep λ_min(M) >= 1e-8
    # so the matrix really is SPD with κ <= ~1e8.
    lam_min = float(torch.linalg.eigvalsh(symmetrize(factor.to(F64)))[0])
    damping = max(damping, 1e-8 - lam_min)
    m64 = _damped64(factor, damping)
    warm_start = None
    if warm == "good":
        warm_start = torch.linalg.inv(m64 + 1e-4 * torch.eye(d, dtype=F64)).to(dtype)
    elif warm == "random":
        warm_start = torch.randn(d, d, dtype=F64, generator=gen).to(dtype)
    tol = 1e-4
    result = damped_inverse(factor, damping, warm_start, tol=tol)
    _check_inverse_result(result, factor, damping, tol)
    if factor.dtype == F64:
        assert result.ok  # Cholesky in float64 always meets 1e-4 at κ <= 1e8
    if warm_start is None:
        assert result.method != "newton_schulz"  # no cold Newton–Schulz any more


def test_damped_inverse_good_warm_start_takes_few_iterations() -> None:
    gen = torch.Generator().manual_seed(1)
    factor = _spd_with_condition(32, 1.0, gen)
    previous = factor + 1e-3 * symmetrize(torch.randn(32, 32, dtype=F64, generator=gen)) / 32
    warm = damped_inverse(previous, 0.1, tol=1e-12).inverse
    cold = damped_inverse(factor, 0.1, tol=1e-12)
    result = damped_inverse(factor, 0.1, warm, tol=1e-12)
    assert result.method == "newton_schulz" and result.ok
    assert cold.method == "cholesky" and cold.ok  # no warm start: Cholesky, no iteration
    assert 1 <= result.iterations <= 3
    _check_inverse_result(result, factor, 0.1, 1e-12)


def test_damped_inverse_exact_warm_start_needs_no_iteration() -> None:
    gen = torch.Generator().manual_seed(11)
    factor = _spd_with_condition(24, 1.0, gen)
    exact = torch.linalg.inv(_damped64(factor, 0.1))
    result = damped_inverse(factor, 0.1, exact)
    assert result.method == "newton_schulz" and result.iterations == 0 and result.ok
    _check_inverse_result(result, factor, 0.1, 1e-4)


def test_damped_inverse_bad_warm_start_goes_to_cholesky() -> None:
    gen = torch.Generator().manual_seed(2)
    factor = _spd_with_condition(16, 2.0, gen)
    random_start = torch.randn(16, 16, dtype=F64, generator=gen)  # residual >= 1: skipped
    result = damped_inverse(factor, 1e-3, random_start)
    assert result.method == "cholesky" and result.ok
    _check_inverse_result(result, factor, 1e-3, 1e-4)
    # A non-finite warm start is skipped, not fatal.
    nan_start = torch.full((16, 16), math.nan, dtype=F64)
    result = damped_inverse(factor, 1e-3, nan_start)
    assert result.method == "cholesky" and result.ok


def test_damped_inverse_float32_factor_uses_float32_cholesky() -> None:
    gen = torch.Generator().manual_seed(12)
    factor = _spd_with_condition(48, 2.0, gen).to(torch.float32)
    result = damped_inverse(factor, 1e-2)
    assert result.method == "cholesky" and result.ok
    assert result.inverse.dtype == torch.float32
    _check_inverse_result(result, factor, 1e-2, 1e-4)


def test_damped_inverse_float32_ill_conditioned_falls_back_to_float64_cholesky() -> None:
    gen = torch.Generator().manual_seed(3)
    factor = _spd_with_condition(24, 5.0, gen).to(torch.float32)
    lam_min = float(torch.linalg.eigvalsh(factor.to(F64))[0])
    damping = max(0.0, 1e-5 - lam_min)
    result = damped_inverse(factor, damping)
    # κ = 1e5: float32 Cholesky misses 1e-4; the float64 one meets it, and rounding it to
    # float32 costs ~κ·6e-8 of residual, reported honestly.
    assert result.method == "cholesky_float64" and not result.ok
    assert result.inverse.dtype == torch.float32
    _check_inverse_result(result, factor, damping, 1e-4)


def test_damped_inverse_warm_start_needing_too_many_iterations_goes_to_cholesky() -> None:
    gen = torch.Generator().manual_seed(4)
    factor = _spd_with_condition(16, 1.0, gen)
    m64 = _damped64(factor, 0.1)
    # X0 = 0.1·M⁻¹: E0 = −0.9·I, residual 0.9, which needs 7 iterations to reach 1e-4.
    start = 0.1 * torch.linalg.inv(m64)
    result = damped_inverse(factor, 0.1, start, max_iters=2)
    assert result.method == "cholesky" and result.ok and result.iterations == 0
    _check_inverse_result(result, factor, 0.1, 1e-4, max_iters=2)
    result = damped_inverse(factor, 0.1, start, max_iters=10)
    assert result.method == "newton_schulz" and result.ok and result.iterations == 7


class _HostReads:
    """Counts the Tensor methods that copy a value to the host (a sync off CPU)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in self.NAMES:
            original = getattr(Tensor, name)

            def counted(t: Tensor, *args: object, _original: object = original) -> object:
                self.count += 1
                return _original(t, *args)  # type: ignore[operator]

            monkeypatch.setattr(Tensor, name, counted)


def test_damped_inverse_reads_back_once_per_rung(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(13)
    factor = _spd_with_condition(32, 1.0, gen).to(torch.float32)
    exact = torch.linalg.inv(_damped64(factor, 0.1))
    previous = (exact + 2e-2 * symmetrize(torch.randn(32, 32, dtype=F64, generator=gen))).float()
    damping = torch.tensor(0.1, dtype=F64)  # a device scalar, as the optimizers pass it
    reads = _HostReads(monkeypatch)
    cold = damped_inverse(factor, damping)
    assert cold.method == "cholesky" and reads.count == 1  # inputs, info and certificate
    reads.count = 0
    warm = damped_inverse(factor, damping, previous)
    # Inputs with the warm start's residual, then one read for all predicted iterations.
    assert warm.method == "newton_schulz" and warm.iterations >= 2 and reads.count == 2
    monkeypatch.undo()
    _check_inverse_result(warm, factor, 0.1, 1e-4)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 24), scale=st.floats(0.05, 0.95))
def test_predicted_iterations_never_exceed_the_needed_ones(seed: int, d: int, scale: float) -> None:
    """For symmetric E the residual of E^(2^k) is at least r^(2^k): the prediction is a lower
    bound on the squarings Newton–Schulz needs, so no iteration is run past convergence."""
    from grng.linalg import _predicted_iterations

    gen = torch.Generator().manual_seed(seed)
    e = _psd(scale * (2 * torch.rand(d, dtype=F64, generator=gen) - 1), gen)
    tol = 1e-4

    def rms(m: Tensor) -> float:
        return float(torch.linalg.matrix_norm(m)) / math.sqrt(d)

    needed, power = 0, e
    while rms(power) > tol:
        power, needed = power @ power, needed + 1
    assert _predicted_iterations(rms(e), tol) <= needed


def test_newton_schulz_is_preferred_off_cpu_only() -> None:
    assert not prefers_newton_schulz(torch.device("cpu"))
    assert prefers_newton_schulz(torch.device("cuda"))


def test_damped_inverse_eigh_clamps_negative_eigenvalues_at_damping() -> None:
    # F = −I is not PSD; M = −0.5 I is negative definite, so NS diverges and Cholesky fails.
    factor = -torch.eye(5, dtype=F64)
    result = damped_inverse(factor, 0.5)
    assert result.method == "eigh" and not result.ok
    # Eigenvalues of F clamped at 0, plus damping: (0 + 0.5)⁻¹ I.
    torch.testing.assert_close(result.inverse, 2.0 * torch.eye(5, dtype=F64), rtol=1e-12, atol=0)
    assert result.residual == pytest.approx(2.0)


def test_damped_inverse_singular_undamped_stays_finite() -> None:
    v = torch.arange(1.0, 5.0, dtype=F64)
    factor = torch.outer(v, v)  # rank 1, damping 0: no inverse exists
    for dtype in (F64, torch.float32, torch.bfloat16):
        result = damped_inverse(factor.to(dtype), 0.0)
        assert result.method == "eigh" and not result.ok
        assert bool(torch.isfinite(result.inverse).all())


def test_damped_inverse_half_precision_returns_float32() -> None:
    gen = torch.Generator().manual_seed(5)
    factor = _spd_with_condition(20, 1.0, gen).to(torch.bfloat16)
    damping = torch.tensor(0.01)  # a float32 0-d tensor, as an optimizer would hold it
    result = damped_inverse(factor, damping)
    assert result.inverse.dtype == torch.float32 and result.ok
    _check_inverse_result(result, factor, float(damping), 1e-4)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_damped_inverse_rejects_non_finite_factor(bad: float) -> None:
    factor = torch.eye(4)
    factor[1, 2] = bad
    with pytest.raises(ValueError, match="factor"):
        damped_inverse(factor, 1e-3)


def test_damped_inverse_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="damping"):
        damped_inverse(torch.eye(3), -1.0)
    with pytest.raises(ValueError, match="damping"):
        damped_inverse(torch.eye(3), torch.tensor(math.nan))
    with pytest.raises(ValueError, match="square"):
        damped_inverse(torch.ones(3, 4), 1.0)
    with pytest.raises(ValueError, match="warm_start"):
        damped_inverse(torch.eye(3), 1.0, torch.eye(4))


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(1, 32),
    n_zero=st.integers(0, 4),
    log10_d1=st.floats(-3.0, 1.0),
    log10_gap=st.floats(-3.0, 1.0),
    tensor_damping=st.booleans(),
)
def test_damped_inverse_monotone_in_damping(
    seed: int, d: int, n_zero: int, log10_d1: float, log10_gap: float, tensor_damping: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    eigenvalues = torch.rand(d, dtype=F64, generator=gen)
    eigenvalues[: min(n_zero, d)] = 0.0  # PSD with a null space, as for rank-deficient factors
    factor = _psd(eigenvalues, gen)
    d1 = 10.0**log10_d1
    d2 = d1 * (1.0 + 10.0**log10_gap)
    tol = 1e-10
    damp1: float | Tensor = torch.tensor(d1, dtype=F64) if tensor_damping else d1
    r1 = damped_inverse(factor, damp1, tol=tol)
    r2 = damped_inverse(factor, d2, tol=tol)
    assert r1.ok and r2.ok
    x1, x2 = r1.inverse, r2.inverse
    # Certified spectral-norm errors ‖X_i − M_i⁻¹‖₂ <= sqrt(d)·residual_i·‖M_i⁻¹‖₂, plus eigvalsh.
    err = math.sqrt(d) * (r1.residual / d1 + r2.residual / d2) * 1.01 + 1e-12 / d1
    # Both inverses are functions of F: the difference has eigenvalues 1/(λ+d1) − 1/(λ+d2) > 0.
    lam = torch.linalg.eigvalsh(factor)
    expected = torch.sort(1.0 / (lam + d1) - 1.0 / (lam + d2)).values
    observed = torch.linalg.eigvalsh(x1 - x2)
    assert float((observed - expected).abs().max()) <= err  # Weyl's inequality
    assert float(observed[0]) >= -err  # Loewner order X2 ⪯ X1
    v = torch.randn(d, 3, dtype=F64, generator=gen)
    n1 = torch.linalg.vector_norm(x1 @ v, dim=0)
    n2 = torch.linalg.vector_norm(x2 @ v, dim=0)
    assert bool((n2 <= n1 + err * torch.linalg.vector_norm(v, dim=0)).all())


# ----------------------------------------------------------------------------------------------
# eigh_factor
# ----------------------------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 48), rank=st.integers(0, 48))
def test_eigh_factor_reconstructs_psd_factor(seed: int, d: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(d, min(rank, d), dtype=F64, generator=gen)
    factor = features @ features.T  # PSD, rank-deficient when rank < d
    eigenvalues, eigenvectors = eigh_factor(factor)
    assert eigenvalues.dtype == F64 and eigenvectors.dtype == F64
    assert bool((eigenvalues >= 0).all())
    scale = max(float(torch.linalg.matrix_norm(factor, ord=2)), 1.0)
    rebuilt = (eigenvectors * eigenvalues) @ eigenvectors.T
    assert float((rebuilt - factor).abs().max()) <= 1e-12 * d * scale
    torch.testing.assert_close(eigenvectors.T @ eigenvectors, torch.eye(d, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_eigh_factor_half_precision(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(6)
    factor = _psd(torch.rand(12, dtype=F64, generator=gen), gen).to(dtype)
    eigenvalues, eigenvectors = eigh_factor(factor)
    assert eigenvalues.dtype == torch.float32 and eigenvectors.dtype == torch.float32
    assert bool((eigenvalues >= 0).all())
    rebuilt = (eigenvectors * eigenvalues) @ eigenvectors.T
    torch.testing.assert_close(rebuilt, symmetrize(factor.float()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_eigh_factor_retries_in_float64(failure: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_eigh = torch.linalg.eigh
    seen: list[torch.dtype] = []

    def flaky_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(matrix.dtype)
        if matrix.dtype == torch.float32:
            if failure == "raise":
                raise torch.linalg.LinAlgError("simulated convergence failure")
            values, vectors = real_eigh(matrix)
            return values * math.nan, vectors
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky_eigh)
    gen = torch.Generator().manual_seed(7)
    factor = _psd(torch.rand(8, dtype=F64, generator=gen), gen).float()
    eigenvalues, eigenvectors = eigh_factor(factor)
    assert seen == [torch.float32, F64]
    assert eigenvalues.dtype == torch.float32 and bool(torch.isfinite(eigenvalues).all())
    rebuilt = (eigenvectors * eigenvalues) @ eigenvectors.T
    torch.testing.assert_close(rebuilt, factor, rtol=0, atol=1e-5)


def test_eigh_factor_rejects_non_finite() -> None:
    factor = torch.eye(3)
    factor[0, 0] = math.nan
    with pytest.raises(ValueError, match="factor"):
        eigh_factor(factor)


# ----------------------------------------------------------------------------------------------
# Kronecker-factored solves
# ----------------------------------------------------------------------------------------------


def _dense_kronecker_solve(v: Tensor, g: Tensor, a: Tensor, dg: float, da: float) -> Tensor:
    gd = g + dg * torch.eye(g.shape[0], dtype=F64)
    ad = a + da * torch.eye(a.shape[0], dtype=F64)
    left = torch.linalg.solve(gd, v)  # (G + dG I)⁻¹ V
    return torch.linalg.solve(ad, left.T).T  # ... (A + dA I)⁻¹, A symmetric


def _rel(x: Tensor, y: Tensor) -> float:
    return float(torch.linalg.matrix_norm(x - y) / torch.linalg.matrix_norm(y))


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    dim_g=st.integers(1, 24),
    dim_a=st.integers(1, 24),
    log10_dg=st.floats(-3.0, 0.0),
    log10_da=st.floats(-3.0, 0.0),
    tensor_damping=st.booleans(),
)
def test_kronecker_solves_match_dense(
    seed: int, dim_g: int, dim_a: int, log10_dg: float, log10_da: float, tensor_damping: bool
) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = _psd(torch.rand(dim_g, dtype=F64, generator=gen), gen)
    a = _psd(torch.rand(dim_a, dtype=F64, generator=gen), gen)
    v = torch.randn(dim_g, dim_a, dtype=F64, generator=gen)
    dg, da = 10.0**log10_dg, 10.0**log10_da
    expected = _dense_kronecker_solve(v, g, a, dg, da)
    damp_g: float | Tensor = torch.tensor(dg, dtype=F64) if tensor_damping else dg
    damp_a: float | Tensor = torch.tensor(da, dtype=F64) if tensor_damping else da

    out = kronecker_solve_eigh(v, eigh_factor(g), eigh_factor(a), damp_g, damp_a)
    assert out.shape == v.shape and out.dtype == F64
    assert _rel(out, expected) <= 1e-8

    g_inv = torch.linalg.inv(g + dg * torch.eye(dim_g, dtype=F64))
    a_inv = torch.linalg.inv(a + da * torch.eye(dim_a, dtype=F64))
    assert _rel(kronecker_solve_inverse(v, g_inv, a_inv), expected) <= 1e-8

    # With inverses from damped_inverse the two routes agree to its certified accuracy.
    rg = damped_inverse(g, dg, tol=1e-12)
    ra = damped_inverse(a, da, tol=1e-12)
    assert _rel(kronecker_solve_inverse(v, rg.inverse, ra.inverse), expected) <= 1e-8


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    dim_g=st.integers(1, 5),
    dim_a=st.integers(1, 5),
    dg=st.floats(1e-2, 1.0),
    da=st.floats(1e-2, 1.0),
)
def test_kronecker_solve_equals_kronecker_product_form(
    seed: int, dim_g: int, dim_a: int, dg: float, da: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = _psd(torch.rand(dim_g, dtype=F64, generator=gen), gen)
    a = _psd(torch.rand(dim_a, dtype=F64, generator=gen), gen)
    v = torch.randn(dim_g, dim_a, dtype=F64, generator=gen)
    gd = g + dg * torch.eye(dim_g, dtype=F64)
    ad = a + da * torch.eye(dim_a, dtype=F64)
    # Row-major vec: vec(G⁻¹ V A⁻¹) = (G ⊗ Aᵀ)⁻¹ vec(V), and A is symmetric.
    expected = torch.linalg.solve(torch.kron(gd, ad), v.reshape(-1)).reshape(dim_g, dim_a)
    out = kronecker_solve_eigh(v, torch.linalg.eigh(g), torch.linalg.eigh(a), dg, da)
    assert _rel(out, expected) <= 1e-8
    out = kronecker_solve_inverse(v, torch.linalg.inv(gd), torch.linalg.inv(ad))
    assert _rel(out, expected) <= 1e-8


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    dim_g=st.integers(1, 12),
    dim_a=st.integers(1, 12),
    gamma=st.floats(1e-3, 1.0),
    diagonal_g=st.booleans(),
    diagonal_a=st.booleans(),
)
def test_precomputed_spectra_solve_the_dense_systems(
    seed: int, dim_g: int, dim_a: int, gamma: float, diagonal_g: bool, diagonal_a: bool
) -> None:
    """eigenbasis_solve with a stored 1/(g aᵀ + γ), and kronecker_solve_inverse with the
    inverses eigh_damped_inverse builds from the eigenbases, are the dense Tikhonov and
    factored solves (float64), also with a diagonal (1-D) side; V is left alone."""
    gen = torch.Generator().manual_seed(seed)

    def factor(d: int, diagonal: bool) -> Tensor:
        eigenvalues = torch.rand(d, dtype=F64, generator=gen)
        return eigenvalues if diagonal else _psd(eigenvalues, gen)

    g, a = factor(dim_g, diagonal_g), factor(dim_a, diagonal_a)
    dense_g = torch.diag(g) if diagonal_g else g
    dense_a = torch.diag(a) if diagonal_a else a
    v = torch.randn(dim_g, dim_a, dtype=F64, generator=gen)
    original = v.clone()
    (eg, qg), (ea, qa) = eigh_factor(g), eigh_factor(a)
    dg, da = math.sqrt(gamma) * 2.0, math.sqrt(gamma) / 2.0
    kron = torch.kron(dense_g, dense_a)
    eye = torch.eye(dim_g * dim_a, dtype=F64)
    tikhonov = torch.linalg.solve(kron + gamma * eye, v.reshape(-1)).reshape(v.shape)
    factored = _dense_kronecker_solve(v, dense_g, dense_a, dg, da)
    out = eigenbasis_solve(v, qg, qa, tikhonov_inverse_spectrum(eg, ea, gamma))
    assert _rel(out, tikhonov) <= 1e-10
    assert _rel(kronecker_tikhonov_solve_eigh(v, (eg, qg), (ea, qa), gamma), tikhonov) <= 1e-10
    out = kronecker_solve_inverse(
        v, eigh_damped_inverse(eg, qg, dg), eigh_damped_inverse(ea, qa, da)
    )
    assert _rel(out, factored) <= 1e-10
    assert _rel(kronecker_solve_eigh(v, (eg, qg), (ea, qa), dg, da), factored) <= 1e-10
    assert torch.equal(v, original)  # the in-place division never touches the caller's V


def test_kronecker_solve_eigh_keeps_gradient_dtype() -> None:
    gen = torch.Generator().manual_seed(8)
    g = _psd(torch.rand(6, dtype=F64, generator=gen), gen).float()
    a = _psd(torch.rand(5, dtype=F64, generator=gen), gen).float()
    v = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
    out = kronecker_solve_eigh(v, eigh_factor(g), eigh_factor(a), 0.1, 0.1)
    assert out.dtype == torch.bfloat16
    expected = _dense_kronecker_solve(v.to(F64), g.to(F64), a.to(F64), 0.1, 0.1)
    assert _rel(out.to(F64), expected) <= 1e-2  # bf16 output rounding
    with pytest.raises(ValueError, match="shape"):
        kronecker_solve_eigh(v.T, eigh_factor(g), eigh_factor(a), 0.1, 0.1)
    with pytest.raises(ValueError, match="shape"):
        kronecker_solve_inverse(v.T, g, a)


# ----------------------------------------------------------------------------------------------
# shifted_inverse_first_order
# ----------------------------------------------------------------------------------------------


def _spectral(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x) if x.ndim == 1 else torch.linalg.matrix_norm(x, ord=2))


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(1, 24),
    k=st.integers(0, 5),
    r=st.floats(1e-3, 0.95),
    negative=st.booleans(),
    symmetric=st.booleans(),
    side=st.sampled_from(["left", "right"]),
)
def test_shifted_inverse_error_within_neumann_bound(
    seed: int, d: int, k: int, r: float, negative: bool, symmetric: bool, side: str
) -> None:
    gen = torch.Generator().manual_seed(seed)
    if symmetric:
        x = _psd(torch.logspace(-1.0, 1.0, d, dtype=F64), gen)
    else:  # any invertible X: the Neumann argument does not need symmetry
        x = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, dtype=F64, generator=gen) / math.sqrt(
            d
        )
    norm_x = _spectral(x)
    eps = (-1.0 if negative else 1.0) * r / norm_x
    shape = (d,) if k == 0 else ((d, k) if side == "left" else (k, d))
    b = torch.randn(*shape, dtype=F64, generator=gen)
    eye = torch.eye(d, dtype=F64)
    shifted = torch.linalg.solve(eye + eps * x, x)  # (M + εI)⁻¹ = (I + εX)⁻¹ X
    exact = shifted @ b if side == "left" else b @ shifted
    approx = shifted_inverse_first_order(x, eps, b, side)
    error = _spectral(approx - exact)
    slack = 1e-13 * norm_x * _spectral(b) / (1.0 - r)
    # Neumann tail: ‖R‖₂ <= r²/(1−r)‖X‖₂ ...
    assert error <= r**2 / (1 - r) * norm_x * _spectral(b) * (1 + 1e-6) + slack
    # ... and relative to the exact result, R = (εX)² (M + εI)⁻¹ gives <= r² <= r²/(1−r).
    assert error / _spectral(exact) <= r**2 * (1 + 1e-6) + slack / _spectral(exact)


def test_shifted_inverse_bound_is_attained() -> None:
    # B = top eigenvector of SPD X: the relative error is exactly r², so the bound is tight.
    gen = torch.Generator().manual_seed(9)
    x = _psd(torch.logspace(-1.0, 1.0, 10, dtype=F64), gen)
    eigenvalues, eigenvectors = torch.linalg.eigh(x)
    top = eigenvectors[:, -1]
    r = 0.5
    eps = r / float(eigenvalues[-1])
    exact = top * float(eigenvalues[-1]) / (1.0 + r)
    approx = shifted_inverse_first_order(x, torch.tensor(eps, dtype=F64), top, "left")
    ratio = _spectral(approx - exact) / _spectral(exact)
    assert ratio == pytest.approx(r**2, rel=1e-9)


def test_shifted_inverse_zero_shift_is_exact() -> None:
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(7, 7, generator=gen)
    b = torch.randn(7, 3, generator=gen)
    assert torch.equal(shifted_inverse_first_order(x, 0.0, b, "left"), x @ b)
    assert torch.equal(shifted_inverse_first_order(x, torch.tensor(0.0), b.T, "right"), b.T @ x)
    with pytest.raises(ValueError, match="side"):
        shifted_inverse_first_order(x, 0.0, b, "both")


# ----------------------------------------------------------------------------------------------
# No-sync functions: torch.vmap rejects .item() and data-dependent Python control flow, so
# running them batched is a cheap CPU proxy for "never synchronises with the host".
# ----------------------------------------------------------------------------------------------


def test_no_sync_functions_run_under_vmap() -> None:
    gen = torch.Generator().manual_seed(11)
    batch, dg, da = 3, 4, 5
    g = torch.stack([_psd(torch.rand(dg, dtype=F64, generator=gen), gen) for _ in range(batch)])
    a = torch.stack([_psd(torch.rand(da, dtype=F64, generator=gen), gen) for _ in range(batch)])
    v = torch.randn(batch, dg, da, dtype=F64, generator=gen)
    damping_g = torch.rand(batch, dtype=F64, generator=gen) + 0.1
    damping_a = torch.rand(batch, dtype=F64, generator=gen) + 0.1
    g_eig, a_eig = torch.linalg.eigh(g), torch.linalg.eigh(a)
    eye_g, eye_a = torch.eye(dg, dtype=F64), torch.eye(da, dtype=F64)
    g_inv = torch.linalg.inv(g + damping_g[:, None, None] * eye_g)
    a_inv = torch.linalg.inv(a + damping_a[:, None, None] * eye_a)

    batched = {
        "symmetrize": torch.vmap(symmetrize)(v[:, :, :dg]),
        "pi": torch.vmap(pi_correction)(a, g),
        "eigh": torch.vmap(kronecker_solve_eigh)(
            v, tuple(g_eig), tuple(a_eig), damping_g, damping_a
        ),
        "inverse": torch.vmap(kronecker_solve_inverse)(v, g_inv, a_inv),
        "shifted": torch.vmap(shifted_inverse_first_order, in_dims=(0, 0, 0, None))(
            g_inv, 0.1 * damping_g, v, "left"
        ),
    }
    for i in range(batch):
        eig_g = (g_eig.eigenvalues[i], g_eig.eigenvectors[i])
        eig_a = (a_eig.eigenvalues[i], a_eig.eigenvectors[i])
        single = {
            "symmetrize": symmetrize(v[i, :, :dg]),
            "pi": pi_correction(a[i], g[i]),
            "eigh": kronecker_solve_eigh(v[i], eig_g, eig_a, damping_g[i], damping_a[i]),
            "inverse": kronecker_solve_inverse(v[i], g_inv[i], a_inv[i]),
            "shifted": shifted_inverse_first_order(g_inv[i], 0.1 * damping_g[i], v[i], "left"),
        }
        for name, value in single.items():
            torch.testing.assert_close(batched[name][i], value, msg=name)
    torch.testing.assert_close(batched["eigh"], batched["inverse"])
