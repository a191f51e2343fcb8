"""Closed-loop clients that keep sending through a server's shutdown, and what counts as lost.

Each client sends a request, waits for its whole answer and sends the next one (after
`pause_s` when it was turned away), over connections it keeps: httpx's keep-alive pool (v2
REST), the `openai` SDK's (OpenAI plain and streaming), one gRPC channel (gRPC). Every request
ends as one of:

- OK: a complete answer (v2: its outputs; OpenAI: a message and its usage; streaming: the
  deltas, a finish_reason, the usage chunk and `[DONE]`; gRPC: OK and its outputs);
- REFUSED: turned away cleanly by the server: 503 with Retry-After and a message (v2, OpenAI,
  streaming before any event), UNAVAILABLE with one of the server's own messages (gRPC);
- ENDED: a stream the server ended cleanly with an error event naming why (`shutting_down`
  at the drain's deadline, `engine_unavailable` when the engine process died);
- UNREACHABLE: the connection was refused while connecting (the listener is closed): nothing
  was sent, and the client may retry elsewhere;
- LOST: anything else. A reset or a connection closed under a request that was sent, a
  truncated stream, a 5xx other than 503 with Retry-After, a 503 without it, any other gRPC
  status, an UNAVAILABLE that is a transport failure rather than the server's message.
"""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
import httpx
import openai
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from tests.live_server import LiveServer, infer_body

OK, REFUSED, ENDED, UNREACHABLE, LOST = "ok", "refused", "ended", "unreachable", "lost"
PROTOCOLS = ("v2", "openai", "stream", "grpc")
# How the server's own refusals begin (predictor.errors): anything else is not the server's.
SERVER_MESSAGES = ("server shutting down", "server overloaded", "model engine unavailable")
CLEAN_STREAM_ENDS = ("shutting_down", "engine_unavailable")
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Outcome:
    protocol: str
    started: float  # time.monotonic() when the request was sent
    ended: float
    kind: str
    detail: str = ""


