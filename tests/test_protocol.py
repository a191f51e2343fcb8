"""The OIP v2 contract: request parsing, parameters, REST bodies and responses, with no model."""

from __future__ import annotations

import base64
import struct

import orjson
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferInput, InferRequest

from predictor.errors import InvalidRequest
from predictor.params import PixelBudget, RequestLimits
from predictor.protocol import (
    Completion,
    build_infer_response,
    decode_base64,
    deserialize_bytes,
    parse_infer_request,
    read_parameters,
)
from predictor.server.rest import parse_rest_request
from tests import images

LIMITS = RequestLimits(
    max_new_tokens=32,
    max_new_tokens_limit=64,
    default_budget=PixelBudget(4096, 65_536),
    max_pixels_limit=262_144,
    max_images_per_request=4,
)
JPEG = images.jpeg()
B64 = base64.b64encode(JPEG).decode()


def serialize(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def request(*inputs: InferInput, parameters: dict | None = None, id: str | None = None):
    return InferRequest("qwen-vl", list(inputs), request_id=id, parameters=parameters)


def image_input(data: list, shape: list[int] | None = None, datatype: str = "BYTES"):
    return InferInput("image", shape if shape is not None else [len(data)], datatype, data)


def parse(req: InferRequest):
    return parse_infer_request(req, LIMITS, "Describe this image.")


def test_images_with_default_prompt_and_defaults() -> None:
    parsed = parse(request(image_input([B64, f"data:image/jpeg;base64,{B64}"]), id="r1"))
    assert parsed.images == [JPEG, JPEG]
    assert parsed.prompts == ["Describe this image."] * 2
    assert parsed.request_id == "r1"
    assert parsed.sampling.max_new_tokens == 32 and parsed.sampling.greedy
    assert parsed.budget == LIMITS.default_budget


def test_missing_id_gets_one() -> None:
    assert parse(request(image_input([B64]))).request_id


def test_raw_bytes_elements_are_images() -> None:
    assert parse(request(image_input([JPEG]))).images == [JPEG]


def test_one_prompt_is_broadcast_and_n_prompts_pair_up() -> None:
    one = InferInput("prompt", [1], "BYTES", ["What colour?"])
    assert parse(request(image_input([B64] * 3), one)).prompts == ["What colour?"] * 3
    many = InferInput("prompt", [2], "BYTES", [b"first", "second"])
    assert parse(request(image_input([B64] * 2), many)).prompts == ["first", "second"]


def test_parameters_are_parsed() -> None:
    params = {
        "max_new_tokens": 5,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "repetition_penalty": 1.1,
        "seed": 7,
        "min_pixels": 1024,
        "max_pixels": 100_000,
        "binary_data_output": True,
    }
    parsed = parse(request(image_input([B64]), parameters=params))
    s = parsed.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k) == (5, 0.7, 0.9, 20)
    assert (s.repetition_penalty, s.seed, s.greedy) == (1.1, 7, False)
    assert parsed.budget == PixelBudget(1024, 100_000)


