"""Loading: every Qwen-VL family, and clear start-up errors for what cannot work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from predictor.engine.loading import (
    cpu_has_native_bf16,
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


def test_dtype_auto_is_bfloat16_where_matmuls_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU here: `torch.cuda.is_bf16_supported` is set to what a T4 and an H100 answer."""
    from predictor.engine import loading

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda native=native: native)
        assert resolve_dtype("auto", torch.device("cpu")) == expected
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16


def test_this_cpu_flag_reading_finds_what_proc_cpuinfo_says() -> None:
    flags = Path("/proc/cpuinfo").read_text()
    assert cpu_has_native_bf16() == ("amx_bf16" in flags or "avx512_bf16" in flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_device_is_a_startup_error() -> None:
    with pytest.raises(StartupError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantization_on_a_cpu_is_bitsandbytes(mode: str) -> None:
    pytest.importorskip("bitsandbytes")
    config = quantization_config(mode, torch.device("cpu"), torch.bfloat16)
    assert config.load_in_4bit == (mode == "4bit") and config.load_in_8bit == (mode == "8bit")
    assert quantization_config("none", torch.device("cpu"), torch.float32) is None


def test_quantization_without_bitsandbytes_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real(name, *a),
    )
    with pytest.raises(StartupError, match="needs bitsandbytes"):
        quantization_config("4bit", torch.device("cpu"), torch.float32)


@pytest.mark.slow
def test_a_non_qwen_vl_checkpoint_is_refused(tiny_qwen3_vl: Path, tmp_path: Path) -> None:
    copy = tmp_path / "other"
    shutil.copytree(tiny_qwen3_vl, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "llava"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(StartupError, match="'llava' model"):
        load_model(Settings(model_dir=str(copy), device="cpu", dtype="float32"))


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
    from predictor.engine.running_batch import RunningBatch

    loaded = load_model(
        Settings(model_dir=str(request.getfixturevalue(fixture)), device="cpu", dtype="float32")
    )
    assert loaded.model_type == model_type
    generator = Generator(loaded.model, loaded.processor)
    assert generator.resize_factor == factor
    RunningBatch(generator, max_rows=2, max_len=512).warm_up()


def _mapped_checkpoint_files(directory: Path) -> list[str]:
    """Files of `directory` this process has memory-mapped (from /proc/self/maps)."""
    maps = Path("/proc/self/maps").read_text().splitlines()
    return sorted({line.split()[-1] for line in maps if str(directory) in line})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_a_quantized_load_keeps_no_mapping_of_the_checkpoint(
    tiny_qwen3_vl: Path, mode: str
) -> None:
    """The same weights as transformers' own loading, read without mapping the file: a mapped
    checkpoint stays resident in the server once its pages are read (the whole of it, since
    quantizing reads every weight)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText

    settings = Settings(
        model_dir=str(tiny_qwen3_vl), device="cpu", dtype="bfloat16", quantization=mode
    )
    loaded = load_model(settings)
    assert _mapped_checkpoint_files(tiny_qwen3_vl) == []
    config = quantization_config(mode, torch.device("cpu"), torch.bfloat16)
    reference = AutoModelForImageTextToText.from_pretrained(
        tiny_qwen3_vl, dtype=torch.bfloat16, quantization_config=config
    )
    ours, theirs = dict(loaded.model.named_parameters()), dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert loaded.model.generation_config.to_diff_dict() == (
        reference.generation_config.to_diff_dict()
    )


def test_the_allocator_settings_take_on_glibc() -> None:
    """A quantized load frees the bf16 checkpoint tensor by tensor; on glibc large blocks must
    then go back to the system at once (a fixed mmap threshold) or the heap keeps them."""
    import platform

    from predictor.engine.loading import large_allocations_from_mmap, return_free_memory

    assert large_allocations_from_mmap() == (platform.libc_ver()[0] == "glibc")
    return_free_memory()
