"""A run interrupted mid-way continues from its checkpoint exactly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from grng.bench import optimizers as O
from grng.bench import runner as R
from grng.bench.tasks import get_task


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["ring", "sophia", "adamw"])
def test_interrupted_run_resumes_to_the_uninterrupted_record(
    tmp_path: Path, optimizer: str
) -> None:
    task = get_task("mnist1d-mlp")
    data = task.load(quick=True, seed=0)
    protocol = R.Protocol(steps=60, eval_every=10, checkpoint_every=20, hessian_iters=2,
                          hessian_batch=64, quick=True, batch_size=32)  # fmt: skip
    run = R.RunSpec("mnist1d-mlp", optimizer, 0.01, 1, "final")
    spec = O.get_optimizer(optimizer)
    device = torch.device("cpu")
    reference = R.train_run(run, task, spec, data, protocol, device)

    checkpoint = R.checkpoint_path(tmp_path, run)
    steps_taken = 0
    real_step = spec.train_step

    def dies_at_step_50(*args: Any) -> Any:
        nonlocal steps_taken
        if steps_taken == 50:
            raise _Interrupt
        steps_taken += 1
        return real_step(*args)

    interrupted = O.OptimizerSpec(spec.name, spec.factory, spec.default_lr, dies_at_step_50)
    with pytest.raises(_Interrupt):
        R.train_run(run, task, interrupted, data, protocol, device, checkpoint=checkpoint)
    assert checkpoint.exists()
    assert torch.load(checkpoint, weights_only=False)["step"] == 40  # the last one before 50

    resumed_steps = 0

    def counting(*args: Any) -> Any:
        nonlocal resumed_steps
        resumed_steps += 1
        return real_step(*args)

    resumed_spec = O.OptimizerSpec(spec.name, spec.factory, spec.default_lr, counting)
    resumed = R.train_run(run, task, resumed_spec, data, protocol, device, checkpoint=checkpoint)
    assert resumed_steps == 20  # steps 41..60 only
    assert not checkpoint.exists()  # removed once the run finished
    for key in ("test_score", "val_score", "final_train_loss", "mean_grad_norm", "hessian_top"):
        assert resumed[key] == reference[key], key
    assert resumed["curves"]["train_loss"] == reference["curves"]["train_loss"]
    assert resumed["curves"]["test_score"] == reference["curves"]["test_score"]
