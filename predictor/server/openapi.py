"""The OpenAPI document (`/openapi.json`, Swagger UI at `/docs` with `--enable_docs_url`).

Why: the predictor's own routes read raw bodies (binary tensors, exact OpenAI errors), so
FastAPI cannot see their request models and would describe no body and a 422 nobody sends.
This module replaces the generated operations of those routes with the real contract:

- v2 infer: the JSON body (`InferRequestBody`, its parameters as `predictor.params` and
  `predictor.protocol` accept them), the binary tensor data extension
  (`application/octet-stream` with `Inference-Header-Content-Length`), and the answers the
  route gives: 200, 400, 404, 499 (client left), 503 (+ `Retry-After`), 504;
- chat completions: `ChatCompletionRequest` (the model that validates requests), the JSON
  answer, the Server-Sent Event stream of `ChatCompletionChunk`s, OpenAI-shaped errors;
- models and Triton's model configuration.

The v2 models here only document: the v2 route parses with `predictor.server.rest` and
`predictor.protocol`, and tests check that these models name the same inputs, outputs and
parameters and that real answers validate against them.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from predictor.openai.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorResponse,
    ModelList,
)
from predictor.openai.router import PREFIXES


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorParameters(_Doc):
    binary_data_size: int | None = Field(
        None, ge=0, description="binary extension: bytes of this tensor after the JSON header"
    )


class InputTensor(_Doc):
    name: Literal["image", "prompt", "guided_decoding_guide_type", "guided_decoding_guide"]
    datatype: Literal["BYTES"]
    shape: list[int] = Field(
        description="[N]; `prompt` may be [1] for all images; the guide inputs are [1]"
    )
    data: list[str] | None = Field(
        None,
        description="image: base64 or a data:image/...;base64, URL per element; prompt: text; "
        "the guide inputs: as the parameters of the same names",
    )
    parameters: TensorParameters | None = None


class OutputParameters(_Doc):
    binary_data: bool | None = None


class RequestedOutput(_Doc):
    name: Literal["text", "finish_reason", "generated_tokens"]
    parameters: OutputParameters | None = None


class InferParameters(_Doc):
    """Generation parameters (same names and ranges on gRPC; a numeric one may also be a
    string that spells the number exactly there), then those Triton's clients add."""

    max_new_tokens: int | None = Field(None, ge=1, description="at most --max_new_tokens_limit")
    min_new_tokens: int | None = Field(None, ge=0, description="stop tokens masked until then")
    ignore_eos: bool | None = Field(None, description="generate exactly max_new_tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy (the default)")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000, description="0: off")
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    min_pixels: int | None = Field(None, ge=1, description="model-input pixels per image")
    max_pixels: int | None = Field(None, ge=1, description="at most --max_pixels_limit")
    guided_decoding_guide_type: Literal["json", "json_schema", "regex", "ebnf_grammar"] | None = (
        Field(None, description="guided decoding: what every output must match")
    )
    guided_decoding_guide: str | None = Field(
        None,
        description="the JSON schema, regex or EBNF grammar (none for json: any JSON); at "
        "most --max_guide_bytes",
    )
    binary_data_output: bool | None = Field(None, description="all outputs in binary")
    triton_enable_empty_final_response: bool | None = Field(
        None, description="accepted; this model is not decoupled"
    )
    priority: int | None = Field(None, ge=0, description="accepted and ignored")
    timeout: int | None = Field(None, ge=0, description="accepted; --request_timeout_s applies")


class InferRequestBody(_Doc):
    id: str | None = None
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None
    parameters: InferParameters | None = None


class OutputTensor(BaseModel):
    name: Literal["text", "finish_reason", "generated_tokens"]
    datatype: Literal["BYTES", "INT32"]
    shape: list[int]
    data: list[str] | list[int] | None = None
    parameters: dict[str, Any] | None = None


class InferTimings(BaseModel):
    decode_ms: int
    generate_ms: int


class InferResponseBody(BaseModel):
    id: str
    model_name: str
    model_version: str | None = None
    outputs: list[OutputTensor]
    parameters: InferTimings | None = None


class V2Error(BaseModel):
    error: str


class TritonTensorConfig(BaseModel):
    name: str
    data_type: str
    dims: list[int]
    format: str | None = None
    optional: bool | None = None


class TritonModelConfig(BaseModel):
    name: str
    platform: str
    backend: str
    max_batch_size: int
    input: list[TritonTensorConfig]
    output: list[TritonTensorConfig]
    model_transaction_policy: dict[str, bool]


SCHEMAS: tuple[type[BaseModel], ...] = (
    InferRequestBody,
    InferResponseBody,
    V2Error,
    TritonModelConfig,
    ChatCompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
    ErrorResponse,
    ModelList,
)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


_BINARY_BODY = {
    "schema": {"type": "string", "format": "binary"},
    "description": "binary tensor data extension: the JSON header (InferRequestBody, inputs "
    "with parameters.binary_data_size), then each tensor's bytes; BYTES elements are a 4-byte "
    "little-endian length, then the bytes. Send Inference-Header-Content-Length.",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}


