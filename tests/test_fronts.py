"""Two front processes on one engine core (`--workers 2`, `predictor.server.fronts`): one model
load, requests through both, one capacity for both, metrics summed over both, and a drain
that stops both from accepting and loses nothing."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.live_server import LiveServer, full_length_picture, infer_body, start_server

pytestmark = pytest.mark.slow
LONG = 400  # tokens: seconds of generation, holding a place while the test looks
_FRONT_1_LINE = re.compile(r"\[front 1\]: request \S+: 1 images")
_FRONT_0_LINE = re.compile(r"predictor\.model: request \S+: 1 images")


def _listens(process: psutil.Process) -> bool:
    connections = getattr(process, "net_connections", None) or process.connections
    return any(c.status == psutil.CONN_LISTEN for c in connections())


def wait_serving(server: LiveServer, timeout_s: float = 120) -> None:
    """Until front 1 listens too (front 0 is ready before it: the pod serves from then)."""
    deadline = time.monotonic() + timeout_s
    while "[front 1]: Starting gRPC server" not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    time.sleep(0.5)  # its REST socket is listening by then; its app's startup follows


def samples(server: LiveServer) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (s.name, s.labels.get("outcome", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("model_name") == server.model_name
    }


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("fronts") / "server.log"
    args = (
        "--workers", "2",
        "--max_batch_size", "1",
        "--max_queue_size", "1",
        "--max_new_tokens_limit", "4000",
    )  # fmt: skip
    with start_server(tiny_qwen3_vl, log, *args) as live:
        wait_serving(live)
        yield live


def test_one_engine_and_requests_through_both_fronts(server: LiveServer) -> None:
    assert server.weight_loads() == 1
    children = psutil.Process(server.process.pid).children()
    spawned = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
    assert len(spawned) == 2  # the engine core and front 1
    body = infer_body(images.jpeg(), 4)
    before = samples(server).get(("qwen_vl_requests_total", "success"), 0)
    for _ in range(16):  # a new connection each: the kernel spreads them over the fronts
        with httpx.Client() as client:
            reply = client.post(server.infer_url, json=body, timeout=60)
        assert reply.status_code == 200, reply.text
    log = server.log()
    assert _FRONT_1_LINE.search(log) and _FRONT_0_LINE.search(log), log[-3000:]
    # Every front's and the core's series, summed in whichever front answers /metrics.
    assert samples(server)[("qwen_vl_requests_total", "success")] == before + 16
    assert samples(server)[("qwen_vl_images_total", "")] >= 16  # counted by the core


def test_the_fronts_share_one_capacity(server: LiveServer) -> None:
    """One batch slot and one queue place in all: with both held (through either front),
    every new request gets 503, whichever front it reaches."""
    picture = full_length_picture(server, tokens=LONG)
    answers: list[int] = []

    def hold() -> None:
        with httpx.Client() as client:
            reply = client.post(server.infer_url, json=infer_body(picture, LONG), timeout=300)
            answers.append(reply.status_code)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    deadline = time.monotonic() + 60
    while True:
        values = samples(server)
        if (
            values.get(("qwen_vl_num_requests_running", ""), 0) == 1
            and values.get(("qwen_vl_num_requests_waiting", ""), 0) == 1
        ):
            break
        assert time.monotonic() < deadline, values
        time.sleep(0.05)
    statuses = []
    for _ in range(12):
        with httpx.Client() as client:
            statuses.append(
                client.post(server.infer_url, json=infer_body(picture, 4), timeout=30).status_code
            )
    assert statuses == [503] * 12
    refusals = server.log().split("\n")
    front_1 = [line for line in refusals if "[front 1]" in line and ": 503 " in line]
    front_0 = [line for line in refusals if "[front" not in line and ": 503 " in line]
    assert front_1 and front_0  # both fronts refused: neither over-admitted
    for thread in holders:
        thread.join(timeout=300)
    assert answers == [200, 200]


@pytest.fixture
def draining_server(tiny_qwen3_vl: Path, tmp_path: Path) -> Iterator[LiveServer]:
    with start_server(tiny_qwen3_vl, tmp_path / "server.log", "--workers", "2") as live:
        wait_serving(live)
        yield live


def test_the_drain_stops_both_fronts_and_loses_nothing(draining_server: LiveServer) -> None:
    server = draining_server
    picture = full_length_picture(server, tokens=64)
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client() as connection:
            reply = connection.post(server.infer_url, json=infer_body(picture, 64), timeout=120)
        with lock:
            results.append(reply.status_code)

    threads = [threading.Thread(target=client) for _ in range(8)]  # fresh connections: both
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while samples(server).get(("qwen_vl_num_requests_running", ""), 0) < 8:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    other = [
        c
        for c in psutil.Process(server.process.pid).children()
        if "resource_tracker" not in " ".join(c.cmdline()) and _listens(c)
    ]
    assert len(other) == 1  # front 1 (the core listens on nothing)
    server.process.send_signal(signal.SIGTERM)  # to front 0 only, as Kubernetes does
    time.sleep(0.3)
    late = []
    for _ in range(4):  # after the signal: refused at once by whichever front, or unreachable
        try:
            with httpx.Client() as connection:
                late.append(
                    connection.post(server.infer_url, json=infer_body(picture, 4), timeout=30)
                )
        except httpx.ConnectError:
            late.append(None)
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(results) == [200] * 8  # every request accepted before the signal
    for reply in late:
        assert reply is None or (reply.status_code == 503 and reply.headers["retry-after"])
    assert server.process.wait(timeout=60) == 0
    assert not other[0].is_running() or other[0].status() == psutil.STATUS_ZOMBIE
    log = server.log()
    assert "[front 1]: SIGTERM: draining" in log
    assert log.count("drained in") == 2
    assert server.weight_loads() == 1
