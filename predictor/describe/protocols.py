"""One small client class per wire protocol, behind one interface: an image in, a caption out.

Why this shape: the runner, retries and outputs do not care how a request travels. Each class
sends one image, parses the answer into a `Caption`, and translates its protocol's failures
into `predictor.describe.errors` once. A new protocol is one class here plus one entry in
`PROTOCOLS`; the `--protocol` choices come from that table.
"""

from __future__ import annotations

import base64
import json
import re
import struct
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx
import orjson

from predictor.describe.errors import (
    DescribeError,
    Fatal,
    ImageRejected,
    RequestFailed,
    Retryable,
)
from predictor.describe.retry import parse_retry_after

# The server names the image in its message when the image itself is at fault
# ("image[0]: not a supported image format"). With one image per request, a body over the
# server's size limit is that image's fault too. Any other field is a problem with the request
# (a flag out of range) that every image would share.
IMAGE_FIELD_PREFIX = "image["
BODY_TOO_LARGE = re.compile(r"^request body: is \d+ bytes, more than the limit")


@dataclass(frozen=True)
class Caption:
    """The server's description of one image."""

    text: str
    finish_reason: str
    generated_tokens: int


@dataclass(frozen=True)
class Structure:
    """What every caption must be (guided decoding on the server): a JSON object matching
    `schema`, or exactly one of `choices`. Each protocol sends it in its own fields."""

    schema: dict[str, Any] | None = None
    choices: tuple[str, ...] = ()

    def v2_parameters(self) -> dict[str, str]:
        """TensorRT-LLM's guide parameters, as the predictor's v2 route reads them."""
        if self.schema is not None:
            guide_type, guide = "json_schema", json.dumps(self.schema)
        else:  # one literal per choice: no regex escaping to get wrong
            guide_type = "ebnf_grammar"
            guide = "root ::= " + " | ".join(
                json.dumps(c, ensure_ascii=False) for c in self.choices
            )
        return {"guided_decoding_guide_type": guide_type, "guided_decoding_guide": guide}

    def openai_fields(self) -> dict[str, Any]:
        """OpenAI's `response_format` for a schema, vLLM's `structured_outputs` for choices."""
        if self.schema is not None:
            named = {"name": "caption", "schema": self.schema, "strict": True}
            return {"response_format": {"type": "json_schema", "json_schema": named}}
        return {"structured_outputs": {"choice": list(self.choices)}}


@dataclass(frozen=True)
class ClientConfig:
    """Where to send images and what to ask; the same for every image of a run.

    parameters: OIP v2 request parameters (max_new_tokens, temperature, ...), only those the
    user set, so the server's defaults apply to the rest. structure: what every caption must
    be (`--json-schema`, `--choices`), if anything.
    """

    url: str
    model: str = "qwen-vl"
    prompt: str | None = None
    parameters: Mapping[str, int | float] = field(default_factory=dict)
    structure: Structure | None = None
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 300.0
    concurrency: int = 1


