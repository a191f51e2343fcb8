"""Shared fixtures: the tiny checkpoints (built once per session) and live servers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import LiveServer, start_server

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


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real model server on the tiny Qwen3-VL model per test module."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with start_server(tiny_qwen3_vl, log, "--max_images_per_request", "8") as live:
        yield live
