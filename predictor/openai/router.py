"""Routes of the OpenAI-compatible API: only HTTP here, the logic is in `serving`.

`POST /openai/v1/chat/completions` and `GET /openai/v1/models` (KServe's prefix), and the same
under `/v1` (the `openai` SDK's usual base path). Every error uses OpenAI's shape
`{"error": {"message", "type", "param", "code"}}`; the status codes are the v2 routes' own
(400, 404, 503 with Retry-After, 504).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from predictor import metrics
from predictor.cancellation import cancel_on_disconnect
from predictor.errors import DeadlineExceeded, InvalidRequest, Unavailable
from predictor.openai.protocol import error_body
from predictor.openai.serving import ChatCall, ChatService, UnknownModel, parse_request

logger = logging.getLogger(__name__)
PREFIXES = ("/openai/v1", "/v1")


def error_response(error: BaseException) -> JSONResponse:
    """One table from exceptions to OpenAI-shaped errors."""
    if isinstance(error, InvalidRequest):
        message = str(error).split(": ", 1)[-1]
        body = error_body(f"{error.field}: {message}", "invalid_request_error", error.field, None)
        return JSONResponse(body, status_code=400)
    if isinstance(error, UnknownModel):
        body = error_body(str(error), "invalid_request_error", "model", "model_not_found")
        return JSONResponse(body, status_code=404)
    if isinstance(error, Unavailable):
        body = error_body(str(error), "server_overloaded", None, error.code)
        return JSONResponse(
            body, status_code=503, headers={"Retry-After": str(error.retry_after_s)}
        )
    if isinstance(error, DeadlineExceeded):
        return JSONResponse(error_body(error.details, "timeout", None, None), status_code=504)
    logger.exception("chat completion failed", exc_info=error)
    return JSONResponse(error_body("internal server error", "server_error", None, None), 500)


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else orjson.dumps(data).decode()
    return f"data: {payload}\n\n".encode()


async def _event_stream(service: ChatService, call: ChatCall) -> AsyncIterator[bytes]:
    error: BaseException | None = None
    try:
        async for chunk in service.stream(call):
            yield _sse(chunk)
    except BaseException as exc:  # counted below; the status line is already sent
        error = exc
        if isinstance(exc, Exception):
            yield _sse(orjson.loads(error_response(exc).body))
        else:
            raise
    finally:
        call.reservation.release()  # already released once the engine queued the row
        metrics.count_request(service.model_name, error)
    if error is None:
        yield _sse("[DONE]")


def register_openai_routes(app: FastAPI, service: ChatService) -> None:
    async def chat_completions(request: Request) -> Response:
        body = await request.body()
        try:
            chat = parse_request(body)
            service.check_model(chat.model)
        except (InvalidRequest, UnknownModel) as exc:
            return error_response(exc)
        except Unavailable as exc:  # the model cannot serve: engine gone, or unloaded
            metrics.count_request(service.model_name, exc)
            return error_response(exc)
        try:
            reservation = service.admit()
        except Unavailable as exc:
            metrics.count_request(service.model_name, exc)
            return error_response(exc)
        try:
            call = await service.prepare(chat, reservation)
        except Exception as exc:
            reservation.release()
            metrics.count_request(service.model_name, exc)
            return error_response(exc)
        if chat.stream:
            return StreamingResponse(
                _event_stream(service, call),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            completion = await cancel_on_disconnect(request, service.complete(call))
        except Exception as exc:
            metrics.count_request(service.model_name, exc)
            return error_response(exc)
        if isinstance(completion, Response):  # the client went away
            metrics.count_request(service.model_name, asyncio.CancelledError())
            return completion
        metrics.count_request(service.model_name, None)
        return JSONResponse(service.response(call, completion))

    async def models() -> JSONResponse:
        return JSONResponse(service.models())

    for prefix in PREFIXES:
        app.add_api_route(f"{prefix}/chat/completions", chat_completions, methods=["POST"])
        app.add_api_route(f"{prefix}/models", models, methods=["GET"])
