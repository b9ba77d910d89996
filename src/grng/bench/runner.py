"""The benchmark protocol: training one run, tuning the learning rate, the seeded finals.

Every optimizer gets exactly the same treatment (``docs/benchmark.md`` states it for
readers):

* the same step budget, batch size, batch stream per seed and model initialisation per
  seed; the same learning-rate schedule, linear warm-up then cosine decay to zero, applied
  as a multiplier of each optimizer's own ``lr`` through ``LambdaLR``;
* the same tuning budget: ``lr_grid`` runs (seed 0) at learning rates half a decade
  apart around the optimizer's default (:func:`lr_grid`), scored by the task's
  metric on the *validation* split at the end of training (never the test split);
* then ``seeds`` runs (seeds 1..S, none of them the tuning seed) at the chosen rate, which
  are the ones reported;
* then, per task, one interleaved timing (:func:`time_task`): every optimizer at its chosen
  rate, AdamW always among them, steps once per round on its own copy of the task's model,
  in an order shuffled every round, so that a busy machine slows all of them alike. The
  summary's step-time ratio comes from it; each run's own wall-clock times stay in its
  record.

Every finished run is one JSON object appended (and flushed, fsync'ed) to ``runs.jsonl``
as soon as it ends, so an interrupted suite keeps what it finished and ``--resume``
skips it (key: task, optimizer, lr, seed, phase). The timings go to ``timing.jsonl`` beside
it, one JSON object per optimizer and task, those of one measurement sharing a
``timing_group``. A run is the unit of work; mid-run
checkpoints could be added later by saving ``model``/``optimizer``/``scheduler`` state,
the batch generator's state and the :class:`_Curves` accumulators every N steps inside
:func:`train_run`'s loop, keyed like the run.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

import grng
from grng.bench.optimizers import OPTIMIZERS, OptimizerSpec, math_attention
from grng.bench.tasks import Task, TaskData
from grng.distributed import DistributedInfo

__all__ = [
    "Phase",
    "Protocol",
    "RunKey",
    "RunLog",
    "RunSpec",
    "choose_lr",
    "git_commit",
    "hessian_top_eigenvalue",
    "lr_grid",
    "round_robin",
    "state_bytes",
    "time_task",
    "train_run",
    "warmup_cosine",
]

Phase = Literal["tune", "final"]
#: The ``phase`` of an interleaved timing record (``timing.jsonl``).
TIMING_PHASE = "timing"

#: The tuning runs use this seed; the reported runs use seeds 1..S so that no reported
#: number comes from a run that also picked the learning rate.
TUNE_SEED = 0
#: Seed of the fixed training batch the Hessian eigenvalue is measured on (same for all).
HESSIAN_BATCH_SEED = 12345
#: Seed of the interleaved timing's models, batches and round order (the first reported seed).
TIMING_SEED = 1
#: Interleaved timing rounds per task when ``Protocol.timing_rounds`` is None: a multiple of
#: the GRNG optimizers' refresh periods (statistics every 10 steps, inverses every 50) and of
#: SophiaG's Hessian period (10), so the mean holds each periodic step in proportion.
TIMING_ROUNDS, QUICK_TIMING_ROUNDS = 100, 10


@dataclass(frozen=True)
class Protocol:
    """The knobs shared by every run of one suite (stored in ``config.json``)."""

    steps: int = 1000
    batch_size: int | None = None  # None: each task's default_batch_size
    tune_steps: int | None = None  # None: same as steps
    lr_grid: int = 7
    seeds: int = 3
    warmup_fraction: float = 0.05
    eval_every: int = 50
    hessian_iters: int = 20
    hessian_batch: int = 512
    #: Save a resumable checkpoint of the run in progress every this many steps (0: never).
    checkpoint_every: int = 200
    quick: bool = False
    samples: int | None = None
    #: Timed rounds of the interleaved timing after each task (:func:`time_task`): None for
    #: the default (:data:`TIMING_ROUNDS`, quick :data:`QUICK_TIMING_ROUNDS`), 0 for none (the
    #: summary then divides the runs' own median step times).
    timing_rounds: int | None = None
    #: Untimed rounds before them (first-step allocations, the first curvature refresh).
    timing_warmup: int = 3

    @property
    def rounds_for_timing(self) -> int:
        """The timed rounds of the interleaved timing (``timing_rounds`` resolved)."""
        if self.timing_rounds is not None:
            return self.timing_rounds
        return QUICK_TIMING_ROUNDS if self.quick else TIMING_ROUNDS

    def batch_for(self, task: Task) -> int:
        return self.batch_size if self.batch_size is not None else task.default_batch_size

    def steps_for(self, phase: Phase) -> int:
        if phase == "tune" and self.tune_steps is not None:
            return self.tune_steps
        return self.steps


def lr_grid(default: float, k: int) -> list[float]:
    """``k`` learning rates half a decade apart, centred on ``default``:
    ``default × 10^((i − (k−1)/2)/2)`` (``k = 1``: the default alone; ``k = 5``:
    default × {1/10, 1/√10, 1, √10, 10}; ``k = 7``, the default, spans 10^±1.5).

    A fixed spacing (rather than a fixed range) means a larger ``k`` widens the search
    instead of refining it: the first full suite picked 13 of 18 rates at the edge of
    a ×1/10..×10 grid."""
    if k < 1:
        raise ValueError(f"lr grid size must be >= 1, got {k}")
    return [default * 10 ** ((i - (k - 1) / 2) / 2) for i in range(k)]


def warmup_cosine(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier for step ``s`` (0-based): linear warm-up over the first
    ``warmup_fraction`` of the steps (from 1/warmup to 1), then cosine decay to 0."""
    warmup = max(1, round(steps * warmup_fraction)) if warmup_fraction > 0 else 0

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        span = max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - warmup) / span)))

    return factor


