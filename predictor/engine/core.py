"""The engine core: a process of its own that owns the model, the device, the vision encoder
and the decode loop, and does nothing else (`--engine_process`).

Why a process: in one process, HTTP and gRPC handling, JSON and base64, JPEG decoding, the
processor, the vision encoder and the decode loop take turns on one GIL, and every turn the
request side takes is a pause in decoding for every running row. vLLM (an API server and an
`EngineCore` process), SGLang and TGI split the request front from the model loop for the same
reason. Here the KServe server process stays the front (protocols, validation, images, the
processor's CPU work, admission, metrics) and sends prepared rows to this process
(`predictor.engine.client.RemoteEngine`), which runs the same `Engine` as the in-process
layout.

Clients: one per front process (`--workers N`: N fronts in front of this one core, as vLLM's
`--api-server-count` puts several API servers in front of one `EngineCore`). Each front has
a duplex pipe from a `spawn` multiprocessing context, carrying pickled tuples, and a
shared-memory region of its own mapped here at spawn: a row's pixel patches (megabytes for a
1 MP image) are copied into it once by that front and read in place here, and everything else
is small and pickled (token ids, text deltas); see `predictor.engine.transfer`. The engine's
load is not sent: the core writes it into a shared board every front reads at admission
(`predictor.engine.board`). ZMQ with msgpack, as vLLM uses, would add a dependency and a
tensor serialisation of our own for no gain on one host. Request ids are each front's own;
the core keys requests by client and id.

Messages, front to core: ("submit", id, rows, packed tensors, streams, arrived), ("abort",
id), ("stop",) (front 0 only). Core to a front: ("ready", info), ("released", id) once a
request's pixel patches have been read, ("text", id, row, delta), ("done", id, completions),
("failed", id, kind, message), and to front 0 with a single front ("metrics", [(collector,
method, value), ...]) every 0.1 s while the engine records any. With several fronts the
metrics are Prometheus' multiprocess files instead, which this process writes like the fronts
(`predictor.server.fronts`), so any front's /metrics shows the engine's.

Lifecycle: the core loads and warms up the model before it says "ready" to every front. It
exits when front 0 (the one that started it) stops it, closes its pipe or dies: the pipe's
end wakes the receiving loop, and on Linux the kernel also kills the core when its parent
exits (`PR_SET_PDEATHSIG`), so no core outlives its front. When another front's pipe closes,
the requests it held are dropped and the core serves on.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from multiprocessing import connection as mp_connection
from typing import Any

from predictor.engine.board import LoadBoard
from predictor.engine.transfer import PackedRow, SharedArena
from predictor.errors import DeadlineExceeded, OutOfDeviceMemory
from predictor.inputs.guides import GuideCompiler
from predictor.inputs.image_workers import ImageWorkers
from predictor.rows import EncodedRow
from predictor.settings import Settings

logger = logging.getLogger("predictor.engine.core")

VISION_THREADS = 2  # rows through the vision encoder while the decode loop runs
METRICS_FLUSH_S = 0.1  # how often the engine's metric updates go to the front
# The engine's own metrics: recorded here, applied to the front's collectors (which /metrics
# serves). Load gauges are on the shared board instead, since admission needs them too.
FORWARDED_METRICS = (
    "BATCH_SIZE",
    "VISION_CACHE_HITS",
    "VISION_CACHE_MISSES",
    "QUEUE_WAIT_SECONDS",
    "TIME_TO_FIRST_TOKEN_SECONDS",
    "GENERATION_SECONDS",
    "IMAGES",
    "GENERATED_TOKENS",
    "PROMPT_TOKENS",
    "REJECTED",
)
_PR_SET_PDEATHSIG = 1


def run(
    settings: Settings,
    connections: list[Any],
    arena_buffers: list[Any],
    board_handle: Any,
    forward_metrics: bool = True,
) -> None:
    """The core process's entry point (spawned by `RemoteEngine`): one pipe and one shared
    region per front (`predictor.engine.transfer`), the shared load board, and whether the
    engine's metrics go to front 0 over its pipe (one front) or to Prometheus' multiprocess
    files (several)."""
    _exit_with_parent()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _configure_logging()
    sys.setswitchinterval(0.001)
    clients = [
        _Client(index, connection, SharedArena.attach(buffer))
        for index, (connection, buffer) in enumerate(zip(connections, arena_buffers, strict=True))
    ]
    try:
        core = Core.load(settings, clients, LoadBoard.attach(board_handle), forward_metrics)
    except Exception as exc:  # reported to the fronts, which refuse to start
        logger.exception("engine core failed to load")
        for client in clients:
            with contextlib.suppress(OSError):
                client.connection.send(("failed", None, type(exc).__name__, str(exc)))
        os._exit(3)
    core.serve()
    os._exit(0)


class _Client:
    """One front process: its pipe, its shared region, the requests it has here."""

    def __init__(self, index: int, connection: Any, arena: SharedArena):
        self.index = index
        self.connection = connection
        self.arena = arena
        self.send_lock = threading.Lock()
        self.requests: dict[int, Any] = {}
        self.aborted: set[int] = set()
        self.closed = False

    def send(self, *message: Any) -> None:
        if self.closed:
            return
        with self.send_lock:
            self.connection.send(message)


class Core:
    """Receives prepared rows from the fronts, runs them through the engine, sends their
    tokens back to the front each came from."""

    def __init__(self, engine: Any, generator: Any, clients: list[_Client], board: LoadBoard):
        self.engine = engine
        self.generator = generator
        self.clients = clients
        self.board = board
        self._lock = threading.Lock()
        # Below the decode loop's priority, as the front's image threads are below its event
        # loop's: a step for every running row comes before one more row's features.
        self._vision = ImageWorkers(VISION_THREADS, name="vision")
        self._gauges: tuple[Any, Any, Any] | None = None  # set: the multiprocess metrics
        self._max_batch_size = max(1, int(getattr(engine.config, "max_batch_size", 1)))
        engine.on_load = self._report_load
        # Guided rows' grammars arrive serialised (compiled by the front): read back, cached.
        from predictor.engine.loading import vocab_size

        self.guides = GuideCompiler(generator.tokenizer, vocab_size(generator.model.config))

    @classmethod
    def load(
        cls, settings: Settings, clients: list[_Client], board: LoadBoard, forward_metrics: bool
    ) -> Core:
        # Imported here: the front imports this module to name the process's target, and
        # should not pay for torch and transformers' model code twice.
        from transformers.utils import logging as transformers_logging

        from predictor.engine.decode_step import configure_compile_cache
        from predictor.engine.generation import Generator
        from predictor.engine.loading import load_model
        from predictor.engine.scheduler import Engine, EngineConfig
        from predictor.engine.vision_cache import VisionCache
        from predictor.inputs.input_cache import MIB

        # No "Loading weights" bar: it is noise in a pod's log, and tqdm's bar takes a
        # multiprocessing lock that this process, which ends with os._exit, would leave
        # behind (the front's resource tracker then warns of a leaked semaphore at exit).
        transformers_logging.disable_progress_bar()

        forwarded = _forward_metrics() if forward_metrics else None
        configure_compile_cache(settings.compile_cache_dir if settings.compile else None)
        loaded = load_model(settings)
        generator = Generator(loaded.model, loaded.processor)
        generator.vision_cache = VisionCache(settings.vision_cache_mb * MIB, settings.model_name)
        config = EngineConfig.from_settings(settings)
        engine = Engine(generator, settings.model_name, config, warm_up=settings.warmup)
        core = cls(engine, generator, clients, board)
        if forwarded is None:
            from predictor import metrics

            name = settings.model_name
            metrics.touch(name)
            core._gauges = (
                metrics.REQUESTS_WAITING.labels(name),
                metrics.REQUESTS_RUNNING.labels(name),
                metrics.UTILIZATION.labels(name),
            )
        dtype = str(generator.model.dtype).removeprefix("torch.")
        info = {"device": str(generator.device), "compiled": settings.compile, "dtype": dtype}
        # As in the server process (predictor.server.main): the model, torch and transformers
        # live as long as the process; frozen, the collector's full passes skip them. Without
        # this the decode loop ran 12% slower here than in one process.
        gc.collect()
        gc.freeze()
        for client in clients:
            with contextlib.suppress(OSError):
                client.send("ready", info)
        if forwarded is not None:
            # Only now: a front reads "ready" first (warm-up's updates, such as its image's
            # vision cache miss, wait for the first flush).
            threading.Thread(
                target=core._flush_metrics, args=(forwarded,), name="metrics", daemon=True
            ).start()
        return core

    def serve(self) -> None:
        """Handle the fronts' messages until front 0 stops us or goes away."""
        open_clients = {client.connection: client for client in self.clients}
        while open_clients:
            for connection in mp_connection.wait(list(open_clients)):
                client = open_clients[connection]
                try:
                    message = connection.recv()
                except (EOFError, OSError):
                    del open_clients[connection]
                    if client.index == 0:
                        logger.info("the front closed its end; the engine core exits")
                        return
                    self._client_gone(client)
                    continue
                kind = message[0]
                if kind == "submit":
                    self._vision.submit(self._admit, client, *message[1:])
                elif kind == "abort":
                    self._abort(client, message[1])
                elif kind == "stop" and client.index == 0:
                    self.engine.stop()
                    return

    def _client_gone(self, client: _Client) -> None:
        """A front other than the first exited: drop what it held, serve the others."""
        with self._lock:
            client.closed = True
            held = list(client.requests.values())
            client.requests.clear()
        log = logger.warning if held else logger.info
        log("front %d closed its end; its %d requests are dropped", client.index, len(held))
        for request in held:
            self.engine.abandon(request)

    def _admit(
        self,
        client: _Client,
        request_id: int,
        rows: list[Any],
        packed: list[PackedRow | None],
        streams: list[bool],
        arrived: float,
    ) -> None:
        """Encode a request's images (off the decode loop's thread) and queue its rows."""
        try:
            try:
                prepared = [
                    replace(
                        row,
                        inputs=self._encoded(client, tensors),
                        on_text=self._sink(client, request_id, index) if stream else None,
                        grammar=self.guides.resolve(row.grammar) if row.grammar else None,
                    )
                    for index, (row, tensors, stream) in enumerate(
                        zip(rows, packed, streams, strict=True)
                    )
                ]
            finally:  # the patches have been read (or never will be): the front reuses them
                client.send("released", request_id)
            with self._lock:
                if request_id in client.aborted or client.closed:
                    client.aborted.discard(request_id)
                    return
                request = self.engine.put(prepared, arrived)
                client.requests[request_id] = request
        except OutOfDeviceMemory as exc:  # the vision encoder's: retryable, one line
            logger.warning("request %s: %s", request_id, exc.reason)
            with contextlib.suppress(OSError):
                client.send("failed", request_id, "out_of_memory", exc.where)
            return
        except Exception as exc:
            logger.exception("request %s could not be queued", request_id)
            with contextlib.suppress(OSError):
                client.send("failed", request_id, "error", f"generation failed: {exc}")
            return
        request.future.add_done_callback(lambda done: self._finished(client, request_id, done))

    def _encoded(self, client: _Client, packed: PackedRow | None) -> Any:
        """A row's inputs from the pipe, through the vision encoder. The pixel patches are
        read in the front's shared arena; nothing kept refers to it."""
        if packed is None:
            return None
        tensors = {key: client.arena.unpack(value) for key, value in packed.tensors.items()}
        return self.generator.encode_images(EncodedRow(tensors, pixel_key=packed.pixel_key))

    def _abort(self, client: _Client, request_id: int) -> None:
        with self._lock:
            request = client.requests.pop(request_id, None)
            if request is None:
                client.aborted.add(request_id)  # still being encoded: dropped when it is
                return
        self.engine.abandon(request)

    def _finished(self, client: _Client, request_id: int, done: Future) -> None:
        with self._lock:
            client.requests.pop(request_id, None)
        error = done.exception()
        with contextlib.suppress(OSError):  # that front is gone
            if error is None:
                client.send("done", request_id, done.result())
            elif isinstance(error, DeadlineExceeded):
                client.send("failed", request_id, "deadline", str(error.details))
            elif isinstance(error, OutOfDeviceMemory):
                client.send("failed", request_id, "out_of_memory", error.where)
            else:
                client.send("failed", request_id, "error", str(error))

    def _sink(self, client: _Client, request_id: int, index: int) -> Any:
        def send(delta: str) -> None:
            with contextlib.suppress(OSError):
                client.send("text", request_id, index, delta)

        return send

    def _flush_metrics(self, forwarded: _MetricEvents) -> None:
        while True:
            time.sleep(METRICS_FLUSH_S)
            events = forwarded.take()
            if events:
                try:
                    self.clients[0].send("metrics", events)
                except OSError:
                    return

    def _report_load(self, running_rows: int, waiting: int, running: int) -> None:
        """Publish the engine's load to the fronts (called when it changes, with the engine's
        lock held, so in order)."""
        self.board.report(running_rows, waiting, running)
        if self._gauges is not None:
            waiting_gauge, running_gauge, utilization = self._gauges
            waiting_gauge.set(waiting)
            running_gauge.set(running)
            utilization.set(min(1.0, running_rows / self._max_batch_size))


