"""The front's side of the engine core process (`predictor.engine.core`): `RemoteEngine`.

It offers what the request path uses of `predictor.engine.scheduler.Engine` (`reserve`,
`submit`, the drain's `refuse_new` / `close` / `busy`, `stop`), so the model and the OpenAI
route do not care where the engine runs. Admission is decided here, at once and without
asking the core, on the shared load board (`predictor.engine.board`): every front publishes
the requests it holds (decoding their images, or sent to the core) and the core its running
rows and requests; capacity is the queue plus the batch slots free, as in the engine itself,
counted over all fronts.

The first front (the server process `main` starts) spawns the core; with `--workers N` it
also prepares a pipe, a shared region and a board slot for each other front
(`sibling_links`), which attach to the same core (`RemoteEngine(..., link=...)`).

One thread reads the core's messages: text deltas go straight to each row's `on_text` (as
the engine's thread calls it in-process), completions and errors resolve the request's future
on its event loop. If the core dies, that thread calls `on_death`, which makes the model not
ready and the server not live, so Kubernetes restarts the pod, and then fails every request
the core held with `EngineUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.multiprocessing as torch_mp

from predictor import metrics
from predictor.engine import core as engine_core
from predictor.engine.board import LoadBoard
from predictor.engine.scheduler import (  # one Reservation and admission rule for both engines
    EngineConfig,
    Reservation,
    refuse_if_full,
)
from predictor.engine.transfer import PackedRow, PackedTensor, SharedArena, Span
from predictor.errors import (
    DeadlineExceeded,
    EngineUnavailable,
    OutOfDeviceMemory,
    ShuttingDown,
    StartupError,
    Unavailable,
)
from predictor.inputs.image_workers import name_this_thread
from predictor.protocol import Completion
from predictor.rows import EncodedRow, Row
from predictor.settings import Settings

logger = logging.getLogger(__name__)

STARTUP_POLL_S = 0.5
STOP_TIMEOUT_S = 10.0
# The region rows' pixel patches cross in (`predictor.engine.transfer`): room for the batch and
# the queue at this project's test sizes, and for a few 1 MP images (about 12 MB each in
# bfloat16, 24 MB in float32); a row that finds no room travels inline instead.
SHARED_ARENA_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class FrontLink:
    """What a front other than the first needs to reach the core (picklable at spawn)."""

    index: int
    connection: Any
    arena_buffer: Any
    board: Any  # LoadBoard.handle


@dataclass(eq=False)
class _Pending:
    """A request sent to the core, until its answer comes back."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    sinks: list[Callable[[str], None] | None] = field(default_factory=list)


