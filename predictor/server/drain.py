"""Graceful drain on SIGTERM or SIGINT: nothing accepted is lost.

What KServe's ModelServer does by itself is not enough: uvicorn drains REST for up to a
hard-coded 30 s and then cancels what is left (HTTP 500s), and only then does KServe unload
the model, which fails gRPC's in-flight calls, and wait out gRPC's own 30 s grace. Here the
signal starts one sequence instead:

1. Readiness goes false (`/v2/models/{name}/ready`, `/v2/health/ready`), so Kubernetes and the
   endpoint picker stop sending; liveness stays true, so the pod is not killed for it.
2. New inference requests, REST, gRPC and OpenAI alike, get 503 with Retry-After
   (`ShuttingDown`); responses carry `Connection: close`, so keep-alive clients reconnect
   elsewhere instead of having their next request reset.
3. Every request already accepted (decoding its images, queued or generating, streaming or
   not) runs to completion, for up to `--drain_timeout_s`.
4. Past that deadline the engine ends what is left with `ShuttingDown` (a clean 503 with
   Retry-After, never a 500 or a reset).
5. The REST and gRPC servers stop, then the engine (and its process) stops, and `main()`
   returns.

A second signal during the drain does not cut it short: Kubernetes sends SIGKILL at the end of
`terminationGracePeriodSeconds`, which the default `--drain_timeout_s` is sized to fit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Protocol

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.05
FLUSH_S = 0.5  # time for the 503s of requests ended at the deadline to go out
GRPC_GRACE_S = 5.0  # in-flight RPCs are already answered by then; this bounds the stragglers


class Drainable(Protocol):
    """What the drain needs of the model (`QwenVLModel`)."""

    def begin_drain(self) -> None: ...
    def busy(self) -> bool: ...
    def end_remaining(self) -> int: ...
    def stop(self) -> None: ...


class Drain:
    """Owns the shutdown sequence of one ModelServer and its model."""

    def __init__(self, server: Any, model: Drainable, timeout_s: float):
        self.server = server  # kserve.ModelServer
        self.model = model
        self.timeout_s = timeout_s
        self.draining = False
        self._task: asyncio.Task | None = None

    def install(self, app: Any) -> None:
        """Take SIGTERM and SIGINT from KServe and uvicorn once the server runs.

        KServe registers its handlers before serving and uvicorn replaces them while it
        serves; a handler added on the running loop at application start-up comes after both.
        """
        self.server.register_signal_handler = lambda: None  # KServe's would unload at once
        app.router.on_startup.append(self._on_startup)

    async def _on_startup(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        if self.draining:
            logger.info("%s during the drain: still draining", signal.Signals(sig).name)
            return
        self.draining = True
        logger.info(
            "%s: draining (up to %g s); readiness is false and new requests get 503",
            signal.Signals(sig).name,
            self.timeout_s,
        )
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        started = time.monotonic()
        self.model.begin_drain()
        deadline = started + self.timeout_s
        while self.model.busy() and time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
        if self.model.busy():
            ended = self.model.end_remaining()
            logger.warning(
                "drain timeout (%g s): %d requests still running end with 503",
                self.timeout_s,
                ended,
            )
            await asyncio.sleep(FLUSH_S)
        else:
            logger.info("drained in %.1f s", time.monotonic() - started)
        await self._stop_servers()
        self.model.stop()
        logger.info("stopped")

    async def _stop_servers(self) -> None:
        # KServe's own objects: its uvicorn server and its grpc.aio server.
        rest = getattr(getattr(self.server, "_rest_server", None), "_server", None)
        if rest is not None:
            rest.should_exit = True
        grpc_server = getattr(getattr(self.server, "_grpc_server", None), "_server", None)
        if grpc_server is not None:
            await grpc_server.stop(grace=GRPC_GRACE_S)
