"""The threads that decode images and run the processor, one per core, at a lower priority.

Why not the event loop's default executor: image work (base64, JPEG decoding and resizing,
the processor's patches, in one process the vision encoder too) is long and CPU-bound, while
the event loop's work (admission, 503s, health probes, streamed tokens) is short and waits on
latency. With KServe's default of cores + 4 threads, a burst at an idle server ran six
images at once on two cores and the event loop queued behind them: its 503s took 70-110 ms.
These threads are as many as the usable cores (more only interleave CPU-bound work), and on
Linux each takes a nice value of `NICE` (threads have their own), so that when the cores are
busy the scheduler runs the event loop, and the engine's decode loop, first. Work is not
lost or slowed when the cores have room: a nice value only orders runnable threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

NICE = 5  # about a third of a default thread's share when both want a core
T = TypeVar("T")


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def lower_this_threads_priority(nice: int = NICE) -> None:
    """Give the calling thread `nice` (Linux only: elsewhere the call would renice the
    whole process). Raising one's own nice value needs no privilege."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def name_this_thread(name: str) -> None:
    """Give the calling thread a name the kernel shows (`top -H`, /proc/PID/task/TID/comm),
    Linux only, 15 characters at most; Python 3.11 names threads only for itself."""
    if sys.platform.startswith("linux"):
        path = f"/proc/self/task/{threading.get_native_id()}/comm"
        with contextlib.suppress(OSError, ValueError), open(path, "w") as comm:
            comm.write(name[:15])


def _start_worker(nice: int, name: str) -> None:
    lower_this_threads_priority(nice)
    name_this_thread(name)


class ImageWorkers:
    """A thread pool for image work, `run` from the event loop."""

    def __init__(self, threads: int | None = None, nice: int = NICE, name: str = "image"):
        self.threads = threads or usable_cores()
        self._pool = ThreadPoolExecutor(
            self.threads,
            thread_name_prefix=name,
            initializer=_start_worker,
            initargs=(nice, f"qwen-vl-{name}"),
        )

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def submit(self, function: Callable[..., Any], *args: Any) -> Any:
        """For callers off the event loop (the engine core's message loop)."""
        return self._pool.submit(function, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
