"""Loading: every Qwen-VL family, and clear start-up errors for what cannot work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from predictor.engine.loading import (
    load_model,
    quantization_config,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from predictor.errors import StartupError
from predictor.settings import Settings


def test_missing_checkpoint_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"config\.json not found"):
        resolve_source(Settings(model_dir=str(tmp_path / "nothing")))


def test_checkpoint_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(StartupError, match="only safetensors"):
        resolve_source(Settings(model_dir=str(tmp_path)))


def test_hub_id_is_used_when_given() -> None:
    source = resolve_source(Settings(model_id="Qwen/Qwen3-VL-2B-Instruct", model_revision="main"))
    assert (source.path_or_id, source.revision) == ("Qwen/Qwen3-VL-2B-Instruct", "main")


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_cuda() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_device_is_a_startup_error() -> None:
    with pytest.raises(StartupError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantization_needs_bitsandbytes_and_cuda(mode: str) -> None:
    with pytest.raises(StartupError, match=r"bitsandbytes|CUDA device"):
        quantization_config(mode, torch.device("cpu"), torch.float32)
    assert quantization_config("none", torch.device("cpu"), torch.float32) is None


@pytest.mark.slow
def test_a_non_qwen_vl_checkpoint_is_refused(tiny_qwen3_vl: Path, tmp_path: Path) -> None:
    copy = tmp_path / "other"
    shutil.copytree(tiny_qwen3_vl, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "llava"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(StartupError, match="'llava' model"):
        load_model(Settings(model_dir=str(copy), device="cpu"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fixture", "model_type", "factor"),
    [
        ("tiny_qwen3_vl", "qwen3_vl", 32),
        ("tiny_qwen2_5_vl", "qwen2_5_vl", 28),
        ("tiny_qwen2_vl", "qwen2_vl", 28),
    ],
)
def test_every_family_loads(
    request: pytest.FixtureRequest, fixture: str, model_type: str, factor: int
) -> None:
    from predictor.engine.generation import Generator

    loaded = load_model(Settings(model_dir=str(request.getfixturevalue(fixture)), device="cpu"))
    assert loaded.model_type == model_type
    generator = Generator(loaded.model, loaded.processor)
    assert generator.resize_factor == factor
    generator.warm_up()
