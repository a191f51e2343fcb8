"""Shutdown under live traffic: 16 closed-loop clients per protocol (v2 REST, OpenAI plain,
OpenAI streaming, gRPC) keep sending through SIGTERM, and through the death of the engine
process, and lose nothing (tests/closed_loop.py defines each outcome, and what is lost).

One server per scenario, default flags, all four protocols at once: at SIGTERM every
client's request is in the engine, so each protocol has 16 accepted requests in flight.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from tests import images
from tests.closed_loop import (
    ENDED,
    LOST,
    OK,
    PROTOCOLS,
    REFUSED,
    UNREACHABLE,
    Outcome,
    Traffic,
    in_flight_at,
    kinds,
    sent_after,
)
from tests.live_server import LiveServer, engine_process, start_server, wait_running

pytestmark = pytest.mark.slow
CLIENTS = 16  # per protocol
MAX_TOKENS = 32
DRAIN_TIMEOUT_S = 90.0  # the default --drain_timeout_s
EXIT_AFTER_DRAIN_S = 5.0  # the bound: the exit comes within the drain time plus this
FAIL_FAST_S = 3.0  # liveness false after the engine dies (the probe's answer, not its period)
REST = ("v2", "openai", "stream")
CLIENT_SLACK_S = 0.5  # between the server's answer and the client thread noting it
RACE_S = 0.25  # a request sent this shortly before the signal may arrive after it


def every_protocol_answered(outcomes: list[Outcome]) -> bool:
    return {o.protocol for o in outcomes if o.kind == OK} == set(PROTOCOLS)


def of(outcomes: list[Outcome], protocol: str) -> list[Outcome]:
    return [o for o in outcomes if o.protocol == protocol]


def grpc_stopped(server: LiveServer, timeout_s: float) -> bool:
    """Whether a new channel finds the gRPC listener closed within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with grpc.insecure_channel(server.grpc_target) as channel:
            try:
                GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=1)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    return True
        time.sleep(0.05)
    return False


def run_traffic(
    tiny_qwen3_vl: Path, log: Path, scenario: Callable[[LiveServer, Traffic], None]
) -> tuple[list[Outcome], LiveServer]:
    """Start a server and the clients, run `scenario` (which ends with the process gone), and
    stop the clients half a second later: what they get once it has exited counts too."""
    with start_server(tiny_qwen3_vl, log) as server:
        traffic = Traffic(server, PROTOCOLS, images.jpeg(), CLIENTS, MAX_TOKENS).start()
        try:
            traffic.wait_for(every_protocol_answered, timeout_s=120)
            scenario(server, traffic)
            time.sleep(0.5)
        finally:
            traffic.stop()
    return traffic.snapshot(), server


def assert_nothing_lost(outcomes: list[Outcome], server: LiveServer) -> None:
    lost = [o for o in outcomes if o.kind == LOST]
    assert not lost, f"{len(lost)} lost, the first: {lost[:5]}"
    log = server.log()
    assert server.weight_loads() == 1, "the weights loaded more than once"
    assert log.count(f"loading model {server.model_name} from") == 1
    assert "Traceback" not in log, log[-3000:]