class Client(ABC):
    """Describes one image per call; safe to call from several threads at once."""

    name: ClassVar[str]

    def __init__(self, config: ClientConfig):
        self.config = config

    @abstractmethod
    def describe(self, image: bytes) -> Caption:
        """Caption `image` (encoded bytes, sent as they are), or raise a `DescribeError`."""

    @property
    @abstractmethod
    def target(self) -> str:
        """Where requests go, for the log."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


def _message_field_is_image(message: str) -> bool:
    return message.startswith(IMAGE_FIELD_PREFIX) or bool(BODY_TOO_LARGE.match(message))


def classify_http(status: int, message: str, retry_after: float | None = None) -> DescribeError:
    """The error for an HTTP status other than 200."""
    text = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status == 400:
        return ImageRejected(message) if _message_field_is_image(message) else Fatal(text)
    if status in (408, 429, 502, 503, 504):
        return Retryable(text, retry_after)
    if status in (401, 403, 404, 405):
        return Fatal(text)
    return RequestFailed(text)


def _http_base(config: ClientConfig, protocol: str) -> str:
    base = config.url.rstrip("/")
    if "://" not in base:
        base = f"http://{base}"
    if not base.startswith(("http://", "https://")):
        raise ValueError(f"--url for {protocol} must be an http(s) URL, got {config.url}")
    return base


def _http_client(config: ClientConfig) -> httpx.Client:
    return httpx.Client(
        headers=dict(config.headers),
        timeout=httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0)),
        limits=httpx.Limits(
            max_connections=config.concurrency, max_keepalive_connections=config.concurrency
        ),
    )


def _post_json(
    client: Client, http: httpx.Client, url: str, body: dict[str, Any]
) -> httpx.Response:
    """POST `body`; transport failures become the describe errors the runner acts on."""
    try:
        return http.post(
            url, content=orjson.dumps(body), headers={"content-type": "application/json"}
        )
    except (httpx.ReadTimeout, httpx.WriteTimeout) as error:
        # The server may still be working on it; sending it again would pile on more work.
        raise RequestFailed(f"no answer in {client.config.timeout_s:g}s (--timeout)") from error
    except httpx.TransportError as error:
        raise Retryable(f"{type(error).__name__}: {error}".rstrip(": ")) from error


class V2RestClient(Client):
    """OIP v2 over REST: JSON body, the image base64-encoded, to `{url}/v2/models/{m}/infer`."""

    name = "v2"

    def __init__(self, config: ClientConfig):
        super().__init__(config)
        self.infer_url = f"{_http_base(config, 'v2')}/v2/models/{config.model}/infer"
        self._http = _http_client(config)
        self._template = self._body_template(config)

    @staticmethod
    def _body_template(config: ClientConfig) -> dict[str, Any]:
        inputs: list[dict[str, Any]] = [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [None]}
        ]
        if config.prompt is not None:
            inputs.append(
                {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": [config.prompt]}
            )
        body: dict[str, Any] = {"inputs": inputs}
        parameters: dict[str, Any] = dict(config.parameters)
        if config.structure is not None:
            parameters.update(config.structure.v2_parameters())
        if parameters:
            body["parameters"] = parameters
        return body

    @property
    def target(self) -> str:
        return self.infer_url

    def build_body(self, image: bytes) -> dict[str, Any]:
        """The JSON body for one image: the image tensor first, then the prompt."""
        image_input = {**self._template["inputs"][0], "data": [base64.b64encode(image).decode()]}
        return {**self._template, "inputs": [image_input, *self._template["inputs"][1:]]}

    def describe(self, image: bytes) -> Caption:
        response = _post_json(self, self._http, self.infer_url, self.build_body(image))
        if response.status_code != 200:
            raise classify_http(
                response.status_code,
                _error_text(response),
                parse_retry_after(response.headers.get("retry-after")),
            )
        try:
            outputs = {o["name"]: o["data"] for o in response.json()["outputs"]}
            return Caption(
                text=str(outputs["text"][0]),
                finish_reason=str(outputs.get("finish_reason", [""])[0]),
                generated_tokens=int(outputs.get("generated_tokens", [0])[0]),
            )
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise RequestFailed(f"unexpected response: {response.text[:200]}") from error

    def close(self) -> None:
        self._http.close()


def _error_text(response: httpx.Response) -> str:
    """The server's message: `{"error": "..."}` from KServe, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"]
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    return response.text.strip()[:500]


# gRPC codes by what the client should do; the names are grpc.StatusCode member names.
GRPC_RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED")
GRPC_FATAL = ("NOT_FOUND", "UNAUTHENTICATED", "PERMISSION_DENIED", "UNIMPLEMENTED")


def classify_grpc(code: str, details: str, retry_after: float | None = None) -> DescribeError:
    """The error for a failed gRPC call, by the name of its status code."""
    text = f"{code}: {details}" if details else code
    if code == "INVALID_ARGUMENT":
        return ImageRejected(details) if _message_field_is_image(details) else Fatal(text)
    if code in GRPC_RETRYABLE:
        return Retryable(text, retry_after)
    if code in GRPC_FATAL:
        return Fatal(text)
    return RequestFailed(text)


