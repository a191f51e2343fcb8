"""Shared fixtures: the tiny checkpoints (built once per session) and live servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _build_tiny_model(out_dir: Path, family: str) -> Path:
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "hack" / "make_tiny_model.py"),
            str(out_dir),
            "--family",
            family,
        ],
        check=True,
        capture_output=True,
    )
    return out_dir


@pytest.fixture(scope="session")
def tiny_qwen3_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen3-vl", "qwen3-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2.5-vl", "qwen2.5-vl")


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2-vl", "qwen2-vl")