def _infer_operation(versioned: bool) -> dict[str, Any]:
    parameters = [
        {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer"},
            "description": "binary extension: length of the JSON header at the body's start",
        },
    ]
    if versioned:
        parameters.insert(
            1,
            {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}},
        )
    binary_answer = {"schema": {"type": "string", "format": "binary"}}
    ok = _json(InferResponseBody, "one text, finish_reason and generated_tokens per image")
    ok["content"]["application/octet-stream"] = binary_answer
    return {
        "tags": ["v2"],
        "summary": "Describe images (Open Inference Protocol v2)",
        "operationId": "infer_versioned" if versioned else "infer",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref(InferRequestBody)},
                "application/octet-stream": _BINARY_BODY,
            },
        },
        "responses": {
            "200": ok,
            "400": _json(V2Error, "bad input; the message starts with the field it names"),
            "404": _json(V2Error, "no such model"),
            "499": {"description": "the client disconnected; its work was stopped"},
            "503": {**_json(V2Error, "queue full or model not ready"), "headers": _RETRY_AFTER},
            "504": _json(V2Error, "not finished within --request_timeout_s"),
        },
    }


def _chat_operation(prefix: str) -> dict[str, Any]:
    answer = _json(ChatCompletion, "the completion; with stream true, Server-Sent Events")
    answer["content"]["text/event-stream"] = {
        "schema": {"type": "string"},
        "description": "`data: <ChatCompletionChunk JSON>` events, then `data: [DONE]`; an error "
        "after the first event comes as one `data: <ErrorResponse JSON>` event",
        "x-event-schema": _ref(ChatCompletionChunk),
    }
    error = "OpenAI-shaped error"
    return {
        "tags": ["openai"],
        "summary": "Chat completions with images (OpenAI-compatible)",
        "operationId": f"chat_completions{prefix.replace('/', '_')}",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(ChatCompletionRequest)}},
        },
        "responses": {
            "200": answer,
            "400": _json(ErrorResponse, f"{error}: bad input, `param` names the field"),
            "404": _json(ErrorResponse, f"{error}: the model is not served here"),
            "500": _json(ErrorResponse, f"{error}: the generation failed"),
            "503": {**_json(ErrorResponse, f"{error}: queue full"), "headers": _RETRY_AFTER},
            "504": _json(ErrorResponse, f"{error}: not finished within --request_timeout_s"),
        },
    }


def _config_operation(versioned: bool) -> dict[str, Any]:
    parameters = [
        {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
    ]
    if versioned:
        parameters.append(
            {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    return {
        "tags": ["v2"],
        "summary": "The model's configuration (Triton's model-configuration extension)",
        "operationId": "model_config_versioned" if versioned else "model_config",
        "parameters": parameters,
        "responses": {
            "200": _json(TritonModelConfig, "inputs, outputs, max_batch_size 0, not decoupled"),
            "404": _json(V2Error, "no such model"),
        },
    }


def _v1_refusal(verb: str) -> dict[str, Any]:
    return {
        "tags": ["v1"],
        "summary": f"KServe's v1 {verb}: this model speaks v2 and refuses it",
        "parameters": [
            {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {"400": _json(V2Error, "use POST /v2/models/{model_name}/infer")},
    }


def build_document(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for `app`, with the predictor's operations and schemas put in."""
    document = get_openapi(
        title="qwen-vl-predictor",
        version=app.version,
        description="Image descriptions over the Open Inference Protocol v2 (REST; gRPC on "
        "its own port) and OpenAI chat completions, on one batching engine.",
        routes=app.routes,
    )
    paths = document.setdefault("paths", {})
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in SCHEMAS:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    paths.setdefault("/v2/models/{model_name}/infer", {})["post"] = _infer_operation(False)
    versioned_infer = "/v2/models/{model_name}/versions/{model_version}/infer"
    paths.setdefault(versioned_infer, {})["post"] = _infer_operation(True)
    paths.setdefault("/v2/models/{model_name}/config", {})["get"] = _config_operation(False)
    versioned_config = "/v2/models/{model_name}/versions/{model_version}/config"
    paths.setdefault(versioned_config, {})["get"] = _config_operation(True)
    for prefix in PREFIXES:
        paths.setdefault(f"{prefix}/chat/completions", {})["post"] = _chat_operation(prefix)
        paths.setdefault(f"{prefix}/models", {})["get"] = {
            "tags": ["openai"],
            "summary": "The served model name and its aliases",
            "operationId": f"models{prefix.replace('/', '_')}",
            "responses": {"200": _json(ModelList, "OpenAI's model list")},
        }
    for verb in ("predict", "explain"):
        path = f"/v1/models/{{model_name}}:{verb}"
        if path in paths:
            paths[path]["post"] = _v1_refusal(verb)
    return document


def install_openapi(app: FastAPI) -> None:
    """Serve `build_document(app)` at `/openapi.json` (built once, on first request)."""
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cached:
            cached.update(build_document(app))
        return cached

    app.openapi = openapi  # type: ignore[method-assign]
