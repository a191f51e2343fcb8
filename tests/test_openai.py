"""The OpenAI-compatible route on the real server, driven by the official `openai` SDK."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow
JPEG = images.jpeg()


def data_url(data: bytes, kind: str = "jpeg") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


DATA_URL = data_url(JPEG)


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("openai") / "server.log"
    args = (
        "--served_model_aliases", "gpt-4o-mini",
        "--max_images_per_request", "3",
        "--batch_wait_ms", "300",  # wide enough for the mixed-protocol batching test
        "--generation_config", "none",  # greedy unless a request says otherwise
    )  # fmt: skip
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def user_turn(*urls: str, text: str = "Describe this image.") -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


def test_chat_completion_for_a_data_url_image(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="qwen-vl", messages=[user_turn(DATA_URL)], max_tokens=8
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "qwen-vl"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 8
    # Prompt tokens include the image's tokens: a larger image costs more prompt tokens.
    big = data_url(images.encode(images.gradient((400, 300)), "PNG"), "png")
    bigger = client.chat.completions.create(
        model="qwen-vl", messages=[user_turn(big)], max_tokens=1
    )
    assert bigger.usage.prompt_tokens > reply.usage.prompt_tokens > 20


def test_streaming_matches_the_plain_answer(client: openai.OpenAI) -> None:
    # temperature 0 said explicitly: the checkpoint's own defaults sample.
    plain = client.chat.completions.create(
        model="gpt-4o-mini", messages=[user_turn(DATA_URL)], max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[user_turn(DATA_URL)],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1


def test_raw_stream_ends_with_done(server: LiveServer) -> None:
    body = {"model": "qwen-vl", "messages": [user_turn(DATA_URL)], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/openai/v1/chat/completions", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line for line in reply.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)


def test_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    full = (
        client.chat.completions.create(
            model="qwen-vl", messages=[user_turn(DATA_URL)], max_tokens=12, temperature=0
        )
        .choices[0]
        .message.content
    )
    stop = full[3:5]
    cut = client.chat.completions.create(
        model="qwen-vl", messages=[user_turn(DATA_URL)], max_tokens=12, stop=[stop], temperature=0
    )
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_several_images_and_turns(client: openai.OpenAI) -> None:
    second = f"data:image/png;base64,{base64.b64encode(images.every_format()['png']).decode()}"
    messages = [
        {"role": "system", "content": "You describe images briefly."},
        user_turn(DATA_URL, text="What is this?"),
        {"role": "assistant", "content": "A red square."},
        user_turn(second, DATA_URL, text="And these two?"),
    ]
    reply = client.chat.completions.create(model="qwen-vl", messages=messages, max_tokens=4)
    assert reply.choices[0].message.content


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {"messages": [user_turn("data:image/jpeg;base64,@@@")]},
            "messages.0.content.0.image_url.url",
        ),
        (
            {
                "messages": [
                    user_turn(f"data:image/png;base64,{base64.b64encode(b'not an image').decode()}")
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        ({"messages": [user_turn("file:///etc/passwd")]}, "messages.0.content.0.image_url.url"),
        ({"messages": [user_turn("/etc/passwd")]}, "messages.0.content.0.image_url.url"),
        (
            {"messages": [user_turn("https://example.com/cat.jpg")]},
            "messages.0.content.0.image_url.url",
        ),
        ({"n": 2}, "n"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": [user_turn(DATA_URL, DATA_URL, DATA_URL, DATA_URL)]}, "messages"),
        ({"messages": [{"role": "user", "content": "no image here"}]}, "messages"),
        (
            {"messages": [user_turn(DATA_URL), {"role": "system", "content": "Answer in French."}]},
            "messages[1]",
        ),
    ],
    ids=[
        "bad-base64",
        "not-an-image",
        "file-url",
        "bare-path",
        "remote-url-without-flag",
        "n-2",
        "too-many-tokens",
        "too-hot",
        "unsupported-parameter",
        "too-many-images",
        "no-image",
        "system-message-the-template-drops",
    ],
)
def test_bad_requests_are_bad_request_errors(
    client: openai.OpenAI, server: LiveServer, kwargs: dict, param: str
) -> None:
    request = {"model": "qwen-vl", "messages": [user_turn(DATA_URL)], "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**request)
    body = error.value.body
    assert body["param"] == param, body
    assert body["type"] == "invalid_request_error" and body["message"].startswith(param)
    assert server.is_ready()


def test_vllm_sampling_and_processor_fields_reach_the_engine(
    client: openai.OpenAI, server: LiveServer
) -> None:
    """`top_k`, `repetition_penalty` and `mm_processor_kwargs` (vLLM's names for the v2
    route's parameters), sent as the `openai` SDK sends extra fields: `extra_body`."""
    picture = data_url(images.encode(images.gradient((400, 300)), "PNG"), "png")

    def ask(**extra: object) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model="qwen-vl", messages=[user_turn(picture)], max_tokens=10, extra_body=extra
        )

    greedy = ask()
    # Sampling from the single most likely token is greedy decoding, whatever the seed.
    assert ask(temperature=1.5, top_k=1, seed=7).choices[0].message.content == (
        greedy.choices[0].message.content
    )
    assert ask(top_k=-1).choices[0].message.content == greedy.choices[0].message.content
    assert ask(repetition_penalty=1.0).choices[0].message.content == (
        greedy.choices[0].message.content
    )
    # A smaller pixel budget resizes the image to fewer patches: fewer prompt tokens.
    # (Both bounds: the checkpoint's own min_pixels is above this max.)
    small = ask(mm_processor_kwargs={"min_pixels": 32 * 32 * 4, "max_pixels": 28 * 28 * 16})
    assert small.usage.prompt_tokens < greedy.usage.prompt_tokens
    big = ask(mm_processor_kwargs={"min_pixels": 500_000, "max_pixels": 600_000})
    assert big.usage.prompt_tokens > greedy.usage.prompt_tokens


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"top_k": "many"}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"mm_processor_kwargs": {"max_pixels": 10**9}}, "mm_processor_kwargs.max_pixels"),
        (
            {"mm_processor_kwargs": {"min_pixels": 600_000, "max_pixels": 500_000}},
            "mm_processor_kwargs.min_pixels",
        ),
        ({"mm_processor_kwargs": {"fps": 2}}, "mm_processor_kwargs.fps"),
    ],
    ids=["top-k-negative", "top-k-text", "no-penalty", "pixels-over-limit", "min-over-max", "fps"],
)
def test_bad_vllm_fields_are_bad_request_errors(
    client: openai.OpenAI, server: LiveServer, extra: dict, param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(
            model="qwen-vl", messages=[user_turn(DATA_URL)], max_tokens=2, extra_body=extra
        )
    assert error.value.body["param"] == param, error.value.body
    assert error.value.body["message"].startswith(param)
    assert server.is_ready()


def test_unknown_model_is_not_found_in_openai_shape(
    client: openai.OpenAI, server: LiveServer
) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="llava", messages=[user_turn(DATA_URL)])
    assert error.value.body["code"] == "model_not_found"
    raw = httpx.post(
        f"{server.url}/openai/v1/chat/completions",
        json={"model": "llava", "messages": [user_turn(DATA_URL)]},
    )
    assert raw.status_code == 404
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


