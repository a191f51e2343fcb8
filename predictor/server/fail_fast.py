"""What the server does when its engine process dies: fail fast, until Kubernetes restarts it.

The policy, one of the two the issue allowed (the other, restarting the engine here with a
backoff, would need the weights loaded a second time in a process whose liveness already
said dead): nothing in this process builds the engine again, and no request loads it
(`predictor.server.health`). From the death on:

- liveness (`/v2/health/live`) and readiness are false, so the kubelet restarts the pod and
  the endpoint picker stops sending to it;
- the requests the engine held, and every new one, get 503 with Retry-After (REST, OpenAI;
  a stream already started ends with an `engine_unavailable` error event) from the door,
  which closes each connection it refuses on;
- gRPC stops at once (GOAWAY, listener closed), since a channel would otherwise keep sending
  to a pod that can serve nothing: its calls in progress get UNAVAILABLE, its next ones
  reconnect elsewhere. The stop is scheduled before those UNAVAILABLEs go out
  (`RemoteEngine._died` tells the model first), so a client's retry finds the GOAWAY, not a
  server that is stopping under it;
- the REST listener stays open for the probes; SIGTERM then drains as usual
  (`predictor.server.drain`), with nothing left to wait for.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

logger = logging.getLogger(__name__)

GRPC_GRACE_S = 5.0  # for the answers of the calls the engine held (they fail at once)


class Mortal(Protocol):
    """What this needs of the model (`QwenVLModel`)."""

    death_listeners: list


class FailFast:
    """Stops a ModelServer's gRPC server when its model's engine process dies."""

    def __init__(self, server: Any, model: Mortal):
        self.server = server  # kserve.ModelServer
        self.model = model
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, app: Any) -> None:
        """Listen for the engine's death once the server's event loop runs."""
        app.router.on_startup.append(self._on_startup)
        self.model.death_listeners.append(self._on_death)

    async def _on_startup(self) -> None:
        self._loop = asyncio.get_running_loop()

    def _on_death(self, detail: str) -> None:
        """On the engine's reader thread: hand over to the event loop."""
        logger.error(
            "%s: not live, not ready; gRPC stops (GOAWAY) and requests get 503 until the pod "
            "is restarted",
            detail,
        )
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_grpc)

    def _stop_grpc(self) -> None:
        grpc_server = getattr(self.server, "_grpc_server", None)
        if grpc_server is not None and hasattr(grpc_server, "begin_drain"):
            grpc_server.begin_drain(GRPC_GRACE_S)
