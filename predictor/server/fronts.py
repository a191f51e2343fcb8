"""Several front processes in front of one engine core: `--workers N`.

Why: once the engine's step is fast, the front (HTTP, JSON, base64, JPEG decoding, patches,
the transfer, the response) is what limits a pod, and one Python process uses about one core.
vLLM scales its API servers out the same way (`--api-server-count`), in front of one engine
core: never a second copy of the model.

How, in one pod:
- The process `main` starts is front 0. It spawns the engine core with a pipe, a shared
  region and a slot on the load board for each front (`predictor.engine.client`), then the
  other fronts (`start`), which attach to that core and load only the processor. Each front is
  a whole KServe ModelServer: REST and gRPC on the same ports, each listening socket bound with
  SO_REUSEPORT, so the kernel spreads new connections over the fronts that listen (grpc binds
  so by default; REST's socket is made so here, `kserve_servers.LimitedRESTServer`).
- Admission is shared: every front takes a place on the board under one process-shared lock,
  so together they admit what the engine's queue and free slots hold, no more
  (`predictor.engine.board`).
- Metrics: Prometheus' multiprocess mode. Every front and the core write their series to
  files in one directory (`PROMETHEUS_MULTIPROC_DIR`, set before prometheus_client is
  imported: `multiprocess_metrics_dir` re-executes front 0 once with it); any front's /metrics
  sums the counters and histograms of all of them and shows the engine's gauges as the core
  wrote them (`metrics_response`). Python's process and GC collectors are not served then.
- Drain: SIGTERM reaches front 0 (the container's first process). Its drain raises the
  board's draining flag, so every front refuses new requests from that instant, and sends
  SIGTERM to the other fronts, each of which drains as one front does (readiness false, 503s,
  GOAWAY, accepted requests run to the end, listener closed last). Front 0 waits for them to
  exit before it stops the engine, so nothing accepted anywhere is lost.
- Failure: if the core dies, every front fails fast on its own (its pipe closes). If another
  front dies outside a drain, the core drops that front's requests, and front 0 fails fast
  (not live: Kubernetes restarts the pod), as for the engine: a pod serves as configured or
  says it cannot. If front 0 dies, the kernel kills the core and the other fronts with it
  (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import connection as mp_connection
from typing import Any

import torch.multiprocessing as torch_mp

from predictor.engine.client import FrontLink

logger = logging.getLogger(__name__)

METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_OWNED_ENV = "QWEN_VL_OWNS_METRICS_DIR"  # set by front 0 for a directory it made itself
KILL_AFTER_S = 15.0  # past the drain's own timeout, for a front that does not exit


def multiprocess_metrics_dir(argv: Sequence[str]) -> None:
    """Make sure this process runs with Prometheus' multiprocess mode on, which
    prometheus_client decides when it is imported (KServe imported it already): set the
    directory and re-execute the same command once, in the same process (its PID stays the
    container's first). A directory given by the environment is used as it is, emptied."""
    path = os.environ.get(METRICS_DIR_ENV)
    if path and "prometheus_client.values" in sys.modules and _values_multiprocess():
        return
    if not path:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        path = tempfile.mkdtemp(prefix="qwen-vl-metrics-", dir=base)
        os.environ[_OWNED_ENV] = "1"
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    os.environ[METRICS_DIR_ENV] = path
    logger.info("--workers: Prometheus multiprocess metrics in %s; restarting once", path)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "predictor", *argv])


def _values_multiprocess() -> bool:
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def remove_metrics_dir() -> None:
    """At front 0's exit: the directory it made for the metrics files."""
    path = os.environ.get(METRICS_DIR_ENV)
    if path and os.environ.get(_OWNED_ENV):
        shutil.rmtree(path, ignore_errors=True)


def metrics_response() -> Any:
    """/metrics in multiprocess mode: every front's and the core's series, summed."""
    from fastapi import Response
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def register_metrics_route(app: Any) -> None:
    """Before KServe's own /metrics (which serves this process's registry only)."""

    async def serve_metrics() -> Any:
        return metrics_response()

    app.add_api_route("/metrics", serve_metrics, methods=["GET"], include_in_schema=False)


class Fronts:
    """The fronts other than the first, started and watched by front 0."""

    def __init__(self, argv: Sequence[str], target: Callable[[Sequence[str], FrontLink], None]):
        self.argv = list(argv)
        self.target = target  # what each other front runs (`predictor.server.main.run_front`)
        self.processes: list[Any] = []
        self.stopping = False
        self.on_death: Callable[[str], None] | None = None

    def start(self, links: list[FrontLink]) -> None:
        context = torch_mp.get_context("spawn")
        for link in links:
            process = context.Process(
                target=self.target,
                args=(self.argv, link),
                name=f"qwen-vl-front-{link.index}",
                daemon=False,
            )
            process.start()
            self.processes.append(process)
        if self.processes:
            threading.Thread(target=self._watch, name="fronts", daemon=True).start()
            logger.info(
                "started %d more front processes: %s",
                len(self.processes),
                ", ".join(str(p.pid) for p in self.processes),
            )

    def _watch(self) -> None:
        sentinels = {process.sentinel: index for index, process in enumerate(self.processes, 1)}
        while sentinels:
            for sentinel in mp_connection.wait(list(sentinels)):
                index = sentinels.pop(sentinel)
                process = self.processes[index - 1]
                process.join(0)
                if self.stopping:
                    continue
                detail = f"front process {index} exited with {process.exitcode}"
                if self.on_death is not None:
                    self.on_death(detail)

    def begin_drain(self) -> None:
        """Tell every other front to drain (SIGTERM), as front 0 does."""
        self.stopping = True
        for process in self.processes:
            if process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    def join(self, timeout_s: float) -> None:
        """Wait for the other fronts to exit (their drains over); kill one that does not."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.warning("front process %d did not exit; killed", process.pid)
                process.kill()
                process.join(5)
