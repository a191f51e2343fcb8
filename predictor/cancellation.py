"""Stop the work of an HTTP request whose client went away.

Why a module of its own: uvicorn lets a handler run to its end after the client disconnected,
which keeps rows in the engine that nobody will read. Every HTTP route that waits on the engine
(the v2 `infer` route in `predictor.server.rest`, the OpenAI route in `predictor.openai`) runs
its work through `cancel_on_disconnect`, so both stop the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import Response

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
T = TypeVar("T")


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Run `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not task.done():
            message = await request.receive()
            if message["type"] == "http.disconnect":
                task.cancel()
                return

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and task.cancelled():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        raise
    finally:
        watcher.cancel()