def test_sigterm_under_live_traffic_loses_nothing(tiny_qwen3_vl: Path, tmp_path: Path) -> None:
    moments: dict[str, float] = {}

    def sigterm(server: LiveServer, traffic: Traffic) -> None:
        wait_running(server, CLIENTS * len(PROTOCOLS), queued=True)  # all accepted
        moments["signal"] = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        moments["code"] = server.process.wait(timeout=DRAIN_TIMEOUT_S + EXIT_AFTER_DRAIN_S)
        moments["exit"] = time.monotonic()

    outcomes, server = run_traffic(tiny_qwen3_vl, tmp_path / "server.log", sigterm)
    assert_nothing_lost(outcomes, server)
    signalled, exited = moments["signal"], moments["exit"]
    assert moments["code"] == 0
    last_answer = max(o.ended for o in outcomes if o.kind == OK)
    assert exited - last_answer < EXIT_AFTER_DRAIN_S, "the exit lagged the drain's end"
    for protocol in PROTOCOLS:
        mine = of(outcomes, protocol)
        in_flight, after = in_flight_at(mine, signalled), sent_after(mine, signalled)
        # Every request the server held at the signal is answered in full. One sent just
        # before it may reach the door after it (a request that was never accepted): refused.
        assert all(
            o.kind == OK or (o.kind == REFUSED and signalled - o.started < RACE_S)
            for o in in_flight
        ), (protocol, kinds(in_flight))
        assert kinds(in_flight)[OK] > 0, (protocol, kinds(in_flight))
        # Only a request that raced the signal may be served; the rest are turned away.
        assert after and kinds(after)[OK] <= CLIENTS, (protocol, kinds(after))
        if protocol in REST:
            # The listener stays open through the drain, so clients get the door's 503 ...
            assert kinds(after)[REFUSED] > 0, (protocol, kinds(after))
            # ... and it closes last: no connect is refused before the last answer went out
            # (give or take the clients' own delay in noting it, 64 threads on 2 cores).
            refused_connects = [o.ended for o in after if o.kind == UNREACHABLE]
            first_refused = min(refused_connects, default=exited)
            assert first_refused > last_answer - CLIENT_SLACK_S, (protocol, last_answer)
        else:
            # GOAWAY: the channels left this server and found its listener closed.
            assert kinds(after)[UNREACHABLE] > 0, kinds(after)
    assert "drained in" in server.log()


def test_engine_death_under_live_traffic_fails_fast(tiny_qwen3_vl: Path, tmp_path: Path) -> None:
    """Fail fast (docs/shutdown.md): the server stops saying live and ready, refuses every
    request with 503 / UNAVAILABLE, loads nothing, and exits cleanly on SIGTERM when
    Kubernetes restarts the pod."""
    moments: dict[str, float] = {}

    def kill_engine(server: LiveServer, traffic: Traffic) -> None:
        engine_process(server).kill()
        moments["kill"] = time.monotonic()
        while server.is_ready() or httpx.get(f"{server.url}/v2/health/live").status_code != 503:
            assert time.monotonic() - moments["kill"] < FAIL_FAST_S, "still live or ready"
            time.sleep(0.05)
        assert grpc_stopped(server, FAIL_FAST_S), "gRPC still serving after the engine died"
        time.sleep(1.5)  # the clients keep sending to a server that cannot serve
        assert server.process.poll() is None, "the front exits by itself: Kubernetes restarts it"
        moments["signal"] = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        moments["code"] = server.process.wait(timeout=EXIT_AFTER_DRAIN_S)
        moments["exit"] = time.monotonic()

    outcomes, server = run_traffic(tiny_qwen3_vl, tmp_path / "server.log", kill_engine)
    assert_nothing_lost(outcomes, server)
    assert moments["code"] == 0
    killed, signalled = moments["kill"], moments["signal"]
    for protocol in PROTOCOLS:
        mine = of(outcomes, protocol)
        # Nothing is served once the engine is gone: no request loads it again.
        assert kinds(sent_after(mine, killed))[OK] == 0, (protocol, kinds(mine))
        # What it held, and (REST) what comes next until SIGTERM, is refused saying why.
        window = [o for o in mine if o.ended > killed and o.started < signalled]
        refused = [o.detail for o in window if o.kind in (REFUSED, ENDED)]
        assert refused, (protocol, kinds(window))
        assert all("engine" in detail for detail in refused), refused[:5]
        if protocol == "grpc":  # GOAWAY at the death: the channels went elsewhere
            assert kinds(window)[UNREACHABLE] > 0, kinds(window)
    log = server.log()
    assert "the engine process exited with -9" in log
    assert "gRPC stops (GOAWAY)" in log