def _connect_refused(error: BaseException) -> bool:
    """Whether a client library's error is a refused connect (httpx's or the SDK's httpx2)."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ == "ConnectError" or isinstance(seen, ConnectionRefusedError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _server_message(message: str, model_name: str) -> bool:
    return message.startswith((*SERVER_MESSAGES, f"model {model_name} "))


def _status(status: int, retry_after: str | None, message: str) -> tuple[str, str]:
    if status == 503 and retry_after and message:
        return REFUSED, message
    return LOST, f"{status} retry-after={retry_after} {message}"


class Client:
    """One closed-loop client of one protocol; `call()` sends one request."""

    def __init__(self, protocol: str, server: LiveServer, picture: bytes, max_tokens: int):
        self.protocol = protocol
        self.server = server
        self.max_tokens = max_tokens
        self.picture = picture
        url = "data:image/jpeg;base64," + base64.b64encode(picture).decode()
        self.messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "Describe this image."},
                ],
            }
        ]
        self._http: httpx.Client | None = None
        self._sdk: openai.OpenAI | None = None
        self._channel: grpc.Channel | None = None
        if protocol == "v2":
            self._http = httpx.Client(timeout=REQUEST_TIMEOUT_S)
        elif protocol in ("openai", "stream"):
            self._sdk = openai.OpenAI(
                base_url=f"{server.url}/v1",
                api_key="unused",
                max_retries=0,  # every outcome is seen as it is
                timeout=REQUEST_TIMEOUT_S,
            )
        elif protocol == "grpc":
            self._channel = grpc.insecure_channel(server.grpc_target)
            self._stub = GRPCInferenceServiceStub(self._channel)
        else:
            raise ValueError(protocol)

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._sdk is not None:
            self._sdk.close()
        if self._channel is not None:
            self._channel.close()

    def call(self) -> tuple[str, str]:
        try:
            return getattr(self, f"_send_{self.protocol}")()
        except grpc.RpcError as error:
            details = error.details() or ""
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                if _server_message(details, self.server.model_name):
                    return REFUSED, details
                if "failed to connect to all addresses" in details:
                    return UNREACHABLE, details
            return LOST, f"{error.code().name} {details}"
        except openai.APIStatusError as error:
            retry_after = error.response.headers.get("retry-after")
            return _status(error.status_code, retry_after, error.message)
        except openai.APIError as error:  # an error event in a stream, or no connection
            if isinstance(error.body, dict) and error.body.get("code") in CLEAN_STREAM_ENDS:
                return ENDED, str(error.body.get("code"))
            if _connect_refused(error):
                return UNREACHABLE, repr(error.__cause__)
            return LOST, f"{type(error).__name__}: {error!r} cause {error.__cause__!r}"
        except httpx.HTTPError as error:
            if _connect_refused(error):
                return UNREACHABLE, repr(error)
            return LOST, repr(error)

    def _send_v2(self) -> tuple[str, str]:
        assert self._http is not None
        body = infer_body(self.picture, self.max_tokens)
        reply = self._http.post(self.server.infer_url, json=body)
        if reply.status_code != 200:
            message = reply.json().get("error", "") if reply.content else ""
            return _status(reply.status_code, reply.headers.get("retry-after"), message)
        outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
        if not outputs.get("generated_tokens") or "text" not in outputs:
            return LOST, f"incomplete answer {outputs}"
        return OK, ""

    def _send_openai(self) -> tuple[str, str]:
        assert self._sdk is not None
        reply = self._sdk.chat.completions.create(
            model=self.server.model_name,
            messages=self.messages,
            max_tokens=self.max_tokens,
            temperature=0,
        )
        if reply.choices[0].message.content is None or reply.usage is None:
            return LOST, f"incomplete answer {reply}"
        return OK, ""

    def _send_stream(self) -> tuple[str, str]:
        assert self._sdk is not None
        stream = self._sdk.chat.completions.create(
            model=self.server.model_name,
            messages=self.messages,
            max_tokens=self.max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        finished = usage = False
        with stream:
            for chunk in stream:
                finished = finished or any(c.finish_reason for c in chunk.choices)
                usage = usage or chunk.usage is not None
        # The SDK stops at [DONE]; a stream cut short by a clean close just stops too.
        if not (finished and usage):
            return LOST, f"truncated stream (finish_reason {finished}, usage {usage})"
        return OK, ""

    def _send_grpc(self) -> tuple[str, str]:
        request = pb.ModelInferRequest(model_name=self.server.model_name)
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(self.picture)
        request.parameters["max_new_tokens"].int64_param = self.max_tokens
        reply = self._stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
        if not any(o.name == "generated_tokens" for o in reply.outputs):
            return LOST, "incomplete answer"
        return OK, ""


class Traffic:
    """`clients` closed-loop clients of each protocol, on threads, until `stop()`."""

    def __init__(
        self,
        server: LiveServer,
        protocols: Iterable[str],
        picture: bytes,
        clients: int = 16,
        max_tokens: int = 64,
        pause_s: float = 0.05,
    ):
        self.outcomes: list[Outcome] = []
        self.pause_s = pause_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clients = [
            Client(protocol, server, picture, max_tokens)
            for protocol in protocols
            for _ in range(clients)
        ]
        self._threads = [
            threading.Thread(target=self._loop, args=(c,), daemon=True) for c in self._clients
        ]

    def start(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout_s: float = REQUEST_TIMEOUT_S + 10) -> None:
        self._stop.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        hung = [t for t in self._threads if t.is_alive()]
        assert not hung, f"{len(hung)} clients still waiting {timeout_s:g} s after the stop"
        for client in self._clients:
            client.close()

    def _loop(self, client: Client) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                kind, detail = client.call()
            except Exception as error:  # a failure no branch above expected: lost, shown
                kind, detail = LOST, f"unexpected {error!r}"
            outcome = Outcome(client.protocol, started, time.monotonic(), kind, detail)
            with self._lock:
                self.outcomes.append(outcome)
            if kind != OK:
                self._stop.wait(self.pause_s)

    def wait_for(self, condition: Callable[[list[Outcome]], bool], timeout_s: float) -> None:
        """Until `condition(outcomes)` holds (say, every protocol has been answered)."""
        deadline = time.monotonic() + timeout_s
        while not condition(self.snapshot()):
            assert time.monotonic() < deadline, f"not within {timeout_s:g} s: {self.tally()}"
            time.sleep(0.05)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def tally(self) -> dict[str, Counter]:
        counts: dict[str, Counter] = {}
        for outcome in self.snapshot():
            counts.setdefault(outcome.protocol, Counter())[outcome.kind] += 1
        return counts


def in_flight_at(outcomes: Iterable[Outcome], moment: float) -> list[Outcome]:
    """The requests sent before `moment` and answered after it."""
    return [o for o in outcomes if o.started < moment < o.ended]


def sent_after(outcomes: Iterable[Outcome], moment: float) -> list[Outcome]:
    return [o for o in outcomes if o.started >= moment]


def kinds(outcomes: Iterable[Outcome]) -> Counter:
    return Counter(o.kind for o in outcomes)
