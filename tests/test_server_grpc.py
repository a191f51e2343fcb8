"""The real model server over gRPC: KServe's stubs, tritonclient.grpc, large images, bad input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from PIL import Image

from tests import images
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
JPEG = images.jpeg()
CLIENT_LIMIT = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("grpc") / "server.log"
    with start_server(tiny_qwen3_vl, log, "--max_images_per_request", "4") as live:
        yield live


@pytest.fixture(scope="module")
def stub(server: LiveServer) -> Iterator[GRPCInferenceServiceStub]:
    options = [
        ("grpc.max_send_message_length", CLIENT_LIMIT),
        ("grpc.max_receive_message_length", CLIENT_LIMIT),
    ]
    with grpc.insecure_channel(server.grpc_target, options=options) as channel:
        yield GRPCInferenceServiceStub(channel)


def image_request(
    images_: list[bytes], raw: bool = False, **params: object
) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[len(images_)]
    )
    if not raw:
        tensor.contents.bytes_contents.extend(images_)
    request = pb.ModelInferRequest(model_name="qwen-vl", inputs=[tensor])  # copies the tensor
    if raw:
        request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images_))
    for key, value in params.items():
        if isinstance(value, float):  # Triton's double_param (field 4), absent from KServe's proto
            request.parameters[key].MergeFromString(b"\x21" + struct.pack("<d", value))
        else:
            request.parameters[key].int64_param = value
    return request


def output(response: pb.ModelInferResponse, name: str) -> list:
    index = [o.name for o in response.outputs].index(name)
    tensor = response.outputs[index]
    if response.raw_output_contents:
        raw = response.raw_output_contents[index]
        if tensor.datatype == "INT32":
            return list(struct.unpack(f"<{len(raw) // 4}i", raw))
        items, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4 : offset + 4 + length].decode())
            offset += 4 + length
        return items
    if tensor.datatype == "INT32":
        return list(tensor.contents.int_contents)
    return [b.decode() for b in tensor.contents.bytes_contents]


@pytest.mark.parametrize("raw", [False, True], ids=["bytes_contents", "raw_input_contents"])
def test_batch_of_three_images(stub: GRPCInferenceServiceStub, raw: bool) -> None:
    pictures = [images.jpeg(color=c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    response = stub.ModelInfer(image_request(pictures, raw=raw, max_new_tokens=4), timeout=60)
    assert response.id
    texts = output(response, "text")
    assert len(texts) == 3 and all(texts)
    assert output(response, "generated_tokens") == [4, 4, 4]
    assert output(response, "finish_reason") == ["length"] * 3


def test_temperature_sent_as_double_is_honoured(stub: GRPCInferenceServiceStub) -> None:
    greedy = stub.ModelInfer(image_request([JPEG], max_new_tokens=8), timeout=60)
    sampled = [
        output(
            stub.ModelInfer(image_request([JPEG], max_new_tokens=8, temperature=1.0, seed=s)),
            "text",
        )
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1]  # same seed, same text
    assert sampled[0] != output(greedy, "text") or sampled[2] != output(greedy, "text")


def test_image_larger_than_grpc_default_limit(stub: GRPCInferenceServiceStub) -> None:
    noise = Image.frombytes("RGB", (1800, 1800), os.urandom(1800 * 1800 * 3))
    png = images.encode(noise, "PNG", compress_level=0)
    assert len(png) > 8 * 1024 * 1024
    response = stub.ModelInfer(image_request([png], max_new_tokens=2), timeout=120)
    assert output(response, "generated_tokens") == [2]


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (image_request([b"not an image"]), "image[0]"),
        (image_request([images.truncated_jpeg()]), "image[0]"),
        (image_request([b""]), "image[0]"),
        (image_request([JPEG] * 5), "image"),
        (image_request([JPEG], max_new_tokens=0), "max_new_tokens"),
        (image_request([JPEG], temperature=9.5), "temperature"),
        (image_request([JPEG], beams=2), "parameters.beams"),
        (pb.ModelInferRequest(model_name="qwen-vl"), "image"),
    ],
    ids=[
        "not-image",
        "truncated",
        "empty",
        "too-many",
        "zero-tokens",
        "hot",
        "unknown",
        "no-inputs",
    ],
)
def test_bad_input_is_invalid_argument(
    stub: GRPCInferenceServiceStub, request_: pb.ModelInferRequest, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request_, timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}: "), error.value.details()
    assert stub.ModelReady(pb.ModelReadyRequest(name="qwen-vl")).ready


def run_triton_client(server: LiveServer, paths: list[Path]) -> dict:
    command = [sys.executable, "-m", "tests.clients.triton_grpc", server.grpc_target, "qwen-vl"]
    done = subprocess.run(
        [*command, *map(str, paths)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_tritonclient_grpc_batch_of_three(server: LiveServer, tmp_path: Path) -> None:
    paths = []
    for name, data in list(images.every_format().items())[:3]:
        paths.append(tmp_path / f"image.{name}")
        paths[-1].write_bytes(data)
    result = run_triton_client(server, paths)
    assert result["status"] == "OK", result
    assert len(result["text"]) == 3 and all(result["text"])
    assert result["generated_tokens"] == [4, 4, 4]


def test_tritonclient_grpc_bad_image(server: LiveServer, tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(images.truncated_jpeg())
    result = run_triton_client(server, [path])
    assert result["status"] == "StatusCode.INVALID_ARGUMENT"
    assert result["message"].startswith("image[0]: ")
