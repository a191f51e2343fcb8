"""Chat completions on the shared engine: validation, conversion to a `Row`, results.

No web framework here: the router turns what this module returns into JSON or SSE. Images go
through the same `predictor.inputs.images` checks as the v2 protocol, parameters through the same
`predictor.params` limits, and generation through the same engine, so a chat request and an
OIP v2 request can share one batch.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import ValidationError

from predictor.engine.scheduler import Reservation
from predictor.errors import InvalidRequest
from predictor.inputs.chat_template import TemplateCheck
from predictor.inputs.image_urls import RemotePolicy, fetch_image_url
from predictor.openai.protocol import ChatCompletionRequest, Message, ProcessorKwargs, Usage
from predictor.params import (
    JSON_OBJECT_SCHEMA,
    Guide,
    PixelBudget,
    SamplingParams,
    parse_generation_params,
)
from predictor.protocol import Completion
from predictor.rows import Row

MAX_STOP_STRINGS = 4  # OpenAI's own limit
# Our parameter names in errors, as the OpenAI request calls them.
_OPENAI_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "min_pixels": "mm_processor_kwargs.min_pixels",
    "max_pixels": "mm_processor_kwargs.max_pixels",
}
TOP_K_OFF = -1  # vLLM's spelling of "no top-k"; ours is 0


class UnknownModel(Exception):
    """The request's `model` is not served here (404)."""

    def __init__(self, name: str, served: tuple[str, ...]):
        super().__init__(f"The model '{name}' does not exist; this server serves {list(served)}")
        self.name = name


@dataclass(frozen=True)
class ChatCall:
    """A validated chat request, ready for the engine."""

    request: ChatCompletionRequest
    row: Row
    id: str
    created: int
    arrived: float
    reservation: Reservation


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request body, or an `InvalidRequest` naming the offending field."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            raise InvalidRequest(location, "unknown or unsupported parameter") from None
        if error["type"] == "json_invalid":
            raise InvalidRequest("body", f"is not valid JSON ({error['msg']})") from None
        raise InvalidRequest(location, error["msg"]) from None