def test_models_lists_the_name_and_aliases(client: openai.OpenAI, server: LiveServer) -> None:
    assert [m.id for m in client.models.list()] == ["qwen-vl", "gpt-4o-mini"]
    assert httpx.get(f"{server.url}/openai/v1/models").json()["data"][1]["id"] == "gpt-4o-mini"


def batch_histogram(server: LiveServer) -> tuple[float, float]:
    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return values["qwen_vl_batch_size_sum"], values["qwen_vl_batch_size_count"]


def test_v2_and_openai_requests_decode_in_the_same_steps(
    client: openai.OpenAI, server: LiveServer
) -> None:
    rows_before, calls_before = batch_histogram(server)
    results: dict[str, object] = {}

    def openai_request() -> None:
        results["openai"] = client.chat.completions.create(
            model="qwen-vl", messages=[user_turn(DATA_URL)], max_tokens=5
        )

    def v2_request() -> None:
        body = {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [DATA_URL]}],
            "parameters": {"max_new_tokens": 5},
        }
        results["v2"] = httpx.post(server.infer_url, json=body, timeout=60)

    threads = [threading.Thread(target=openai_request), threading.Thread(target=v2_request)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    # The engine process forwards its metrics every 0.1 s: wait for this run's to arrive.
    deadline = time.monotonic() + 5
    while batch_histogram(server)[1] == calls_before and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    rows_after, steps_after = batch_histogram(server)
    rows, steps = rows_after - rows_before, steps_after - calls_before
    assert steps >= 1 and rows > steps  # some decoding step ran both requests' rows
    assert results["v2"].status_code == 200
    assert results["openai"].choices[0].message.content


def test_openai_requests_are_counted(server: LiveServer, client: openai.OpenAI) -> None:
    def count(outcome: str) -> float:
        text = httpx.get(f"{server.url}/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "qwen_vl_requests_total" and sample.labels["outcome"] == outcome:
                    return sample.value
        return 0.0

    ok, invalid = count("success"), count("invalid")
    client.chat.completions.create(model="qwen-vl", messages=[user_turn(DATA_URL)], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen-vl", messages=[user_turn("file:///x")])
    assert (count("success"), count("invalid")) == (ok + 1, invalid + 1)