BAD_REQUESTS = {
    "no-image": (lambda: request(InferInput("prompt", [1], "BYTES", ["hi"])), "image"),
    "unknown-input": (
        lambda: request(image_input([B64]), InferInput("x", [1], "BYTES", ["a"])),
        "inputs.x",
    ),
    "duplicate-input": (lambda: request(image_input([B64]), image_input([B64])), "inputs.image"),
    "wrong-datatype": (lambda: request(image_input([1.0], datatype="FP32")), "image"),
    "wrong-shape": (lambda: request(image_input([B64, B64], shape=[3])), "image"),
    "two-dims": (lambda: request(image_input([B64], shape=[1, 1])), "image"),
    "empty": (lambda: request(image_input([], shape=[0])), "image"),
    "too-many-images": (lambda: request(image_input([B64] * 5)), "image"),
    "bad-base64": (lambda: request(image_input([B64, "%%%"])), "image[1]"),
    "number-element": (lambda: request(image_input([12])), "image[0]"),
    "prompt-count": (
        lambda: request(image_input([B64] * 3), InferInput("prompt", [2], "BYTES", ["a", "b"])),
        "prompt",
    ),
    "prompt-datatype": (
        lambda: request(image_input([B64]), InferInput("prompt", [1], "INT32", [1])),
        "prompt",
    ),
    "prompt-utf8": (
        lambda: request(image_input([B64]), InferInput("prompt", [1], "BYTES", [b"\xff\xfe"])),
        "prompt[0]",
    ),
    "unknown-parameter": (
        lambda: request(image_input([B64]), parameters={"beam": 2}),
        "parameters.beam",
    ),
    "max-new-tokens-type": (
        lambda: request(image_input([B64]), parameters={"max_new_tokens": "5"}),
        "max_new_tokens",
    ),
    "max-new-tokens-float": (
        lambda: request(image_input([B64]), parameters={"max_new_tokens": 5.0}),
        "max_new_tokens",
    ),
    "max-new-tokens-limit": (
        lambda: request(image_input([B64]), parameters={"max_new_tokens": 65}),
        "max_new_tokens",
    ),
    "max-new-tokens-zero": (
        lambda: request(image_input([B64]), parameters={"max_new_tokens": 0}),
        "max_new_tokens",
    ),
    "temperature-range": (
        lambda: request(image_input([B64]), parameters={"temperature": -1}),
        "temperature",
    ),
    "temperature-bool": (
        lambda: request(image_input([B64]), parameters={"temperature": True}),
        "temperature",
    ),
    "top-p-zero": (lambda: request(image_input([B64]), parameters={"top_p": 0}), "top_p"),
    "top-k-negative": (lambda: request(image_input([B64]), parameters={"top_k": -1}), "top_k"),
    "penalty-zero": (
        lambda: request(image_input([B64]), parameters={"repetition_penalty": 0}),
        "repetition_penalty",
    ),
    "seed-negative": (lambda: request(image_input([B64]), parameters={"seed": -3}), "seed"),
    "max-pixels-limit": (
        lambda: request(image_input([B64]), parameters={"max_pixels": 10**9}),
        "max_pixels",
    ),
    "min-over-max": (
        lambda: request(image_input([B64]), parameters={"min_pixels": 9000, "max_pixels": 5000}),
        "min_pixels",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_name_the_field(case: str) -> None:
    build, field = BAD_REQUESTS[case]
    with pytest.raises(InvalidRequest) as error:
        parse(build())
    assert error.value.field == field, str(error.value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (B64[:-1], "padding"),  # a character short
        (B64 + "QQ==QQ==", "Excess data after padding"),
        ("=" + B64, "Leading padding"),
        (B64[:40] + "\n" + B64[40:], "Only base64 data"),  # a line break inside
        (B64[:40] + "é" + B64[41:], "ASCII"),
    ],
)
def test_bad_base64_says_what_is_wrong(text: str, reason: str) -> None:
    """pybase64 decodes; its one error text is replaced by binascii's precise one."""
    with pytest.raises(InvalidRequest) as error:
        decode_base64(text, "image[0]")
    assert error.value.field == "image[0]"
    assert reason.lower() in str(error.value).lower(), str(error.value)


def test_base64_with_surrounding_space_and_data_urls_decodes() -> None:
    for text in (B64, f" {B64}\n", f"data:image/jpeg;base64,{B64}", f"DATA:image/png;base64,{B64}"):
        assert decode_base64(text, "image") == JPEG


def test_grpc_parameters_including_triton_double_and_uint64() -> None:
    grpc_request = pb.ModelInferRequest(model_name="qwen-vl")
    grpc_request.parameters["seed"].int64_param = 11
    grpc_request.parameters["note"].string_param = "x"
    # KServe's proto has no double_param (4) or uint64_param (5): build them as a client would.
    grpc_request.parameters["temperature"].MergeFromString(b"\x21" + struct.pack("<d", 0.5))
    grpc_request.parameters["top_k"].MergeFromString(b"\x28\x96\x01")
    assert read_parameters(grpc_request.parameters) == {
        "seed": 11,
        "note": "x",
        "temperature": 0.5,
        "top_k": 150,
    }


def test_grpc_raw_input_contents_are_deserialized() -> None:
    grpc_request = pb.ModelInferRequest(
        model_name="qwen-vl",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[2])],
        raw_input_contents=[serialize([JPEG, JPEG])],
    )
    assert parse(InferRequest.from_grpc(grpc_request)).images == [JPEG, JPEG]


@pytest.mark.parametrize(
    "raw", [b"\x05\x00", struct.pack("<I", 100) + b"short"], ids=["cut-length", "past-end"]
)
def test_malformed_binary_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequest, match=r"^image: "):
        deserialize_bytes(raw, "image")


def rest_binary_body(elements: list[bytes], **extra) -> tuple[bytes, str]:
    raw = serialize(elements)
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(elements)],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        **extra,
    }
    json_part = orjson.dumps(header)
    return json_part + raw, str(len(json_part))


def test_rest_binary_extension_keeps_raw_image_bytes() -> None:
    body, length = rest_binary_body([JPEG, JPEG], parameters={"max_new_tokens": 3})
    parsed_rest = parse_rest_request(body, length, "qwen-vl")
    assert parsed_rest.id is None
    parsed = parse(parsed_rest)
    assert parsed.images == [JPEG, JPEG]
    assert parsed.sampling.max_new_tokens == 3