class V2GrpcClient(Client):
    """OIP v2 over gRPC with KServe's own stubs; `--url` is `host:port` (`grpcs://` for TLS).

    Not tritonclient.grpc: it registers the same protobuf package as KServe, and one process
    cannot import both.
    """

    name = "grpc"

    def __init__(self, config: ClientConfig):
        super().__init__(config)
        import grpc

        pb, stub_class = _kserve_grpc_stubs()
        self._grpc, self._pb = grpc, pb
        address, secure = self._address(config.url)
        self._address_text = address
        options: list[tuple[str, Any]] = [
            # The server enforces its own size limits and says which one an image broke.
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", -1),
            # gRPC's own reconnect backoff grows to two minutes by default; capped so that a
            # restarted server is found again within a few of our retries.
            ("grpc.max_reconnect_backoff_ms", 5000),
        ]
        self._metadata: list[tuple[str, str]] = []
        for name, value in config.headers:
            if name.lower() == "host":  # an ingress routes gRPC by :authority, not by metadata
                options.append(("grpc.default_authority", value))
            else:
                self._metadata.append((name.lower(), value))
        if secure:
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._stub = stub_class(self._channel)
        self._request_template = self._make_template(config)

    @staticmethod
    def _address(url: str) -> tuple[str, bool]:
        for scheme, secure in (("grpc://", False), ("grpcs://", True)):
            if url.startswith(scheme):
                return url[len(scheme) :].rstrip("/"), secure
        if "://" in url:
            raise ValueError(f"--url for grpc must be host:port (or grpcs://host:port), got {url}")
        return url, False

    def _make_template(self, config: ClientConfig) -> Any:
        pb = self._pb
        request = pb.ModelInferRequest(model_name=config.model)
        if config.prompt is not None:
            prompt = request.inputs.add(name="prompt", datatype="BYTES", shape=[1])
            prompt.contents.bytes_contents.append(config.prompt.encode("utf-8"))
        parameters: dict[str, Any] = dict(config.parameters)
        if config.structure is not None:
            parameters.update(config.structure.v2_parameters())
        for key, value in parameters.items():
            parameter = request.parameters[key]
            if isinstance(value, str):
                parameter.string_param = value
            elif isinstance(value, bool):
                parameter.bool_param = value
            elif isinstance(value, int):
                parameter.int64_param = value
            else:
                # KServe's proto has no double_param; the predictor (like Triton) reads field 4,
                # so it is written on the wire by hand: tag 0x21 = field 4, 64-bit.
                parameter.MergeFromString(b"\x21" + struct.pack("<d", float(value)))
        return request

    @property
    def target(self) -> str:
        return self._address_text

    def build_request(self, image: bytes) -> Any:
        """The `ModelInferRequest` for one image: the image tensor first, then the prompt."""
        request = self._pb.ModelInferRequest()
        request.CopyFrom(self._request_template)
        tensor = self._pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1]
        )
        tensor.contents.bytes_contents.append(image)
        request.inputs.insert(0, tensor)
        return request

    def describe(self, image: bytes) -> Caption:
        request = self.build_request(image)
        try:
            response = self._stub.ModelInfer(
                request, timeout=self.config.timeout_s, metadata=self._metadata or None
            )
        except self._grpc.RpcError as error:
            code = error.code()
            if code == self._grpc.StatusCode.DEADLINE_EXCEEDED:
                raise RequestFailed(
                    f"no answer in {self.config.timeout_s:g}s (--timeout)"
                ) from error
            raise classify_grpc(
                code.name, error.details() or "", _grpc_retry_after(error)
            ) from error
        try:
            return Caption(
                text=_grpc_output(response, "text", str)[0],
                finish_reason=(_grpc_output(response, "finish_reason", str) or [""])[0],
                generated_tokens=(_grpc_output(response, "generated_tokens", int) or [0])[0],
            )
        except (ValueError, IndexError) as error:
            raise RequestFailed(f"unexpected response: {error}") from error

    def close(self) -> None:
        self._channel.close()


def _kserve_grpc_stubs() -> tuple[Any, Any]:
    """KServe's `grpc_predict_v2_pb2` module and its `GRPCInferenceServiceStub`.

    Imported on first use: the stubs import all of `kserve` (over a second), which v2 REST
    users should not wait for. And `kserve.model_server` parses `sys.argv` when imported, so
    our own flags (`--protocol grpc` is not one of its choices) are hidden from it meanwhile.
    """
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
        from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
    finally:
        sys.argv = saved
    return pb, GRPCInferenceServiceStub