@dataclass(frozen=True)
class RunSpec:
    """One training run of the suite."""

    task: str
    optimizer: str
    lr: float
    seed: int
    phase: Phase

    @property
    def key(self) -> RunKey:
        return run_key(self.task, self.optimizer, self.lr, self.seed, self.phase)


RunKey = tuple[str, str, str, int, str]


def run_key(task: str, optimizer: str, lr: float, seed: int, phase: str) -> RunKey:
    """Identity of a run in ``runs.jsonl``; the rate is rounded so that recomputing a grid
    point gives the same key."""
    return (task, optimizer, f"{lr:.6g}", int(seed), phase)


def git_commit() -> str:
    """``git describe --always --dirty`` of the checkout ``grng`` is imported from, or
    ``"unknown"`` (git missing, not a checkout): provenance never stops a benchmark."""
    source = Path(grng.__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(source), *args],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip

    try:
        # The checkout must track grng itself: a wheel installed into a virtualenv that
        # sits inside some other repository must not report that repository's commit.
        git("ls-files", "--error-unmatch", "__init__.py")
        return git("describe", "--always", "--dirty") or "unknown"
    except (OSError, subprocess.SubprocessError):  # no git, not a repository, timeout
        return "unknown"


# --------------------------------------------------------------------------- measurements


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


