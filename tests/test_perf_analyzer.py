"""Triton's perf_analyzer, the real binary, against the real server over REST and gRPC.

perf_analyzer 2.60's wheel needs glibc 2.38; hack/perf_analyzer.sh runs it through Debian
trixie's loader and C runtime, fetched with apt (CI has Debian's archive). It reads the model's
metadata and config first, so this also proves the model-configuration extension is enough
for it.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.client_bench import install_perf_analyzer, run_perf_analyzer, write_input_data
from tests import images
from tests.live_server import LiveServer, start_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        platform.system() != "Linux" or platform.machine() != "x86_64",
        reason="perf_analyzer's wheel is built for Linux x86_64 only",
    ),
]


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    return install_perf_analyzer()


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("perf-analyzer") / "server.log"
    with start_server(tiny_qwen3_vl, log, "--max_new_tokens", "8") as live:
        yield live


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_perf_analyzer_runs_at_concurrency_1_and_8(
    perf_analyzer: Path, server: LiveServer, tmp_path: Path, protocol: str
) -> None:
    data = write_input_data(
        tmp_path / "input.json", [images.jpeg(), images.encode(images.gradient(), "PNG")]
    )
    target = f"127.0.0.1:{server.http_port}" if protocol == "http" else server.grpc_target
    extra = ("--request-parameter", "max_new_tokens:4:int") if protocol == "grpc" else ()
    # Any stability will do: this checks that perf_analyzer works, not how steady a shared
    # CI machine is.
    rows = run_perf_analyzer(
        perf_analyzer, target, protocol, data, tmp_path, requests=8, extra=extra,
        stability_percent=1000,
    )  # fmt: skip
    assert [row["Concurrency"] for row in rows] == [1, 8]
    assert all(row["Inferences/Second"] > 0 and row["p50 latency"] > 0 for row in rows)
    log = server.log()
    assert "400 Bad Request" not in log and "500 Internal" not in log, log[-3000:]