def _grpc_retry_after(error: Any) -> float | None:
    """`retry-after` (seconds) or gRPC's `grpc-retry-pushback-ms` from the trailers, if any."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after":
            return parse_retry_after(value)
        if key == "grpc-retry-pushback-ms" and str(value).isdigit():
            return int(value) / 1000
    return None


def _grpc_output(response: Any, name: str, kind: type) -> list[Any]:
    """One output tensor as a list, from `contents` or `raw_output_contents`."""
    names = [o.name for o in response.outputs]
    if name not in names:
        if name == "text":
            raise ValueError("response has no 'text' output")
        return []
    index = names.index(name)
    tensor = response.outputs[index]
    if index < len(response.raw_output_contents):
        raw = response.raw_output_contents[index]
        if kind is int:
            return list(struct.unpack(f"<{len(raw) // 4}i", raw))
        items, offset = [], 0
        while offset + 4 <= len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4 : offset + 4 + length].decode("utf-8", "replace"))
            offset += 4 + length
        return items
    if kind is int:
        return list(tensor.contents.int_contents)
    return [b.decode("utf-8", "replace") for b in tensor.contents.bytes_contents]


class OpenAIClient(Client):
    """OpenAI chat completions: the image as a data: URL, the prompt as text, to
    `{url}/v1/chat/completions` (the server's OpenAI-compatible route)."""

    name = "openai"
    DEFAULT_PROMPT = "Describe this image."
    # v2 parameter names as chat-completion fields; the others have no OpenAI equivalent.
    FIELDS: ClassVar[dict[str, str]] = {
        "max_new_tokens": "max_tokens",
        "temperature": "temperature",
        "top_p": "top_p",
        "seed": "seed",
    }

    def __init__(self, config: ClientConfig):
        super().__init__(config)
        unsupported = sorted(set(config.parameters) - set(self.FIELDS))
        if unsupported:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in unsupported)
            raise ValueError(f"{flags}: not available with --protocol openai")
        self.chat_url = f"{_http_base(config, 'openai')}/v1/chat/completions"
        self._http = _http_client(config)

    @property
    def target(self) -> str:
        return self.chat_url

    def build_body(self, image: bytes) -> dict[str, Any]:
        url = f"data:{_mime_type(image)};base64,{base64.b64encode(image).decode()}"
        content = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": self.config.prompt or self.DEFAULT_PROMPT},
        ]
        body: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
        }
        body.update({self.FIELDS[k]: v for k, v in self.config.parameters.items()})
        if self.config.structure is not None:
            body.update(self.config.structure.openai_fields())
        return body

    def describe(self, image: bytes) -> Caption:
        response = _post_json(self, self._http, self.chat_url, self.build_body(image))
        if response.status_code != 200:
            raise classify_http(
                response.status_code,
                _openai_error_text(response),
                parse_retry_after(response.headers.get("retry-after")),
            )
        try:
            body = response.json()
            choice = body["choices"][0]
            return Caption(
                text=str(choice["message"]["content"]),
                finish_reason=str(choice.get("finish_reason") or ""),
                generated_tokens=int(body.get("usage", {}).get("completion_tokens", 0)),
            )
        except (ValueError, KeyError, IndexError, TypeError) as error:
            raise RequestFailed(f"unexpected response: {response.text[:200]}") from error

    def close(self) -> None:
        self._http.close()


def _mime_type(image: bytes) -> str:
    """A plausible image/* type for the data: URL (the server sniffs the bytes anyway)."""
    signatures = ((b"\x89PNG", "png"), (b"GIF8", "gif"), (b"RIFF", "webp"), (b"BM", "bmp"))
    for magic, kind in signatures:
        if image.startswith(magic):
            return f"image/{kind}"
    return "image/jpeg"


def _openai_error_text(response: httpx.Response) -> str:
    """OpenAI's error message; a problem with the image is reported as `image[0]: ...`,
    as the v2 protocols report it, since each request carries one image."""
    try:
        error = response.json()["error"]
        message, param = str(error["message"]), str(error.get("param") or "")
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:500]
    if "image_url" in param and message.startswith(f"{param}: "):
        return f"{IMAGE_FIELD_PREFIX}0]: {message[len(param) + 2 :]}"
    return message


PROTOCOLS: dict[str, type[Client]] = {
    V2RestClient.name: V2RestClient,
    V2GrpcClient.name: V2GrpcClient,
    OpenAIClient.name: OpenAIClient,
}


def make_client(protocol: str, config: ClientConfig) -> Client:
    """The client for `protocol` (a key of `PROTOCOLS`)."""
    return PROTOCOLS[protocol](config)
