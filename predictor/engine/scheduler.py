"""The generation engine: batches concurrent requests on one device.

Why an engine: serving one request at a time leaves a GPU mostly idle. Here every request
(OIP v2 REST or gRPC, and the OpenAI route) submits its rows (one per image) to one bounded
queue. A single worker thread owns the model; the asyncio side only awaits futures, so the
event loop keeps answering health checks and metrics.

Chosen mechanism: continuous batching, a step-wise decode loop that admits rows between steps
(`predictor.engine.running_batch.RunningBatch`). Before each decoding step the worker prefills
whatever rows are waiting (up to `max_batch_size` running rows) and adds them to the running
batch; a row leaves as soon as it reaches its own `max_new_tokens`, a stop token or string, or its
caller goes away, and its slot is filled at the next step. So a request never waits for
someone else's batch to finish, and rows with different limits and sampling settings share
every step. When the engine is idle, the first request waits `batch_wait_ms` (default 0) for
others. This is the only decode path: the decoding step runs on a preallocated cache with
static shapes (`predictor.engine.decode_step`), compiled before ready with `--compile`.

Work ahead of the batch: each request's thread runs the processor and the vision encoder for
its own images (`Generator.encode`) before it joins the queue, in parallel with the batch the
worker is decoding, so a batch's critical path is only the language model's prefill and
decoding. On this project's CPU benchmark that halved the time of a batch of 16.

Backpressure: a request is refused at once when the requests admitted but not yet generating
(queued, or still decoding their images) fill the queue (`max_queue_size`) plus the batch
slots free at that moment (`QueueFull`: HTTP 503 with Retry-After, gRPC UNAVAILABLE). Every
request has a deadline (`request_timeout_s`, `DeadlineExceeded`: HTTP 504, gRPC
DEADLINE_EXCEEDED). A request whose caller is cancelled (client disconnect, gRPC cancel,
deadline) has its queued rows dropped and its running rows stopped at the next token, which
frees their slots.

Failures stay with their request: if a prefill fails, each request in it is retried alone so
only the one that fails again gets the error; a CUDA out-of-memory error splits the rows in
halves and retries them. Out of memory in a decoding step fails the most recently admitted half
of the running rows, with an error the client may retry, and the others go on. The worker
thread never dies.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from predictor import metrics
from predictor.engine.generation import Generator
from predictor.engine.prefill_groups import prefill_groups
from predictor.engine.running_batch import RunningBatch
from predictor.errors import DeadlineExceeded, OutOfDeviceMemory, QueueFull, Unavailable
from predictor.protocol import Completion
from predictor.rows import Row

logger = logging.getLogger(__name__)


class Reservation:
    """A place in the queue held while a request decodes its images; release exactly once.
    (`Engine` and `client.RemoteEngine` both hand these out: anything with `_release`.)"""

    def __init__(self, engine: Any):
        self._engine = engine
        self._held = True

    @property
    def held(self) -> bool:
        return self._held

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
    waiting_served_ratio: float = 0.0  # see `Engine._hold_back`; 0: off
    max_waiting_tokens: int = 0
    max_model_len: int = 4096  # tokens a row's cache slot holds, prompt and output
    compile_step: bool = False  # torch.compile the decoding step (CUDA graphs on a GPU)

    @classmethod
    def from_settings(cls, settings: Any) -> EngineConfig:
        """The engine's part of the server's flags (`predictor.settings.Settings`)."""
        return cls(
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
            max_queue_size=settings.max_queue_size,
            request_timeout_s=settings.request_timeout_s,
            waiting_served_ratio=settings.waiting_served_ratio,
            max_waiting_tokens=settings.max_waiting_tokens,
            max_model_len=settings.max_model_len,
            compile_step=settings.compile,
        )


def refuse_if_full(
    config: EngineConfig,
    model_name: str,
    refusal: Callable[[], Unavailable] | None,
    pending: int,
    running_rows: int,
) -> None:
    """The admission rule both engines (`Engine`, `client.RemoteEngine`) apply: raise
    `refusal()` while new work is refused (draining), else `QueueFull` once `pending`
    requests (queued, or admitted and still decoding their images) fill the capacity.

    The capacity is the queue plus the batch slots free right now: a request decoding its
    images is headed for a free slot, not for the queue; counting it against the queue alone
    refused a burst at an idle server after `max_queue_size` requests although
    `max_batch_size` slots were empty."""
    if refusal is not None:
        raise refusal()
    free_slots = max(0, config.max_batch_size - running_rows)
    if pending >= config.max_queue_size + free_slots:
        metrics.REJECTED.labels(model_name).inc()
        raise QueueFull(pending)


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
    started: float | None = None  # time.monotonic() when its first row began generating
    queued_at_step: int = 0  # the engine's decoding steps so far when it was queued

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


Finished = list[tuple[_Slot, Completion]]  # rows that ended, with their completions


class Engine:
    """Owns the generator on one worker thread; `submit` is the only entry point."""

    def __init__(
        self,
        generator: Generator,
        model_name: str,
        config: EngineConfig,
        running_batch: Callable[..., RunningBatch] = RunningBatch,
        warm_up: bool = False,
    ):
        self.generator = generator
        self.model_name = model_name
        self.config = config
        self._batch_size = metrics.BATCH_SIZE.labels(model_name)  # observed at every step
        self.batch = running_batch(
            generator, config.max_batch_size, config.max_model_len, config.compile_step
        )
        if warm_up:
            self.batch.warm_up()
        self._queue: deque[_Slot] = deque()
        self._waiting: set[_Request] = set()
        self._running: set[_Request] = set()
        self._running_rows = 0
        self._lock = threading.Condition()
        self._stopped = False
        self._group = 0
        self._reserved = 0  # admitted requests still decoding their images
        self._steps = 0  # decoding steps run (held-back admissions count their wait in these)
        # Called with (running rows, waiting requests, running requests) whenever they change
        # (with the engine's lock held: keep it short); the engine process reports load so.
        self.on_load: Callable[[int, int, int], None] | None = None
        self._refusal: Callable[[], Unavailable] | None = None  # new work refused (draining)
        self._closed: Callable[[], Unavailable] | None = None  # everything refused and ended
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
            request = self._enqueue(list(rows), arrived, admitted=reservation is not None)
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
        refuse_if_full(
            self.config, self.model_name, self._refusal, self._pending(), self._running_rows
        )

    def _pending(self) -> int:
        """Admitted requests not yet generating: queued, or still decoding their images."""
        return len(self._waiting - self._running) + self._reserved

    def _enqueue(self, rows: list[Row], arrived: float, admitted: bool = False) -> _Request:
        """Queue a request's rows. One `admitted` earlier (it holds a reservation, counted in
        `_pending`) is not refused now; any other must fit the capacity."""
        with self._lock:
            if self._closed is not None:
                raise self._closed()
            if not admitted:
                self._refuse_if_full()
            self._group += 1
            rows = [replace(r, group=self._group) for r in rows]
            request = _Request(rows, arrived, arrived + self.config.request_timeout_s)
            request.queued_at_step = self._steps
            self._waiting.add(request)
            self._queue.extend(_Slot(request, i) for i in range(len(rows)))
            self._publish_load()
            self._lock.notify()
        return request

    # ---- drain (predictor.server.drain) --------------------------------------------------------

    def refuse_new(self, error: Callable[[], Unavailable]) -> None:
        """Refuse requests not yet admitted with `error()`; admitted ones still run."""
        with self._lock:
            self._refusal = error

    def close(self, error: Callable[[], Unavailable]) -> int:
        """End every request the engine holds with `error()` and refuse all later ones;
        how many were ended. Running rows stop at their next token."""
        with self._lock:
            self._closed = self._refusal = error
            held = self._waiting | self._running
            for request in held:
                request.abandoned = True
            self._queue.clear()
            self._waiting.clear()
            self._publish_load()
        ended = 0
        for request in held:
            try:
                request.future.set_exception(error())
                ended += 1
            except InvalidStateError:
                pass  # it finished meanwhile
        return ended

    @property
    def busy(self) -> bool:
        """Whether any admitted request has not finished (decoding, queued or running)."""
        with self._lock:
            return bool(self._reserved or self._queue or self._waiting or self._running)

    def put(self, rows: list[Row], arrived: float) -> _Request:
        """Queue an already admitted request without waiting for it (the engine process's
        entry point; its front decided admission). `abandon` it if its caller goes away."""
        return self._enqueue(rows, arrived, admitted=True)

    def abandon(self, request: _Request) -> None:
        self._abandon(request)

    def _abandon(self, request: _Request) -> None:
        """The caller stopped waiting: drop its queued rows; running rows stop at next token."""
        with self._lock:
            request.abandoned = True
            self._waiting.discard(request)
            self._queue = deque(s for s in self._queue if s.request is not request)
            self._publish_load()
        logger.debug("request abandoned by its caller; its rows are dropped")

    # ---- the worker thread ------------------------------------------------------------

    # ---- the worker: rows join and leave between decoding steps ------------------------

    def _work(self) -> None:
        batch = self.batch
        while True:
            slots = self._admissions(len(batch))
            if slots is None:
                return
            try:
                if slots:
                    self._admit(batch, slots)
                if len(batch):
                    self._step(batch)
            except Exception:  # the worker must never die
                logger.exception("engine step failed unexpectedly")
                for slot in [*slots, *batch.clear()]:
                    self._settle(slot, error=RuntimeError("generation failed"))
            finally:
                self._track(batch)

    def _admissions(self, running: int) -> list[_Slot] | None:
        """Rows to add before the next step. An idle engine blocks here until a request
        arrives (then waits `batch_wait_ms` for others) and takes as many as fit; a busy one
        never waits, but may hold waiting rows back for a few steps (`_hold_back`)."""
        with self._lock:
            if running == 0:
                while not self._queue and not self._stopped:
                    self._lock.wait()
                window_ends = time.monotonic() + self.config.batch_wait_ms / 1000
                while len(self._queue) < self.config.max_batch_size and not self._stopped:
                    left = window_ends - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
            if self._stopped:
                return None
            if running and self._hold_back(running):
                return []
            return self._take(self.config.max_batch_size - running, running)

    def _hold_back(self, running: int) -> bool:
        """Whether to run the next step without taking in the rows waiting (lock held).

        Why: a prefill stops every running row for its whole length, and its cost hardly
        grows with the rows it serves (on this project's CPU benchmark, one 448x448 row took
        8 ms and sixteen 32 ms, while a decoding step of 16 rows took 6.5 ms). Taking rows in
        one at a time, as they trickle in, paid that pause for each. As in
        text-generation-inference, waiting rows are taken in once they number
        `waiting_served_ratio` of the running rows, or fill the free slots, or the oldest has
        waited `max_waiting_tokens` steps; what that bought is in the README."""
        if not self._queue:
            return False
        free = self.config.max_batch_size - running
        enough = max(1, min(free, math.ceil(self.config.waiting_served_ratio * running)))
        if len(self._queue) >= enough:
            return False
        waited = self._steps - self._queue[0].request.queued_at_step
        return waited < self.config.max_waiting_tokens

    def _admit(self, batch: RunningBatch, slots: list[_Slot]) -> None:
        """Prefill slots into the running batch, rows of similar prompt lengths together
        (failures isolated, see `_isolated`)."""

        def prefill(rows: list[_Slot]) -> list[tuple[_Slot, Completion]]:
            finished = batch.admit(
                [s.row for s in rows], rows, [s.request.should_stop for s in rows]
            )
            self._first_token(rows)
            self._fail_broken(batch)
            return finished

        # Rows of similar prompt lengths prefill together (`predictor.engine.prefill_groups`).
        for group in prefill_groups(self._live(slots), _prompt_length):
            self._isolated(group, prefill)

    def _step(self, batch: RunningBatch) -> None:
        """One decoding step for every running row. Out of device memory: the newest half of
        the rows fail (the client may retry) and the others go on."""
        self._batch_size.observe(len(batch))
        self._steps += 1
        try:
            finished = batch.step()
        except torch.OutOfMemoryError:
            finished = None  # handled below, once the failed step's frames are gone
        except Exception as exc:
            logger.exception("a decoding step failed; its %d rows fail", len(batch))
            for slot in batch.clear():
                self._settle(slot, error=RuntimeError(f"generation failed: {exc}"))
            return
        if finished is None:
            evicted = batch.evict(max(1, len(batch) // 2))
            logger.warning("out of memory decoding; %d rows fail", len(evicted))
            empty_cache()
            for slot in evicted:
                self._settle(slot, error=OutOfDeviceMemory("while decoding"))
            return
        self._fail_broken(batch)
        self._finished(finished)

    def _fail_broken(self, batch: RunningBatch) -> None:
        """Rows whose logits held a NaN left the batch: each fails alone, the others go on."""
        failed = batch.take_failed()
        if failed:
            logger.warning("%d rows produced NaN logits; they fail, the batch goes on", len(failed))
        for slot in failed:
            self._settle(slot, error=RuntimeError("generation failed: the model produced NaN"))

    def _live(self, slots: list[_Slot]) -> list[_Slot]:
        live = [s for s in slots if not s.request.should_stop()]
        for slot in slots:
            if slot not in live:
                self._settle(slot, error=DeadlineExceeded(self.config.request_timeout_s))
        return live

    def _finished(self, finished: Finished) -> None:
        for slot, completion in finished:
            if slot.request.should_stop():  # stopped early: its text is cut, not an answer
                self._settle(slot, error=DeadlineExceeded(self.config.request_timeout_s))
            else:
                self._settle(slot, completion=completion)

    def _track(self, batch: RunningBatch) -> None:
        """Publish which requests are running, when rows joined or left in this step."""
        if len(batch) == self._running_rows and not self._queue:
            return  # nothing changed (rows only leave by finishing, which shrinks the batch)
        with self._lock:
            self._running = {member.owner.request for member in batch.members}
            self._running_rows = len(batch)
            self._publish_load()

    def _take(self, count: int, running: int) -> list[_Slot]:
        """Move up to `count` rows from the queue to the running set (lock held)."""
        taken = [self._queue.popleft() for _ in range(min(count, len(self._queue)))]
        now = time.monotonic()
        for slot in taken:
            request = slot.request
            self._running.add(request)
            if not any(s.request is request for s in self._queue):
                self._waiting.discard(request)
            if request.started is None:
                request.started = now
            metrics.QUEUE_WAIT_SECONDS.labels(self.model_name).observe(now - request.arrived)
        rows = running + len(taken)
        if taken or rows != self._running_rows:
            # Only on a change: this runs before every decoding step, and in the engine
            # process each publication is a message to the front (one a step cost P1 5%).
            self._running_rows = rows
            self._publish_load()
        return taken

    def _isolated(self, slots: list[_Slot], run: Callable[[list[_Slot]], Finished]) -> None:
        """Run the model on slots together; if that fails, the failure stays with the request
        that caused it: each request is retried alone, and a CUDA out-of-memory error splits
        the rows in halves until they fit (one image that does not fit fails alone)."""
        out_of_memory = False
        try:
            finished = run(slots)
        except torch.OutOfMemoryError:
            # Retried below, outside this block: while it runs, the exception's traceback
            # keeps the failed prefill's frames and their tensors alive, and the allocator
            # could not give their memory back.
            out_of_memory = True
        except OutOfDeviceMemory as exc:  # the vision encoder's, already handled there
            for slot in slots:
                self._settle(slot, error=exc)
            return
        except Exception as exc:
            requests = list(dict.fromkeys(s.request for s in slots))
            if len(requests) == 1:
                logger.exception("generation failed for one request")
                for slot in slots:
                    self._settle(slot, error=RuntimeError(f"generation failed: {exc}"))
                return
            logger.warning("%d requests failed together; retrying each alone", len(requests))
            for request in requests:
                self._isolated([s for s in slots if s.request is request], run)
            return
        if out_of_memory:
            empty_cache()
            if len(slots) == 1:
                self._settle(slots[0], error=OutOfDeviceMemory("on one image"))
                return
            logger.warning("out of memory on %d rows; splitting them", len(slots))
            half = len(slots) // 2
            self._isolated(slots[:half], run)
            self._isolated(slots[half:], run)
            return
        self._finished(finished)

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
                self._count(request)
        except InvalidStateError:
            pass  # already failed, or cancelled by a caller that stopped waiting

    def _count(self, request: _Request) -> None:
        if request.started is not None:
            metrics.GENERATION_SECONDS.labels(self.model_name).observe(
                time.monotonic() - request.started
            )
        done = [c for c in request.results if c is not None]
        metrics.IMAGES.labels(self.model_name).inc(len(done))
        metrics.GENERATED_TOKENS.labels(self.model_name).inc(sum(c.generated_tokens for c in done))
        metrics.PROMPT_TOKENS.labels(self.model_name).inc(sum(c.prompt_tokens for c in done))

    def _publish_load(self) -> None:
        """Update the load gauges (called with the lock held)."""
        metrics.REQUESTS_WAITING.labels(self.model_name).set(len(self._waiting - self._running))
        metrics.REQUESTS_RUNNING.labels(self.model_name).set(len(self._running))
        rows = self._running_rows + len(self._queue)
        metrics.UTILIZATION.labels(self.model_name).set(min(1.0, rows / self.config.max_batch_size))
        if self.on_load is not None:
            self.on_load(self._running_rows, len(self._waiting - self._running), len(self._running))

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


def empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _prompt_length(slot: _Slot) -> int | None:
    """A slot's prompt tokens, images included, or None before its row is encoded."""
    inputs = slot.row.inputs
    return None if inputs is None else int(inputs.tensors["input_ids"].shape[-1])