class _MetricEvents:
    """Metric updates recorded in this process, waiting to be sent to the front."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[str, str, float]] = []

    def record(self, name: str, method: str, value: float) -> None:
        with self._lock:
            self._events.append((name, method, value))

    def take(self) -> list[tuple[str, str, float]]:
        with self._lock:
            events, self._events = self._events, []
        return events


class _ForwardedMetric:
    """Stands in for one of `predictor.metrics`' collectors in this process: `labels(...)`
    then `observe`, `inc` or `set` records the update for the front (the only process whose
    /metrics Prometheus scrapes), which applies it to the real collector."""

    def __init__(self, name: str, events: _MetricEvents):
        self.name = name
        self.events = events

    def labels(self, *values: str) -> _ForwardedMetric:
        return self  # one model per process: the front labels with its model name

    def observe(self, value: float) -> None:
        self.events.record(self.name, "observe", value)

    def inc(self, value: float = 1.0) -> None:
        self.events.record(self.name, "inc", value)


def _forward_metrics() -> _MetricEvents:
    """Replace the engine's collectors in this process by forwarding stand-ins (before the
    engine is built: it looks some of them up once)."""
    from predictor import metrics

    events = _MetricEvents()
    for name in FORWARDED_METRICS:
        setattr(metrics, name, _ForwardedMetric(name, events))
    return events


def _exit_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (no orphaned engine holding a
    GPU). Elsewhere the closed pipe still ends it."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


def _configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [engine core]: %(message)s")
    )
    root = logging.getLogger("predictor")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
