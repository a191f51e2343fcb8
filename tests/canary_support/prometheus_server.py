"""A real Prometheus server (Debian's `prometheus` package) on a free loopback port.

It scrapes the given targets every second with the labels a cluster's PodMonitor would add
(namespace, pod, serving_kserve_io_inferenceservice), keeps its data in a temp dir, and never
uses :9090 (a system Prometheus, if one runs, stays out of the way).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from tests.live_server import free_port

SCRAPE_INTERVAL_S = 1.0


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


@dataclass(frozen=True)
class Target:
    address: str  # host:port of a /metrics endpoint
    labels: dict[str, str]


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_samples(self, query: str, timeout_s: float = 30) -> None:
        """Wait until `query` returns a series: every target has been scraped at least once."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = httpx.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=5)
            if reply.json()["data"]["result"]:
                return
            time.sleep(0.2)
        raise RuntimeError(f"no samples for {query} in {timeout_s}s:\n{self.log()}")


@contextlib.contextmanager
def start_prometheus(
    binary: str, targets: list[Target], workdir: Path
) -> Iterator[PrometheusServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {
            "scrape_interval": f"{SCRAPE_INTERVAL_S:g}s",
            "scrape_timeout": f"{SCRAPE_INTERVAL_S:g}s",
            "evaluation_interval": f"{SCRAPE_INTERVAL_S:g}s",
        },
        "scrape_configs": [
            {
                "job_name": f"target-{i}",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [t.address], "labels": t.labels}],
            }
            for i, t in enumerate(targets)
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = workdir / "prometheus.log"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {process.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready in 30s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
