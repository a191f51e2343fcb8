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
