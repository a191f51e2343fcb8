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

Transport: one duplex pipe from a `spawn` multiprocessing context, carrying pickled tuples,
and one shared-memory region mapped by both processes at spawn: a row's pixel patches
(megabytes of floats for a 1 MP image) are copied into it once by the front and read in place
here, and everything else is small and pickled (token ids, text deltas, load figures); see
`predictor.engine.transfer`. ZMQ with msgpack, as vLLM uses, would add a dependency and a
tensor serialisation of our own for no gain at one front and one core on one host.

Messages, front to core: ("submit", id, rows, packed tensors, streams, arrived), ("abort",
id), ("stop",). Core to front: ("ready", info), ("released", id) once a request's pixel
patches have been read, ("text", id, row, delta), ("done", id, completions),
("failed", id, kind, message), ("load", running rows, waiting requests, running requests),
("metrics", [(collector, method, value), ...]) every 0.1 s while the engine records any.

Lifecycle: the core loads and warms up the model before it says "ready". It exits when the
front closes the pipe or dies: the pipe's end wakes the receiving loop, and on Linux the kernel
also kills the core when its parent exits (`PR_SET_PDEATHSIG`), so no core outlives its front.
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
from typing import Any

from predictor.engine.transfer import SharedArena
from predictor.errors import DeadlineExceeded, OutOfDeviceMemory
from predictor.inputs.guides import GuideCompiler
from predictor.inputs.image_workers import ImageWorkers
from predictor.rows import EncodedRow
from predictor.settings import Settings

logger = logging.getLogger("predictor.engine.core")

VISION_THREADS = 2  # rows through the vision encoder while the decode loop runs
METRICS_FLUSH_S = 0.1  # how often the engine's metric updates go to the front
# The engine's own metrics: recorded here, applied to the front's collectors (which /metrics
# serves). Load gauges travel in "load" messages instead, since admission needs them too.
FORWARDED_METRICS = (
    "BATCH_SIZE",
    "QUEUE_WAIT_SECONDS",
    "TIME_TO_FIRST_TOKEN_SECONDS",
    "GENERATION_SECONDS",
    "IMAGES",
    "GENERATED_TOKENS",
    "PROMPT_TOKENS",
    "REJECTED",
)
_PR_SET_PDEATHSIG = 1


def run(settings: Settings, connection: Any, arena_buffer: Any) -> None:
    """The core process's entry point (spawned by `RemoteEngine`), with the shared region
    rows' pixel patches arrive in (`predictor.engine.transfer`)."""
    _exit_with_parent()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _configure_logging()
    sys.setswitchinterval(0.001)
    try:
        core = Core.load(settings, connection, SharedArena.attach(arena_buffer))
    except Exception as exc:  # reported to the front, which refuses to start
        logger.exception("engine core failed to load")
        with contextlib.suppress(OSError):
            connection.send(("failed", None, type(exc).__name__, str(exc)))
        os._exit(3)
    core.serve()
    os._exit(0)


