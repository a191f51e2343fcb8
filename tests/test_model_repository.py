"""The model repository with `--enable_model_repository`: unloading makes the server say so.

(Refusal by default is in test_client_limits.py, whose server runs with the defaults.) Each
test here unloads the one model, so each starts its own server.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub

from tests import images
from tests.live_server import LiveServer, infer_body, start_server

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tiny_qwen3_vl: Path, tmp_path: Path) -> Iterator[LiveServer]:
    log = tmp_path / "server.log"
    with start_server(tiny_qwen3_vl, log, "--enable_model_repository", "true") as live:
        yield live


def status(server: LiveServer, path: str) -> int:
    return httpx.get(f"{server.url}{path}").status_code


def test_unloading_over_rest_makes_readiness_and_liveness_false(server: LiveServer) -> None:
    body = infer_body(images.jpeg(), max_new_tokens=2)
    assert httpx.post(server.infer_url, json=body).status_code == 200
    loaded = httpx.post(f"{server.url}/v2/repository/models/qwen-vl/load")
    assert loaded.status_code == 200  # already loaded: nothing to do, as in Triton
    unloaded = httpx.post(f"{server.url}/v2/repository/models/qwen-vl/unload")
    assert unloaded.status_code == 200
    assert status(server, "/v2/models/qwen-vl/ready") == 404  # the readiness probe's route
    assert status(server, "/v2/health/ready") == 503
    assert status(server, "/v2/health/live") == 503  # cannot come back: restart the pod
    assert httpx.post(server.infer_url, json=body).status_code == 404
    again = httpx.post(f"{server.url}/v2/repository/models/qwen-vl/load")
    assert again.status_code == 503
    assert "cannot be loaded again in this process" in again.json()["error"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(
            model="qwen-vl", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert error.value.status_code == 503
    assert "Traceback" not in server.log()


def test_unloading_over_grpc_makes_readiness_and_liveness_false(server: LiveServer) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = GRPCInferenceServiceStub(channel)
        metadata = stub.ServerMetadata(pb.ServerMetadataRequest())
        assert "model_repository_extension" in metadata.extensions
        unloaded = stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="qwen-vl"))
        assert unloaded.isUnloaded
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert not stub.ServerLive(pb.ServerLiveRequest()).live
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelReady(pb.ModelReadyRequest(name="qwen-vl"))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as error:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="qwen-vl"))
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert status(server, "/v2/health/live") == 503
