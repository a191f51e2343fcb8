"""Send the images through a thread pool, write each caption as it arrives, and count.

Why threads: the work is waiting on the network, httpx and gRPC clients are thread-safe, and a
plain pool keeps Ctrl-C and the progress bar simple. One image per request: the server batches
concurrent requests itself, and a failure then concerns one image only. At most
2 x concurrency images are queued at a time, so a million-file folder costs no memory up front.

Writes happen in the worker threads, never in the main one, so Ctrl-C (delivered to the main
thread) cannot interrupt a write halfway. The first Ctrl-C stops new requests and lets those in
flight finish; a second one quits at once, which the atomic writes make safe too.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from tqdm import tqdm

from predictor.describe.errors import (
    Cancelled,
    Fatal,
    ImageRejected,
    RequestFailed,
)
from predictor.describe.files import ImageFile
from predictor.describe.outputs import Outputs, Plan
from predictor.describe.protocols import Caption, Client
from predictor.describe.retry import RetryPolicy, call_with_retries

logger = logging.getLogger(__name__)
EXIT_INTERRUPTED = 130


@dataclass
class Counts:
    """What a run did; the summary line and the exit code come from it."""

    done: int = 0
    skipped: int = 0
    skipped_rejected: int = 0  # of `skipped`: refused by the server in an earlier run
    failed: int = 0
    rejected: int = 0  # of `failed`: refused by the server in this run
    not_started: int = 0  # left when the run was interrupted or stopped
    tokens: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    fatal: str | None = None

    def summary(self) -> str:
        seconds = max(self.elapsed_s, 1e-9)
        line = (
            f"done {self.done}, skipped {self.skipped}, failed {self.failed} "
            f"in {self.elapsed_s:.1f}s: {self.done / seconds:.2f} images/s, "
            f"{self.tokens / seconds:.1f} tokens/s"
        )
        notes = []
        if self.rejected:
            notes.append(f"{self.rejected} refused by the server")
        if self.skipped_rejected:
            notes.append(
                f"{self.skipped_rejected} skipped were refused in an earlier run; "
                "--retry-failed sends them again"
            )
        if self.not_started:
            notes.append(f"{self.not_started} not started")
        return line + (f" ({'; '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class _Result:
    image: ImageFile
    caption: Caption | None = None
    error: str | None = None
    rejected: bool = False
    cancelled: bool = False


class Runner:
    """Describes the images of a `Plan` with one `Client`, writing through `Outputs`."""

    def __init__(
        self,
        client: Client,
        outputs: Outputs,
        policy: RetryPolicy,
        concurrency: int,
        progress: bool = True,
    ):
        self.client = client
        self.outputs = outputs
        self.policy = policy
        self.concurrency = concurrency
        self.progress = progress
        self.stop = threading.Event()

    def run(self, plan: Plan, prefailed: Mapping[str, str] | None = None) -> Counts:
        """Describe `plan.todo`; images in `prefailed` (key -> reason) count as failed unsent."""
        prefailed = prefailed or {}
        counts = Counts(skipped=plan.skipped, skipped_rejected=plan.skipped_rejected)
        todo = [image for image in plan.todo if image.key not in prefailed]
        for key, reason in prefailed.items():
            logger.warning("failed %s: %s", key, reason)
            counts.failed += 1
        bar = tqdm(total=len(todo), unit="img", disable=not self.progress, dynamic_ncols=True)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="describe")
        queue = iter(todo)
        pending: set[Future[_Result]] = set()
        started = time.perf_counter()

        def fill() -> None:
            while len(pending) < 2 * self.concurrency and not self.stop.is_set():
                image = next(queue, None)
                if image is None:
                    return
                pending.add(pool.submit(self._describe_one, image))

        def collect(finished: set[Future[_Result]]) -> None:
            for future in finished:
                pending.discard(future)
                if future.cancelled():
                    continue
                try:
                    self._count(future.result(), counts)
                except Fatal as error:
                    counts.fatal = counts.fatal or error.message
                    self.stop.set()  # every other image would fail the same way
                    continue
                bar.update(1)
                if counts.failed:
                    bar.set_postfix(failed=counts.failed, refresh=False)

        try:
            fill()
            while pending and not self.stop.is_set():
                finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                collect(finished)
                fill()
        except KeyboardInterrupt:
            counts.interrupted = True
            logger.warning(
                "interrupted: finishing %d requests in flight (Ctrl-C again quits at once)",
                sum(1 for f in pending if f.running()),
            )
        finally:
            self.stop.set()
            for future in pending:
                future.cancel()
            try:
                while pending:
                    collect(wait(pending, timeout=0.5).done)
            except KeyboardInterrupt:
                bar.close()
                os._exit(EXIT_INTERRUPTED)  # outputs are atomic: nothing is left half written
            pool.shutdown(wait=True)
            bar.close()
        counts.elapsed_s = time.perf_counter() - started
        finished_count = counts.done + counts.failed - len(prefailed)
        counts.not_started = len(todo) - finished_count
        return counts

    def _count(self, result: _Result, counts: Counts) -> None:
        if result.caption is not None:
            counts.done += 1
            counts.tokens += result.caption.generated_tokens
        elif result.error is not None:
            counts.failed += 1
            counts.rejected += result.rejected
            logger.warning("failed %s: %s", result.image.key, result.error)

    def _describe_one(self, image: ImageFile) -> _Result:
        """Runs in a worker thread: read, send (with retries), write."""
        try:
            data = image.path.read_bytes()
        except OSError as error:
            return _Result(image, error=f"cannot read the file: {error.strerror or error}")
        try:
            caption = call_with_retries(
                lambda: self.client.describe(data), self.policy, self.stop, image.key
            )
        except ImageRejected as error:
            message = error.message
            self._write(image, lambda: self.outputs.record_rejection(image, message))
            return _Result(image, error=message, rejected=True)
        except RequestFailed as error:
            return _Result(image, error=error.message)
        except Cancelled:
            return _Result(image, cancelled=True)
        self._write(image, lambda: self.outputs.record_caption(image, caption))
        return _Result(image, caption=caption)

    @staticmethod
    def _write(image: ImageFile, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as error:
            # A full disk or a read-only folder fails every image alike: stop the run.
            raise Fatal(f"cannot write the output of {image.key}: {error}") from error