class RemoteEngine:
    """The engine core process, started, watched and spoken to from the server process."""

    def __init__(
        self,
        settings: Settings,
        model_name: str,
        fronts: int = 1,
        link: FrontLink | None = None,
    ):
        self.settings = settings
        self.model_name = model_name
        self.config = EngineConfig.from_settings(settings)
        self.on_death: Callable[[str], None] | None = None
        self.alive = False
        self.info: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # a send may pickle megabytes: not under _lock
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._reserved = 0
        self._stopping = False
        self._refusal: Callable[[], Unavailable] | None = None  # new work refused (draining)
        self._closed: Callable[[], Unavailable] | None = None  # everything refused and ended
        self._spans: dict[int, list[Span]] = {}  # arena spans each request's rows hold
        self._pixel_dtype: Any = None  # the core's model dtype: patches are cast to it here
        self._reader: threading.Thread | None = None
        self.sibling_links: list[FrontLink] = []
        self.process: Any = None  # the core, when this front started it
        if link is not None:  # another front started the core: attach to it
            self.index = link.index
            self.board = LoadBoard.attach(link.board)
            self._arena = SharedArena.attach(link.arena_buffer)
            self._connection = link.connection
            return
        self.index = 0
        context = torch_mp.get_context("spawn")
        self.board = LoadBoard.create(fronts, context)
        self._arena = SharedArena(SHARED_ARENA_BYTES)
        self._connection, child_end = context.Pipe(duplex=True)
        core_ends, buffers = [child_end], [self._arena.buffer]
        for index in range(1, fronts):
            front_end, core_end = context.Pipe(duplex=True)
            arena = SharedArena(SHARED_ARENA_BYTES)
            core_ends.append(core_end)
            buffers.append(arena.buffer)
            self.sibling_links.append(FrontLink(index, front_end, arena.buffer, self.board.handle))
        self.process = context.Process(
            target=engine_core.run,
            args=(settings, core_ends, buffers, self.board.handle, fronts == 1),
            name="qwen-vl-engine-core",
            daemon=True,
        )
        self.process.start()
        for end in core_ends:  # the core has them: its death closes the fronts' pipes
            end.close()

    def release_sibling_links(self) -> None:
        """Close this process's copies of the other fronts' pipe ends, once they have them."""
        for link in self.sibling_links:
            link.connection.close()
        self.sibling_links = []

    # ---- start-up ---------------------------------------------------------------------

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until the core has loaded and warmed up the model; StartupError if it
        fails or dies first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._connection.poll(STARTUP_POLL_S):
            if self.process is not None and not self.process.is_alive():
                raise StartupError(f"the engine process exited with {self.process.exitcode}")
            if deadline is not None and time.monotonic() > deadline:
                raise StartupError(f"the engine process was not ready in {timeout_s:g} s")
        try:
            message = self._connection.recv()
        except (EOFError, OSError):
            raise StartupError(f"the engine process exited with {self._exit_code()}") from None
        if message[0] != "ready":
            raise StartupError(f"the engine process failed to load: {message[3]}")
        self.info = message[1]
        self._pixel_dtype = getattr(torch, self.info.get("dtype", "float32"))
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="engine-reader", daemon=True)
        self._reader.start()
        if self.board.fronts == 1:  # several: the core writes these (multiprocess metrics)
            board, name = self.board, self.model_name
            metrics.REQUESTS_WAITING.labels(name).set_function(lambda: board.waiting_requests)
            metrics.REQUESTS_RUNNING.labels(name).set_function(lambda: board.running_requests)
            batch = self.config.max_batch_size
            metrics.UTILIZATION.labels(name).set_function(
                lambda: min(1.0, board.running_rows / batch)
            )
        where = f"process {self.process.pid}" if self.process is not None else "process"
        logger.info("engine %s ready (%s); front %d", where, self.info, self.index)

    def _exit_code(self) -> Any:
        if self.process is None:
            return "an unknown status (another front started it)"
        self.process.join(5)
        return self.process.exitcode

    @property
    def pixel_dtype(self) -> torch.dtype:
        """The dtype the core's vision encoder takes pixel patches in (known once ready)."""
        return self._pixel_dtype or torch.float32

    # ---- admission (what Engine offers the request path) ------------------------------

    def reserve(self) -> Reservation:
        with self._lock, self.board.lock:
            self._refuse_if_full()
            self._reserved += 1
            self._publish()
        return Reservation(self)

    def _release(self) -> None:
        with self._lock:
            self._reserved -= 1
            self._publish()

    def _publish(self) -> None:
        """This front's admitted, unfinished requests, for every front's admission. Called
        with the lock held."""
        self.board.set_outstanding(self.index, self._reserved + len(self._pending))

    def _refuse_if_full(self) -> None:
        """Called with the lock and the board's lock held."""
        if not self.alive:
            raise EngineUnavailable()
        board = self.board
        if self._refusal is None and board.draining:
            raise ShuttingDown()  # the first front drains: every front refuses from now
        # Admitted requests of every front the core is not running are decoding or queued.
        pending = max(0, board.outstanding() - board.running_requests)
        refuse_if_full(self.config, self.model_name, self._refusal, pending, board.running_rows)

    async def submit(
        self,
        rows: Sequence[Row],
        arrived: float | None = None,
        reservation: Reservation | None = None,
    ) -> list[Completion]:
        """Send one request's prepared rows to the core and wait for their completions."""
        arrived = time.monotonic() if arrived is None else arrived
        loop = asyncio.get_running_loop()
        pending = _Pending(loop, loop.create_future(), [row.on_text for row in rows])
        # The core encodes images and decodes; what it needs of a row is its tensors, its
        # conversation and its settings (images are already in the tensors).
        sent = [replace(row, images=(), on_text=None, inputs=None) for row in rows]
        streams = [row.on_text is not None for row in rows]
        spans: list[Span] = []
        packed = [self._pack(row.inputs, spans) for row in rows]
        try:
            with self._lock:
                if not self.alive:
                    raise EngineUnavailable()
                if self._closed is not None:
                    raise self._closed()
                if reservation is None:
                    with self.board.lock:
                        self._refuse_if_full()
                request_id = next(self._ids)
                self._pending[request_id] = pending
                self._spans[request_id] = spans
                self._publish()
                spans = []  # the core releases them now
            try:
                self._send("submit", request_id, sent, packed, streams, arrived)
            except OSError:
                self._forget(request_id)
                self._release_spans(request_id)
                raise EngineUnavailable() from None
        finally:
            for span in spans:  # refused before sending
                self._arena.free(span)
            if reservation is not None:
                reservation.release()
        remaining = arrived + self.config.request_timeout_s - time.monotonic()
        try:
            return await asyncio.wait_for(pending.future, remaining)
        except TimeoutError:
            self._abort(request_id)
            raise DeadlineExceeded(self.config.request_timeout_s) from None
        except BaseException:  # cancelled (client gone) or failed: free its rows either way
            self._abort(request_id)
            raise

    def _pack(self, inputs: EncodedRow | None, spans: list[Span]) -> PackedRow | None:
        """A row's processor tensors for the pipe: pixel patches into the shared arena (uint8
        frames as they are, the core normalises them; float patches cast to the core's dtype,
        which its vision encoder would do anyway), the rest inline, and its pixels' key."""
        if inputs is None:
            return None
        packed: dict[str, PackedTensor] = {}
        for key, tensor in inputs.tensors.items():
            if key == "pixel_values" and tensor.dtype != torch.uint8:  # uint8 frames stay so
                tensor = tensor.to(self._pixel_dtype)
            packed[key] = self._arena.pack(tensor, spans, shared=key == "pixel_values")
        return PackedRow(packed, inputs.pixel_key)

    def _release_spans(self, request_id: int) -> None:
        with self._lock:
            spans = self._spans.pop(request_id, [])
        for span in spans:
            self._arena.free(span)

    def _abort(self, request_id: int) -> None:
        if self._forget(request_id) is not None and self.alive:
            with contextlib.suppress(OSError):  # the core is gone; the reader fails the rest
                self._send("abort", request_id)

    def _forget(self, request_id: int) -> _Pending | None:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            self._publish()
            return pending

    def _send(self, *message: Any) -> None:
        with self._send_lock:
            self._connection.send(message)

    # ---- the reader thread ------------------------------------------------------------

    def _read(self) -> None:
        name_this_thread("qwen-vl-reader")
        while True:
            try:
                message = self._connection.recv()
            except (EOFError, OSError):
                break
            try:
                self._handle(message)
            except Exception:  # a bad message must not stop the reader
                logger.exception("unexpected message from the engine process: %r", message[:2])
        self._died()

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "text":
            _, request_id, index, delta = message
            pending = self._pending.get(request_id)
            if pending is not None and pending.sinks[index] is not None:
                pending.sinks[index](delta)
        elif kind == "done":
            pending = self._forget(message[1])
            if pending is not None:
                pending.loop.call_soon_threadsafe(_resolve, pending.future, message[2], None)
        elif kind == "failed":
            _, request_id, reason, detail = message
            pending = self._forget(request_id)
            if pending is not None:
                error: BaseException = RuntimeError(detail)
                if reason == "deadline":
                    error = DeadlineExceeded(self.config.request_timeout_s)
                elif reason == "out_of_memory":
                    error = OutOfDeviceMemory(detail)
                pending.loop.call_soon_threadsafe(_resolve, pending.future, None, error)
        elif kind == "released":  # the core has read the request's patches
            self._release_spans(message[1])
        elif kind == "metrics":
            for name, method, value in message[1]:
                if name in engine_core.FORWARDED_METRICS and method in ("observe", "inc"):
                    getattr(getattr(metrics, name).labels(self.model_name), method)(value)

    def _died(self) -> None:
        """The core's end of the pipe closed: fail what it held; tell the model."""
        with self._lock:
            self.alive = False
            held = list(self._pending.values())
            self._pending.clear()
            self._spans.clear()
            self._publish()
            stopping = self._stopping
        self._arena.reset()  # nothing reads it any more
        if self.process is not None:
            self.process.join(timeout=1)
        detail = f"the engine process exited with {self._exit_code()}"
        if not stopping:
            logger.error("%s; %d requests fail", detail, len(held))
        # Told first: what it schedules on the event loop (the gRPC server's GOAWAY) runs
        # before the failed requests' answers go out and their clients send again.
        if not stopping and self.on_death is not None:
            try:
                self.on_death(detail)
            except Exception:  # a bug there must not leave the requests hanging
                logger.exception("the engine's death handler failed")
        for pending in held:
            pending.loop.call_soon_threadsafe(
                _resolve, pending.future, None, EngineUnavailable(detail)
            )
        self.board.report(0, 0, 0)

    # ---- drain (predictor.server.drain) --------------------------------------------------------

    def refuse_new(self, error: Callable[[], Unavailable]) -> None:
        """Refuse requests not yet admitted with `error()`; admitted ones still run. The
        first front's drain also raises the board's flag, so every front refuses at once."""
        with self._lock:
            self._refusal = error
        if self.index == 0:
            self.board.set_draining()

    def close(self, error: Callable[[], Unavailable]) -> int:
        """End every request sent to the core with `error()` (the core drops their rows) and
        refuse all later ones; how many were ended."""
        with self._lock:
            self._closed = self._refusal = error
            held = list(self._pending.items())
            self._pending.clear()
            self._publish()
        for request_id, pending in held:
            pending.loop.call_soon_threadsafe(_resolve, pending.future, None, error())
            if self.alive:
                with contextlib.suppress(OSError):
                    self._send("abort", request_id)
        return len(held)

    @property
    def busy(self) -> bool:
        """Whether any admitted request has not finished (decoding, or sent to the core)."""
        with self._lock:
            return bool(self._reserved or self._pending)

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._pending

    def stop(self) -> None:
        """Ask the core to stop; kill it if it does not exit in time."""
        with self._lock:
            self._stopping = True
        if self.process is not None and self.process.is_alive():
            with contextlib.suppress(OSError):
                self._send("stop")
            self.process.join(STOP_TIMEOUT_S)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self._connection.close()


def _resolve(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