def state_bytes(model: nn.Module, optimizer: Optimizer) -> dict[str, int]:
    """Persistent training memory in bytes: parameters, their gradients (counted as one
    parameter-sized buffer whether or not currently allocated), and every tensor held in
    ``optimizer.state`` (moments, curvature factors, inverses, eigenbases), each storage
    counted once. Activations are excluded: they are the same for every optimizer."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: set[int] = {p.data_ptr() for p in model.parameters()}
    opt = 0
    for t in _tensors(dict(optimizer.state)):
        if t.numel() == 0 or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        opt += t.numel() * t.element_size()
    return {"param_bytes": params, "grad_bytes": params, "optimizer_state_bytes": opt}


def hessian_top_eigenvalue(
    model: nn.Module, task: Task, x: Tensor, y: Tensor, iters: int = 20, seed: int = 0
) -> float:
    """Largest-magnitude eigenvalue of the training-loss Hessian on one fixed batch, by
    power iteration with Hessian-vector products (double backprop); returns the Rayleigh
    quotient ``vᵀHv`` of the last iterate."""
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    with math_attention():
        loss = task.loss(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        eig = float("nan")
        for _ in range(iters):
            norm = torch.sqrt(sum((u * u).sum() for u in v))  # type: ignore[arg-type]
            v = [u / norm for u in v]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            eig = float(sum((a * b).sum() for a, b in zip(v, hv, strict=True)))
            v = [h.detach() for h in hv]
    return eig


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Curves:
    """Per-run traces: window means of the training loss and gradient norm every
    ``log_every`` steps, and evaluations every ``eval_every`` steps."""

    log_step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)  # training time only
    val_score: list[float] = field(default_factory=list)
    test_score: list[float] = field(default_factory=list)


def _grad_norm(params: Iterable[Tensor]) -> Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None


def train_run(
    run: RunSpec,
    task: Task,
    spec: OptimizerSpec,
    data: TaskData,
    protocol: Protocol,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    distributed: DistributedInfo | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Train one run and return its record (the JSON line).

    With ``checkpoint`` (a file path), the run saves everything it needs to continue
    (model, optimizer, scheduler and RNG states, curves, timers, the step) there every
    ``protocol.checkpoint_every`` steps, continues from it when it exists (replaying the
    batch stream to the same position, so the continuation is exact), and deletes it
    once the run has finished.

    With ``distributed`` (more than one rank), the model is wrapped in
    DistributedDataParallel for the training steps, every rank draws the same global
    batch and trains on its slice of it, and evaluations use the (identical) model on
    every rank.

    Timing covers the training steps only (``train_step``), not evaluations. Evaluations
    run every ``eval_every`` steps and at the end: the validation split always, the test
    split only in the ``final`` phase (tuning never looks at test). A non-finite training
    loss stops the run with status ``"diverged"``.
    """
    steps = protocol.steps_for(run.phase)
    batch_size = protocol.batch_for(task)
    torch.manual_seed(run.seed)  # any stochasticity inside optimizers (Sophia's sampling)
    model = task.build_model(run.seed, data=data, quick=protocol.quick).to(device)
    parallel = distributed is not None and distributed.world_size > 1
    forward: nn.Module = model
    if parallel:
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = spec.factory(forward, run.lr)
    scheduler = LambdaLR(optimizer, warmup_cosine(steps, protocol.warmup_fraction))
    params = [p for p in model.parameters() if p.requires_grad]

    # The gradient norm at θ, read just before the update: a pre-hook sees it for every
    # strategy (SAM's first pass, Sophia's step before its Hessian pass, RENG's graph).
    norm_sum: list[Tensor] = []

    def record_norm(_opt: Optimizer, _args: Any, _kwargs: Any) -> None:
        norm_sum.append(_grad_norm(params))

    hook = optimizer.register_step_pre_hook(record_norm)

    generator = torch.Generator().manual_seed(run.seed)
    batches = task.batches(data, batch_size, generator)
    log_every = max(1, steps // 100)
    curves = _Curves()
    step_times: list[float] = []
    status, error = "ok", None
    loss_window: list[Tensor] = []
    final = run.phase == "final"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_seconds = 0.0
    wall_start = time.perf_counter()

    def evaluate(step: int) -> None:
        curves.eval_step.append(step)
        curves.eval_seconds.append(train_seconds)
        curves.val_score.append(task.score(task.evaluate(model, data, "val")))
        if final:
            curves.test_score.append(task.score(task.evaluate(model, data, "test")))

    done = 0
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        curves = _Curves(**saved["curves"])
        step_times = saved["step_times"]
        train_seconds = saved["train_seconds"]
        norm_sum.extend(torch.tensor(v) for v in saved["grad_norms"])
        done = saved["step"]
        for _ in range(done):  # the same batch stream, from the same position
            next(batches)
        if progress is not None:
            progress(done)
    for step in range(done, steps):
        x, y = next(batches)
        x, y = x.to(device), y.to(device)  # the data stay on the CPU (TaskData)
        if parallel:
            assert distributed is not None
            rows = distributed.local_batch(len(x))
            x, y = x[rows], y[rows]
        _sync(device)
        t0 = time.perf_counter()
        loss = spec.train_step(forward, optimizer, task, x, y)
        scheduler.step()
        _sync(device)
        dt = time.perf_counter() - t0
        step_times.append(dt)
        train_seconds += dt
        loss_window.append(loss)
        done = step + 1
        if done % log_every == 0 or done == steps:
            window = torch.stack(loss_window).float()
            norms = torch.stack(norm_sum[-len(loss_window) :]) if norm_sum else window * 0
            loss_window.clear()
            curves.log_step.append(done)
            curves.train_loss.append(float(window.mean()))
            curves.grad_norm.append(float(norms.float().mean()))
            if not math.isfinite(curves.train_loss[-1]):
                status = "diverged"
                break
        if done % protocol.eval_every == 0 or done == steps:
            evaluate(done)
        if (
            checkpoint is not None
            and protocol.checkpoint_every > 0
            and done % protocol.checkpoint_every == 0
            and not loss_window  # the window is flushed: the state is complete
            and done < steps
        ):
            _save_checkpoint(checkpoint, model, optimizer, scheduler, curves, step_times,
                             train_seconds, norm_sum, done)  # fmt: skip
        if progress is not None:
            progress(1)
    hook.remove()
    if progress is not None and done < steps:
        progress(steps - done)

    record: dict[str, Any] = {
        **asdict(run),
        "status": status,
        "error": error,
        "steps": steps,
        "steps_done": done,
        "batch_size": batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "ranks": distributed.world_size if distributed is not None else 1,
        "backend": distributed.backend if distributed is not None else None,
        "train_seconds": train_seconds,
        "wall_seconds": None,
        "median_step_seconds": statistics.median(step_times) if step_times else None,
        "curves": asdict(curves),
    }
    # Scores: the last evaluation; a diverged run has none (worst in every comparison).
    if status == "ok":
        record["val_score"] = _finite_or_none(curves.val_score[-1])
        record["test_score"] = _finite_or_none(curves.test_score[-1]) if final else None
    else:
        record["val_score"] = record["test_score"] = None
    record["final_train_loss"] = (
        _finite_or_none(curves.train_loss[-1]) if curves.train_loss else None
    )
    all_norms = torch.stack(norm_sum).float() if norm_sum else torch.zeros(0)
    record["mean_grad_norm"] = _finite_or_none(float(all_norms.mean())) if norm_sum else None
    reached = [
        (s, sec)
        for s, sec, v in zip(curves.eval_step, curves.eval_seconds, curves.test_score, strict=False)
        if task.reached(v)
    ]
    record["steps_to_target"] = reached[0][0] if reached else None
    record["seconds_to_target"] = reached[0][1] if reached else None
    record.update(state_bytes(model, optimizer))
    record["peak_device_bytes"] = (
        torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    )
    record["hessian_top"] = None
    if final and status == "ok" and protocol.hessian_iters > 0:
        hgen = torch.Generator().manual_seed(HESSIAN_BATCH_SEED)
        hx, hy = (t.to(device) for t in next(task.batches(data, protocol.hessian_batch, hgen)))
        try:
            record["hessian_top"] = _finite_or_none(
                hessian_top_eigenvalue(model, task, hx, hy, protocol.hessian_iters)
            )
        except RuntimeError as exc:  # e.g. a layer without double backward
            print(f"warning: Hessian eigenvalue failed for {run}: {exc}", file=sys.stderr)
    record["wall_seconds"] = time.perf_counter() - wall_start
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    return record


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: Optimizer,
    scheduler: LambdaLR,
    curves: _Curves,
    step_times: list[float],
    train_seconds: float,
    grad_norms: list[Tensor],
    step: int,
) -> None:
    """Write atomically (temporary file, then rename): a kill mid-write leaves the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "curves": asdict(curves),
        "step_times": step_times,
        "train_seconds": train_seconds,
        "grad_norms": [float(v) for v in grad_norms],
        "step": step,
    }
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def checkpoint_path(folder: Path, run: RunSpec) -> Path:
    """Where ``run``'s in-progress checkpoint lives inside the results folder."""
    task, optimizer, lr, seed, phase = run.key
    return folder / "checkpoints" / f"{task}_{optimizer}_lr{lr}_s{seed}_{phase}.pt"


