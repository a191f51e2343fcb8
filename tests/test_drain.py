"""Graceful drain (predictor.server.drain) on the real server: SIGTERM during v2 REST, gRPC and
streaming OpenAI requests loses none of them, refuses new ones with 503 + Retry-After, and
both processes exit; past `--drain_timeout_s` what is left ends with a clean 503."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from tests.live_server import (
    LiveServer,
    full_length_picture,
    infer_body,
    start_server,
    wait_running,
)

pytestmark = pytest.mark.slow
LONG = 2000  # tokens: a few seconds on the tiny model, long enough to be running at SIGTERM
ARGS = (
    "--max_new_tokens_limit", "4000", "--max_batch_size", "16",
    "--generation_config", "none",  # greedy: every row runs to its token limit
)  # fmt: skip
LAYOUTS = {
    "in-process": ("--engine_process", "false"),
    "engine-process": ("--engine_process", "true"),
}


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The server's flags for each process layout; the drain must hold in both."""
    return LAYOUTS[request.param]


def v2_client(server: LiveServer, picture: bytes) -> Callable[[], tuple]:
    def call() -> tuple:
        reply = httpx.post(server.infer_url, json=infer_body(picture, LONG), timeout=120)
        if reply.status_code != 200:
            return ("v2", reply.status_code, reply.headers.get("retry-after"))
        outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
        return ("v2", 200, outputs["generated_tokens"][0])

    return call


def grpc_client(server: LiveServer, picture: bytes) -> Callable[[], tuple]:
    def call() -> tuple:
        request = pb.ModelInferRequest(model_name=server.model_name)
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(picture)
        request.parameters["max_new_tokens"].int64_param = LONG
        with grpc.insecure_channel(server.grpc_target) as channel:
            try:
                reply = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
            except grpc.RpcError as error:
                return ("grpc", error.code().name, error.details())
        tokens = next(o for o in reply.outputs if o.name == "generated_tokens")
        return ("grpc", "OK", tokens.contents.int_contents[0])

    return call


def stream_client(server: LiveServer, picture: bytes) -> Callable[[], tuple]:
    url = "data:image/jpeg;base64," + base64.b64encode(picture).decode()
    body = {
        "model": server.model_name,
        "stream": True,
        "max_tokens": LONG,
        "stream_options": {"include_usage": True},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe this image."},  # v2's default prompt
                ],
            }
        ],
    }

    def call() -> tuple:
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json=body, timeout=120
        ) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        if response.status_code != 200:
            return ("sse", response.status_code, None)
        if events[-1] != "[DONE]":
            return ("sse", "error", json.loads(events[-1]))
        usage = next(json.loads(e)["usage"] for e in reversed(events[:-1]) if '"usage"' in e)
        return ("sse", 200, usage["completion_tokens"])

    return call


def run_all(calls: list[Callable[[], tuple]]) -> tuple[list[threading.Thread], list[tuple]]:
    results: list[tuple] = []

    def run(call: Callable[[], tuple]) -> None:
        try:
            results.append(call())
        except Exception as exc:  # a reset or refused connection: reported as a loss
            results.append(("lost", repr(exc), None))

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    return threads, results


def test_sigterm_loses_no_accepted_request(
    tiny_qwen3_vl: Path, tmp_path: Path, layout: tuple[str, ...]
) -> None:
    with start_server(tiny_qwen3_vl, tmp_path / "server.log", *ARGS, *layout) as server:
        picture = full_length_picture(server)
        children = psutil.Process(server.process.pid).children(recursive=True)
        calls = [
            make(server, picture)
            for make in (v2_client, grpc_client, stream_client)
            for _ in range(5)
        ] + [v2_client(server, picture)]
        threads, results = run_all(calls)
        wait_running(server, len(calls))
        server.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        while server.is_ready():
            assert time.monotonic() - signalled < 2, "still ready 2 s after SIGTERM"
            time.sleep(0.02)
        late = httpx.post(server.infer_url, json=infer_body(picture, 2), timeout=10)
        assert late.status_code == 503 and late.headers["retry-after"], late.text
        assert late.headers["connection"] == "close"
        for thread in threads:
            thread.join(timeout=120)
        assert server.process.wait(timeout=60) == 0
        log = server.log()
    assert sorted(r[:2] for r in results) == sorted(
        [("grpc", "OK")] * 5 + [("sse", 200)] * 5 + [("v2", 200)] * 6
    ), results
    assert all(r[2] == LONG for r in results), results
    assert "drained in" in log, log[-3000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left behind: {alive}"


def test_past_the_drain_timeout_requests_end_with_503(
    tiny_qwen3_vl: Path, tmp_path: Path, layout: tuple[str, ...]
) -> None:
    args = (*ARGS, *layout, "--drain_timeout_s", "0.5")
    with start_server(tiny_qwen3_vl, tmp_path / "server.log", *args) as server:
        picture = full_length_picture(server)
        calls = [make(server, picture) for make in (v2_client, grpc_client, stream_client)]
        threads, results = run_all(calls)
        wait_running(server, len(calls))
        server.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
    by_route = {r[0]: r for r in results}
    assert by_route["v2"][1:] == (503, "1"), results
    assert by_route["grpc"][1] == "UNAVAILABLE" and "shutting down" in by_route["grpc"][2]
    sse = by_route["sse"]
    assert sse[1] == "error" and sse[2]["error"]["code"] == "shutting_down", results
