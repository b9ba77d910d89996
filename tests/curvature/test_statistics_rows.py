"""Row subsets of the factor statistics (``max_statistics_rows``) and diagonal-only capture.

Ground truth: the capture of every row (itself checked against hand-computed factors in
``test_capture.py``). Unbiasedness is checked by averaging over many seeds with a
z-test whose resolution is asserted, so a bias of a few percent would fail it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import grng
import grng.curvature.capture as capture_module
from grng.curvature import CurvatureCapture, FactorEstimate, find_kronecker_layers
from grng.curvature.capture import inclusion_probabilities
from grng.optim.options import CurvatureOptions

WIDTH = capture_module.MIN_SUBSET_WIDTH


@pytest.fixture(autouse=True)
def _narrow_sides_are_drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The models here are narrow, so let sides of any width be drawn (see
    ``test_narrow_sides_sum_every_row`` for the width rule itself)."""
    monkeypatch.setattr(capture_module, "MIN_SUBSET_WIDTH", 1)


class ConvThenLinear(nn.Module):
    """Conv1d over (N, 3, 10) then a Linear over its 8 positions: 8 N rows per call each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).transpose(1, 2))


def _data(seed: int = 0, n: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Examples of very different scale: row norms vary, as gradient rows do.
    x = torch.randn(n, 3, 10, generator=g) * torch.logspace(-1, 1, n)[:, None, None]
    return x, torch.randint(0, 3, (n, 8), generator=g)


def _capture(model: nn.Module, cap: int | None, seed: int, chunks: int = 1, **kw):
    layers = find_kronecker_layers(model, set(model.parameters()))
    capture = CurvatureCapture(model, layers, max_statistics_rows=cap, row_seed=seed, **kw)
    capture.armed = True
    x, y = _data()
    for xs, ys in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
        loss = F.cross_entropy(model(xs).flatten(0, 1), ys.flatten()) / chunks
        loss.backward()
    estimates = capture.estimates()
    capture.remove()
    return estimates


def _factors(estimates: dict[str, FactorEstimate]) -> dict[str, Tensor]:
    return {
        f"{name}/{side}": getattr(e, f"{side}_factor")
        for name, e in estimates.items()
        for side in ("activation", "gradient")
    }


def _assert_mean_is(samples: list[dict[str, Tensor]], expected: dict[str, Tensor]) -> None:
    """Every entry's mean over the samples is the expected value (|z| < 5), and the test
    resolves a bias of 2% of the factor's largest entry."""
    for key, value in expected.items():
        stack = torch.stack([s[key] for s in samples])
        error = stack.std(0) / len(samples) ** 0.5
        scale = value.abs().max()
        assert error.max() < 0.02 * scale, key  # the test would see a 2% bias
        z = (stack.mean(0) - value).abs() / (error + 1e-12 * scale)
        assert z.max() < 5, (key, z.max())


# ------------------------------------------------------------------ the draw itself
def _capped_by_loop(weight: list[float], k: int) -> list[float]:
    """Inclusion probabilities by the textbook iteration: cap at 1, redistribute."""
    capped: set[int] = set()
    while True:
        rest = [i for i in range(len(weight)) if i not in capped]
        total = sum(weight[i] for i in rest)
        rate = (k - len(capped)) / total if total > 0 else 0.0
        new = {i for i in rest if rate * weight[i] >= 1 and weight[i] > 0}
        if not new:
            return [1.0 if i in capped else min(1.0, rate * weight[i]) for i in range(len(weight))]
        capped |= new


