#!/usr/bin/env python3
"""`python hack/canary.py ...`: the canary tool from a checkout, without installing the package.

The code lives in predictor/canary/ (installed as the `qwen-vl-canary` console script); this
file only puts the repository root on the import path. `--help` lists the subcommands.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from predictor.canary.cli import main

if __name__ == "__main__":
    main()
