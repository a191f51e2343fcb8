"""The engine in a process of its own (`--engine_process`): the same answers as in-process,
streaming and cancellation across the process boundary, and two processes that live and die
together (a dead engine makes the server not ready at once and fails its requests; a dead
front leaves no engine behind)."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from predictor.engine.generation import Generator
from predictor.engine.loading import load_model
from predictor.engine.running_batch import describe
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.rows import Row
from predictor.settings import Settings
from tests import images
from tests.live_server import (
    LiveServer,
    engine_process,
    full_length_picture,
    infer_body,
    start_server,
)

pytestmark = pytest.mark.slow
ENGINE_ARGS = (
    "--engine_process", "true", "--max_new_tokens_limit", "4000",
    "--generation_config", "none",  # greedy: answers are compared across requests
)  # fmt: skip


def gauge(server: LiveServer, name: str, absent: float | None = None) -> float:
    """A series' value for the server's model; `absent` if given and no such series (a
    labelled counter appears once it is first counted)."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model_name") == server.model_name:
                return sample.value
    if absent is not None:
        return absent
    raise AssertionError(f"no {name} in /metrics")


def text_of(reply: httpx.Response) -> str:
    outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
    return outputs["text"][0]


def chat_body(picture: bytes, max_tokens: int, stream: bool) -> dict:
    url = "data:image/jpeg;base64," + base64.b64encode(picture).decode()
    return {
        "model": "qwen-vl",
        "max_tokens": max_tokens,
        "stream": stream,
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


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("engine-process") / "server.log"
    with start_server(tiny_qwen3_vl, log, *ENGINE_ARGS) as live:
        yield live


def test_greedy_text_is_the_in_process_generators(server: LiveServer, tiny_qwen3_vl: Path):
    picture = images.jpeg((128, 96), (30, 140, 200))
    reply = httpx.post(server.infer_url, json=infer_body(picture, 12), timeout=60)
    assert reply.status_code == 200, reply.text

    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl), device="cpu", dtype="float32"))
    generator = Generator(loaded.model, loaded.processor)

    image = fit_to_budget(
        Image.open(io.BytesIO(picture)).convert("RGB"),
        generator.default_budget,
        generator.resize_factor,
    )
    row = Row.single(image, "Describe this image.", SamplingParams(max_new_tokens=12))
    assert text_of(reply) == describe(generator, [row])[0].text


def test_the_engines_metrics_reach_the_servers_metrics(server: LiveServer) -> None:
    before = {
        name: gauge(server, name)
        for name in (
            "qwen_vl_images_total",
            "qwen_vl_generated_tokens_total",
            "qwen_vl_batch_size_count",
            "qwen_vl_time_to_first_token_seconds_count",
        )
    }
    reply = httpx.post(server.infer_url, json=infer_body(images.jpeg(), 6), timeout=60)
    outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
    deadline = time.monotonic() + 5
    while gauge(server, "qwen_vl_images_total") == before["qwen_vl_images_total"]:
        assert time.monotonic() < deadline, "the engine's counts never reached /metrics"
        time.sleep(0.05)
    after = {name: gauge(server, name) for name in before}
    assert after["qwen_vl_images_total"] == before["qwen_vl_images_total"] + 1
    assert (
        after["qwen_vl_generated_tokens_total"] - before["qwen_vl_generated_tokens_total"]
        == outputs["generated_tokens"][0]
    )
    assert after["qwen_vl_batch_size_count"] > before["qwen_vl_batch_size_count"]
    assert (
        after["qwen_vl_time_to_first_token_seconds_count"]
        == before["qwen_vl_time_to_first_token_seconds_count"] + 1
    )


def test_a_picture_sent_again_is_not_encoded_again(server: LiveServer) -> None:
    """The same JPEG twice: the second request's row reaches the engine named by the front's
    content key, its vision encoding comes from the engine's cache (one hit, counted on the
    server's /metrics), and the text is the first one's."""
    picture = images.jpeg((160, 112), (200, 60, 90))
    counts = ("qwen_vl_vision_cache_hits_total", "qwen_vl_vision_cache_misses_total")

    def settled(expected: tuple[float, float]) -> tuple[float, float]:
        deadline = time.monotonic() + 5
        while (now := tuple(gauge(server, name, 0.0) for name in counts)) != expected:
            assert time.monotonic() < deadline, (now, expected)
            time.sleep(0.05)
        return now

    hits, misses = (gauge(server, name, 0.0) for name in counts)
    first = httpx.post(server.infer_url, json=infer_body(picture, 8), timeout=60)
    assert first.status_code == 200, first.text
    settled((hits, misses + 1))
    again = httpx.post(server.infer_url, json=infer_body(picture, 8), timeout=60)
    assert again.status_code == 200, again.text
    settled((hits + 1, misses + 1))
    assert text_of(again) == text_of(first)


def test_streamed_deltas_join_to_the_plain_answer(server: LiveServer) -> None:
    picture = images.jpeg((96, 72), (200, 40, 40))
    plain = httpx.post(
        f"{server.url}/v1/chat/completions", json=chat_body(picture, 10, False), timeout=60
    )
    assert plain.status_code == 200, plain.text
    deltas = []
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=chat_body(picture, 10, True), timeout=60
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["delta"].get("content") or "")
    assert "".join(deltas) == plain.json()["choices"][0]["message"]["content"]


def test_a_client_that_leaves_frees_its_slot_in_the_engine(server: LiveServer) -> None:
    picture = full_length_picture(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.infer_url, json=infer_body(picture, 3500), timeout=2)
    deadline = time.monotonic() + 10
    while gauge(server, "qwen_vl_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.05)
    assert httpx.post(server.infer_url, json=infer_body(picture, 2), timeout=30).status_code == 200


def test_a_killed_engine_makes_the_server_not_ready_and_fails_its_requests(
    tiny_qwen3_vl: Path, tmp_path: Path
) -> None:
    with start_server(tiny_qwen3_vl, tmp_path / "server.log", *ENGINE_ARGS) as live:
        picture = full_length_picture(live)
        answers: list[httpx.Response | BaseException] = []

        def long_request() -> None:
            try:
                answers.append(
                    httpx.post(live.infer_url, json=infer_body(picture, 3500), timeout=30)
                )
            except BaseException as exc:  # reported below
                answers.append(exc)

        client = threading.Thread(target=long_request)
        client.start()
        deadline = time.monotonic() + 20
        while gauge(live, "qwen_vl_num_requests_running") != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        engine_process(live).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        while live.is_ready() or httpx.get(f"{live.url}/v2/health/live").status_code != 503:
            assert time.monotonic() - killed < 2, "still ready or live 2 s after the engine died"
            time.sleep(0.05)
        client.join(timeout=10)
        assert not client.is_alive(), "the request held by the dead engine hangs"
        (answer,) = answers
        assert isinstance(answer, httpx.Response) and answer.status_code == 503, answer
        refused = httpx.post(live.infer_url, json=infer_body(picture, 2), timeout=10)
        assert refused.status_code == 503, refused.text


def test_a_killed_front_leaves_no_engine_behind(tiny_qwen3_vl: Path, tmp_path: Path) -> None:
    with start_server(tiny_qwen3_vl, tmp_path / "server.log", *ENGINE_ARGS) as live:
        engine = engine_process(live)
        os.kill(live.process.pid, signal.SIGKILL)
        live.process.wait(timeout=10)
        gone, alive = psutil.wait_procs([engine], timeout=5)
        assert engine in gone and not alive, "the engine process outlived its front"
