"""Request and response schemas of `POST /v1/chat/completions` (the subset we serve).

Owned here rather than imported from KServe, whose OpenAI types need vLLM. Every model
forbids unknown fields, so an unsupported parameter (`logprobs`, `tools`, ...) is a 400 that
names it instead of being silently ignored, and every model is strict, as OpenAI and the v2
route are: `"4"`, `4.0` or `true` is not a `max_tokens`, `"0.5"` not a `temperature`, `1` or
`"yes"` not a `stream`.

Beside OpenAI's own fields, the sampling extras that vLLM accepts and serving benchmarks send
(aiperf, genai-perf, vLLM's `benchmark_serving`): `ignore_eos`, `min_tokens`, `top_k`,
`repetition_penalty`, checked with the v2 route's ranges (`predictor.params`).

Structured output: OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and
vLLM's `structured_outputs` (`json`, `regex`, `choice`, `grammar`, `json_object`), one of the
two per request (`serving` turns either into a `predictor.params.Guide`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ProcessorKwargs(_Strict):
    """vLLM's `mm_processor_kwargs`, limited to the Qwen processor's per-image pixel budget."""

    min_pixels: int | None = None
    max_pixels: int | None = None


class JsonSchemaFormat(_Strict):
    """`response_format.json_schema`: OpenAI's named schema. `strict` is accepted either way:
    the schema is always enforced (as vLLM does)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs`: exactly one of these."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(None, alias="json")  # a JSON schema
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF, with a `root` rule
    json_object: bool | None = None


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    # Sampling and processor fields vLLM accepts beside OpenAI's (the v2 route's parameters;
    # predictor.params checks them as it does there).
    top_k: int | None = None  # 0 (or vLLM's -1) turns it off
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens: the end of turn does not end it
    mm_processor_kwargs: ProcessorKwargs | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as many clients send it


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# ---- responses: what `serving` returns, as schemas for the OpenAPI document (and its tests) --


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One Server-Sent Event's `data:` (the stream ends with `data: [DONE]`). The usage chunk
    (with `stream_options.include_usage`) has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]
    models: list[str] = Field(description="KServe's v1 list-models answer, kept for its clients")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape, used for every error on these routes."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
