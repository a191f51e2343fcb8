"""Start the real model server as a subprocess on free loopback ports, and stop it."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

MODEL_NAME = "qwen-vl"
STARTUP_TIMEOUT_S = 180
# What predictor.engine.loading logs each time a checkpoint's weights load, in either process.
_WEIGHTS_LOAD = re.compile(r"predictor\.engine\.loading.*: loading ")


def infer_body(picture: bytes, max_new_tokens: int) -> dict:
    """An OIP v2 JSON body describing one encoded image, greedily: said explicitly, since a
    server left to the checkpoint's defaults (`--generation_config auto`) may sample."""
    return {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(picture).decode()],
            }
        ],
        "parameters": {"max_new_tokens": max_new_tokens, "temperature": 0},
    }


def full_length_picture(server: LiveServer, tokens: int = 150) -> bytes:
    """A small JPEG the random model describes to `tokens` tokens without ending its turn
    (it rarely ends early, but may), for tests that need a request to keep running."""
    from tests import images

    for color in ((200, 40, 40), (40, 200, 40), (40, 40, 200), (128, 128, 128), (0, 0, 0)):
        picture = images.jpeg(color=color)
        reply = httpx.post(server.infer_url, json=infer_body(picture, tokens), timeout=60).json()
        finish = next(o for o in reply["outputs"] if o["name"] == "finish_reason")["data"][0]
        if finish == "length":
            return picture
    raise RuntimeError(f"no test image ran to {tokens} tokens")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log_path: Path
    startup_s: float
    model_name: str = MODEL_NAME

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model_name}/infer"

    def is_ready(self) -> bool:
        try:
            response = httpx.get(f"{self.url}/v2/models/{self.model_name}/ready", timeout=2)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json().get("ready") is True

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def weight_loads(self) -> int:
        """How many times the log says a checkpoint's weights were loaded (once is right)."""
        return len(_WEIGHTS_LOAD.findall(self.log()))


def engine_process(server: LiveServer) -> psutil.Process:
    """The engine core among the server's children (the other is multiprocessing's tracker)."""
    for child in psutil.Process(server.process.pid).children():
        if "resource_tracker" not in " ".join(child.cmdline()):
            return child
    raise AssertionError("the server has no engine process")


TEST_DEFAULTS = (("--dtype", "float32"), ("--compile", "false"))


@contextlib.contextmanager
def start_server(model_dir: Path, log_path: Path, *extra_args: str) -> Iterator[LiveServer]:
    http_port, grpc_port = free_port(), free_port()
    # Exact texts are compared in float32, and compiling the decoding step at every start
    # would cost each test module its compile time: both as the test asks, else these.
    for flag, value in TEST_DEFAULTS:
        if flag not in extra_args:
            extra_args = (*extra_args, flag, value)
    command = [
        sys.executable,
        "-m",
        "predictor",
        "--model_dir",
        str(model_dir),
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
        *extra_args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    name = (
        extra_args[extra_args.index("--model_name") + 1]
        if "--model_name" in extra_args
        else MODEL_NAME
    )
    live = LiveServer(process, http_port, grpc_port, log_path, startup_s=0.0, model_name=name)
    try:
        deadline = started + STARTUP_TIMEOUT_S
        while not live.is_ready():
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{live.log()}")
            if time.perf_counter() > deadline:
                raise RuntimeError(f"server not ready in {STARTUP_TIMEOUT_S}s:\n{live.log()}")
            time.sleep(0.2)
        live.startup_s = time.perf_counter() - started
        yield live
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_running(
    server: LiveServer, count: int, timeout_s: float = 60, queued: bool = False
) -> None:
    """Until `count` requests are generating in the engine (or queued for it, with `queued`):
    admitted, past their image decoding."""
    from prometheus_client.parser import text_string_to_metric_families

    names = {"qwen_vl_num_requests_running"}
    if queued:
        names.add("qwen_vl_num_requests_waiting")
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        admitted = sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name in names
        )
        if admitted >= count:
            return
        assert time.monotonic() < deadline, f"only {admitted} of {count} requests in the engine"
        time.sleep(0.05)