@pytest.mark.parametrize(
    "weight",
    [
        [5.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 3.0, 0.1, 0.1],
        [1.0] * 10,
        [5.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # fewer positive weights than k
        [1e6, 1e3, 1.0, 1.0, 1.0, 1.0, 1.0, 1e-3],
    ],
)
def test_inclusion_probabilities_sum_to_k_and_are_capped_proportions(weight, float64):
    k = 4
    got = inclusion_probabilities(torch.tensor(weight), k)
    expected = torch.tensor(_capped_by_loop(weight, k))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    positive = sum(w > 0 for w in weight)
    assert float(got.sum()) == pytest.approx(min(k, positive), abs=1e-12)


def test_subset_of_rows_is_unbiased_and_bounded(float64):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(50, 3, generator=g) * torch.rand(50, 1, generator=g) ** 3 * 10
    rows[::7] = 0.0  # zero rows are never drawn
    capture = CurvatureCapture(nn.Linear(1, 1), [])
    samples = []
    for seed in range(3000):
        capture.row_seed = seed
        subset = capture._statistics_subset(rows, 8, salt=11)
        assert subset.shape == (8, 3)
        samples.append({"sum": subset.T @ subset})
    _assert_mean_is(samples, {"sum": rows.T @ rows})


def test_a_non_finite_row_makes_the_estimate_non_finite_drawn_or_not(float64):
    rows = torch.ones(100, 2)
    rows[57, 1] = float("inf")
    capture = CurvatureCapture(nn.Linear(1, 1), [])
    for seed in range(5):
        capture.row_seed = seed
        subset = capture._statistics_subset(rows, 4, salt=0)
        assert not torch.isfinite(subset.T @ subset).all()


# ------------------------------------------------------------------ through the engine
@pytest.mark.parametrize("chunks", [1, 2])
def test_capped_factors_are_unbiased_estimates_of_the_full_ones(chunks, float64):
    """Conv1d (48 patch rows) and a Linear over positions (48 rows), 8 rows per call:
    the average over draws is the estimate from every row, normalisation included,
    also when the batch is accumulated from two micro-batches."""
    torch.manual_seed(0)
    model = ConvThenLinear()
    full = _factors(_capture(model, None, 0, chunks))
    whole_batch = _factors(_capture(model, None, 0, 1))
    for key, value in full.items():  # accumulation of the full estimates is exact
        torch.testing.assert_close(value, whole_batch[key], rtol=1e-12, atol=1e-14)
    samples = [_factors(_capture(model, 8 // chunks, seed, chunks)) for seed in range(1500)]
    assert not torch.equal(samples[0]["conv/activation"], full["conv/activation"])
    _assert_mean_is(samples, full)


def test_calls_within_the_cap_are_exact_and_so_are_few_nonzero_rows(float64):
    torch.manual_seed(0)
    model = ConvThenLinear()
    full = _factors(_capture(model, None, 0))
    for key, value in _factors(_capture(model, 48, 3)).items():
        assert torch.equal(value, full[key]), key  # 48 rows per call: nothing drawn

    # A loss on the first position only (a classifier's [CLS]): the head's gradient
    # rows are nonzero for 5 of 40 rows, all of which a cap of 8 draws, with π = 1.
    layer = nn.Linear(4, 3)
    layers = find_kronecker_layers(layer, set(layer.parameters()))
    g_full = {}
    for cap in (None, 8):
        capture = CurvatureCapture(layer, layers, max_statistics_rows=cap, row_seed=1)
        capture.armed = True
        x = torch.randn(5, 8, 4, generator=torch.Generator().manual_seed(2))
        layer(x)[:, 0].pow(2).sum().backward()
        g_full[cap] = capture.estimates()["Linear"].gradient_factor
        capture.remove()
    torch.testing.assert_close(g_full[8], g_full[None], rtol=1e-12, atol=0)


def test_narrow_sides_sum_every_row(float64, monkeypatch):
    """Sides narrower than ``MIN_SUBSET_WIDTH`` (128) are exact above the cap, where a
    draw would cost as much as the sum; a side as wide is drawn."""
    monkeypatch.setattr(capture_module, "MIN_SUBSET_WIDTH", WIDTH)
    assert WIDTH == 128
    layer = nn.Linear(WIDTH - 1, 3)  # activation side WIDTH wide (bias column), gradient 3
    layers = find_kronecker_layers(layer, set(layer.parameters()))
    x = torch.randn(300, WIDTH - 1, generator=torch.Generator().manual_seed(0))
    estimates = {}
    for cap in (None, 64):
        capture = CurvatureCapture(layer, layers, max_statistics_rows=cap, row_seed=1)
        capture.armed = True
        layer(x).pow(2).sum().backward()
        estimates[cap] = capture.estimates()["Linear"]
        capture.remove()
    assert torch.equal(estimates[64].gradient_factor, estimates[None].gradient_factor)
    assert not torch.allclose(estimates[64].activation_factor, estimates[None].activation_factor)


def test_activation_and_gradient_draws_are_independent(float64, monkeypatch):
    """E[Â ⊗ Ĝ] = A ⊗ G holds for independent draws. The layer is the identity and the
    loss ½‖out‖², so gradient rows equal activation rows: one shared draw would make
    Ĝ = Â and E[Â ⊗ Â] = A ⊗ A + Cov (the control below sees that)."""
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor(
        [[0.2], [0.5], [1.0], [1.5], [2.0], [3.0]]
    )

    def products(seeds: range) -> tuple[list[dict[str, Tensor]], Tensor]:
        layers = find_kronecker_layers(layer, set(layer.parameters()))
        capture = CurvatureCapture(layer, layers, loss_reduction="sum", max_statistics_rows=2)
        capture.armed = True
        out = []
        for seed in seeds:
            capture.clear()
            capture.row_seed = seed
            (0.5 * layer(x).pow(2).sum()).backward()
            e = capture.estimates()["Linear"]
            out.append({"kron": torch.kron(e.activation_factor, e.gradient_factor)})
        capture.remove()
        return out, torch.kron(x.T @ x / 6, x.T @ x / 6)

    samples, expected = products(range(2000))
    _assert_mean_is(samples, {"kron": expected})
    # Control: the same draw for both sides (one salt) is detectably biased.
    monkeypatch.setattr(capture_module, "_statistics_salt", lambda salt, side: salt)
    shared, _ = products(range(2000))
    mean = torch.stack([s["kron"] for s in shared]).mean(0)
    assert (mean - expected).abs().max() > 0.1 * expected.abs().max()


# ------------------------------------------------------------------ optimizers
def _sequence_batches(steps: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(4, 8, 5, generator=g), torch.randint(0, 3, (4, 8), generator=g))
        for _ in range(steps)
    ]


def _sequence_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _run(model, optimizer, batches) -> None:
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()


def test_the_default_cap_reaches_the_capture_and_is_validated():
    model = _sequence_model()
    options = CurvatureOptions()
    assert options.max_statistics_rows == 1024
    assert grng.KFAC(model).capture.max_statistics_rows == options.max_statistics_rows
    assert CurvatureOptions(max_statistics_rows=None).max_statistics_rows is None
    with pytest.raises(ValueError, match="max_statistics_rows"):
        CurvatureOptions(max_statistics_rows=0)
    with pytest.raises(TypeError, match="max_statistics_rows"):
        CurvatureOptions(max_statistics_rows=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_statistics_rows"):
        CurvatureCapture(model, [], max_statistics_rows=0)


def test_subsets_are_drawn_per_step_and_alike_after_a_resume(float64):
    """32 rows per call, 8 drawn: a resumed K-FAC continues bit-identically, because the
    draw is seeded by the step; drawing with another seed would not."""
    batches = _sequence_batches(6)
    model = _sequence_model()
    optimizer = grng.KFAC(model, factor_update_freq=1, inverse_update_freq=1)
    optimizer.capture.max_statistics_rows = 8
    _run(model, optimizer, batches[:3])
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    _run(model, optimizer, batches[3:])

    def resumed(row_seed: int | None) -> nn.Module:
        twin = copy.deepcopy(saved_model)
        again = grng.KFAC(twin, factor_update_freq=1, inverse_update_freq=1)
        again.capture.max_statistics_rows = 8
        again.load_state_dict(copy.deepcopy(saved_state))
        if row_seed is not None:
            again.capture.row_seed = row_seed
        _run(twin, again, batches[3:])
        return twin

    for p, q in zip(model.parameters(), resumed(None).parameters(), strict=True):
        assert torch.equal(p, q)
    other = resumed(0)
    assert any(
        not torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters(), strict=True)
    )


def test_hooks_do_no_work_on_steps_without_capture(monkeypatch):
    """Off capture steps every hook returns at once: nothing is recorded, attention's
    ``F.linear`` is not wrapped, and no gradient hook is registered."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = attention
            self.head = nn.Linear(8, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.attention(x, x, x, need_weights=False)[0])

    model = Net()
    optimizer = grng.KFAC(model, factor_update_freq=3)
    calls: list[int] = []
    wrapped: list[bool] = []
    record = CurvatureCapture.record

    def counting(self, *args, **kwargs) -> None:
        calls.append(optimizer.steps_taken)
        record(self, *args, **kwargs)

    monkeypatch.setattr(CurvatureCapture, "record", counting)
    original = F.linear
    # Registered after the adapter's pre-hook, so it sees F.linear as the call will.
    attention.register_forward_pre_hook(lambda m, a: wrapped.append(F.linear is not original))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4, 5), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
    assert sorted(set(calls)) == [0, 3]
    assert wrapped == [True, False, False, True, False, False]
    assert F.linear is original
    with torch.no_grad():  # a capture step's evaluation pass records nothing either
        model(torch.randn(2, 5, 8))
    assert wrapped[-1] is False and sorted(set(calls)) == [0, 3]


# ------------------------------------------------------------------ diagonals only
class TokensThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 5)
        self.conv = nn.Conv1d(5, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.conv(self.embedding(tokens).transpose(1, 2)))
        return self.head(h.transpose(1, 2))


def test_diagonals_are_the_factors_diagonals_and_the_rows_are_unchanged(float64):
    """R-Kalman's capture (``statistics="diagonals"``): each estimate is the diagonal of
    the full factor, whatever the cap, and the kept rows are the very same."""
    torch.manual_seed(0)
    model = TokensThenLinear()
    captures = {}
    for mode, cap in (("factors", None), ("diagonals", 4)):
        layers = find_kronecker_layers(model, set(model.parameters()))
        captures[mode] = CurvatureCapture(
            model, layers, keep_rows=6, row_seed=3, max_statistics_rows=cap, statistics=mode
        )
        captures[mode].armed = True
    tokens = torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(tokens).flatten(0, 1), (tokens[:, 2:] % 3).flatten()).backward()
    full, diagonal = (captures[m].estimates() for m in ("factors", "diagonals"))
    assert full.keys() == diagonal.keys() == {"embedding", "conv", "head"}
    for name, e in full.items():
        d = diagonal[name]
        for side in ("activation", "gradient"):
            factor = getattr(e, f"{side}_factor")
            expected = factor if factor.dim() == 1 else factor.diagonal()
            got = getattr(d, f"{side}_factor")
            assert got.shape == expected.shape, (name, side)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
            rows, same = getattr(e, f"{side}_rows"), getattr(d, f"{side}_rows")
            assert (rows is None and same is None) or torch.equal(rows, same), (name, side)
    layer = captures["diagonals"].layers[1]
    assert layer.activation_estimate_shape == (layer.activation_dim,)
    with pytest.raises(ValueError, match="statistics"):
        captures["factors"].set_statistics("traces")


def test_rkalman_steps_as_it_did_with_full_factors(float64):
    batches = [
        torch.randint(0, 7, (4, 9), generator=torch.Generator().manual_seed(s)) for s in range(5)
    ]
    params = []
    for mode in ("diagonals", "factors"):
        torch.manual_seed(0)
        model = TokensThenLinear()
        optimizer = grng.RKalman(model, rows_per_update=6)
        assert optimizer.capture.statistics == "diagonals"
        optimizer.capture.set_statistics(mode)
        for tokens in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(tokens).flatten(0, 1), (tokens[:, 2:] % 3).flatten()).backward()
            optimizer.step()
        params.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
