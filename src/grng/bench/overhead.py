"""``grng bench overhead``: what each optimizer costs per step, relative to AdamW.

For every model (the mnist1d MLP at several hidden widths, the Conv1d net, the small char
transformer) and every optimizer: a fresh model (seed 0), 3 untimed warm-up steps, then
``steps`` timed steps on random inputs of the task's shape (the data's content does not
change the cost). Reported: the median and the mean step time (the mean includes the
periodic curvature refreshes, the median is a typical step) and the persistent memory
(parameters + gradients + optimizer state, :func:`grng.bench.runner.state_bytes`; plus
the CUDA allocator's peak on a GPU), each also as a ratio to AdamW's.
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import grng
from grng.bench.models import MLP, CharTransformer, Conv1dNet
from grng.bench.optimizers import OptimizerSpec
from grng.bench.runner import git_commit, state_bytes
from grng.bench.tasks import get_task

__all__ = ["model_configs", "run"]

WARMUP_STEPS = 3


def model_configs(
    widths: Sequence[int], quick: bool
) -> list[tuple[str, int | None, nn.Module, Tensor, Tensor, str]]:
    """``(label, mlp width or None, model, x, y, task name)`` for every measured model."""
    g = torch.Generator().manual_seed(0)
    batch = 16 if quick else 128
    x1d = torch.randn(batch, 40, generator=g)
    y1d = torch.randint(0, 10, (batch,), generator=g)
    out: list[tuple[str, int | None, nn.Module, Tensor, Tensor, str]] = []
    for w in widths:
        torch.manual_seed(0)
        out.append((f"mlp-{w}", w, MLP(hidden=w), x1d, y1d, "mnist1d-mlp"))
    torch.manual_seed(0)
    out.append(("conv1d", None, Conv1dNet(channels=8 if quick else 32), x1d, y1d, "mnist1d-cnn"))
    vocab, block = 65, 64
    size = (
        {"d_model": 32, "n_layers": 1, "n_heads": 2}
        if quick
        else {"d_model": 128, "n_layers": 4, "n_heads": 4}
    )
    tb = 4 if quick else 64
    xt = torch.randint(0, vocab, (tb, block), generator=g)
    yt = torch.randint(0, vocab, (tb, block), generator=g)
    torch.manual_seed(0)
    out.append(
        ("transformer", None, CharTransformer(vocab, block_size=block, **size), xt, yt,
         "shakespeare-char")
    )  # fmt: skip
    return out


def _measure(
    spec: OptimizerSpec, model: nn.Module, x: Tensor, y: Tensor, task_name: str, steps: int,
    device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    import copy

    task = get_task(task_name)
    model = copy.deepcopy(model).to(device)
    x, y = x.to(device), y.to(device)
    optimizer = spec.factory(model, spec.default_lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(WARMUP_STEPS + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        spec.train_step(model, optimizer, task, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_STEPS:
            times.append(time.perf_counter() - t0)
    mem = state_bytes(model, optimizer)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "mean_ms": statistics.fmean(times) * 1e3,
        "memory_mb": sum(mem.values()) / 2**20,
        "peak_device_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        ),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | optimizer | median ms | ×AdamW | mean ms | ×AdamW | memory MiB | ×AdamW |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:

        def rel(k: str, r: dict[str, Any] = r) -> str:
            return f"{r[k]:.2f}" if r.get(k) is not None else "—"

        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['median_ms']:.2f} | {rel('median_rel')} "
            f"| {r['mean_ms']:.2f} | {rel('mean_rel')} | {r['memory_mb']:.2f} "
            f"| {rel('memory_rel')} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], optimizers: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    for i, opt in enumerate(optimizers):
        pts = sorted(
            ((r["width"], r) for r in rows if r["optimizer"] == opt and r["width"]),
            key=lambda p: p[0],
        )
        if not pts or pts[0][1].get("mean_rel") is None:
            continue
        ws = [w for w, _ in pts]
        c = plt.get_cmap("tab10")(i % 10)
        axes[0].plot(ws, [r["mean_rel"] for _, r in pts], "o-", color=c, label=opt)
        axes[1].plot(ws, [r["memory_rel"] for _, r in pts], "o-", color=c, label=opt)
    axes[0].set(xlabel="MLP hidden width", ylabel="mean step time ×AdamW", xscale="log",
                yscale="log")  # fmt: skip
    axes[1].set(xlabel="MLP hidden width", ylabel="memory ×AdamW", xscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Cost relative to AdamW, mnist1d MLP (depth 2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(
    optimizers: Sequence[OptimizerSpec],
    widths: Sequence[int],
    steps: int,
    quick: bool,
    device: torch.device,
    out: Path,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Measure every (model, optimizer); print the table and write ``overhead.md``,
    ``overhead.csv`` and ``overhead.png`` under ``out``. AdamW is always measured (it is
    the reference) even if not asked for."""
    from grng.bench.optimizers import get_optimizer

    commit = git_commit()  # before measuring: the checkout may change while we do
    specs = list(optimizers)
    if "adamw" not in [s.name for s in specs]:
        specs.insert(0, get_optimizer("adamw"))
    from tqdm import tqdm

    # --quick: two tiny widths, whatever --widths says (a smoke test of the whole path).
    configs = model_configs([8, 16] if quick else widths, quick)
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(configs) * len(specs), desc="overhead", file=sys.stderr,
              disable=not progress) as bar:  # fmt: skip
        for label, width, model, x, y, task_name in configs:
            group = []
            for spec in specs:
                bar.set_postfix_str(f"{label} {spec.name}", refresh=False)
                m = _measure(spec, model, x, y, task_name, steps, device)
                group.append({"model": label, "width": width, "optimizer": spec.name, **m})
                bar.update(1)
            base = next(r for r in group if r["optimizer"] == "adamw")
            for r in group:
                r["median_rel"] = r["median_ms"] / base["median_ms"]
                r["mean_rel"] = r["mean_ms"] / base["mean_ms"]
                r["memory_rel"] = r["memory_mb"] / base["memory_mb"]
            rows += group
    header = (
        f"# grng bench overhead — grng {grng.__version__}, commit {commit}\n\n"
        f"{steps} timed steps after {WARMUP_STEPS} warm-up, device "
        f"{device}, {torch.get_num_threads()} thread(s); memory = parameters + gradients + "
        "optimizer state.\n"
    )
    text = header + "\n" + _table(rows) + "\n"
    (out / "overhead.md").write_text(text, encoding="utf-8")
    fields = ["model", "width", "optimizer", "median_ms", "median_rel", "mean_ms", "mean_rel",
              "memory_mb", "memory_rel", "peak_device_mb"]  # fmt: skip
    with (out / "overhead.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in fields})
    _plot(rows, [s.name for s in specs], out / "overhead.png")
    print(text)
    print(f"results in {out}/")
    return rows
