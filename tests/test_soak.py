"""Memory levels off under many image sizes: `hack/soak.py` against the real server.

It cycles 24 distinct image grids (each a different vision-encoder shape) through v2 REST,
gRPC and OpenAI (plain and streaming) in JPEG, PNG and WebP, 624 requests in all, and fails if
the server's resident memory grew by 50 MB or more after the first round.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_memory_levels_off_over_more_grids_than_the_cache_holds(
    tiny_qwen3_vl: Path, tmp_path: Path
) -> None:
    report = tmp_path / "soak.json"
    command = [
        sys.executable,
        str(ROOT / "hack" / "soak.py"),
        "--model_dir",
        str(tiny_qwen3_vl),
        "--rounds",
        "13",
        "--grids",
        "24",
        "--json",
        str(report),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert report.exists(), run.stdout + run.stderr
    result = json.loads(report.read_text())
    assert result["requests"] >= 600
    assert run.returncode == 0, run.stdout
    assert result["growth_after_first_round_mb"] < 50, run.stdout
