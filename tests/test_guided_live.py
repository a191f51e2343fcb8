"""Guided decoding through the real server, in both process layouts: the OpenAI SDK with a
Pydantic model's schema (`response_format`) and vLLM's `structured_outputs`, streamed or not;
OIP v2 over REST and gRPC with TensorRT-LLM's names (parameters or inputs); 16 requests at
once mixing guided and free ones; and bad guides refused with 400 / INVALID_ARGUMENT naming
the field, logged as one line.

The tiny model has random weights: its free text never parses, so every valid output here is
the grammar's doing."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import grpc
import httpx
import jsonschema
import openai
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from pydantic import BaseModel, Field

from tests import images
from tests.live_server import LiveServer, infer_body, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {
    "engine-process": ("--engine_process", "true"),
    "in-process": ("--engine_process", "false"),
}
COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (128, 128, 128), (250, 200, 0)]
PICTURES = [images.jpeg(color=color) for color in COLORS]
REGEX = r"(a|the) (red|green|blue) [a-z]{2,8}"
CHOICES = ["indoor", "outdoor", "under water"]


class Caption(BaseModel):
    caption: str = Field(max_length=40)
    tags: list[Annotated[str, Field(max_length=12)]] = Field(max_length=3)
    count: int = Field(ge=0, le=99)
    people: bool


SCHEMA = Caption.model_json_schema()


@pytest.fixture(scope="module", params=list(LAYOUTS))
def server(
    request: pytest.FixtureRequest, tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("guided") / "server.log"
    args = (
        *LAYOUTS[request.param],
        "--generation_config", "none",  # greedy unless a request says otherwise
        "--guide_compile_timeout_s", "0.5",
        "--max_guide_bytes", "20000",
    )  # fmt: skip
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def messages(picture: bytes = PICTURES[0]) -> list[dict]:
    url = "data:image/jpeg;base64," + base64.b64encode(picture).decode()
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi."}]
    return [{"role": "user", "content": parts}]


def v2_body(picture: bytes, guide_type: str | None, guide: str | None, **extra) -> dict:
    body = infer_body(picture, 64)
    if guide_type is not None:
        body["parameters"]["guided_decoding_guide_type"] = guide_type
    if guide is not None:
        body["parameters"]["guided_decoding_guide"] = guide
    body["parameters"].update(extra)
    return body


def outputs(reply: httpx.Response) -> dict:
    assert reply.status_code == 200, reply.text
    return {o["name"]: o["data"][0] for o in reply.json()["outputs"]}


def valid(kind: str, text: str, finish_reason: str) -> bool:
    """Whether it stopped; if it did, it matches its guide (assertions)."""
    if finish_reason != "stop":
        return False
    if kind == "schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    return True


# ---- OpenAI ---------------------------------------------------------------------------


def test_openai_sdk_parses_a_pydantic_model(client: openai.OpenAI) -> None:
    stopped = 0
    for picture in PICTURES[:3]:
        reply = client.chat.completions.create(
            model="qwen-vl",
            messages=messages(picture),
            max_tokens=128,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "Caption", "schema": SCHEMA, "strict": True},
            },
        )
        choice = reply.choices[0]
        if valid("schema", choice.message.content, choice.finish_reason):
            stopped += 1
            Caption.model_validate_json(choice.message.content)
    assert stopped >= 2
    parsed = client.chat.completions.parse(  # the SDK's own helper: its strict schema
        model="qwen-vl", messages=messages(PICTURES[1]), max_tokens=128, response_format=Caption
    )
    assert isinstance(parsed.choices[0].message.parsed, Caption)


def test_structured_outputs_stream_as_they_answer(client: openai.OpenAI) -> None:
    for guide, kind in (({"choice": CHOICES}, "choice"), ({"regex": REGEX}, "regex")):
        body = {"structured_outputs": guide}
        plain = client.chat.completions.create(
            model="qwen-vl", messages=messages(), max_tokens=32, extra_body=body
        )
        assert valid(kind, plain.choices[0].message.content, plain.choices[0].finish_reason)
        chunks = list(
            client.chat.completions.create(
                model="qwen-vl", messages=messages(), max_tokens=32, extra_body=body, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == plain.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"
    reply = client.chat.completions.create(
        model="qwen-vl",
        messages=messages(),
        max_tokens=48,
        response_format={"type": "json_object"},
    )
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


# ---- OIP v2 ---------------------------------------------------------------------------


def test_v2_rest_parameters_and_inputs(server: LiveServer) -> None:
    schema = outputs(
        httpx.post(
            server.infer_url,
            json=v2_body(PICTURES[2], "json_schema", json.dumps(SCHEMA)),
            timeout=60,
        )
    )
    assert schema["text"].startswith("{")
    valid("schema", schema["text"], schema["finish_reason"])
    body = infer_body(PICTURES[0], 32)  # TensorRT-LLM's form: BYTES [1] inputs
    body["inputs"] += [
        {
            "name": "guided_decoding_guide_type",
            "datatype": "BYTES",
            "shape": [1],
            "data": ["regex"],
        },
        {"name": "guided_decoding_guide", "datatype": "BYTES", "shape": [1], "data": [REGEX]},
    ]
    regex = outputs(httpx.post(server.infer_url, json=body, timeout=60))
    assert valid("regex", regex["text"], regex["finish_reason"])
    grammar = 'root ::= "yes" | "no"'
    ebnf = outputs(
        httpx.post(server.infer_url, json=v2_body(PICTURES[1], "ebnf_grammar", grammar), timeout=60)
    )
    assert ebnf["text"] in ("yes", "no") and ebnf["finish_reason"] == "stop"
    anything = outputs(
        httpx.post(server.infer_url, json=v2_body(PICTURES[1], "json", None), timeout=60)
    )
    if anything["finish_reason"] == "stop":
        assert isinstance(json.loads(anything["text"]), dict | list)


def test_v2_grpc_tritonclient_inputs_and_kserve_parameters(
    server: LiveServer, tmp_path: Path
) -> None:
    path = tmp_path / "picture.jpg"
    path.write_bytes(PICTURES[0])
    inputs = {"guided_decoding_guide_type": "regex", "guided_decoding_guide": REGEX}
    command = [
        sys.executable, "-m", "tests.clients.triton_grpc_calls", server.grpc_target, "qwen-vl",
        "infer", str(path), json.dumps({"max_new_tokens": 32}), json.dumps(inputs),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert valid("regex", result["text"][0], result["finish_reason"][0])
    # KServe's stubs: the guide as string parameters.
    with grpc.insecure_channel(server.grpc_target) as channel:
        request = grpc_request(PICTURES[1], "ebnf_grammar", choice_ebnf())
        reply = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    text = reply.outputs[0].contents.bytes_contents[0].decode()
    assert text in CHOICES


def choice_ebnf() -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in CHOICES)


def grpc_request(picture: bytes, guide_type: str | None, guide: str | None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="qwen-vl")
    tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(picture)
    request.parameters["max_new_tokens"].int64_param = 32
    if guide_type is not None:
        request.parameters["guided_decoding_guide_type"].string_param = guide_type
    if guide is not None:
        request.parameters["guided_decoding_guide"].string_param = guide
    return request


def test_sixteen_requests_at_once_mixed_with_free_ones(
    server: LiveServer, client: openai.OpenAI
) -> None:
    results: list[tuple[str, str, str]] = []
    lock = threading.Lock()

    def one(index: int) -> None:
        picture = PICTURES[index % len(PICTURES)]
        sampled = {"temperature": 1.0, "seed": index} if index % 2 else {}
        kind = ["schema", "regex", "choice", "free"][index % 4]
        if index % 8 < 4:  # v2
            guide = {"schema": ("json_schema", json.dumps(SCHEMA)), "regex": ("regex", REGEX)}
            guide["choice"] = ("ebnf_grammar", choice_ebnf())
            guide_type, text = guide.get(kind, (None, None))
            got = outputs(
                httpx.post(
                    server.infer_url,
                    json=v2_body(picture, guide_type, text, **sampled),
                    timeout=120,
                )
            )
            answer = (kind, got["text"], got["finish_reason"])
        else:  # OpenAI
            body = {
                "schema": {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "c", "schema": SCHEMA},
                    }
                },
                "regex": {"structured_outputs": {"regex": REGEX}},
                "choice": {"structured_outputs": {"choice": CHOICES}},
                "free": {},
            }[kind]
            reply = client.chat.completions.create(
                model="qwen-vl",
                messages=messages(picture),
                max_tokens=64,
                extra_body=body,
                **sampled,
            )
            answer = (kind, reply.choices[0].message.content, reply.choices[0].finish_reason)
        with lock:
            results.append(answer)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16
    stopped = sum(valid(kind, text, finish) for kind, text, finish in results if kind != "free")
    assert stopped >= 8


# ---- bad guides -----------------------------------------------------------------------

BAD_V2 = [
    ({"guided_decoding_guide": REGEX}, "guided_decoding_guide_type"),  # a guide without a type
    (
        {"guided_decoding_guide_type": "xml", "guided_decoding_guide": "x"},
        "guided_decoding_guide_type",
    ),
    (
        {"guided_decoding_guide_type": "regex", "guided_decoding_guide": "(ab"},
        "guided_decoding_guide",
    ),
    (
        {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": "{bad"},
        "guided_decoding_guide",
    ),
    (
        {"guided_decoding_guide_type": "json_schema", "guided_decoding_guide": '{"not": {}}'},
        "guided_decoding_guide",
    ),
    (
        {"guided_decoding_guide_type": "ebnf_grammar", "guided_decoding_guide": "root ::= x"},
        "guided_decoding_guide",
    ),
    (
        {"guided_decoding_guide_type": "regex", "guided_decoding_guide": "a" * 20001},
        "guided_decoding_guide",
    ),
    (
        {"guided_decoding_guide_type": "regex", "guided_decoding_guide": "a+", "ignore_eos": True},
        "ignore_eos",
    ),
]


@pytest.mark.parametrize(("parameters", "field"), BAD_V2)
def test_a_bad_v2_guide_is_a_400_naming_the_field(
    server: LiveServer, parameters: dict, field: str
) -> None:
    body = infer_body(PICTURES[0], 8)
    body["parameters"].update(parameters)
    reply = httpx.post(server.infer_url, json=body, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"].startswith(f"{field}: ")


def test_a_bad_grpc_guide_is_invalid_argument(server: LiveServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(grpc_request(PICTURES[0], "regex", "[z-a]"), timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("guided_decoding_guide: is not a valid regex")


BAD_OPENAI = [
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    (
        {"structured_outputs": {"json": {"type": "object", "uniqueItems": True}}},
        "structured_outputs.json",
    ),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "c"}}},
        "response_format.json_schema.schema",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": {"type": "foo"}},
            }
        },
        "response_format.json_schema.schema",
    ),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    (
        {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
        "structured_outputs",
    ),
    ({"response_format": {"type": "json_object"}, "min_tokens": 4}, "min_tokens"),
    ({"structured_outputs": {"regex": ".{1,160}"}}, "structured_outputs.regex"),  # 3 s to compile
]


@pytest.mark.parametrize(("extra", "field"), BAD_OPENAI)
def test_a_bad_openai_guide_is_a_400_naming_the_field(
    client: openai.OpenAI, extra: dict, field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="qwen-vl", messages=messages(), max_tokens=8, extra_body=extra
        )
    assert refused.value.body["param"] == field, refused.value.body


def test_bad_guides_are_logged_as_one_line(server: LiveServer) -> None:
    log = server.log()
    assert "guided_decoding_guide: is not a valid regex" in log
    assert "Traceback" not in log
