"""The generation engine: batches concurrent requests into shared `generate` calls.

Why an engine: serving one request at a time leaves a GPU mostly idle. Here every request
(OIP v2 REST or gRPC, and any other route) submits its rows (one per image) to one bounded
queue. A single worker thread owns the model: it takes the first waiting row, keeps gathering
for up to `batch_wait_ms` or until `max_batch_size` rows, and runs them together
(`Generator.describe` groups rows by sampling settings; see its module docstring). The asyncio
side only awaits futures, so the event loop keeps answering health checks and metrics.

Chosen mechanism: dynamic batching per `generate` call with a per-row stopping criterion,
rather than a step-wise decode loop that admits rows between steps. It keeps transformers'
own `generate` (every Qwen-VL family, every attention backend, quantization) and still lets
each row stop at its own `max_new_tokens` or when its client goes away. The price: a row that
arrives while a batch runs waits for that batch to finish.

Work ahead of the batch: each request's thread runs the processor and the vision encoder for
its own images (`Generator.encode`) before it joins the queue, in parallel with the batch the
worker is decoding, so a batch's critical path is only the language model's prefill and
decoding. On this project's CPU benchmark that halved the time of a batch of 16.

Backpressure: beyond `max_queue_size` waiting requests a request is refused at once
(`QueueFull`: HTTP 503 with Retry-After, gRPC UNAVAILABLE). Every request has a deadline
(`request_timeout_s`, `DeadlineExceeded`: HTTP 504, gRPC DEADLINE_EXCEEDED). A request whose
caller is cancelled (client disconnect, gRPC cancel, deadline) has its queued rows dropped and
its running rows stopped at the next token, which frees their slots.

Failures stay with their request: if a batch fails, each request in it is retried alone so
only the one that fails again gets the error; a CUDA out-of-memory error splits the batch in
halves and retries them. The worker thread never dies.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace

import torch

from predictor import metrics
from predictor.errors import DeadlineExceeded, QueueFull
from predictor.generation import Generator, Row
from predictor.protocol import Completion

logger = logging.getLogger(__name__)


# How long a batch about to start may wait for admitted requests still decoding their images.
# A burst of requests decodes in a few hundred milliseconds; starting without them would make
# them wait for the whole batch instead (seconds on a GPU with long descriptions).
DECODING_WAIT_S = 0.5


class Reservation:
    """A place in the queue held while a request decodes its images; release exactly once."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._engine._release()


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 16
    batch_wait_ms: float = 0.0
    max_queue_size: int = 64
    request_timeout_s: float = 300.0


@dataclass(eq=False)
class _Request:
    """One submitted request: its rows, their results, and whether anyone still waits."""

    rows: list[Row]
    arrived: float
    deadline: float
    future: Future = field(default_factory=Future)
    results: list[Completion | None] = field(default_factory=list)
    pending: int = 0
    first_token_seen: bool = False
    abandoned: bool = False

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)
        self.pending = len(self.rows)

    def should_stop(self) -> bool:
        return self.abandoned or time.monotonic() > self.deadline


@dataclass(frozen=True)
class _Slot:
    """One row of one request, as the worker sees it."""

    request: _Request
    index: int

    @property
    def row(self) -> Row:
        return self.request.rows[self.index]


