#!/usr/bin/env python3
"""Soak the server with many image sizes and watch its memory level off.

Why: every distinct image grid (each size and aspect ratio after resizing) gets its own
vision-encoder graph, and a cache that keeps something per grid must give it back when the grid
leaves it; a pod under real traffic sees far more grids than any cache holds. This cycles
`--grids` distinct grids (JPEG, PNG and WebP; v2 REST, gRPC, OpenAI plain and streaming) round
after round and prints the server's resident memory (its process and any children) after each
round. It fails (exit 1) if memory grew by more than `--max_growth_mb` after the first round.

Usage: python hack/soak.py [--rounds 13] [--grids 24] [--clients 4] [--json OUT]
       (starts the tiny Qwen3-VL model on loopback; --model_dir DIR to use another checkpoint)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402
import psutil  # noqa: E402
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb  # noqa: E402
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub  # noqa: E402
from PIL import Image  # noqa: E402

from tests.live_server import LiveServer, infer_body, start_server  # noqa: E402

FORMATS = ("JPEG", "PNG", "WEBP")
ROUTES = ("v2", "grpc", "openai", "openai-stream")
MAX_NEW_TOKENS = 4


def grid_sizes(count: int) -> list[tuple[int, int]]:
    """`count` image sizes that resize to distinct grids (sides 32 px apart, small enough that
    no pixel budget merges two of them)."""
    return [(64 + 32 * (i // 2), 96 if i % 2 else 160) for i in range(count)]


def encoded(size: tuple[int, int], fmt: str, shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade % 256, 90, 200)).save(buffer, fmt)
    return buffer.getvalue()


def server_rss_mb(pid: int) -> float:
    """Resident memory of the server and every process it started."""
    process = psutil.Process(pid)
    members = [process, *process.children(recursive=True)]
    total = 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total / 1e6


@dataclass
class Client:
    """One simulated user with its own HTTP connection and gRPC channel."""

    server: LiveServer
    http: httpx.Client = field(init=False)
    channel: grpc.Channel = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(timeout=120)
        self.channel = grpc.insecure_channel(self.server.grpc_target)
        self.stub = GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    def send(self, route: str, picture: bytes, fmt: str) -> None:
        """One request on `route`; raises on anything but a full answer."""
        if route == "v2":
            response = self.http.post(self.server.infer_url, json=infer_body(picture, 4))
            response.raise_for_status()
        elif route == "grpc":
            request = pb.ModelInferRequest(model_name=self.server.model_name)
            tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
            tensor.contents.bytes_contents.append(picture)
            request.parameters["max_new_tokens"].int64_param = MAX_NEW_TOKENS
            self.stub.ModelInfer(request, timeout=120)
        else:
            url = f"data:image/{fmt.lower()};base64,{base64.b64encode(picture).decode()}"
            body = {
                "model": self.server.model_name,
                "max_tokens": MAX_NEW_TOKENS,
                "stream": route == "openai-stream",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "Describe."},
                        ],
                    }
                ],
            }
            chat = f"{self.server.url}/v1/chat/completions"
            if route == "openai":
                self.http.post(chat, json=body).raise_for_status()
            else:
                with self.http.stream("POST", chat, json=body) as response:
                    response.raise_for_status()
                    if not any(line == "data: [DONE]" for line in response.iter_lines()):
                        raise RuntimeError("stream ended without [DONE]")


def run_round(server: LiveServer, clients: list[Client], work: list[tuple]) -> int:
    """Send `work` (route, picture, format) through `clients` in parallel; errors raised."""
    errors: list[BaseException] = []
    lock = threading.Lock()
    queue = list(work)

    def drain(client: Client) -> None:
        while True:
            with lock:
                if not queue or errors:
                    return
                route, picture, fmt = queue.pop()
            try:
                client.send(route, picture, fmt)
            except BaseException as exc:  # reported after the round
                with lock:
                    errors.append(exc)

    threads = [threading.Thread(target=drain, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"request failed: {errors[0]!r}") from errors[0]
    return len(work)


def soak(server: LiveServer, rounds: int, grids: int, clients: int) -> dict:
    """Round after round of every grid twice (a size seen again), memory after each round."""
    sizes = grid_sizes(grids)
    work = []
    for index, size in enumerate(sizes):
        for repeat in range(2):
            fmt = FORMATS[(index + repeat) % len(FORMATS)]
            route = ROUTES[(2 * index + repeat) % len(ROUTES)]
            work.append((route, encoded(size, fmt, index), fmt))
    users = [Client(server) for _ in range(clients)]
    rss = [server_rss_mb(server.process.pid)]
    seconds = []
    sent = 0
    try:
        for number in range(rounds):
            started = time.perf_counter()
            sent += run_round(server, users, work)
            seconds.append(time.perf_counter() - started)
            rss.append(server_rss_mb(server.process.pid))
            print(f"round {number + 1}: {rss[-1]:.0f} MB, {seconds[-1]:.1f} s", flush=True)
    finally:
        for user in users:
            user.close()
    return {
        "grids": grids,
        "requests": sent,
        "rss_mb_start": rss[0],
        "rss_mb_after_each_round": rss[1:],
        "growth_after_first_round_mb": rss[-1] - rss[1],
        "round_seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=13)
    parser.add_argument("--grids", type=int, default=24)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--max_growth_mb", type=float, default=50.0)
    parser.add_argument("--model_dir", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("server_args", nargs="*", help="flags passed on to the server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir
        if model_dir is None:
            import subprocess

            model_dir = Path(scratch) / "tiny-qwen3-vl"
            subprocess.run(
                [sys.executable, str(ROOT / "hack" / "make_tiny_model.py"), str(model_dir)],
                check=True,
                capture_output=True,
            )
        log = Path(scratch) / "server.log"
        with start_server(model_dir, log, *args.server_args) as server:
            result = soak(server, args.rounds, args.grids, args.clients)
    growth = result["growth_after_first_round_mb"]
    print(
        f"soak: {result['requests']} requests over {args.grids} grids, RSS "
        f"{result['rss_mb_start']:.0f} MB at start, {result['rss_mb_after_each_round'][0]:.0f} "
        f"MB after round 1, {result['rss_mb_after_each_round'][-1]:.0f} MB after round "
        f"{args.rounds}: {growth:+.0f} MB (limit {args.max_growth_mb:.0f})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    sys.exit(0 if growth < args.max_growth_mb else 1)


if __name__ == "__main__":
    main()
