"""The Open Inference Protocol v2 contract of the predictor: tensors in, tensors out.

Inputs: `image` (BYTES [N], one encoded image per element) and optional `prompt` (BYTES [N] or
[1], broadcast); optional `guided_decoding_guide_type` and `guided_decoding_guide` (BYTES [1],
for every image: TensorRT-LLM's Triton inputs, also accepted as request parameters). Request
parameters: see `predictor.params`. Outputs: `text` (BYTES [N]),
`finish_reason` (BYTES [N]) and `generated_tokens` (INT32 [N]).

This module only translates: a KServe `InferRequest` (built from REST JSON, REST binary or gRPC)
becomes a `ParsedRequest`; a list of `Completion`s becomes an `InferResponse`. It never sees the
model, so the whole contract is tested without one.
"""

from __future__ import annotations

import binascii
import re
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pybase64
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from predictor.errors import InvalidRequest
from predictor.params import (
    GENERATION_PARAMETERS,
    GUIDE_PARAMETER,
    GUIDE_TYPE_PARAMETER,
    PixelBudget,
    RequestLimits,
    SamplingParams,
    number_from_text,
    parse_generation_params,
)

IMAGE_INPUT = "image"
PROMPT_INPUT = "prompt"
TEXT_OUTPUT = "text"
FINISH_REASON_OUTPUT = "finish_reason"
TOKENS_OUTPUT = "generated_tokens"
MAX_PROMPT_CHARS = 16_384
# Parameters that Triton's clients add on their own, accepted beside the generation ones. Each
# is checked for its type; none changes the answer of this (non-decoupled) model:
# - binary_data_output (tritonclient.http, no outputs named): binary outputs, which KServe honours;
# - triton_enable_empty_final_response (tritonclient.grpc streaming, perf_analyzer over gRPC):
#   an empty last response for decoupled models; this model sends one response per request;
# - priority (tritonclient infer(priority=N)): Triton ignores it without priority levels, so do we;
# - timeout (tritonclient infer(timeout=µs)): a queue time-out Triton applies only when the model's
#   config enables one; here --request_timeout_s bounds every request.
# sequence_id/sequence_start/sequence_end are refused: this is not a sequence model.
CLIENT_PARAMETERS = {
    "binary_data_output": bool,
    "triton_enable_empty_final_response": bool,
    "priority": int,
    "timeout": int,
}
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")

