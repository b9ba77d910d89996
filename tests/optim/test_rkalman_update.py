"""R-Kalman's covariance update: symmetrised once per update, and its float32 drift."""

from __future__ import annotations

import torch

from grng.optim.rkalman import absorb_coordinates, floor_schedule, kalman_absorb


def _spd(d: int, dtype: torch.dtype) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return torch.linalg.inv(a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)).to(dtype)


def test_symmetrised_update_is_bitwise_symmetric_and_the_exact_inverse() -> None:
    d, k, beta = 30, 4, 0.9
    p = _spd(d, torch.float64)
    u = torch.randn(d, k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    new = kalman_absorb(p, u, beta, 1 - beta)
    assert torch.equal(new, new.mT)
    exact = torch.linalg.inv(beta * torch.linalg.inv(p) + (1 - beta) * u @ u.T)
    torch.testing.assert_close(new, exact, rtol=1e-10, atol=1e-12)
    raw = kalman_absorb(p, u, beta, 1 - beta, symmetric=False)
    torch.testing.assert_close(raw, new, rtol=1e-13, atol=1e-15)  # only rounding apart


def test_float32_updates_stay_with_the_float64_recursion() -> None:
    """300 updates (data unsymmetrised, floor symmetrised, as the optimizer runs them) in
    float32 against float64: the covariance stays within 1e-5 relative, exactly
    symmetric, and the unsymmetrised intermediate's asymmetry stays at rounding."""
    d, k, beta = 40, 8, 0.95
    g = torch.Generator().manual_seed(2)
    p32, p64 = torch.eye(d) * 10.0, torch.eye(d, dtype=torch.float64) * 10.0
    _, information, _ = floor_schedule(d, k, beta)
    c = torch.tensor(0.01 * information, dtype=torch.float64)
    worst = 0.0
    for step in range(300):
        u = torch.randn(d, k, generator=g, dtype=torch.float64) / k**0.5
        index = (torch.arange(k) + k * step) % d
        p64 = absorb_coordinates(kalman_absorb(p64, u, beta, 1 - beta), index, c)
        middle = kalman_absorb(p32, u.float(), beta, 1 - beta, symmetric=False)
        worst = max(worst, float((middle - middle.mT).norm() / middle.norm()))
        p32 = absorb_coordinates(middle, index, c.float())
        assert torch.equal(p32, p32.mT)
    assert worst < 1e-6
    assert float((p32.double() - p64).norm() / p64.norm()) < 1e-5
