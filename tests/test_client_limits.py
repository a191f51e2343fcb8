"""Slow and oversized clients, and what the log says about refused requests, on the real
server (raw sockets where a well-behaved client library could not misbehave).

The server runs with short deadlines (1.5 s for headers and for the body) so that the tests
can wait for them; the defaults are 10 s and 60 s. It also runs with the model repository at
its default (off).
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from tests import images
from tests.live_server import LiveServer, infer_body, start_server

pytestmark = pytest.mark.slow
HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
SLACK_S = 1.0  # scheduling on shared CPUs
MAX_IMAGE_BYTES = 100_000
MAX_BODY_BYTES = 2 * MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024  # request_limits' formula


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("limits") / "server.log"
    args = (
        "--http_header_timeout_s", str(HEADER_TIMEOUT_S),
        "--http_body_timeout_s", str(BODY_TIMEOUT_S),
        "--max_images_per_request", "2",
        "--max_image_bytes", str(MAX_IMAGE_BYTES),
    )  # fmt: skip
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


@pytest.fixture(scope="module")
def stub(server: LiveServer) -> Iterator[GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield GRPCInferenceServiceStub(channel)


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def log_lines(server: LiveServer, marker: str) -> list[str]:
    return [line for line in server.log().splitlines() if marker in line]


# ---- header size ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1024 * 1024, 16 * 1024 * 1024])
def test_oversized_headers_get_431(server: LiveServer, size: int) -> None:
    response = httpx.get(f"{server.url}/v2/health/live", headers={"X-Big": "a" * size}, timeout=30)
    assert response.status_code == 431


def test_many_headers_adding_up_get_431(server: LiveServer) -> None:
    headers = {f"X-Part-{i}": "b" * 1000 for i in range(100)}  # 100 KB, each header small
    assert httpx.get(f"{server.url}/v2/health/live", headers=headers).status_code == 431


def test_headers_under_the_limit_are_served(server: LiveServer) -> None:
    headers = {"Authorization": "Bearer " + "c" * 8000}  # a large JWT
    assert httpx.get(f"{server.url}/v2/health/live", headers=headers).status_code == 200


# ---- deadlines -----------------------------------------------------------------------------


def test_slowloris_clients_are_closed_at_the_header_deadline_while_others_are_served(
    server: LiveServer,
) -> None:
    """20 clients send their headers one byte every 0.2 s; each is answered 408 and closed
    within the header deadline, while ordinary requests keep being answered at once."""
    closed_after: list[float] = []
    answers: list[bytes] = []

    def slowloris() -> None:
        sock = connect(server)
        started = time.perf_counter()
        request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 1000
        try:
            for byte in request:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:  # closed by the server: what the test wants
            pass
        answers.append(read_until_closed(sock))
        closed_after.append(time.perf_counter() - started)
        sock.close()

    threads = [threading.Thread(target=slowloris) for _ in range(20)]
    for thread in threads:
        thread.start()
    latencies = []
    with httpx.Client(timeout=5) as client:
        while any(thread.is_alive() for thread in threads):
            started = time.perf_counter()
            assert client.get(f"{server.url}/v2/health/ready").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
        body = infer_body(images.jpeg(), max_new_tokens=2)
        assert client.post(server.infer_url, json=body).status_code == 200
    for thread in threads:
        thread.join()
    assert len(closed_after) == 20
    assert max(closed_after) < HEADER_TIMEOUT_S + SLACK_S
    assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
    assert max(latencies) < 0.5


def test_a_connection_that_sends_nothing_is_closed(server: LiveServer) -> None:
    sock = connect(server)
    started = time.perf_counter()
    assert read_until_closed(sock) == b""
    assert HEADER_TIMEOUT_S - 0.1 <= time.perf_counter() - started < HEADER_TIMEOUT_S + SLACK_S


def test_a_body_that_stops_short_is_dropped_at_the_body_deadline(server: LiveServer) -> None:
    sock = connect(server)
    sock.sendall(
        b"POST /v2/models/qwen-vl/infer HTTP/1.1\r\nHost: x\r\nX-Request-Id: short-body-1\r\n"
        b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"inputs": ['
    )
    started = time.perf_counter()
    answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert BODY_TIMEOUT_S - 0.1 <= time.perf_counter() - started < BODY_TIMEOUT_S + SLACK_S
    time.sleep(0.2)  # the application's side of it is logged once the disconnect reaches it
    (line,) = log_lines(server, "short-body-1")
    assert "WARNING" in line and "408 request body not received within 1.5 s" in line
    assert "Traceback" not in server.log()


def test_a_slow_body_is_cut_at_the_deadline(server: LiveServer) -> None:
    """One byte every 0.1 s: never idle, but not done in time either."""
    picture = base64.b64encode(images.jpeg()).decode()
    body = (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["'
        + picture.encode()
        + b'"]}]}'
    )
    sock = connect(server)
    sock.sendall(
        b"POST /v2/models/qwen-vl/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    started = time.perf_counter()
    try:
        for byte in body:
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        pass
    assert read_until_closed(sock).startswith(b"HTTP/1.1 408 ")
    assert time.perf_counter() - started < BODY_TIMEOUT_S + SLACK_S


def test_a_body_over_the_largest_valid_request_is_cut_with_413(server: LiveServer) -> None:
    """Chunked, so no Content-Length announces it: counted as it arrives."""

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "qwen-vl", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"x" * 65536

    try:
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            content=chunks(),
            headers={"X-Request-Id": "too-big-1", "Content-Type": "application/json"},
        )
        assert response.status_code == 413
    except httpx.TransportError:  # closed while still sending: the 413 may be lost
        pass
    time.sleep(0.3)
    (line,) = log_lines(server, "too-big-1")
    assert f"413 request body over {MAX_BODY_BYTES} bytes; closed" in line


def test_a_declared_length_over_the_limit_is_refused_before_the_body(server: LiveServer) -> None:
    sock = connect(server)
    sock.sendall(
        b"POST /v2/models/qwen-vl/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1)
    )
    answer = read_until_closed(sock)  # the answer, then a close at the body deadline
    sock.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"request body" in answer


# ---- logs ----------------------------------------------------------------------------------


def test_a_client_that_leaves_mid_upload_is_one_info_line_and_no_500(server: LiveServer) -> None:
    for path in ("/v2/models/qwen-vl/infer", "/v1/chat/completions"):
        sock = connect(server)
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nX-Request-Id: leaves-{path[1:3]}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{".encode()
        )
        time.sleep(0.3)
        sock.close()
    time.sleep(0.5)
    for marker in ("leaves-v2", "leaves-v1"):
        (line,) = log_lines(server, marker)
        assert " INFO " in line and "client left before the answer" in line
    assert not log_lines(server, "http_status:500")  # KServe's timing log
    assert not log_lines(server, '" 500 ')  # uvicorn's access log
    assert "Traceback" not in server.log()


def test_a_400_is_one_warning_line_with_id_model_and_route(server: LiveServer) -> None:
    body = infer_body(b"not an image", max_new_tokens=2)
    response = httpx.post(server.infer_url, json=body, headers={"X-Request-Id": "bad-image-7"})
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "bad-image-7"
    (line,) = log_lines(server, "bad-image-7")
    assert "WARNING" in line
    assert "model qwen-vl POST /v2/models/qwen-vl/infer: 400 image[0]:" in line
    assert "Traceback" not in server.log()


def test_every_response_gets_a_request_id(server: LiveServer) -> None:
    first = httpx.get(f"{server.url}/v2/health/ready").headers["x-request-id"]
    second = httpx.get(f"{server.url}/v2/health/ready").headers["x-request-id"]
    assert first != second and len(first) == 32
    forged = httpx.get(f"{server.url}/v2/health/ready", headers={"X-Request-Id": "a b\tc"})
    assert forged.headers["x-request-id"] != "a b\tc"  # not a sane id: replaced


def test_a_request_cannot_forge_log_lines(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/v2/models/evil%0AERROR%20forged/ready")
    assert response.status_code == 404
    assert not [line for line in server.log().splitlines() if line.startswith("ERROR forged")]
    assert log_lines(server, "evil\\nERROR forged")


def test_unknown_routes_and_models_are_warnings_not_tracebacks(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/no/such/route").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/nope/ready").status_code == 404
    assert httpx.post(f"{server.url}/v2/models/nope/infer", json={}).status_code == 404
    assert len(log_lines(server, "WARNING predictor.requests")) >= 3
    assert "Traceback" not in server.log() and " ERROR " not in server.log()


def test_grpc_refusals_are_one_warning_line(
    server: LiveServer, stub: GRPCInferenceServiceStub
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(pb.ModelInferRequest(model_name="qwen-vl", id="grpc-bad-3"))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelReady(pb.ModelReadyRequest(name="grpc-nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    (line,) = log_lines(server, "grpc-bad-3")
    assert "WARNING" in line and "grpc /inference.GRPCInferenceService/ModelInfer" in line
    assert "INVALID_ARGUMENT image:" in line
    assert len(log_lines(server, "grpc-nope")) == 1
    assert "Traceback" not in server.log()


def test_a_grpc_call_past_its_deadline_is_one_info_line(
    server: LiveServer, stub: GRPCInferenceServiceStub
) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(images.jpeg())
    request = pb.ModelInferRequest(model_name="qwen-vl", id="grpc-gone-5", inputs=[tensor])
    request.parameters["max_new_tokens"].int64_param = 1000
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.5)
    (line,) = log_lines(server, "grpc-gone-5")
    assert " INFO " in line and "cancelled (the client left or its deadline passed)" in line
    assert "Traceback" not in server.log()


# ---- the model repository, off by default ---------------------------------------------------


@pytest.mark.parametrize("action", ["load", "unload"])
def test_the_model_repository_is_refused_by_default_over_rest(
    server: LiveServer, action: str
) -> None:
    response = httpx.post(f"{server.url}/v2/repository/models/qwen-vl/{action}")
    assert response.status_code == 403
    assert "--enable_model_repository" in response.json()["error"]
    assert server.is_ready()


def test_the_model_repository_is_refused_by_default_over_grpc(
    server: LiveServer, stub: GRPCInferenceServiceStub
) -> None:
    for call, request in (
        (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="qwen-vl")),
        (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="qwen-vl")),
    ):
        with pytest.raises(grpc.RpcError) as error:
            call(request)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    extensions = stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
    assert "model_repository_extension" not in extensions
    assert server.is_ready()
