"""Graceful drain on SIGTERM or SIGINT: nothing accepted is lost, while clients keep sending.

What KServe's ModelServer does by itself is not enough: uvicorn drains REST for up to a
hard-coded 30 s and then cancels what is left (HTTP 500s), and only then does KServe unload
the model, which fails gRPC's in-flight calls, and wait out gRPC's own 30 s grace. Here the
signal starts one sequence instead:

1. Readiness goes false (`/v2/models/{name}/ready`, `/v2/health/ready`), so Kubernetes and the
   endpoint picker stop sending; liveness stays true, so the pod is not killed for it.
2. The doors close: new inference requests, REST and OpenAI (`predictor.server.admission`)
   and gRPC (`predictor.server.grpc_door`), get 503 with Retry-After / UNAVAILABLE before
   their bodies are decoded (`ShuttingDown`).
3. REST: every response from now on carries `Connection: close`, those of requests already in
   progress included, and idle kept-alive connections close (`predictor.server.rest_drain`),
   so clients reconnect, elsewhere behind a load balancer; the listener stays open, so a
   request that still comes here gets its 503, not a refused or reset connection.
4. gRPC: the server stops at once with a grace (`QuietGRPCServer.begin_drain`): HTTP/2 GOAWAY
   on every connection, so channels reconnect elsewhere, and its listener closes; calls in
   progress run on.
5. Every request already accepted (holding its place: decoding its images, queued or
   generating, streaming or not) runs to completion, for up to `--drain_timeout_s`.
6. Past that deadline the engine ends what is left with `ShuttingDown` (a clean 503 with
   Retry-After, never a 500 or a reset).
7. The REST listener closes last, once what its queue held is answered; then `main()` stops
   the engine (and its process) and returns.

A second signal during the drain does not cut it short: Kubernetes sends SIGKILL at the end of
`terminationGracePeriodSeconds`, which the default `--drain_timeout_s` is sized to fit.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.05
FLUSH_S = 0.5  # time for the 503s of requests ended at the deadline to go out
GRPC_GRACE_S = 5.0  # past the drain's deadline: in-flight RPCs are answered by then
SERVER_FINISH_S = 10.0  # for each server to stop once its requests are answered


class Drainable(Protocol):
    """What the drain needs of the model (`QwenVLModel`)."""

    def begin_drain(self) -> None: ...
    def busy(self) -> bool: ...
    def end_remaining(self) -> int: ...


class DrainableServer(Protocol):
    """What the drain needs of a protocol server (`predictor.server.kserve_servers`)."""

    def begin_drain(self, grace_s: float) -> None: ...
    async def finish(self) -> None: ...


class Drain:
    """Owns the shutdown sequence of one ModelServer's servers and its model."""

    def __init__(self, server: Any, model: Drainable, timeout_s: float):
        self.server = server  # kserve.ModelServer
        self.model = model
        self.timeout_s = timeout_s
        self.draining = False
        self._task: asyncio.Task | None = None
        # Called right after the model's doors close (front 0 tells the other fronts).
        self.on_begin: list[Callable[[], None]] = []

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

    def servers(self) -> list[DrainableServer]:
        """KServe's REST and gRPC servers, built by `ModelServer.start()` (gRPC when enabled)."""
        found = (getattr(self.server, name, None) for name in ("_rest_server", "_grpc_server"))
        return [s for s in found if s is not None and hasattr(s, "begin_drain")]

    async def run(self) -> None:
        started = time.monotonic()
        self.model.begin_drain()  # first: from here on the doors refuse
        for hook in self.on_begin:
            hook()
        servers = self.servers()
        for server in servers:
            server.begin_drain(self.timeout_s + FLUSH_S + GRPC_GRACE_S)
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
        # gRPC's listener closed at the signal; REST's closes last. Once both servers are
        # done KServe's `asyncio.run` returns (ending this task) and `main()` stops the engine.
        for server in reversed(servers):
            try:
                await asyncio.wait_for(server.finish(), SERVER_FINISH_S)
            except TimeoutError:
                logger.warning("%s did not stop in %g s", type(server).__name__, SERVER_FINISH_S)
