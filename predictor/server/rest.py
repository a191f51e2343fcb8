"""The REST `infer` route, for JSON bodies and the binary tensor data extension alike.

Why the predictor owns this route: KServe 0.21 decodes binary BYTES inputs as UTF-8 (a 500 for
any JPEG), answers 500 when a request has no `id`, and lets FastAPI answer malformed JSON with
422. `tritonclient.http` sends images in binary by default, so those cases are the normal ones.
This route parses both body forms into KServe's `InferRequest` itself and then hands over to
KServe's data plane, so the model, its metrics and its error handlers stay KServe's.
It is registered on KServe's app before KServe adds its own routes, so it takes precedence.

A client that disconnects has its request cancelled (`cancel_on_disconnect`): uvicorn would
otherwise let the handler run to the end, keeping rows in the engine that nobody will read.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

from predictor.cancellation import cancel_on_disconnect
from predictor.errors import DeadlineExceeded, InvalidRequest, Unavailable
from predictor.protocol import deserialize_bytes
from predictor.server.triton_config import model_config

HEADER_LENGTH = "inference-header-content-length"
T = TypeVar("T")


def _json_object(data: bytes, field: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(field, f"is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidRequest(field, "must be a JSON object")
    return value


def _header_length(value: str | None, body_length: int) -> int | None:
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidRequest("Inference-Header-Content-Length", "must be an integer") from None
    if not 0 < length <= body_length:
        raise InvalidRequest(
            "Inference-Header-Content-Length",
            f"is {length}, outside the body's {body_length} bytes",
        )
    return length


def _shape(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidRequest(f"{field}.shape", "must be a list of non-negative integers")
    return value


def _parameters(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(field, "must be a JSON object")
    return value


class _BinaryTail:
    """The bytes after the JSON header, handed out input by input."""

    def __init__(self, data: bytes):
        self.data = data
        self.offset = 0

    def take(self, size: Any, field: str) -> bytes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidRequest(field, "binary_data_size must be a non-negative integer")
        if self.offset + size > len(self.data):
            raise InvalidRequest(
                field, f"binary_data_size {size} runs past the end of the request body"
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _infer_input(spec: Any, index: int, tail: _BinaryTail) -> InferInput:
    field = f"inputs[{index}]"
    if not isinstance(spec, dict):
        raise InvalidRequest(field, "must be a JSON object")
    name, datatype = spec.get("name"), spec.get("datatype")
    if not isinstance(name, str) or not name:
        raise InvalidRequest(f"{field}.name", "must be a non-empty string")
    field = f"inputs.{name}"
    if not isinstance(datatype, str):
        raise InvalidRequest(f"{field}.datatype", "must be a string")
    shape = _shape(spec.get("shape"), field)
    parameters = _parameters(spec.get("parameters"), f"{field}.parameters")
    tensor = InferInput(name=name, shape=shape, datatype=datatype, parameters=parameters)
    if "data" in spec:
        tensor.data = spec["data"]
    elif "binary_data_size" in parameters:
        chunk = tail.take(parameters["binary_data_size"], field)
        if datatype == "BYTES":
            tensor.data = deserialize_bytes(chunk, field)
        else:
            tensor._raw_data = chunk  # refused later by the contract, with the datatype named
    else:
        raise InvalidRequest(field, "has neither 'data' nor a 'binary_data_size' parameter")
    return tensor


def parse_rest_request(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """An OIP v2 REST body (JSON, or JSON header plus binary tensors) as an `InferRequest`."""
    json_length = _header_length(header_length, len(body))
    header = body if json_length is None else body[:json_length]
    tail = _BinaryTail(b"" if json_length is None else body[json_length:])
    document = _json_object(header, "request body")
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequest("id", "must be a string")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequest("inputs", "must be a non-empty list of tensors")
    tensors = [_infer_input(spec, i, tail) for i, spec in enumerate(inputs)]
    if tail.offset != len(tail.data):
        raise InvalidRequest(
            "request body",
            f"{len(tail.data) - tail.offset} bytes of binary data belong to no input",
        )
    outputs = document.get("outputs")
    if outputs is not None and (
        not isinstance(outputs, list)
        or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)
    ):
        raise InvalidRequest("outputs", "must be a list of objects with a 'name'")
    requested = [
        RequestedOutput(o["name"], _parameters(o.get("parameters"), f"outputs.{o['name']}"))
        for o in outputs or []
    ]
    return InferRequest(
        model_name=model_name,
        infer_inputs=tensors,
        request_id=request_id,
        parameters=_parameters(document.get("parameters"), "parameters"),
        request_outputs=requested or None,
    )


def json_response(content: Any, headers: dict[str, str] | None = None) -> Response:
    """`content` as JSON, encoded with orjson. FastAPI's `ORJSONResponse` does the same but
    is deprecated: it warns at every response, and since the image decoder's
    `warnings.catch_warnings` resets the once-per-location registry, the warning's text went
    to the log at a third of all requests."""
    body = orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, media_type="application/json", headers=headers)


async def unavailable_handler(_: Request, exc: Unavailable) -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={"error": str(exc)},
        headers={"Retry-After": str(exc.retry_after_s)},
    )


async def deadline_handler(_: Request, exc: DeadlineExceeded) -> JSONResponse:
    return JSONResponse(status_code=504, content={"error": exc.details})


def register_infer_routes(app: FastAPI, dataplane: DataPlane, max_body_bytes: int) -> None:
    """Add `POST /v2/models/{model_name}[/versions/{v}]/infer` ahead of KServe's routes, and
    the status codes of the engine's overload (503 + Retry-After) and deadline (504) errors."""

    async def run(infer_request: InferRequest, headers: dict[str, str]) -> Response:
        model_name = infer_request.model_name
        result, response_headers = await dataplane.infer(model_name, infer_request, headers)
        encoded, encode_headers = dataplane.encode(model_name, result, headers, {})
        response_headers.update(encode_headers)
        for name in ("content-length", "content-type"):
            response_headers.pop(name, None)
        if isinstance(encoded, bytes):
            return Response(
                content=encoded, media_type="application/octet-stream", headers=response_headers
            )
        return json_response(encoded, response_headers)

    async def infer(request: Request, model_name: str, model_version: str | None = None) -> Any:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            raise InvalidRequest(
                "request body", f"is {declared} bytes, more than the limit of {max_body_bytes}"
            )
        await dataplane.get_model(model_name)  # 404 or 503 before the body is read; no load
        headers = dict(request.headers)
        # The whole body is read before the disconnect watcher starts reading ASGI messages.
        body = await request.body()
        infer_request = parse_rest_request(body, headers.get(HEADER_LENGTH), model_name)
        return await cancel_on_disconnect(request, run(infer_request, headers))

    for path in (
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
    ):
        app.add_api_route(path, infer, methods=["POST"], response_model=None)
    app.add_exception_handler(Unavailable, unavailable_handler)
    app.add_exception_handler(DeadlineExceeded, deadline_handler)


def register_config_routes(app: FastAPI, dataplane: DataPlane) -> None:
    """Triton's model-configuration extension, `GET /v2/models/{name}[/versions/{v}]/config`
    (see `predictor.server.triton_config`); an unknown model is KServe's 404."""

    async def config(model_name: str, model_version: str | None = None) -> Response:
        model = dataplane.get_model_from_registry(model_name)
        return json_response(model_config(model.name))

    for path in (
        "/v2/models/{model_name}/config",
        "/v2/models/{model_name}/versions/{model_version}/config",
    ):
        app.add_api_route(path, config, methods=["GET"], response_model=None)
