"""Shared fixtures: the tiny checkpoints (built once per session) and live servers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from predictor.engine.loading import LoadedModel

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL_FIXTURES = {  # family: the session fixture that builds its tiny checkpoint
    "qwen3-vl": "tiny_qwen3_vl",
    "qwen2.5-vl": "tiny_qwen2_5_vl",
    "qwen2-vl": "tiny_qwen2_vl",
}


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


@pytest.fixture(scope="module", params=list(TINY_MODEL_FIXTURES))
def loaded_family(request: pytest.FixtureRequest) -> LoadedModel:
    """Each family's tiny checkpoint through the predictor's own loading code, on the CPU
    (one load per test module and family)."""
    from predictor.engine.loading import load_model  # torch and transformers: only when needed
    from predictor.settings import Settings

    model_dir: Path = request.getfixturevalue(TINY_MODEL_FIXTURES[request.param])
    return load_model(Settings(model_dir=str(model_dir), device="cpu", dtype="float32"))
