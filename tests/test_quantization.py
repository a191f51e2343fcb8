"""`--quantization 4bit|8bit` on a CPU: bitsandbytes layers through the same decoding step
(eager: compiling is skipped for them), served on the v2 route and the OpenAI route by the
real server.

The tiny model's random weights make no sense of any picture, so what is checked is that each
mode loads as bitsandbytes layers, serves both routes with the requested token counts, and is
greedy-deterministic (two identical requests, one text)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests import images
from tests.live_server import LiveServer, infer_body, start_server

pytestmark = pytest.mark.slow
JPEG = images.jpeg()


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def server(
    request: pytest.FixtureRequest, tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    pytest.importorskip("bitsandbytes")
    log = tmp_path_factory.mktemp(f"quant-{request.param}") / "server.log"
    # --compile true as shipped: a quantized model's step must run eager instead (and say so).
    args = ("--quantization", request.param, "--generation_config", "none", "--compile", "true")
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


def test_the_model_is_quantized_on_the_cpu(server: LiveServer) -> None:
    assert "quantization 4bit" in server.log() or "quantization 8bit" in server.log()
    assert " on cpu " in server.log()
    assert "4-bit/8-bit weights: the decoding step runs eager" in server.log()


def test_v2_route_serves_the_quantized_model(server: LiveServer) -> None:
    texts = []
    for _ in range(2):
        reply = httpx.post(server.infer_url, json=infer_body(JPEG, 12), timeout=120)
        assert reply.status_code == 200, reply.text
        outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
        assert outputs["generated_tokens"][0] <= 12
        texts.append(outputs["text"][0])
    assert texts[0] == texts[1]


def test_openai_route_serves_the_quantized_model(server: LiveServer) -> None:
    url = f"data:image/jpeg;base64,{base64.b64encode(JPEG).decode()}"
    body = {
        "model": server.model_name,
        "max_tokens": 8,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ],
    }
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] <= 8


def _linears(model: torch.nn.Module, prefix: str) -> dict[str, str]:
    """{name: class name} of the linear layers under `prefix`."""
    return {
        name: type(module).__name__
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, torch.nn.Linear)
    }


def test_the_vision_tower_is_quantized_only_when_asked(tiny_qwen3_vl: Path) -> None:
    """Default: the vision tower stays in the model's dtype (as vLLM and TGI keep it). With
    --quantize_vision its layers are 4-bit, except those bitsandbytes' CPU layout cannot pack
    (the tiny model's 32-wide inputs), and an image still decodes through them."""
    pytest.importorskip("bitsandbytes")
    from predictor.engine.generation import Generator
    from predictor.engine.loading import load_model
    from predictor.engine.running_batch import describe
    from predictor.params import SamplingParams
    from predictor.rows import Row
    from predictor.settings import Settings

    base = {"model_dir": str(tiny_qwen3_vl), "device": "cpu", "dtype": "bfloat16"}
    plain = load_model(Settings(**base, quantization="4bit")).model
    assert set(_linears(plain, "model.visual.").values()) == {"Linear"}
    assert set(_linears(plain, "model.language_model.").values()) == {"Linear4bit"}

    loaded = load_model(Settings(**base, quantization="4bit", quantize_vision=True))
    vision = _linears(loaded.model, "model.visual.")
    for name, kind in vision.items():
        module = loaded.model.get_submodule(name)
        narrow = module.in_features % 64 != 0 or module.out_features % 32 != 0
        assert kind == ("Linear" if narrow else "Linear4bit"), name
    assert "Linear4bit" in vision.values() and "Linear" in vision.values()
    assert type(loaded.model.lm_head).__name__ == "Linear"
    row = Row.single(images.gradient(), "Describe this image.", SamplingParams(max_new_tokens=4))
    done = describe(Generator(loaded.model, loaded.processor), [row], max_len=512)
    assert 1 <= done[0].generated_tokens <= 4


def test_every_vision_layer_of_qwen3_vl_2b_packs(tmp_path: Path) -> None:
    """At Qwen3-VL-2B's real widths nothing in the vision tower is too narrow for
    bitsandbytes' CPU layout: --quantize_vision quantizes all of it (on the meta device)."""
    from hack.model_shapes import shaped_config
    from predictor.engine.loading import ModelSource, unquantized_modules

    ids = {"<|endoftext|>": 0, "<|im_end|>": 1, "<|image_pad|>": 2, "<|video_pad|>": 3}
    ids |= {"<|vision_start|>": 4, "<|vision_end|>": 5}
    shaped_config("qwen3-vl-2b", ids).save_pretrained(tmp_path)
    source = ModelSource(str(tmp_path))
    assert unquantized_modules(source, "4bit", quantize_vision=True) == ["lm_head"]
    assert unquantized_modules(source, "4bit", quantize_vision=False) == [
        "model.visual",
        "lm_head",
    ]


def test_quantize_vision_needs_quantization() -> None:
    from predictor.settings import Settings

    with pytest.raises(ValueError, match="--quantize_vision needs --quantization"):
        Settings(quantize_vision=True).validate()