# --------------------------------------------------------------------------- interleaved timing


def round_robin(
    steps: Mapping[str, Callable[[int], object]],
    rounds: int,
    warmup: int,
    device: torch.device,
    seed: int = 0,
    on_round: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Time ``steps`` interleaved: ``warmup`` untimed rounds, then ``rounds`` timed ones.

    Every round calls each step once with the round's index (warm-up rounds count from 0),
    in an order drawn afresh every round from ``random.Random(seed)`` (warm-up rounds: the
    given order). A call is timed alone: wall-clock ``time.perf_counter`` around it, with
    the CUDA device synchronised before and after. Python's garbage collector runs
    between rounds and is paused within them, so that a collection falls on no one
    optimizer's step. Returns the seconds of each timed call per name, and, for a step
    that raised, ``"ExceptionType: message"`` instead (its name leaves the rounds and its
    times).
    """
    live = dict(steps)
    times: dict[str, list[float]] = {name: [] for name in steps}
    errors: dict[str, str] = {}
    order = random.Random(seed)
    was_enabled = gc.isenabled()
    try:
        for index in range(warmup + rounds):
            names = list(live)
            if index >= warmup:
                order.shuffle(names)
            gc.collect()
            gc.disable()
            for name in names:
                try:
                    _sync(device)
                    start = time.perf_counter()
                    live[name](index)
                    _sync(device)
                    elapsed = time.perf_counter() - start
                except Exception as exc:  # reported to the caller, the others go on
                    errors[name] = f"{type(exc).__name__}: {exc}"
                    del live[name]
                    times.pop(name)
                    continue
                if index >= warmup:
                    times[name].append(elapsed)
            if was_enabled:
                gc.enable()
            if on_round is not None:
                on_round()
    finally:
        if was_enabled:
            gc.enable()
    return times, errors


def time_task(
    task: Task,
    data: TaskData,
    entries: Sequence[tuple[OptimizerSpec, float]],
    protocol: Protocol,
    device: torch.device,
    distributed: DistributedInfo | None = None,
    on_round: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """The interleaved timing of one task: a record per ``(spec, lr)`` of ``entries``.

    Every optimizer gets its own model (``task.build_model(TIMING_SEED)``, the same
    initial weights for all) and steps with its ``train_step`` at its rate ``lr``; all of
    them step on the same batch in a round (a pool of 8 batches drawn from the task's
    stream with seed :data:`TIMING_SEED`, in turn). :func:`round_robin` runs
    ``protocol.timing_warmup`` untimed and ``protocol.rounds_for_timing`` timed rounds.
    A step is ``train_step`` alone (no scheduler, no evaluation). Under ``distributed``
    every rank times the same rounds on its slice of each batch (DDP-wrapped models).

    A record holds the step times (``step_seconds``), their median and mean, and the
    measurement's ``timing_group`` (shared by the records of one call); an optimizer that
    fails has ``status == "error"`` and its message.
    """
    rounds, warmup = protocol.rounds_for_timing, protocol.timing_warmup
    batch_size = protocol.batch_for(task)
    parallel = distributed is not None and distributed.world_size > 1
    stream = task.batches(data, batch_size, torch.Generator().manual_seed(TIMING_SEED))
    pool = []
    for _ in range(min(8, warmup + rounds)):
        x, y = next(stream)
        if parallel:
            assert distributed is not None
            rows = distributed.local_batch(len(x))
            x, y = x[rows], y[rows]
        pool.append((x.to(device), y.to(device)))
    group = f"{task.name}@{time.time_ns()}"
    base: dict[str, Any] = {
        "task": task.name, "seed": TIMING_SEED, "phase": TIMING_PHASE, "timing_group": group,
        "rounds": rounds, "warmup_rounds": warmup, "batch_size": batch_size,
        "device": str(device), "threads": torch.get_num_threads(),
        "ranks": distributed.world_size if distributed is not None else 1,
    }  # fmt: skip
    steps: dict[str, Callable[[int], object]] = {}
    errors: dict[str, str] = {}
    lrs = {spec.name: lr for spec, lr in entries}
    for spec, lr in entries:
        try:
            torch.manual_seed(TIMING_SEED)
            model = task.build_model(TIMING_SEED, data=data, quick=protocol.quick).to(device)
            forward: nn.Module = model
            if parallel:
                forward = DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            optimizer = spec.factory(forward, lr)
        except Exception as exc:
            errors[spec.name] = f"{type(exc).__name__}: {exc}"
            continue

        def step(i: int, spec: OptimizerSpec = spec, forward: nn.Module = forward,
                 optimizer: Optimizer = optimizer) -> None:  # fmt: skip
            x, y = pool[i % len(pool)]
            spec.train_step(forward, optimizer, task, x, y)

        steps[spec.name] = step
    times, failed = round_robin(steps, rounds, warmup, device, TIMING_SEED, on_round)
    errors.update(failed)
    records = []
    for spec, _ in entries:
        name = spec.name
        record = {**base, "optimizer": name, "lr": lrs[name]}
        if name in errors:
            print(f"error: interleaved timing of {name} on {task.name}: {errors[name]}",
                  file=sys.stderr)  # fmt: skip
            record.update(status="error", error=errors[name], step_seconds=[],
                          median_step_seconds=None, mean_step_seconds=None)  # fmt: skip
        else:
            t = times[name]
            record.update(status="ok", error=None, step_seconds=t,
                          median_step_seconds=statistics.median(t) if t else None,
                          mean_step_seconds=statistics.fmean(t) if t else None)  # fmt: skip
        records.append(record)
    return records


def latest_timing(records: Iterable[dict[str, Any]], task: str) -> dict[str, dict[str, Any]]:
    """The newest interleaved timing of ``task`` in ``records``: optimizer -> its record
    (the records of the last ``timing_group`` written for the task); empty if none."""
    timings = [r for r in records if r.get("phase") == TIMING_PHASE and r.get("task") == task]
    if not timings:
        return {}
    group = timings[-1].get("timing_group")
    return {r["optimizer"]: r for r in timings if r.get("timing_group") == group}


def choose_lr(records: Iterable[dict[str, Any]], task: Task) -> float | None:
    """The tuning run's rate with the best validation score (ties: the smaller rate);
    ``None`` when every tuning run diverged."""
    scored = [r for r in records if r.get("val_score") is not None]
    if not scored:
        return None
    sign = 1.0 if task.higher_is_better else -1.0
    best = max(scored, key=lambda r: (sign * r["val_score"], -r["lr"]))
    return float(best["lr"])


def _json_safe(obj: Any) -> Any:
    """Non-finite floats (a diverged run's curves) become ``null``: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


class RunLog:
    """``runs.jsonl``: one JSON object per finished run, appended and flushed at once.

    ``stamp`` (e.g. the commit and ``grng.__version__``) is added to every record this log
    appends: a resumed suite can mix runs of several versions, so each line says its own."""

    def __init__(self, path: Path, write: bool = True, stamp: dict[str, Any] | None = None) -> None:
        self.path = path
        self.stamp = dict(stamp or {})
        #: Only one process writes (rank 0 under --distributed); the others keep the same
        #: records in memory so that every rank tunes and resumes identically.
        self.write = write
        self.records: list[dict[str, Any]] = []
        if path.exists():
            with path.open(encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        # A line cut short by a kill mid-write: that run is simply redone.
                        continue

    def finished(self) -> set[RunKey]:
        return {
            run_key(r["task"], r["optimizer"], r["lr"], r["seed"], r["phase"]) for r in self.records
        }

    def append(self, record: dict[str, Any]) -> None:
        record = _json_safe({**record, **self.stamp})
        self.records.append(record)
        if not self.write:
            return
        line = json.dumps(record, allow_nan=False) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def of(self, task: str, optimizer: str, phase: Phase) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["task"] == task and r["optimizer"] == optimizer and r["phase"] == phase
        ]


def _error_record(run: RunSpec, exc: BaseException) -> dict[str, Any]:
    return {
        **asdict(run),
        "status": "error",
        "error": f"{type(exc).__name__}: {exc}",
        "val_score": None,
        "test_score": None,
    }


def run_suite(
    tasks: dict[str, tuple[Task, TaskData]],
    optimizers: list[OptimizerSpec],
    protocol: Protocol,
    log: RunLog,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    distributed: DistributedInfo | None = None,
) -> list[dict[str, Any]]:
    """Tune, then run the seeded finals, for every task and optimizer; skip runs already in
    ``log``. After each task's runs, the interleaved timing of its optimizers
    (:func:`time_task`, AdamW added as the reference) is appended to ``timing.jsonl``
    beside ``log`` (kept in memory only when ``log`` does not write), unless the newest
    one there covers them already. Returns every record of this suite, old and new: the
    runs, then the timing records (``phase == "timing"``). A run that raises is
    recorded with status ``"error"`` (and reported on stderr) so that one broken optimizer
    does not stop the suite; ``KeyboardInterrupt`` stops it, keeping the finished rows."""
    done = log.finished()
    timing_log = RunLog(log.path.parent / "timing.jsonl", write=log.write, stamp=log.stamp)

    def execute(run: RunSpec, task: Task, spec: OptimizerSpec, data: TaskData) -> None:
        if run.key in done:
            if progress is not None:
                progress(protocol.steps_for(run.phase))
            return
        try:
            # Checkpoints are a single-process feature: under --distributed every rank
            # would have to resume alike.
            single = distributed is None or distributed.world_size == 1
            ckpt = checkpoint_path(log.path.parent, run) if log.write and single else None
            record = train_run(run, task, spec, data, protocol, device, progress, distributed, ckpt)
        except Exception as exc:  # recorded, reported, and the suite goes on
            print(f"error: {run.optimizer} on {run.task} (lr {run.lr:.3g}, seed "
                  f"{run.seed}): {type(exc).__name__}: {exc}", file=sys.stderr)  # fmt: skip
            record = _error_record(run, exc)
        log.append(record)
        done.add(run.key)
        if on_record is not None:
            on_record(record)

    for task_name, (task, data) in tasks.items():
        for spec in optimizers:
            for lr in lr_grid(task.lr_centre(spec.name, spec.default_lr), protocol.lr_grid):
                execute(RunSpec(task_name, spec.name, lr, TUNE_SEED, "tune"), task, spec, data)
            best = choose_lr(log.of(task_name, spec.name, "tune"), task)
            for seed in range(1, protocol.seeds + 1):
                if best is None:  # every rate diverged: nothing to report, skip the finals
                    if progress is not None:
                        progress(protocol.steps_for("final"))
                    continue
                execute(RunSpec(task_name, spec.name, best, seed, "final"), task, spec, data)
        if protocol.rounds_for_timing > 0:
            timed = [o.name for o in optimizers]
            # AdamW is the reference of the ratios: timed whether or not it is compared.
            reference = [] if "adamw" in timed else [OPTIMIZERS["adamw"]]
            last = latest_timing(timing_log.records, task_name)
            if set(last) >= {*timed, "adamw"}:  # done before this --resume
                if progress is not None:
                    progress(len(optimizers) * (protocol.rounds_for_timing
                                                + protocol.timing_warmup))  # fmt: skip
                continue
            entries = [
                (
                    spec,
                    choose_lr(log.of(task_name, spec.name, "tune"), task)
                    or task.lr_centre(spec.name, spec.default_lr),
                )
                for spec in [*reference, *optimizers]
            ]
            per_round = (lambda: progress(len(optimizers))) if progress is not None else None
            for record in time_task(task, data, entries, protocol, device, distributed,
                                    per_round):  # fmt: skip
                timing_log.append(record)
    keys = {(t, o.name) for t in tasks for o in optimizers}
    runs = [r for r in log.records if (r["task"], r["optimizer"]) in keys]
    timings = [r for r in timing_log.records if r["task"] in tasks]
    return runs + timings


def total_steps(n_tasks: int, n_optimizers: int, protocol: Protocol) -> int:
    """Training steps of a whole suite, for the progress bar's ETA (the interleaved timing's
    rounds included, one step per compared optimizer and round)."""
    per_opt = protocol.lr_grid * protocol.steps_for("tune") + protocol.seeds * protocol.steps
    timing = protocol.rounds_for_timing + protocol.timing_warmup
    return n_tasks * n_optimizers * (per_opt + (timing if protocol.rounds_for_timing else 0))