class ChatService:
    """Everything the chat routes do that is not HTTP."""

    def __init__(self, model: Any, aliases: tuple[str, ...], remote: RemotePolicy):
        self.model = model  # the loaded QwenVLModel: engine, preprocessor, limits, settings
        self.names = (model.name, *aliases)
        self.remote = remote
        self._template_check: TemplateCheck | None = None  # made once the model is loaded

    @property
    def template_check(self) -> TemplateCheck:
        if self._template_check is None:
            generator = self.model.preprocessor  # the processor, in either process layout
            self._template_check = TemplateCheck(
                lambda messages: generator.processor.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True
                )
            )
        return self._template_check

    @property
    def model_name(self) -> str:
        return self.model.name

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise UnknownModel(name, self.names)
        # Not readiness, which the drain turns off while admitted requests still run: the
        # engine's admission (`admit`) refuses new ones then.
        refusal = self.model.serving_refusal()
        if refusal is not None:
            raise refusal

    def admit(self) -> Reservation:
        """A place in the engine's queue for the request about to be decoded (or 503)."""
        return self.model.take_reservation()

    async def prepare(self, request: ChatCompletionRequest, reservation: Reservation) -> ChatCall:
        """Validate parameters, fetch and decode images, encode the conversation."""
        arrived = time.monotonic()
        sampling, budget = self._sampling(request)
        messages, urls = self._conversation(request.messages)
        images = [await fetch_image_url(url, self.remote, field) for field, url in urls]
        row = await self.model.image_workers.run(
            self._encode_row, messages, images, [f for f, _ in urls], sampling, budget
        )
        chat_id = f"chatcmpl-{uuid.uuid4().hex}"
        return ChatCall(request, row, chat_id, int(time.time()), arrived, reservation)

    def _sampling(self, request: ChatCompletionRequest) -> tuple[SamplingParams, PixelBudget]:
        if request.n not in (None, 1):
            raise InvalidRequest("n", "only n = 1 is supported")
        if request.stream_options is not None and not request.stream:
            raise InvalidRequest("stream_options", "is only allowed when stream is true")
        tokens_field = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        pixels = request.mm_processor_kwargs or ProcessorKwargs()
        params = {
            "max_new_tokens": request.max_completion_tokens or request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "top_k": 0 if request.top_k == TOP_K_OFF else request.top_k,
            "repetition_penalty": request.repetition_penalty,
            "seed": request.seed,
            "min_new_tokens": request.min_tokens,
            "ignore_eos": request.ignore_eos,
            "min_pixels": pixels.min_pixels,
            "max_pixels": pixels.max_pixels,
        }
        try:
            sampling, budget = parse_generation_params(
                {k: v for k, v in params.items() if v is not None},
                self.model.limits,
                guide=request_guide(request),
            )
        except InvalidRequest as exc:
            names = {**_OPENAI_NAMES, "max_new_tokens": tokens_field}
            field = names.get(exc.field, exc.field)
            message = str(exc).split(": ", 1)[1]
            for ours, theirs in names.items():
                message = message.replace(ours, theirs)
            raise InvalidRequest(field, message) from None
        stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
        if len(stop) > MAX_STOP_STRINGS or any(not s for s in stop):
            raise InvalidRequest("stop", f"takes up to {MAX_STOP_STRINGS} non-empty strings")
        return replace(sampling, stop=tuple(stop)), budget

    def _conversation(
        self, messages: list[Message]
    ) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
        """Chat-template messages with image placeholders, and (field, url) of each image."""
        converted: list[dict[str, Any]] = []
        urls: list[tuple[str, str]] = []
        for i, message in enumerate(messages):
            if isinstance(message.content, str):
                converted.append({"role": message.role, "content": message.content})
                continue
            content: list[dict[str, Any]] = []
            for j, part in enumerate(message.content):
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                    continue
                field = f"messages.{i}.content.{j}.image_url.url"
                if message.role != "user":
                    raise InvalidRequest(field, "images are only accepted in user messages")
                content.append({"type": "image"})
                urls.append((field, part.image_url.url))
            converted.append({"role": message.role, "content": content})
        self.template_check.check(converted)
        limit = self.model.settings.max_images_per_request
        if not urls:
            raise InvalidRequest("messages", "must contain at least one image_url part")
        if len(urls) > limit:
            raise InvalidRequest(
                "messages", f"hold {len(urls)} images, more than the limit of {limit}"
            )
        return converted, urls

    def _encode_row(self, messages, images, fields, sampling, budget) -> Row:
        grammar = self.model.compile_guide(sampling)  # before the images: a 400 costs less
        row = Row((), tuple(messages), sampling, grammar=grammar)
        return self.model.encode_row(row, images, fields, budget, "max_tokens")

    async def complete(self, call: ChatCall) -> Completion:
        (completion,) = await self.model.engine.submit(
            [call.row], arrived=call.arrived, reservation=call.reservation
        )
        return completion

    def response(self, call: ChatCall, completion: Completion) -> dict[str, Any]:
        return {
            "id": call.id,
            "object": "chat.completion",
            "created": call.created,
            "model": call.request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.text},
                    "finish_reason": completion.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage(completion).model_dump(),
        }

    async def stream(self, call: ChatCall) -> AsyncIterator[dict[str, Any]]:
        """Chunks in OpenAI's order: the role, content deltas, the finish reason, [usage].

        Deltas come from the engine thread as the row generates, even inside a batch.
        """
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str] = asyncio.Queue()
        sink: Callable[[str], None] = lambda text: loop.call_soon_threadsafe(  # noqa: E731
            deltas.put_nowait, text
        )
        streamed = replace(call, row=replace(call.row, on_text=sink))
        task = asyncio.ensure_future(self.complete(streamed))
        try:
            yield self._chunk(call, {"role": "assistant", "content": ""})
            while True:
                getter = asyncio.ensure_future(deltas.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                yield self._chunk(call, {"content": getter.result()})
            while not deltas.empty():
                yield self._chunk(call, {"content": deltas.get_nowait()})
            completion = task.result()
            yield self._chunk(call, {}, finish_reason=completion.finish_reason)
            options = call.request.stream_options
            if options is not None and options.include_usage:
                final = self._chunk(call, None)
                final["usage"] = usage(completion).model_dump()
                yield final
        finally:
            if not task.done():
                task.cancel()

    def _chunk(
        self, call: ChatCall, delta: dict[str, Any] | None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        choices = (
            []
            if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        )
        return {
            "id": call.id,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.request.model,
            "choices": choices,
        }

    def models(self) -> dict[str, Any]:
        created = int(self.model.loaded_at)
        cards = [
            {"id": name, "object": "model", "created": created, "owned_by": "qwen-vl-predictor"}
            for name in self.names
        ]
        # "models" keeps KServe's v1 list-models answer for clients of GET /v1/models.
        return {"object": "list", "data": cards, "models": list(self.names)}


def request_guide(request: ChatCompletionRequest) -> Guide | None:
    """What the output must match: `response_format` or `structured_outputs`, or None."""
    guides = []
    response_format = request.response_format
    if response_format is not None:
        guide = _response_format_guide(response_format)
        if guide is not None:
            guides.append(guide)
    if request.structured_outputs is not None:
        guides.append(_structured_outputs_guide(request.structured_outputs))
    if len(guides) > 1:
        raise InvalidRequest(
            "structured_outputs", "cannot be combined with a JSON response_format; send one"
        )
    return guides[0] if guides else None


def _response_format_guide(response_format: Any) -> Guide | None:
    kind, named = response_format.type, response_format.json_schema
    if kind != "json_schema":
        if named is not None:
            raise InvalidRequest(
                "response_format.json_schema", "is only allowed with type json_schema"
            )
        if kind == "json_object":
            return Guide("json_schema", JSON_OBJECT_SCHEMA, "response_format")
        return None  # text
    if named is None:
        raise InvalidRequest("response_format.json_schema", "is required with type json_schema")
    if named.schema_ is None:
        raise InvalidRequest("response_format.json_schema.schema", "is required")
    return Guide("json_schema", json.dumps(named.schema_), "response_format.json_schema.schema")


def _structured_outputs_guide(outputs: Any) -> Guide:
    given = [
        name
        for name, value in (
            ("json", outputs.json_),
            ("regex", outputs.regex),
            ("choice", outputs.choice),
            ("grammar", outputs.grammar),
            ("json_object", outputs.json_object or None),
        )
        if value is not None
    ]
    if len(given) != 1:
        got = ", ".join(given) or "none"
        raise InvalidRequest(
            "structured_outputs",
            f"must set one of json, regex, choice, grammar, json_object; got {got}",
        )
    (name,) = given
    field = f"structured_outputs.{name}"
    if name == "json":
        schema = outputs.json_
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return Guide("json_schema", text, field)
    if name == "choice":
        return Guide.choice(outputs.choice, field)
    if name == "json_object":
        return Guide("json_schema", JSON_OBJECT_SCHEMA, field)
    text = outputs.regex if name == "regex" else outputs.grammar
    if not text:
        raise InvalidRequest(field, "must not be empty")
    return Guide("regex" if name == "regex" else "ebnf", text, field)


def usage(completion: Completion) -> Usage:
    return Usage(
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.generated_tokens,
        total_tokens=completion.prompt_tokens + completion.generated_tokens,
    )