class Core:
    """Receives prepared rows, runs them through the engine, sends their tokens back."""

    def __init__(self, engine: Any, generator: Any, connection: Any, arena: SharedArena):
        self.engine = engine
        self.arena = arena
        self.generator = generator
        self.connection = connection
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._requests: dict[int, Any] = {}
        self._aborted: set[int] = set()
        # Below the decode loop's priority, as the front's image threads are below its event
        # loop's: a step for every running row comes before one more row's features.
        self._vision = ImageWorkers(VISION_THREADS, name="vision")
        engine.on_load = self._report_load
        # Guided rows' grammars arrive serialised (compiled by the front): read back, cached.
        from predictor.engine.loading import vocab_size

        self.guides = GuideCompiler(generator.tokenizer, vocab_size(generator.model.config))

    @classmethod
    def load(cls, settings: Settings, connection: Any, arena: SharedArena) -> Core:
        # Imported here: the front imports this module to name the process's target, and
        # should not pay for torch and transformers' model code twice.
        from transformers.utils import logging as transformers_logging

        from predictor.engine.decode_step import configure_compile_cache
        from predictor.engine.generation import Generator
        from predictor.engine.loading import load_model
        from predictor.engine.scheduler import Engine, EngineConfig

        # No "Loading weights" bar: it is noise in a pod's log, and tqdm's bar takes a
        # multiprocessing lock that this process, which ends with os._exit, would leave
        # behind (the front's resource tracker then warns of a leaked semaphore at exit).
        transformers_logging.disable_progress_bar()

        forwarded = _forward_metrics()
        configure_compile_cache(settings.compile_cache_dir if settings.compile else None)
        loaded = load_model(settings)
        generator = Generator(loaded.model, loaded.processor)
        config = EngineConfig.from_settings(settings)
        engine = Engine(generator, settings.model_name, config, warm_up=settings.warmup)
        core = cls(engine, generator, connection, arena)
        threading.Thread(
            target=core._flush_metrics, args=(forwarded,), name="metrics", daemon=True
        ).start()
        dtype = str(generator.model.dtype).removeprefix("torch.")
        info = {"device": str(generator.device), "compiled": settings.compile, "dtype": dtype}
        # As in the server process (predictor.server.main): the model, torch and transformers
        # live as long as the process; frozen, the collector's full passes skip them. Without
        # this the decode loop ran 12% slower here than in one process.
        gc.collect()
        gc.freeze()
        core.send("ready", info)
        return core

    def send(self, *message: Any) -> None:
        with self._send_lock:
            self.connection.send(message)

    def serve(self) -> None:
        """Handle the front's messages until it stops us or goes away."""
        while True:
            try:
                message = self.connection.recv()
            except (EOFError, OSError):
                logger.info("the front closed its end; the engine core exits")
                return
            kind = message[0]
            if kind == "submit":
                self._vision.submit(self._admit, *message[1:])
            elif kind == "abort":
                self._abort(message[1])
            elif kind == "stop":
                self.engine.stop()
                return

    def _admit(
        self,
        request_id: int,
        rows: list[Any],
        packed: list[dict | None],
        streams: list[bool],
        arrived: float,
    ) -> None:
        """Encode a request's images (off the decode loop's thread) and queue its rows."""
        try:
            try:
                prepared = self._prepared(request_id, rows, packed, streams)
            finally:  # the patches have been read (or never will be): the front reuses them
                self.send("released", request_id)
            with self._lock:
                if request_id in self._aborted:
                    self._aborted.discard(request_id)
                    return
                request = self.engine.put(prepared, arrived)
                self._requests[request_id] = request
        except OutOfDeviceMemory as exc:
            logger.warning("request %s: %s", request_id, exc.reason)
            self.send("failed", request_id, "out_of_memory", "in the vision encoder")
            return
        except Exception as exc:
            logger.exception("request %s could not be queued", request_id)
            self.send("failed", request_id, "error", f"generation failed: {exc}")
            return
        request.future.add_done_callback(lambda done: self._finished(request_id, done))

    def _prepared(
        self, request_id: int, rows: list, packed: list[dict | None], streams: list[bool]
    ) -> list:
        """The request's rows with their images through the vision encoder (which raises
        `OutOfDeviceMemory` when the device is full)."""
        return [
            replace(
                row,
                inputs=self._encoded(tensors),
                on_text=self._sink(request_id, index) if stream else None,
                grammar=self.guides.resolve(row.grammar) if row.grammar else None,
            )
            for index, (row, tensors, stream) in enumerate(zip(rows, packed, streams, strict=True))
        ]

    def _encoded(self, packed: dict | None) -> Any:
        """A row's inputs from the pipe, through the vision encoder. The pixel patches are
        read in the shared arena; nothing kept refers to it."""
        if packed is None:
            return None
        tensors = {key: self.arena.unpack(value) for key, value in packed.items()}
        return self.generator.encode_images(EncodedRow(tensors))

    def _abort(self, request_id: int) -> None:
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is None:
                self._aborted.add(request_id)  # still being encoded: dropped when it is
                return
        self.engine.abandon(request)

    def _finished(self, request_id: int, done: Future) -> None:
        with self._lock:
            self._requests.pop(request_id, None)
        error = done.exception()
        if error is None:
            self.send("done", request_id, done.result())
        elif isinstance(error, DeadlineExceeded):
            self.send("failed", request_id, "deadline", str(error.details))
        elif isinstance(error, OutOfDeviceMemory):
            self.send("failed", request_id, "out_of_memory", error.where)
        else:
            self.send("failed", request_id, "error", str(error))

    def _sink(self, request_id: int, index: int) -> Any:
        return lambda delta: self.send("text", request_id, index, delta)

    def _flush_metrics(self, forwarded: _MetricEvents) -> None:
        while True:
            time.sleep(METRICS_FLUSH_S)
            events = forwarded.take()
            if events:
                try:
                    self.send("metrics", events)
                except OSError:
                    return

    def _report_load(self, running_rows: int, waiting: int, running: int) -> None:
        """Tell the front the engine's load (called when it changes, with the engine's lock
        held, so in order)."""
        with contextlib.suppress(OSError):
            self.send("load", running_rows, waiting, running)


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
