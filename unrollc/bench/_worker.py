"""Entry point of one measurement process: ``python -m unrollc.bench._worker CONFIG_JSON OUT_PATH [time|memory]``."""

from __future__ import annotations

import sys

from .runner import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