GUIDE_INPUTS = (GUIDE_TYPE_PARAMETER, GUIDE_PARAMETER)
# Every input is required but these (Triton's model config says so; v2 metadata has no field).
OPTIONAL_INPUTS = frozenset({PROMPT_INPUT, *GUIDE_INPUTS})
INPUT_METADATA = [
    {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
    {"name": PROMPT_INPUT, "datatype": "BYTES", "shape": [-1]},
    {"name": GUIDE_TYPE_PARAMETER, "datatype": "BYTES", "shape": [1]},
    {"name": GUIDE_PARAMETER, "datatype": "BYTES", "shape": [1]},
]
OUTPUT_METADATA = [
    {"name": TEXT_OUTPUT, "datatype": "BYTES", "shape": [-1]},
    {"name": FINISH_REASON_OUTPUT, "datatype": "BYTES", "shape": [-1]},
    {"name": TOKENS_OUTPUT, "datatype": "INT32", "shape": [-1]},
]
_DATA_URL = re.compile(r"^data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)


def decode_base64(text: str, field: str) -> bytes:
    """Strict base64 (or a base64 data URL) to bytes; anything else is the client's error.

    Why pybase64: its SIMD decoder checks the alphabet and the padding as it decodes, 0.006
    ms for a 100 KB image against 0.31 ms for binascii's strict mode (and more for
    `b64decode(validate=True)`, which runs a regular expression over the text first): the
    largest single step of a request on the event loop. On an error, binascii's strict mode
    decodes the text again only to say what is wrong with it."""
    payload = text
    if text[:1].isspace() or text[-1:].isspace():
        payload = text.strip()
    if payload[:5].lower() == "data:":
        payload = _DATA_URL.sub("", payload, count=1)
        if payload.startswith("data:"):
            raise InvalidRequest(field, "only base64 image data URLs are accepted")
    try:
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(field, f"is not valid base64 ({_base64_error(payload)})") from None


def _base64_error(payload: str) -> str:
    """What binascii's strict mode says is wrong with `payload` (more precise than pybase64's
    "Non-base64 digit found" for bad padding or trailing data)."""
    try:
        binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        return str(exc)
    return "Non-base64 digit found"


@dataclass(frozen=True)
class Completion:
    """One generated description and how it ended."""

    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    generated_tokens: int
    prompt_tokens: int = 0


@dataclass(frozen=True)
class ParsedRequest:
    """A valid OIP v2 request, images still encoded."""

    request_id: str
    images: list[bytes]
    prompts: list[str]
    sampling: SamplingParams
    budget: PixelBudget


def read_parameters(parameters: Any) -> dict[str, Any]:
    """Request parameters as plain Python values, from a REST dict or gRPC `InferParameter`s.

    A gRPC `string_param` that spells a number exactly becomes that number for the numeric
    parameters (`params.number_from_text`): KServe's proto can carry a fraction no other way.
    """
    if not parameters:
        return {}
    values: dict[str, Any] = {}
    for key, value in parameters.items():
        if hasattr(value, "WhichOneof"):
            choice = value.WhichOneof("parameter_choice")
            values[key] = getattr(value, choice) if choice else _triton_only_param(value)
            if choice == "string_param":
                values[key] = number_from_text(key, values[key])
        else:
            values[key] = value
    return values


def _check_client_parameters(params: Mapping[str, Any]) -> None:
    """Refuse unknown parameters by name; type-check the ones Triton's clients add."""
    for name in sorted(params):
        if name in GENERATION_PARAMETERS:
            continue
        value = params[name]
        kind = CLIENT_PARAMETERS.get(name)
        if kind is None:
            why = (
                "sequence parameters are not supported: this is not a sequence model"
                if name in SEQUENCE_PARAMETERS
                else f"unknown parameter; accepted: {', '.join(GENERATION_PARAMETERS)}"
            )
            raise InvalidRequest(f"parameters.{name}", why)
        if kind is bool and not isinstance(value, bool):
            raise InvalidRequest(f"parameters.{name}", f"must be true or false, got {value!r}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InvalidRequest(
                f"parameters.{name}", f"must be a non-negative integer, got {value!r}"
            )


def _triton_only_param(message: Any) -> float | int | None:
    """Read `double_param` (field 4) or `uint64_param` (field 5) of an `InferParameter`.

    Triton's protocol has them and gRPC clients send temperature as a double, but KServe's copy
    of the proto lacks both, so protobuf keeps them as unknown fields. They are read back from
    the wire form here rather than silently dropped.
    """
    raw = message.SerializeToString()
    offset = 0
    while offset < len(raw):
        key, offset = _varint(raw, offset)
        field, wire_type = key >> 3, key & 7
        if field == 4 and wire_type == 1 and offset + 8 <= len(raw):
            return struct.unpack_from("<d", raw, offset)[0]
        if field == 5 and wire_type == 0:
            return _varint(raw, offset)[0]
        break
    return None


def _varint(raw: bytes, offset: int) -> tuple[int, int]:
    result = shift = 0
    while offset < len(raw):
        byte = raw[offset]
        offset += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    return result, offset


def deserialize_bytes(raw: bytes, field: str) -> list[bytes]:
    """Split a BYTES tensor in the binary layout (4-byte little-endian length, then the bytes)."""
    elements: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest(field, "binary BYTES data ends inside an element length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise InvalidRequest(
                field, f"binary BYTES element of {length} bytes runs past the end of the data"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list | tuple):
        return [item for element in data for item in _flatten(element)]
    if hasattr(data, "tolist") and not isinstance(data, bytes | str):
        return _flatten(data.tolist())
    return [data]


def tensor_elements(tensor: InferInput, field: str) -> list[Any]:
    """The elements of a tensor, whichever way its data arrived."""
    # gRPC raw_input_contents are kept on the private `_raw_data`; KServe's own deserialiser
    # crashes (500) on malformed lengths, so the predictor reads them itself.
    raw = getattr(tensor, "_raw_data", None)
    if raw is not None and not tensor.data:
        if tensor.datatype != "BYTES":
            raise InvalidRequest(field, f"datatype must be BYTES, got {tensor.datatype}")
        return deserialize_bytes(bytes(raw), field)
    if tensor.data is None:
        raise InvalidRequest(field, "has no data")
    return _flatten(tensor.data)


def _check_bytes_tensor(tensor: InferInput, elements: list[Any], field: str) -> None:
    if tensor.datatype != "BYTES":
        raise InvalidRequest(field, f"datatype must be BYTES, got {tensor.datatype}")
    shape = list(tensor.shape)
    if len(shape) != 1:
        raise InvalidRequest(field, f"shape must be one-dimensional [N], got {shape}")
    if shape[0] != len(elements):
        raise InvalidRequest(
            field, f"shape {shape} does not match the {len(elements)} elements sent"
        )


def _image_bytes(element: Any, field: str) -> bytes:
    if isinstance(element, str):
        return decode_base64(element, field)
    if isinstance(element, bytes | bytearray | memoryview):
        return bytes(element)
    raise InvalidRequest(field, f"must be base64 text or raw bytes, got {type(element).__name__}")


def _text(element: Any, field: str) -> str:
    """A BYTES element as text: UTF-8 bytes or a str, anything else refused naming `field`."""
    if isinstance(element, bytes | bytearray):
        try:
            element = bytes(element).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(field, "is not valid UTF-8") from None
    if not isinstance(element, str):
        raise InvalidRequest(field, f"must be text, got {type(element).__name__}")
    return element


def _prompt_text(element: Any, field: str) -> str:
    element = _text(element, field)
    if len(element) > MAX_PROMPT_CHARS:
        raise InvalidRequest(field, f"is {len(element)} characters, more than {MAX_PROMPT_CHARS}")
    return element


def _inputs_by_name(request: InferRequest) -> dict[str, InferInput]:
    by_name: dict[str, InferInput] = {}
    known = (IMAGE_INPUT, PROMPT_INPUT, *GUIDE_INPUTS)
    for tensor in request.inputs or []:
        if tensor.name not in known:
            raise InvalidRequest(
                f"inputs.{tensor.name}",
                f"unknown input; this model takes {', '.join(repr(k) for k in known)}",
            )
        if tensor.name in by_name:
            raise InvalidRequest(f"inputs.{tensor.name}", "is given more than once")
        by_name[tensor.name] = tensor
    if IMAGE_INPUT not in by_name:
        raise InvalidRequest(IMAGE_INPUT, "input is required (BYTES [N], one image each)")
    return by_name


def _guide_inputs(tensors: Mapping[str, InferInput], params: Mapping[str, Any]) -> dict[str, str]:
    """The guide inputs as the parameters of the same names (one text each, for every image)."""
    values: dict[str, str] = {}
    for name in GUIDE_INPUTS:
        if name not in tensors:
            continue
        if name in params:
            raise InvalidRequest(name, "is given both as an input and as a parameter")
        tensor = tensors[name]
        elements = tensor_elements(tensor, name)
        _check_bytes_tensor(tensor, elements, name)
        if len(elements) != 1:
            raise InvalidRequest(name, f"must hold one element ([1]), got {len(elements)}")
        values[name] = _text(elements[0], name)
    return values


def _check_requested_outputs(request: InferRequest) -> None:
    known = {spec["name"] for spec in OUTPUT_METADATA}
    for output in request.request_outputs or []:
        if output.name not in known:
            raise InvalidRequest(
                f"outputs.{output.name}", f"unknown output; this model gives {sorted(known)}"
            )


def parse_infer_request(
    request: InferRequest, limits: RequestLimits, default_prompt: str
) -> ParsedRequest:
    """Validate an OIP v2 request against the contract and the server's limits."""
    tensors = _inputs_by_name(request)
    image_tensor = tensors[IMAGE_INPUT]
    image_elements = tensor_elements(image_tensor, IMAGE_INPUT)
    _check_bytes_tensor(image_tensor, image_elements, IMAGE_INPUT)
    count = len(image_elements)
    if count == 0:
        raise InvalidRequest(IMAGE_INPUT, "must hold at least one image")
    if count > limits.max_images_per_request:
        raise InvalidRequest(
            IMAGE_INPUT,
            f"holds {count} images, more than the limit of {limits.max_images_per_request}",
        )
    images = [_image_bytes(e, f"{IMAGE_INPUT}[{i}]") for i, e in enumerate(image_elements)]
    prompts = [default_prompt] * count
    if PROMPT_INPUT in tensors:
        prompt_tensor = tensors[PROMPT_INPUT]
        prompt_elements = tensor_elements(prompt_tensor, PROMPT_INPUT)
        _check_bytes_tensor(prompt_tensor, prompt_elements, PROMPT_INPUT)
        if len(prompt_elements) not in (1, count):
            raise InvalidRequest(
                PROMPT_INPUT,
                f"holds {len(prompt_elements)} prompts for {count} images; send 1 or {count}",
            )
        texts = [_prompt_text(e, f"{PROMPT_INPUT}[{i}]") for i, e in enumerate(prompt_elements)]
        prompts = texts * count if len(texts) == 1 else texts
    _check_requested_outputs(request)
    params = read_parameters(request.parameters)
    _check_client_parameters(params)
    params.update(_guide_inputs(tensors, params))
    sampling, budget = parse_generation_params(params, limits)
    return ParsedRequest(
        request_id=request.id or str(uuid.uuid4()),
        images=images,
        prompts=prompts,
        sampling=sampling,
        budget=budget,
    )


def build_infer_response(
    request: InferRequest,
    request_id: str,
    model_name: str,
    completions: Iterable[Completion],
    timings: Mapping[str, int] | None = None,
) -> InferResponse:
    """The OIP v2 response: one `text`, `finish_reason` and `generated_tokens` per image."""
    done = list(completions)
    n = len(done)
    outputs = [
        InferOutput(TEXT_OUTPUT, [n], "BYTES", data=[c.text for c in done]),
        InferOutput(FINISH_REASON_OUTPUT, [n], "BYTES", data=[c.finish_reason for c in done]),
        InferOutput(TOKENS_OUTPUT, [n], "INT32", data=[c.generated_tokens for c in done]),
    ]
    return InferResponse(
        response_id=request_id,
        model_name=model_name,
        infer_outputs=outputs,
        from_grpc=request.from_grpc,
        parameters=dict(timings) if timings else None,
        use_binary_outputs=request.use_binary_outputs,
        requested_outputs=request.request_outputs,
    )
