"""The real model server over REST: curl-style JSON, tritonclient.http, bad inputs, metrics."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow
MAX_IMAGE_BYTES = 300_000
JPEG = images.jpeg()
B64 = base64.b64encode(JPEG).decode()


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("rest") / "server.log"
    args = ("--max_images_per_request", "4", "--max_image_bytes", str(MAX_IMAGE_BYTES))
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


def image_tensor(data: list, shape: list[int] | None = None, datatype: str = "BYTES") -> dict:
    return {"name": "image", "datatype": datatype, "shape": shape or [len(data)], "data": data}


def infer(server: LiveServer, body: dict | bytes, **kwargs) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(server.infer_url, json=body, timeout=60, **kwargs)
    return httpx.post(server.infer_url, content=body, timeout=60, **kwargs)


def outputs(response: httpx.Response) -> dict[str, list]:
    return {o["name"]: o["data"] for o in response.json()["outputs"]}


def test_server_is_live_ready_and_describes_its_tensors(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert server.is_ready()
    metadata = httpx.get(f"{server.url}/v2/models/{server.model_name}").json()
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("image", "BYTES", [-1]),
        ("prompt", "BYTES", [-1]),
        ("guided_decoding_guide_type", "BYTES", [1]),
        ("guided_decoding_guide", "BYTES", [1]),
    ]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [
        ("text", "BYTES"),
        ("finish_reason", "BYTES"),
        ("generated_tokens", "INT32"),
    ]


def test_base64_jpeg_without_id_gets_a_description(server: LiveServer) -> None:
    response = infer(server, {"inputs": [image_tensor([B64])], "parameters": {"max_new_tokens": 6}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"]  # KServe alone answers 500 when the request has no id
    result = outputs(response)
    assert len(result["text"]) == 1 and result["text"][0]
    assert result["finish_reason"] == ["length"]
    assert result["generated_tokens"] == [6]
    assert {"decode_ms", "generate_ms"} <= set(body["parameters"])


def test_request_id_prompts_and_data_urls(server: LiveServer) -> None:
    body = {
        "id": "my-request",
        "inputs": [
            image_tensor([B64, f"data:image/jpeg;base64,{B64}"]),
            {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["What is it?"]},
        ],
        # Greedy said explicitly: the checkpoint's own defaults sample (--generation_config auto).
        "parameters": {"max_new_tokens": 4, "temperature": 0},
    }
    response = infer(server, body)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "my-request"
    texts = outputs(response)["text"]
    assert len(texts) == 2 and texts[0] == texts[1]  # same image, same prompt, greedy


def triton_client(server: LiveServer) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=60)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_http_batch_of_three(server: LiveServer, binary: bool) -> None:
    pictures = [images.jpeg(color=c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = pictures if binary else [base64.b64encode(p).decode() for p in pictures]
    image = triton_http.InferInput("image", [3], "BYTES")
    image.set_data_from_numpy(np.array(data, dtype=object), binary_data=binary)
    prompt = triton_http.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array(["Describe it."], dtype=object), binary_data=binary)
    requested = [
        triton_http.InferRequestedOutput(n, binary_data=binary)
        for n in ("text", "generated_tokens")
    ]
    result = triton_client(server).infer(
        server.model_name, [image, prompt], outputs=requested, parameters={"max_new_tokens": 5}
    )
    texts = result.as_numpy("text")
    assert texts.shape == (3,) and all(t for t in texts)
    assert result.as_numpy("generated_tokens").tolist() == [5, 5, 5]


def test_binary_and_json_give_the_same_greedy_text(server: LiveServer) -> None:
    image = triton_http.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([JPEG], dtype=object), binary_data=True)
    greedy = {"max_new_tokens": 6, "temperature": 0}  # the checkpoint's defaults sample
    binary = triton_client(server).infer(server.model_name, [image], parameters=greedy)
    plain = infer(server, {"inputs": [image_tensor([B64])], "parameters": greedy})
    assert binary.as_numpy("text")[0].decode() == outputs(plain)["text"][0]


def binary_body(elements: list[bytes]) -> tuple[bytes, dict]:
    import struct

    import orjson

    raw = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": [len(elements)],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    )
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


BAD_JSON_BODIES = {
    "undecodable-base64": ({"inputs": [image_tensor(["@@not-base64@@"])]}, "image[0]"),
    "not-an-image": ({"inputs": [image_tensor([base64.b64encode(b"hello").decode()])]}, "image[0]"),
    "truncated": (
        {"inputs": [image_tensor([base64.b64encode(images.truncated_jpeg()).decode()])]},
        "image[0]",
    ),
    "decompression-bomb": (
        {
            "inputs": [
                image_tensor([base64.b64encode(images.png_header_only(20000, 20000)).decode()])
            ]
        },
        "image[0]",
    ),
    "zero-size": ({"inputs": [image_tensor([""])]}, "image[0]"),
    "wrong-datatype": ({"inputs": [image_tensor([1.5], datatype="FP32")]}, "image"),
    "wrong-shape": ({"inputs": [image_tensor([B64], shape=[2])]}, "image"),
    "no-image-input": (
        {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
        "image",
    ),
    "prompt-count-mismatch": (
        {
            "inputs": [
                image_tensor([B64, B64, B64]),
                {"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
            ]
        },
        "prompt",
    ),
    "out-of-range-parameter": (
        {"inputs": [image_tensor([B64])], "parameters": {"max_new_tokens": 100000}},
        "max_new_tokens",
    ),
    "wrong-typed-parameter": (
        {"inputs": [image_tensor([B64])], "parameters": {"temperature": "warm"}},
        "temperature",
    ),
    "unknown-parameter": (
        {"inputs": [image_tensor([B64])], "parameters": {"beams": 4}},
        "parameters.beams",
    ),
    "too-many-images": ({"inputs": [image_tensor([B64] * 5)]}, "image"),
    "too-many-bytes": (
        {"inputs": [image_tensor([base64.b64encode(b"\xff" * (MAX_IMAGE_BYTES + 1)).decode()])]},
        "image[0]",
    ),
    "unknown-output": (
        {"inputs": [image_tensor([B64])], "outputs": [{"name": "logits"}]},
        "outputs.logits",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_BODIES))
def test_bad_json_input_is_a_400_naming_the_field(server: LiveServer, case: str) -> None:
    body, field = BAD_JSON_BODIES[case]
    response = infer(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}: "), response.json()
    assert server.is_ready()


@pytest.mark.parametrize(
    ("body", "headers", "field"),
    [
        (b"{not json", {}, "request body"),
        (b'{"inputs": "image"}', {}, "inputs"),
        (*binary_body([b"not an image"]), "image[0]"),
        (
            binary_body([JPEG])[0],
            {"Inference-Header-Content-Length": "999999"},
            "Inference-Header-Content-Length",
        ),
        (binary_body([JPEG])[0][:-5], binary_body([JPEG])[1], "inputs.image"),
    ],
    ids=[
        "malformed-json",
        "inputs-not-list",
        "binary-not-image",
        "bad-header-length",
        "binary-cut-short",
    ],
)
def test_bad_bodies_are_a_400_naming_the_field(
    server: LiveServer, body: bytes, headers: dict, field: str
) -> None:
    response = infer(server, body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"{field}: ")
    assert server.is_ready()


def test_unknown_model_is_404(server: LiveServer) -> None:
    response = httpx.post(
        f"{server.url}/v2/models/nope/infer", json={"inputs": [image_tensor([B64])]}
    )
    assert response.status_code == 404


def scrape(server: LiveServer) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{server.url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_requests_images_and_tokens(server: LiveServer) -> None:
    label = (("model_name", server.model_name),)
    before = scrape(server)

    def delta(name: str, labels: tuple = label) -> float:
        return scrape(server).get((name, labels), 0.0) - before.get((name, labels), 0.0)

    ok = infer(server, {"inputs": [image_tensor([B64, B64])], "parameters": {"max_new_tokens": 3}})
    assert ok.status_code == 200
    assert infer(server, {"inputs": [image_tensor(["@@"])]}).status_code == 400
    outcome = lambda o: (("model_name", server.model_name), ("outcome", o))  # noqa: E731
    assert delta("qwen_vl_requests_total", outcome("success")) == 1
    assert delta("qwen_vl_requests_total", outcome("invalid")) == 1
    assert delta("qwen_vl_images_total") == 2
    assert delta("qwen_vl_generated_tokens_total") == 6
    assert delta("qwen_vl_generation_seconds_count") == 1
    assert delta("qwen_vl_prompt_tokens_total") > 40
    assert ("request_predict_seconds_count", label) in scrape(server)  # KServe's own stages


def test_startup_time_is_reported(server: LiveServer) -> None:
    print(f"\nstart-up to ready on the tiny model: {server.startup_s:.1f} s")
    assert "ready in" in server.log()


def test_an_image_sent_again_is_not_encoded_again(server: LiveServer) -> None:
    """The engine's vision cache (`--vision_cache_mb`, on by default): the second request with
    the same picture finds its encoder output, counted across the engine process, and gets the
    same text; another picture misses."""
    label = (("model_name", server.model_name),)
    picture = base64.b64encode(images.jpeg(color=(17, 99, 201))).decode()
    other = base64.b64encode(images.jpeg(color=(201, 99, 17))).decode()
    parameters = {"max_new_tokens": 6, "temperature": 0}
    body = {"inputs": [image_tensor([picture])], "parameters": parameters}

    def counts() -> tuple[float, float]:
        samples = scrape(server)
        return tuple(
            samples.get((f"qwen_vl_vision_cache_{kind}_total", label), 0.0)
            for kind in ("hits", "misses")
        )

    def settled(expected: tuple[float, float]) -> tuple[float, float]:
        for _ in range(50):  # the engine forwards its counts every 0.1 s
            seen = counts()
            if seen == expected:
                break
            time.sleep(0.1)
        return seen

    hits, misses = counts()
    first = outputs(infer(server, body))
    assert settled((hits, misses + 1)) == (hits, misses + 1)
    second = outputs(infer(server, body))
    assert settled((hits + 1, misses + 1)) == (hits + 1, misses + 1)
    assert second["text"] == first["text"]
    infer(server, {**body, "inputs": [image_tensor([other])]})
    assert settled((hits + 1, misses + 2)) == (hits + 1, misses + 2)
