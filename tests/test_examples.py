"""Every script in ``examples/`` runs with ``--smoke`` (CPU, no download).

Each runs in a subprocess, as a user would run it, with one thread per process (the
CI machine's cores are shared), and must exit 0 within its timeout and print its
final line. The DDP example runs under torchrun with 2 gloo ranks.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT_S = 120

#: script -> (modules it needs, launcher arguments before the script, regex of its last line)
SCRIPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {
    "custom_layer.py": ((), (), r"step\s+30\s+loss"),
    "ddp_torchrun.py": (
        (),
        ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"),
        r"2 rank\(s\), ring: .*difference between ranks 0\.0e\+00",
    ),
    "hf_trainer_ring.py": (("transformers", "accelerate"), (), r"ring: 40 steps"),
    "lightning_ring_accumulation.py": (("lightning",), (), r"ring: 20 optimizer steps"),
}


def test_every_example_is_run() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_runs_with_smoke(script: str) -> None:
    modules, launcher, last_line = SCRIPTS[script]
    for module in modules:
        pytest.importorskip(module)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # Offline: a smoke run must not download (a download attempt fails instead).
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, *launcher, str(EXAMPLES / script), "--smoke"],
        capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=EXAMPLES.parent,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, output[-4000:]
    assert re.search(last_line, lines[-1]), output[-4000:]