class Engine:
    """Owns the generator on one worker thread; `submit` is the only entry point."""

    def __init__(self, generator: Generator, model_name: str, config: EngineConfig):
        self.generator = generator
        self.model_name = model_name
        self.config = config
        self._queue: deque[_Slot] = deque()
        self._waiting: set[_Request] = set()
        self._running: set[_Request] = set()
        self._running_rows = 0
        self._lock = threading.Condition()
        self._stopped = False
        self._group = 0
        self._reserved = 0  # admitted requests still decoding their images
        self._thread = threading.Thread(target=self._work, name="qwen-vl-engine", daemon=True)
        self._thread.start()

    # ---- the asyncio side -------------------------------------------------------------

    async def submit(
        self,
        rows: Sequence[Row],
        arrived: float | None = None,
        reservation: Reservation | None = None,
    ) -> list[Completion]:
        """Queue the rows of one request and wait for all their completions."""
        arrived = time.monotonic() if arrived is None else arrived
        try:
            request = self._enqueue(list(rows), arrived)
        finally:
            if reservation is not None:
                reservation.release()
        remaining = request.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(asyncio.wrap_future(request.future), remaining)
        except TimeoutError:
            self._abandon(request)
            raise DeadlineExceeded(self.config.request_timeout_s) from None
        except BaseException:  # cancelled (client gone) or failed: free its rows either way
            self._abandon(request)
            raise

    def check_capacity(self) -> None:
        """Refuse now if the queue is full, before the caller spends time decoding images."""
        with self._lock:
            self._refuse_if_full()

    def reserve(self) -> Reservation:
        """Admit a request that is still being decoded: it counts against the queue bound, and
        a batch about to start waits a little for it (see `_next_batch`)."""
        with self._lock:
            self._refuse_if_full()
            self._reserved += 1
        return Reservation(self)

    def _release(self) -> None:
        with self._lock:
            self._reserved -= 1
            self._lock.notify()

    def _refuse_if_full(self) -> None:
        """Called with the lock held."""
        waiting = len(self._waiting) + self._reserved
        if waiting >= self.config.max_queue_size:
            metrics.REJECTED.labels(self.model_name).inc()
            raise QueueFull(waiting)

    def _enqueue(self, rows: list[Row], arrived: float) -> _Request:
        with self._lock:
            if len(self._waiting) >= self.config.max_queue_size:
                metrics.REJECTED.labels(self.model_name).inc()
                raise QueueFull(len(self._waiting))
            self._group += 1
            rows = [replace(r, group=self._group) for r in rows]
            request = _Request(rows, arrived, arrived + self.config.request_timeout_s)
            self._waiting.add(request)
            self._queue.extend(_Slot(request, i) for i in range(len(rows)))
            self._publish_load()
            self._lock.notify()
        return request

    def _abandon(self, request: _Request) -> None:
        """The caller stopped waiting: drop its queued rows; running rows stop at next token."""
        with self._lock:
            request.abandoned = True
            self._waiting.discard(request)
            self._queue = deque(s for s in self._queue if s.request is not request)
            self._publish_load()
        logger.debug("request abandoned by its caller; its rows are dropped")

    # ---- the worker thread ------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception:  # the worker must never die
                logger.exception("engine batch failed unexpectedly")
                self._fail(batch, RuntimeError("generation failed"))
            finally:
                self._finish(batch)

    def _next_batch(self) -> list[_Slot] | None:
        with self._lock:
            while not self._queue and not self._stopped:
                self._lock.wait()
            if self._stopped:
                return None
            started = time.monotonic()
            window_ends = started + self.config.batch_wait_ms / 1000
            decoding_ends = started + DECODING_WAIT_S
            while len(self._queue) < self.config.max_batch_size and not self._stopped:
                # Requests already admitted but still decoding images are worth a short wait:
                # otherwise a burst splits into a small batch and a long wait for the rest.
                ends = decoding_ends if self._reserved else window_ends
                left = ends - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            batch = [
                self._queue.popleft()
                for _ in range(min(len(self._queue), self.config.max_batch_size))
            ]
            now = time.monotonic()
            for slot in batch:
                request = slot.request
                if request not in self._running:
                    self._running.add(request)
                if not any(s.request is request for s in self._queue):
                    self._waiting.discard(request)
                metrics.QUEUE_WAIT_SECONDS.labels(self.model_name).observe(now - request.arrived)
            self._running_rows = len(batch)
            self._publish_load()
        return batch

    def _run(self, batch: list[_Slot]) -> None:
        live = [s for s in batch if not s.request.should_stop()]
        for slot in batch:
            if slot not in live:
                self._settle(slot, error=DeadlineExceeded(self.config.request_timeout_s))
        if not live:
            return
        metrics.BATCH_SIZE.labels(self.model_name).observe(len(live))
        self._generate(live)

    def _generate(self, slots: list[_Slot]) -> None:
        """Run slots together; on failure, isolate the request (or half) that caused it."""
        started = time.perf_counter()
        try:
            completions = self.generator.describe(
                [s.row for s in slots],
                stop_checks=[s.request.should_stop for s in slots],
                on_step=lambda: self._first_token(slots),
            )
        except torch.OutOfMemoryError:
            if len(slots) == 1:
                self._settle(slots[0], error=RuntimeError("out of device memory on one image"))
                return
            logger.warning("out of memory on a batch of %d rows; splitting it", len(slots))
            _empty_cache()
            half = len(slots) // 2
            self._generate(slots[:half])
            self._generate(slots[half:])
            return
        except Exception as exc:
            requests = list(dict.fromkeys(s.request for s in slots))
            if len(requests) == 1:
                logger.exception("generation failed for one request")
                for slot in slots:
                    self._settle(slot, error=RuntimeError(f"generation failed: {exc}"))
                return
            logger.warning("a batch of %d requests failed; retrying each alone", len(requests))
            for request in requests:
                self._generate([s for s in slots if s.request is request])
            return
        metrics.GENERATION_SECONDS.labels(self.model_name).observe(time.perf_counter() - started)
        for slot, completion in zip(slots, completions, strict=True):
            if slot.request.should_stop():  # stopped early: its text is cut, not an answer
                self._settle(slot, error=DeadlineExceeded(self.config.request_timeout_s))
            else:
                self._settle(slot, completion=completion)

    def _first_token(self, slots: list[_Slot]) -> None:
        now = time.monotonic()
        for slot in slots:
            request = slot.request
            if not request.first_token_seen:
                request.first_token_seen = True
                metrics.TIME_TO_FIRST_TOKEN_SECONDS.labels(self.model_name).observe(
                    now - request.arrived
                )

    def _settle(
        self,
        slot: _Slot,
        completion: Completion | None = None,
        error: BaseException | None = None,
    ) -> None:
        request = slot.request
        try:
            if error is not None:
                request.future.set_exception(error)
                return
            request.results[slot.index] = completion
            request.pending -= 1
            if request.pending == 0:
                request.future.set_result(list(request.results))
                self._count(request.results)
        except InvalidStateError:
            pass  # already failed, or cancelled by a caller that stopped waiting

    def _count(self, completions: list[Completion | None]) -> None:
        done = [c for c in completions if c is not None]
        metrics.IMAGES.labels(self.model_name).inc(len(done))
        metrics.GENERATED_TOKENS.labels(self.model_name).inc(sum(c.generated_tokens for c in done))
        metrics.PROMPT_TOKENS.labels(self.model_name).inc(sum(c.prompt_tokens for c in done))

    def _fail(self, batch: list[_Slot], error: BaseException) -> None:
        for slot in batch:
            self._settle(slot, error=error)

    def _finish(self, batch: list[_Slot]) -> None:
        with self._lock:
            for slot in batch:
                request = slot.request
                if request.future.done() or not any(s.request is request for s in self._queue):
                    self._running.discard(request)
            self._running_rows = 0
            self._publish_load()

    def _publish_load(self) -> None:
        """Update the load gauges (called with the lock held)."""
        metrics.REQUESTS_WAITING.labels(self.model_name).set(len(self._waiting - self._running))
        metrics.REQUESTS_RUNNING.labels(self.model_name).set(len(self._running))
        rows = self._running_rows + len(self._queue)
        metrics.UTILIZATION.labels(self.model_name).set(min(1.0, rows / self.config.max_batch_size))

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        with self._lock:
            return not self._queue and not self._running

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._thread.join(timeout=5)


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
