"""How many torch ops one ordinary step runs, and how much of its time is matrix products.

    .venv/bin/python benchmarks/step_ops.py [--model mlp256-b128] [--optimizers sgd,adamw,kfac,asdl-kfac]

Explains where a K-FAC step sits above the preconditioning floor of ``grng bench
overhead`` on a model whose step is short (the mnist1d MLP: about a millisecond). Each
optimizer of ``grng.bench.overhead.CONTENDERS`` is built on the model at its defaults,
takes steps 0–10 untimed (the capture at steps 0 and 10, the first inverses), and then
steps 11–19, ordinary steps with no capture or refresh, run under ``torch.profiler``. Per
step: the ``aten::`` ops called (nested ones included, as the profiler counts them), their
self CPU time, and the part of it in ``mm``/``addmm``/``bmm``; the profiler's overhead
inflates absolute times, so compare the rows with each other. One thread.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from grng.bench import overhead as O

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
WARMUP_STEPS, PROFILED_STEPS = 11, 9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mlp256-b128")
    parser.add_argument("--optimizers", default="sgd,adamw,kfac,ring,asdl-kfac")
    args = parser.parse_args()
    torch.set_num_threads(1)
    (config,) = [c for c in O.model_configs() if c.name == args.model]
    print(f"{config.label}: ordinary steps {WARMUP_STEPS}..{WARMUP_STEPS + PROFILED_STEPS - 1}"
          ", per step, under torch.profiler\n")  # fmt: skip
    print("| optimizer | aten ops | aten self ms | of which matmuls ms |")
    print("|---|---:|---:|---:|")
    for name in args.optimizers.split(","):
        contender = O.CONTENDERS[name]
        if (why := contender.missing()) is not None or contender.build is None:
            print(f"| {name} | skipped: {why} | | |")
            continue
        torch.manual_seed(0)
        model = config.build()
        batch = config.batch(torch.Generator().manual_seed(0))
        built = contender.build(model, batch)
        for _ in range(WARMUP_STEPS):
            built.step(*batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(PROFILED_STEPS):
                built.step(*batch)
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        calls = sum(e.count for e in events) / PROFILED_STEPS
        total = sum(e.self_cpu_time_total for e in events) / PROFILED_STEPS / 1e3
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
        print(f"| {contender.label} | {calls:.0f} | {total:.2f} | "
              f"{matmul / PROFILED_STEPS / 1e3:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
