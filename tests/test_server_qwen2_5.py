"""The real server on the tiny Qwen2.5-VL model (patch 14): REST and gRPC answer the same."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from tests import images
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_qwen2_5_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("qwen2.5") / "server.log"
    with start_server(tiny_qwen2_5_vl, log, "--model_name", "qwen25") as live:
        yield live


def test_rest_and_grpc_give_the_same_greedy_description(server: LiveServer) -> None:
    assert server.model_name == "qwen25"
    picture = images.encode(images.gradient((150, 100)), "PNG")
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [1],
                "data": [base64.b64encode(picture).decode()],
            }
        ],
        "parameters": {"max_new_tokens": 6},
    }
    rest = httpx.post(f"{server.url}/v2/models/qwen25/infer", json=body, timeout=60)
    assert rest.status_code == 200, rest.text
    rest_text = rest.json()["outputs"][0]["data"][0]

    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(picture)
    request = pb.ModelInferRequest(model_name="qwen25", inputs=[tensor])
    request.parameters["max_new_tokens"].int64_param = 6
    with grpc.insecure_channel(server.grpc_target) as channel:
        response = GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert response.outputs[0].contents.bytes_contents[0].decode() == rest_text
    assert rest_text


def test_model_name_flag_names_the_route(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/v2/models/qwen25/ready").json()["ready"] is True
    assert httpx.get(f"{server.url}/v2/models/qwen-vl/ready").status_code == 404
