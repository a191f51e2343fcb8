"""Request and response schemas of `POST /v1/chat/completions` (the subset we serve).

Owned here rather than imported from KServe, whose OpenAI types need vLLM. Every model
forbids unknown fields, so an unsupported parameter (`logprobs`, `tools`, ...) is a 400 that
names it instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    # Sampling and processor fields vLLM accepts beside OpenAI's (the v2 route's parameters).
    top_k: int | None = None  # 0 (or vLLM's -1) turns it off
    repetition_penalty: float | None = None
    mm_processor_kwargs: ProcessorKwargs | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as many clients send it


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    """OpenAI's error shape, used for every error on these routes."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
