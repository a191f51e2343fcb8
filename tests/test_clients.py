"""Third-party clients unmodified against the real server: tritonclient (http, grpc), KServe's
gRPC stub and `InferenceGRPCClient`, and the `openai` SDK with vLLM's sampling extras.

Covers Triton's model-configuration extension, gRPC `ModelMetadata`, numbers sent as strings
over KServe's gRPC proto, the parameters Triton's clients add on their own, and the OpenAI
route's strict types.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton_http
from kserve import InferenceGRPCClient, InferenceRESTClient, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import InferInput, InferRequest

from predictor.openai.protocol import ChatCompletion, ChatCompletionChunk, ErrorResponse, ModelList
from predictor.server.openapi import InferResponseBody, TritonModelConfig, V2Error
from tests import images
from tests.live_server import LiveServer, infer_body, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
JPEG = images.jpeg()
DATA_URL = f"data:image/jpeg;base64,{base64.b64encode(JPEG).decode()}"


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("clients") / "server.log"
    # Greedy unless a request says otherwise: these tests compare clients, not defaults.
    args = ("--enable_docs_url", "true", "--generation_config", "none")
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


@pytest.fixture(scope="module")
def stub(server: LiveServer) -> Iterator[GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def chat(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def triton_grpc(server: LiveServer, *args: str) -> dict:
    """Run one tritonclient.grpc call in its own process (see tests/clients)."""
    command = [sys.executable, "-m", "tests.clients.triton_grpc_calls", server.grpc_target, *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def user_turn(url: str = DATA_URL) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi."}]
    return {"role": "user", "content": parts}


# ---- Triton's model configuration and gRPC metadata --------------------------------------


def test_tritonclient_http_reads_metadata_and_config(server: LiveServer) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    metadata = client.get_model_metadata("qwen-vl")
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [
        ("image", "BYTES"),
        ("prompt", "BYTES"),
        ("guided_decoding_guide_type", "BYTES"),
        ("guided_decoding_guide", "BYTES"),
    ]
    config = client.get_model_config("qwen-vl")
    assert config["max_batch_size"] == 0
    assert config["model_transaction_policy"] == {"decoupled": False}
    assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in config["input"]] == [
        ("image", "TYPE_STRING", [-1], False),
        ("prompt", "TYPE_STRING", [-1], True),
        ("guided_decoding_guide_type", "TYPE_STRING", [1], True),
        ("guided_decoding_guide", "TYPE_STRING", [1], True),
    ]
    assert [(o["name"], o["data_type"]) for o in config["output"]] == [
        ("text", "TYPE_STRING"),
        ("finish_reason", "TYPE_STRING"),
        ("generated_tokens", "TYPE_INT32"),
    ]
    versioned = httpx.get(f"{server.url}/v2/models/qwen-vl/versions/1/config")
    assert versioned.json() == config
    missing = httpx.get(f"{server.url}/v2/models/nope/config")
    assert missing.status_code == 404 and "nope" in missing.text


def test_tritonclient_grpc_reads_metadata_and_config(server: LiveServer) -> None:
    metadata = triton_grpc(server, "qwen-vl", "metadata")
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [
        ("image", "BYTES"),
        ("prompt", "BYTES"),
        ("guided_decoding_guide_type", "BYTES"),
        ("guided_decoding_guide", "BYTES"),
    ]
    assert [t["name"] for t in metadata["outputs"]] == ["text", "finish_reason", "generated_tokens"]
    config = triton_grpc(server, "qwen-vl", "config")["config"]
    rest = httpx.get(f"{server.url}/v2/models/qwen-vl/config").json()
    assert config["name"] == rest["name"] and config["platform"] == rest["platform"]
    assert config.get("max_batch_size", 0) == 0
    # protobuf's JSON writes int64 dims as strings and leaves out false booleans
    assert [
        (i["name"], i["data_type"], i["dims"], i.get("optional", False)) for i in config["input"]
    ] == [
        (i["name"], i["data_type"], [str(d) for d in i["dims"]], i["optional"])
        for i in rest["input"]
    ]
    assert [o["name"] for o in config["output"]] == [o["name"] for o in rest["output"]]
    missing = triton_grpc(server, "nope", "config")
    assert missing["status"] == "StatusCode.NOT_FOUND"


def test_kserve_grpc_stub_reads_metadata(stub: GRPCInferenceServiceStub) -> None:
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="qwen-vl"))
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("image", "BYTES", [-1]),
        ("prompt", "BYTES", [-1]),
        ("guided_decoding_guide_type", "BYTES", [1]),
        ("guided_decoding_guide", "BYTES", [1]),
    ]
    assert [t.name for t in metadata.outputs] == ["text", "finish_reason", "generated_tokens"]


# ---- numbers as strings over KServe's gRPC proto -------------------------------------------


def kserve_client_text(server: LiveServer, **parameters: object) -> list[str]:
    async def call() -> list[str]:
        async with InferenceGRPCClient(server.grpc_target) as client:
            tensor = InferInput("image", [1], "BYTES", data=[JPEG])
            request = InferRequest("qwen-vl", [tensor], parameters=parameters)
            reply = await client.infer(request)
        return [t.decode() if isinstance(t, bytes) else t for t in reply.outputs[0].data]

    return asyncio.run(call())


def test_kserve_grpc_client_string_temperature_matches_tritonclient_double(
    server: LiveServer, tmp_path: Path
) -> None:
    path = tmp_path / "red.jpg"
    path.write_bytes(JPEG)
    sampled = {"max_new_tokens": 8, "seed": 7}
    from_triton = triton_grpc(
        server, "qwen-vl", "infer", str(path), json.dumps({**sampled, "temperature": 0.5})
    )
    from_kserve = kserve_client_text(server, **sampled, temperature="0.5", top_p="1")
    assert from_kserve == from_triton["text"]
    greedy = kserve_client_text(server, max_new_tokens=8)
    assert from_kserve != greedy  # the temperature was applied, not dropped


def test_kserve_rest_client_sends_the_fraction_as_a_number(server: LiveServer) -> None:
    async def call() -> str:
        client = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            tensor = InferInput("image", [1], "BYTES", data=[base64.b64encode(JPEG).decode()])
            parameters = {"max_new_tokens": 8, "seed": 7, "temperature": 0.5}
            request = InferRequest("qwen-vl", [tensor], parameters=parameters)
            reply = await client.infer(server.url, request, model_name="qwen-vl")
        finally:
            await client.close()
        return reply.outputs[0].data[0]

    over_grpc = kserve_client_text(server, max_new_tokens=8, seed=7, temperature="0.5")
    assert [asyncio.run(call())] == over_grpc


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("temperature", "0.5 ", "temperature: must be a number, got str '0.5 '"),
        ("temperature", "nan", "temperature: must be a number, got str 'nan'"),
        ("max_new_tokens", "4.0", "max_new_tokens: must be an integer, got str '4.0'"),
        ("temperature", "3", "temperature: must be in [0.0, 2.0], got 3.0"),
    ],
)
def test_grpc_strings_that_are_not_exactly_the_number_are_refused(
    stub: GRPCInferenceServiceStub, name: str, text: str, message: str
) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(JPEG)
    request = pb.ModelInferRequest(model_name="qwen-vl", inputs=[tensor])
    request.parameters[name].string_param = text
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


# ---- parameters Triton's clients add ------------------------------------------------------


def test_tritonclient_priority_and_timeout_are_accepted(server: LiveServer) -> None:
    client = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    image = triton_http.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([JPEG], dtype=object))
    result = client.infer(
        "qwen-vl", [image], priority=1, timeout=10_000_000, parameters={"max_new_tokens": 2}
    )
    assert result.as_numpy("generated_tokens").tolist() in ([1], [2])


@pytest.mark.parametrize(
    ("parameters", "status", "message"),
    [
        ({"triton_enable_empty_final_response": True}, 200, None),
        ({"triton_enable_empty_final_response": "yes"}, 400, "must be true or false"),
        ({"sequence_id": 3}, 400, "not a sequence model"),
        ({"priority": -1}, 400, "must be a non-negative integer"),
        ({"frobnicate": 1}, 400, "parameters.frobnicate: unknown parameter"),
    ],
)
def test_triton_added_parameters_are_checked(
    server: LiveServer, parameters: dict, status: int, message: str | None
) -> None:
    body = infer_body(JPEG, 2)
    body["parameters"].update(parameters)
    reply = httpx.post(server.infer_url, json=body, timeout=60)
    assert reply.status_code == status, reply.text
    if message:
        assert message in reply.json()["error"]


# ---- the OpenAI route: vLLM's sampling extras and strict types -----------------------------


def test_ignore_eos_and_min_tokens_are_accepted_with_the_openai_sdk(
    chat: openai.OpenAI, server: LiveServer
) -> None:
    """The SDK's `extra_body` reaches the engine (tests/test_decoding.py shows the stop
    tokens masked; the random model here rarely ends its turn on its own)."""
    reply = chat.chat.completions.create(
        model="qwen-vl", messages=[user_turn()], max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (12, "length")
    stream = chat.chat.completions.create(
        model="qwen-vl",
        messages=[user_turn()],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"min_tokens": 12, "top_k": 5, "repetition_penalty": 1.1},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage]
    assert usage[-1].completion_tokens == 12
    body = infer_body(JPEG, 12)
    body["parameters"].update(ignore_eos=True, min_new_tokens=12)  # the v2 names
    outputs = httpx.post(server.infer_url, json=body, timeout=60).json()["outputs"]
    assert {o["name"]: o["data"] for o in outputs}["generated_tokens"] == [12]


def test_top_k_and_repetition_penalty_are_applied(chat: openai.OpenAI) -> None:
    def text(**extra: object) -> str:
        reply = chat.chat.completions.create(
            model="qwen-vl", messages=[user_turn()], max_tokens=12, extra_body=extra
        )
        return reply.choices[0].message.content

    assert text(top_k=1, seed=3) == text()  # top_k 1 is greedy whatever the temperature
    assert text(repetition_penalty=5.0) != text()


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("max_tokens", "4", "max_tokens"),
        ("max_tokens", True, "max_tokens"),
        ("max_tokens", 4.0, "max_tokens"),
        ("stream", "yes", "stream"),
        ("stream", 1, "stream"),
        ("temperature", "0.5", "temperature"),
        ("temperature", False, "temperature"),
        ("top_k", -2, "top_k"),  # -1 and 0 are vLLM's "off"
        ("top_k", 2.5, "top_k"),
        ("repetition_penalty", 0, "repetition_penalty"),
        ("min_tokens", 9, "min_tokens"),  # more than max_tokens 8
        ("ignore_eos", "true", "ignore_eos"),
        ("seed", "7", "seed"),
    ],
)
def test_openai_route_refuses_loose_types_and_ranges(
    server: LiveServer, field: str, value: object, named: str
) -> None:
    body = {"model": "qwen-vl", "messages": [user_turn()], "max_tokens": 8, field: value}
    reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == named and error["message"].startswith(f"{named}: ")


# ---- the OpenAPI document ------------------------------------------------------------------

NO_BODY = {  # KServe's model repository extension: a model name in the path, no body
    "/v2/repository/models/{model_name}/load",
    "/v2/repository/models/{model_name}/unload",
}


def refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from refs(item)


def test_openapi_document_describes_every_route(server: LiveServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    paths = document["paths"]
    posts = [path for path, operations in paths.items() if "post" in operations]
    assert [p for p in posts if "requestBody" not in paths[p]["post"] and p not in NO_BODY] == []
    schemas = document["components"]["schemas"]
    assert {r.rsplit("/", 1)[-1] for r in refs(document)} <= set(schemas)
    infer = paths["/v2/models/{model_name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    assert {"200", "400", "404", "503", "504"} <= set(infer["responses"])
    for prefix in ("/v1", "/openai/v1"):
        chat = paths[f"{prefix}/chat/completions"]["post"]
        body = chat["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
        assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "ignore_eos" in schemas["ChatCompletionRequest"]["properties"]
    assert "404" in paths["/v2/models/{model_name}/config"]["get"]["responses"]
    assert httpx.get(f"{server.url}/docs").status_code == 200


def test_real_answers_match_the_documented_models(server: LiveServer) -> None:
    v2 = httpx.post(server.infer_url, json=infer_body(JPEG, 3), timeout=60)
    InferResponseBody.model_validate(v2.json())
    bad = httpx.post(server.infer_url, json={"inputs": []}, timeout=60)
    assert bad.status_code == 400
    V2Error.model_validate(bad.json())
    TritonModelConfig.model_validate(httpx.get(f"{server.url}/v2/models/qwen-vl/config").json())
    ModelList.model_validate(httpx.get(f"{server.url}/v1/models").json())
    body = {"model": "qwen-vl", "messages": [user_turn()], "max_tokens": 3}
    chat = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    ChatCompletion.model_validate(chat.json())
    refused = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "n": 2}, timeout=60)
    assert refused.status_code == 400
    ErrorResponse.model_validate(refused.json())
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=streamed, timeout=60
    ) as reply:
        events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(event) for event in events[:-1]]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
