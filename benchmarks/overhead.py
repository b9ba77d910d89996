"""Step time and peak memory of every optimizer relative to AdamW: ``grng bench overhead``.

    .venv/bin/python benchmarks/overhead.py [options of grng bench overhead]
    .venv/bin/python benchmarks/overhead.py --models mlp256-b128,conv1d-b128
    .venv/bin/python benchmarks/overhead.py --profile ring        # top ops of one RING step

The same command as ``grng bench overhead`` (``--help`` lists its options), kept here
beside the other timing scripts. What it measures, and how, is in
``src/grng/bench/overhead.py``: every optimizer steps on its own copy of the model, one
step each per round in a shuffled order (interleaved), on one thread; the median and mean
step time and the peak memory are reported relative to torch's AdamW in the same rounds,
beside the floor (SGD's step plus the bare preconditioning products, over AdamW's step).
"""

from __future__ import annotations

import sys

from grng.bench import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", "overhead", *sys.argv[1:]]))