def test_rest_json_body() -> None:
    body = orjson.dumps(
        {"id": "a", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]}
    )
    assert parse(parse_rest_request(body, None, "qwen-vl")).images == [JPEG]


@pytest.mark.parametrize(
    ("body", "header", "field"),
    [
        (b"{", None, "request body"),
        (b"[]", None, "request body"),
        (b'{"inputs": 3}', None, "inputs"),
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": "1", "data": []}]}',
            None,
            "inputs.image.shape",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}',
            None,
            "inputs.image",
        ),
        (b'{"id": 5, "inputs": []}', None, "id"),
        (b'{"inputs": []}', "abc", "Inference-Header-Content-Length"),
        (b'{"inputs": []}', "9999", "Inference-Header-Content-Length"),
    ],
)
def test_bad_rest_bodies_name_the_field(body: bytes, header: str | None, field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        parse_rest_request(body, header, "qwen-vl")
    assert error.value.field == field


def test_rest_binary_size_past_the_end_and_leftover_bytes() -> None:
    body, length = rest_binary_body([JPEG])
    with pytest.raises(InvalidRequest, match="runs past the end"):
        parse_rest_request(body[:-10], length, "qwen-vl")
    with pytest.raises(InvalidRequest, match="belong to no input"):
        parse_rest_request(body + b"extra", length, "qwen-vl")


def test_response_has_three_outputs_in_order() -> None:
    req = request(image_input([B64, B64]))
    completions = [Completion("a red square", "stop", 4), Completion("blue", "length", 8)]
    response = build_infer_response(req, "rid", "qwen-vl", completions, {"generate_ms": 5})
    rest, _ = response.to_rest()
    outputs = {o["name"]: o for o in rest["outputs"]}
    assert rest["id"] == "rid"
    assert outputs["text"]["data"] == ["a red square", "blue"]
    assert outputs["finish_reason"]["data"] == ["stop", "length"]
    assert outputs["generated_tokens"] == {
        "name": "generated_tokens",
        "shape": [2],
        "datatype": "INT32",
        "data": [4, 8],
    }
    assert rest["parameters"] == {"generate_ms": 5}


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("temperature", "0.5", 0.5),
        ("top_p", ".9", 0.9),
        ("repetition_penalty", "1e0", 1.0),
        ("max_new_tokens", "4", 4),
        ("seed", "+7", 7),
        ("temperature", "0.5 ", "0.5 "),  # not exactly a number: stays text, refused as text
        ("temperature", "nan", "nan"),
        ("temperature", "inf", "inf"),
        ("max_new_tokens", "4.0", "4.0"),
        ("max_new_tokens", "0x10", "0x10"),
        ("ignore_eos", "true", "true"),  # only numeric parameters are read from text
    ],
)
def test_grpc_strings_become_the_number_they_spell_exactly(
    name: str, text: str, value: object
) -> None:
    assert read_parameters({name: pb.InferParameter(string_param=text)}) == {name: value}


def test_a_string_number_over_rest_stays_refused() -> None:
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]}
    body["parameters"] = {"temperature": "0.5"}
    with pytest.raises(InvalidRequest, match=r"temperature: must be a number, got str '0.5'"):
        parse(parse_rest_request(orjson.dumps(body), None, "qwen-vl"))


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"triton_enable_empty_final_response": 1}, "must be true or false"),
        ({"binary_data_output": "yes"}, "must be true or false"),
        ({"priority": True}, "must be a non-negative integer"),
        ({"timeout": -1}, "must be a non-negative integer"),
        ({"sequence_start": True}, "not a sequence model"),
        ({"min_new_tokens": 40}, "must not exceed max_new_tokens (32)"),
        ({"ignore_eos": 1}, "ignore_eos: must be true or false"),
    ],
)
def test_client_and_length_parameters_are_checked(parameters: dict, message: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        parse(request(image_input([B64]), parameters=parameters))
    assert message in str(error.value)


def test_ignore_eos_and_triton_parameters_are_accepted() -> None:
    parameters = {
        "ignore_eos": True,
        "max_new_tokens": 12,
        "triton_enable_empty_final_response": True,
        "binary_data_output": False,
        "priority": 2,
        "timeout": 5_000_000,
    }
    sampling = parse(request(image_input([B64]), parameters=parameters)).sampling
    assert (sampling.max_new_tokens, sampling.min_new_tokens) == (12, 12)
    minimum = parse(request(image_input([B64]), parameters={"min_new_tokens": 5})).sampling
    assert (minimum.max_new_tokens, minimum.min_new_tokens) == (32, 5)
