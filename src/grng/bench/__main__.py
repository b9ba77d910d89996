"""``python -m grng.bench [options]``: the same as ``grng bench [options]``."""

import sys

from grng.bench.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
