"""``grng bench``: the command line of the benchmark (parsing and validation only).

::

    grng bench [options]            # tune + seeded runs, then summary.md/.csv and plots
    grng bench overhead [options]   # step time and memory relative to AdamW, interleaved
    grng bench ablate [options]     # rho ablation of RING, RENG and R-Kalman
    python -m grng.bench [options]  # same as ``grng bench``

Bad input (unknown task or optimizer, missing data, unusable values) prints one line
``grng bench: error: ...`` on stderr and returns exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import torch

import grng
from grng.bench.optimizers import OPTIMIZERS, get_optimizer
from grng.bench.tasks import SUITES, TASKS, DataNotFoundError, Task, TaskData, get_task

__all__ = ["main"]

PROG = "grng bench"
DEFAULT_TASKS = "mnist1d-mlp,mnist1d-cnn"
DEFAULT_STEPS, DEFAULT_TUNE_STEPS = 1000, 500
# --quick: smoke-sized (seconds per task), for tests and CI.
QUICK = {"steps": 20, "tune_steps": 20, "batch_size": 32, "lr_grid": 2, "seeds": 2,
         "eval_every": 10, "hessian_iters": 3, "hessian_batch": 64}  # fmt: skip


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (no usage dump) and raise :class:`UsageError`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of names")
    return list(dict.fromkeys(names))  # drop duplicates, keep order


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where to train (default: cpu)")  # fmt: skip
    p.add_argument("--optimizers", type=_names, default=list(OPTIMIZERS), metavar="A,B,...",
                   help=f"optimizers to compare (default: all available: {','.join(OPTIMIZERS)})")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The ``grng`` parser: ``grng bench [options]`` and ``grng bench overhead [options]``."""
    root = _Parser(prog="grng", description="grng command line.")
    sub = root.add_subparsers(dest="command", required=True, parser_class=_Parser)
    bench = sub.add_parser(
        "bench",
        help="run the optimizer benchmark",
        description=(
            "Compare optimizers under one protocol: per task and optimizer, a learning-rate "
            "grid of --lr-grid values half a decade apart around each optimizer's default "
            "(7: default*10^-1.5 .. default*10^1.5) is scored on "
            "the validation split (--tune-steps each, seed 0), then --seeds runs (seeds "
            "1..S) at the chosen rate report the test metric. Same steps, batch size and "
            "warm-up + cosine schedule for all. Results: OUT/runs.jsonl (one line per "
            "finished run), OUT/summary.md, OUT/summary.csv, OUT/<task>.png. "
            "See docs/benchmark.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    bench.add_argument("--tasks", type=_names, default=_names(DEFAULT_TASKS), metavar="A,B,...",
                       help=f"tasks to run; valid: {', '.join(TASKS)}")  # fmt: skip
    _add_common(bench)
    bench.add_argument("--steps", type=_positive_int, default=None,
                       help=f"training steps of each reported run (default {DEFAULT_STEPS}; "
                            f"--quick: {QUICK['steps']})")  # fmt: skip
    bench.add_argument("--tune-steps", type=_positive_int, default=None,
                       help=f"training steps of each tuning run (default {DEFAULT_TUNE_STEPS}, "
                            "capped at --steps)")  # fmt: skip
    bench.add_argument("--batch-size", type=_positive_int, default=None,
                       help="batch size (default: each task's own, 128 for mnist1d)")  # fmt: skip
    bench.add_argument("--lr-grid", type=_positive_int, default=None, metavar="K",
                       help="learning rates tried per optimizer, half a decade apart (default 7)")  # fmt: skip
    bench.add_argument("--seeds", type=_positive_int, default=None,
                       help="seeded runs reported per optimizer (default 3)")  # fmt: skip
    bench.add_argument("--eval-every", type=_positive_int, default=None,
                       help="steps between evaluations, the resolution of steps-to-target "
                            "(default 50)")  # fmt: skip
    bench.add_argument("--hessian-iters", type=int, default=None,
                       help="power iterations for the top Hessian eigenvalue at the end of "
                            "each reported run; 0 skips it (default 20)")  # fmt: skip
    bench.add_argument("--hessian-batch", type=_positive_int, default=None,
                       help="training examples the top Hessian eigenvalue is measured on "
                            "(default 512; --quick: 64)")  # fmt: skip
    bench.add_argument("--samples", type=_positive_int, default=None,
                       help="mnist1d: examples generated (default 5000); shakespeare: "
                            "characters kept; cifar: training images kept")  # fmt: skip
    bench.add_argument("--data", default=None, metavar="PATH",
                       help="data file for shakespeare-char / cifar (default: $GRNG_DATA_DIR, "
                            "shared/data beside the repo, or the cache)")  # fmt: skip
    bench.add_argument("--download", action="store_true",
                       help="download missing data (shakespeare, cifar) into the cache")  # fmt: skip
    bench.add_argument("--out", type=Path, default=None,
                       help="results folder (default runs/bench-<timestamp>)")  # fmt: skip
    bench.add_argument("--resume", action="store_true",
                       help="continue in an existing --out folder, skipping finished runs")  # fmt: skip
    bench.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                       help="save the run in progress every N steps so that --resume "
                            "continues it exactly (0: never; default 200)")  # fmt: skip
    bench.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel runs under torchrun (gloo on CPU, nccl with "
        "--device cuda): each rank trains on its slice of every global "
        "batch; rank 0 writes the results. Launch with: torchrun "
        "--nproc_per_node=N -m grng.bench --distributed ...",
    )
    bench.add_argument("--threads", type=_positive_int, default=1,
                       help="torch intra-op threads; 1 is fastest for these small models "
                            "on a shared CPU")  # fmt: skip
    bench.add_argument("--quick", action="store_true",
                       help="smoke-sized suite (small data and models, "
                            f"{QUICK['steps']} steps, grid {QUICK['lr_grid']}, "
                            f"{QUICK['seeds']} seeds); explicit options still win")  # fmt: skip
    bench.add_argument("--suite", choices=list(SUITES), default=None,
                       help="a preset: its tasks (or those of --tasks), each run as its "
                            "own suite in OUT/<task>/ with the protocol sized for it "
                            "(explicit options win; with --quick, the quick sizes); "
                            "'language': sst2-minilm and shakespeare-char at full size, "
                            "see docs/benchmark.md")  # fmt: skip
    bsub = bench.add_subparsers(dest="bench_command", parser_class=_Parser)
    from grng.bench import overhead

    over = bsub.add_parser(
        "overhead",
        help="step time and memory of every optimizer relative to AdamW, measured interleaved",
        description=overhead.DESCRIPTION,
    )
    overhead.add_arguments(over)
    from grng.bench import ablate

    abl = bsub.add_parser(
        "ablate",
        help="rho ablation of RING, RENG and R-Kalman",
        description=ablate.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ablate.add_arguments(abl)
    rep = bsub.add_parser(
        "report",
        help="regenerate the summary of results folders from their records, without training",
        description=(
            "Rewrite summary.md, summary.csv and the plots of each FOLDER (a grng bench or "
            "grng bench ablate results folder) from its config.json and runs.jsonl (and "
            "timing.jsonl), without training: to look at a suite that is still running or "
            "was stopped (the header then says how many runs are missing), or to redraw "
            "finished results with this grng's tables and plots."
        ),
    )
    rep.add_argument("folders", type=Path, nargs="+", metavar="FOLDER")
    return root


def _timestamp() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _check_names(args: argparse.Namespace) -> None:
    """Unknown names: the registries' ValueError (which lists the valid names)."""
    try:
        for name in getattr(args, "tasks", []):
            get_task(name)
        for name in args.optimizers:
            get_optimizer(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_common(args: argparse.Namespace) -> torch.device:
    _check_names(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(args.device)


def _load_tasks(args: argparse.Namespace) -> dict[str, tuple[Task, TaskData]]:
    """Load every task's data before any training, so a missing file fails at once."""
    loaded = {}
    for name in args.tasks:
        task = get_task(name)
        try:
            data = task.load(data=args.data, download=args.download, quick=args.quick,
                             samples=args.samples, seed=0)  # fmt: skip
        except DataNotFoundError as exc:
            msg = " ".join(str(exc).split())
            raise UsageError(
                f"{name}: data not found: {msg} (pass --data PATH, or --download)"
            ) from None
        except (ValueError, ImportError) as exc:  # --samples too small; a missing extra
            raise UsageError(f"{name}: {exc}") from None
        loaded[name] = (task, data)
    return loaded


def _protocol(args: argparse.Namespace) -> Any:
    from grng.bench.runner import Protocol

    def pick(value: Any, key: str, default: Any) -> Any:
        if value is not None:
            return value
        return QUICK[key] if args.quick else default

    steps = pick(args.steps, "steps", DEFAULT_STEPS)
    tune = pick(args.tune_steps, "tune_steps", DEFAULT_TUNE_STEPS)
    defaults = Protocol()
    hess = pick(args.hessian_iters, "hessian_iters", defaults.hessian_iters)
    if hess < 0:
        raise UsageError(f"--hessian-iters must be >= 0, got {hess}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {args.checkpoint_every}")
    return Protocol(
        steps=steps,
        tune_steps=min(tune, steps),
        batch_size=pick(args.batch_size, "batch_size", None),
        lr_grid=pick(args.lr_grid, "lr_grid", defaults.lr_grid),
        seeds=pick(args.seeds, "seeds", defaults.seeds),
        eval_every=pick(args.eval_every, "eval_every", defaults.eval_every),
        hessian_iters=hess,
        hessian_batch=pick(
            getattr(args, "hessian_batch", None), "hessian_batch", defaults.hessian_batch
        ),
        checkpoint_every=(
            defaults.checkpoint_every if args.checkpoint_every is None else args.checkpoint_every
        ),
        quick=args.quick,
        samples=args.samples,
        # A --suite preset's interleaved-timing rounds (no option of its own).
        **({"timing_rounds": args.timing_rounds} if getattr(args, "timing_rounds", None) else {}),
    )


def _prepare_out(args: argparse.Namespace, config: dict[str, Any]) -> Path:
    out: Path = args.out or Path("runs") / f"bench-{_timestamp()}"
    config_path = out / "config.json"
    if (out / "runs.jsonl").exists() and not args.resume:
        raise UsageError(f"--out {out} already holds runs.jsonl; pass --resume or another --out")
    if args.resume and config_path.exists():
        old = json.loads(config_path.read_text(encoding="utf-8"))
        changed = [k for k in ("protocol", "device") if old.get(k) != config.get(k)]
        if changed:
            raise UsageError(
                f"--resume: {out} was run with different {', '.join(changed)} "
                f"(was {old.get(changed[0])}); use the same options or another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    return out


def _run_preset(args: argparse.Namespace) -> int:
    """``--suite NAME``: every entry of the preset (those of ``--tasks`` when it is given)
    as its own suite in ``OUT/<task>/``."""
    entries = SUITES[args.suite]
    if args.tasks != _names(DEFAULT_TASKS):  # --tasks given: a part of the preset
        unknown = [t for t in args.tasks if t not in {e.task for e in entries}]
        if unknown:
            raise UsageError(f"--suite {args.suite} has no task {unknown[0]!r}; its tasks: "
                             f"{', '.join(e.task for e in entries)}")  # fmt: skip
        entries = tuple(e for e in entries if e.task in args.tasks)
    base: Path = args.out or Path("runs") / f"{args.suite}-{_timestamp()}"
    status = 0
    for entry in entries:
        sub = argparse.Namespace(**vars(args))
        sub.suite, sub.tasks, sub.out = None, [entry.task], base / entry.task
        for key, value in asdict(entry).items():
            if key != "task" and not args.quick and getattr(sub, key, None) is None:
                setattr(sub, key, value)
        status = max(status, _run_bench(sub))
    return status


def _run_bench(args: argparse.Namespace) -> int:
    if getattr(args, "suite", None) is not None:
        return _run_preset(args)
    from grng.bench.runner import RunLog, git_commit, run_suite, total_steps

    device = _check_common(args)
    protocol = _protocol(args)
    torch.set_num_threads(args.threads)
    info = None
    if args.distributed:
        from grng.distributed import init_from_env

        info = init_from_env(backend="nccl" if device.type == "cuda" else "gloo")
        device = info.device
    main_rank = info is None or info.is_main
    # The code that produced the results: in config.json, every run record, summary.md.
    provenance = {"commit": git_commit(), "grng_version": grng.__version__}
    config = {"protocol": asdict(protocol), "device": str(device),
              "tasks": args.tasks, "optimizers": args.optimizers, **provenance}  # fmt: skip
    tasks = _load_tasks(args)
    out = _prepare_out(args, config) if main_rank else Path()
    if info is not None and info.world_size > 1:
        import torch.distributed as dist

        # Rank 0 has checked and created the folder (its default name has a timestamp).
        shared: list[Any] = [str(out)]
        dist.broadcast_object_list(shared, src=0)
        out = Path(shared[0])
    specs = [get_optimizer(n) for n in args.optimizers]
    log = RunLog(out / "runs.jsonl", write=main_rank, stamp=provenance)

    from tqdm import tqdm

    total = total_steps(len(tasks), len(specs), protocol)
    start = time.perf_counter()
    with tqdm(total=total, unit="step", desc="grng bench", file=sys.stderr,
              disable=args.quiet or not main_rank, dynamic_ncols=True,
              smoothing=0.05) as bar:  # fmt: skip

        def on_record(r: dict[str, Any]) -> None:
            bar.set_postfix_str(f"{r['task']} {r['optimizer']} lr={r['lr']:.2g} "
                                f"{r['phase']} s{r['seed']}", refresh=False)  # fmt: skip

        records = run_suite(tasks, specs, protocol, log, device, bar.update, on_record, info)
    elapsed = time.perf_counter() - start
    if info is not None:
        from grng.distributed import shutdown

        shutdown(info)
    if not main_rank:
        return 0

    task_objs = {name: t for name, (t, _) in tasks.items()}
    ranks = f"{info.world_size} rank(s), {info.backend or 'no'} backend" if info else "1 process"
    runs = [r for r in records if r.get("phase") in ("tune", "final")]
    header = suite_header(records, protocol, str(device), ranks, provenance,
                          f"this invocation took {elapsed:.0f} s",
                          planned_runs(runs, task_objs, args.optimizers, protocol))  # fmt: skip
    text = write_summary(out, records, task_objs, args.optimizers, header)
    errors = [r for r in records if r.get("status") == "error"]
    print(text)
    print(f"results in {out}/ ({len(records)} runs; {elapsed:.0f} s)")
    if errors:
        print(f"warning: {len(errors)} run(s) failed; see 'error' in runs.jsonl", file=sys.stderr)
    return 0


def _ranks_text(records: Sequence[dict[str, Any]]) -> str:
    """How the runs were distributed, from their records: "1 process" or "N rank(s), B backend"."""
    ranks = max((int(r.get("ranks") or 1) for r in records), default=1)
    if ranks == 1:
        return "1 process"
    backend = next((r["backend"] for r in records if r.get("backend")), None)
    return f"{ranks} rank(s), {backend or 'no'} backend"


def planned_runs(
    records: Sequence[dict[str, Any]], tasks: dict[str, Task], optimizers: Sequence[str],
    protocol: Any,
) -> tuple[int, int]:  # fmt: skip
    """``(done, planned)``: the runs a suite of ``tasks`` × ``optimizers`` makes (its grid's
    tuning runs and ``seeds`` finals per pair, no finals for a pair whose every tuning rate
    diverged) and how many of them ``records`` holds."""
    from grng.bench.runner import TUNE_SEED, choose_lr, lr_grid, run_key

    have = {run_key(r["task"], r["optimizer"], r["lr"], r["seed"], r["phase"]) for r in records}
    finals = {(r["task"], r["optimizer"], int(r["seed"])) for r in records
              if r.get("phase") == "final"}  # fmt: skip
    done = planned = 0
    for name, task in tasks.items():
        for opt in optimizers:
            grid = lr_grid(task.lr_centre(opt, get_optimizer(opt).default_lr), protocol.lr_grid)
            tuned = [run_key(name, opt, lr, TUNE_SEED, "tune") in have for lr in grid]
            planned += len(grid)
            done += sum(tuned)
            tunes = [r for r in records if r["task"] == name and r["optimizer"] == opt
                     and r.get("phase") == "tune"]  # fmt: skip
            if all(tuned) and choose_lr(tunes, task) is None:
                continue  # every rate diverged: no finals
            planned += protocol.seeds
            done += sum((name, opt, s) in finals for s in range(1, protocol.seeds + 1))
    return done, planned


def suite_header(
    records: Sequence[dict[str, Any]],
    protocol: Any,
    device: str,
    ranks: str,
    provenance: dict[str, str],
    note: str,
    progress: tuple[int, int],
) -> str:
    """A suite summary's header: the code, the protocol and ``note`` (what this invocation
    did), then how many of the planned runs are missing (``progress``: done, planned) and
    the runs' commits when they are not all this code's."""
    from grng.bench.report import provenance_note, threads_text

    runs = [r for r in records if r.get("phase") in ("tune", "final")]
    return (
        f"# grng bench — {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC — grng "
        f"{provenance['grng_version']}, commit {provenance['commit']}\n\n"
        f"{protocol.steps} steps (tuning {protocol.steps_for('tune')}), batch "
        f"{protocol.batch_size or 'task default'}, lr grid {protocol.lr_grid}, "
        f"{protocol.seeds} seeds, device {device}, {ranks}, {threads_text(runs)} thread(s) "
        f"each; test metric mean ± std over seeds; {note}."
        + provenance_note(records, provenance["commit"], *progress)
    )


def write_summary(
    out: Path,
    records: Sequence[dict[str, Any]],
    tasks: dict[str, Task],
    optimizers: Sequence[str],
    header: str,
) -> str:
    """A suite's ``summary.csv``, ``summary.md`` (``header``, then one table per task) and
    ``<task>.png`` from its records (runs and interleaved timings); returns the markdown."""
    from grng.bench import report

    rows = report.summarize(records, tasks, optimizers)
    report.write_csv(rows, out / "summary.csv")
    text = report.write_markdown(rows, tasks, out / "summary.md", header)
    for name, task in tasks.items():
        report.plot_task(records, task, optimizers, out / f"{name}.png")
    return text


def _union(first: Sequence[str], more: Iterable[str]) -> list[str]:
    """``first``, then the other names of ``more``, each once, in order."""
    return list(dict.fromkeys([*first, *more]))


def summarize_folder(out: Path, config: dict[str, Any], provenance: dict[str, str]) -> str:
    """``grng bench report`` for a suite folder: its summary regenerated from its
    ``config.json``, ``runs.jsonl`` and ``timing.jsonl``, no training; returns the markdown.

    It reports every task and optimizer the records hold (a ``--resume`` with fewer of
    them rewrites ``config.json``'s lists); the missing runs it counts are those of the
    latest invocation's tasks × optimizers."""
    from grng.bench.runner import Protocol, RunLog

    protocol = Protocol(**config["protocol"])
    runs, timings = (RunLog(out / f, write=False).records for f in ("runs.jsonl", "timing.jsonl"))
    tasks = {n: get_task(n) for n in _union(config["tasks"], (r["task"] for r in runs))}
    optimizers = _union(config["optimizers"], (r["optimizer"] for r in runs))
    records = [*runs, *(r for r in timings if r["task"] in tasks)]
    latest = {n: tasks[n] for n in config["tasks"]}
    progress = planned_runs(runs, latest, config["optimizers"], protocol)
    header = suite_header(records, protocol, config["device"], _ranks_text(runs), provenance,
                          "summarised by `grng bench report`, no training", progress)  # fmt: skip
    return write_summary(out, records, tasks, optimizers, header)


def _read_results_config(folder: Path) -> dict[str, Any]:
    """``folder``'s ``config.json``, checked to describe what ``grng bench report`` needs:
    UsageError otherwise, before anything is written."""
    from grng.bench.runner import Protocol, RunLog

    if not (folder / "config.json").is_file() or not (folder / "runs.jsonl").is_file():
        raise UsageError(f"{folder}: not a results folder (it needs config.json and "
                         "runs.jsonl, as grng bench and grng bench ablate write them)")  # fmt: skip
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        ablation = "rhos" in config  # grng bench ablate
        if not isinstance(config["device"], str):
            raise TypeError(f"device {config['device']!r}")
        for protocol in config["protocols"].values() if ablation else [config["protocol"]]:
            Protocol(**protocol)
        for rho in config["rhos"] if ablation else []:
            float(rho)
        names = list(config["protocols"] if ablation else config["tasks"])
        names += [r["task"] for r in RunLog(folder / "runs.jsonl", write=False).records]
        for name in dict.fromkeys(names):
            get_task(name)
        for name in config["optimizers"]:
            get_optimizer(name)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UsageError(f"{folder}: config.json or runs.jsonl does not describe a grng "
                         f"bench results folder ({type(exc).__name__}: {exc})") from None  # fmt: skip
    return dict(config)


def _run_report(args: argparse.Namespace) -> int:
    from grng.bench import ablate
    from grng.bench.runner import git_commit

    # Every folder is checked before any summary is rewritten.
    configs = [_read_results_config(folder) for folder in args.folders]
    provenance = {"commit": git_commit(), "grng_version": grng.__version__}
    for folder, config in zip(args.folders, configs, strict=True):
        summarize = ablate.summarize_folder if "rhos" in config else summarize_folder
        print(summarize(folder, config, provenance))
        print(f"summary regenerated in {folder}/")
    return 0


def _run_overhead(args: argparse.Namespace) -> int:
    from grng.bench import overhead

    try:
        return overhead.main(args)
    except ValueError as exc:  # unknown names, no CUDA, bad --widths
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``grng`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "bench" and args.bench_command == "overhead":
            return _run_overhead(args)
        if args.command == "bench" and args.bench_command == "report":
            return _run_report(args)
        if args.command == "bench" and args.bench_command == "ablate":
            from grng.bench import ablate

            return ablate.run(args)
        return _run_bench(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
