"""Smoke test of the case library: every optimizer variant trains every model a few steps."""

from __future__ import annotations

import math

import pytest

from tests.cases import ALL, MODELS, VARIANTS, train_step

STEPS = 5


# Expected here: the LSTM's weights are on the diagonal fallback, and BERT's and GPT-2's
# output layers are tied to their (Embedding) input tables.
@pytest.mark.filterwarnings("ignore::grng.CoverageWarning")
@pytest.mark.filterwarnings(r"ignore:weights tied across module types.*\(Embedding\)")
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("variant", ALL)
def test_every_variant_trains_every_model(variant: str, model_name: str) -> None:
    case = MODELS[model_name]
    model = case.build(0)
    optimizer = VARIANTS[variant].build(model, factor_update_freq=1)
    assert optimizer.layers, "no Kronecker layer found"
    if VARIANTS[variant].create_graph and not case.double_backward:
        with pytest.raises(RuntimeError, match=r"double backward.*finite_difference"):
            train_step(variant, model, optimizer, *case.batch(0), loss_fn=case.loss)
        return
    losses = []
    for i in range(STEPS):
        x, y = case.batch(i)
        loss = train_step(variant, model, optimizer, x, y, loss_fn=case.loss)
        assert loss is not None
        losses.append(float(loss))
    assert all(math.isfinite(loss) for loss in losses), losses
    assert optimizer.nonfinite_steps == 0
    assert all(p.isfinite().all() for p in model.parameters())
