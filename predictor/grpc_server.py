"""KServe's gRPC server plus Triton's `ModelConfig` method on the same service.

Why a subclass: KServe's servicer implements only the methods of its own copy of the v2 proto,
and Triton's clients (tritonclient.grpc, perf_analyzer) also call
`inference.GRPCInferenceService/ModelConfig`. gRPC routes by full method name, so a second
handler for that one method on the same service name sits beside KServe's. KServe builds and
starts its `aio.server` in one method, so `start` is KServe 0.21's own with that handler added
(pinned in pyproject.toml).
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
from grpc import aio
from kserve.errors import ModelNotFound
from kserve.logging import logger
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer

from predictor.triton_config import ModelConfigRequest, ModelConfigResponse, model_config_response

SERVICE = "inference.GRPCInferenceService"


def model_config_handler(dataplane: DataPlane) -> grpc.GenericRpcHandler:
    """`ModelConfig` for the models in KServe's registry (NOT_FOUND for others)."""

    async def model_config(request: Any, context: aio.ServicerContext) -> Any:
        try:
            model = dataplane.get_model_from_registry(request.name)
        except ModelNotFound:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"Model with name {request.name} does not exist."
            )
        return model_config_response(model.name)

    method = grpc.unary_unary_rpc_method_handler(
        model_config,
        request_deserializer=ModelConfigRequest.FromString,
        response_serializer=ModelConfigResponse.SerializeToString,
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelConfig": method})


class TritonGRPCServer(GRPCServer):
    """KServe's `GRPCServer`, with Triton's `ModelConfig` beside KServe's methods."""

    async def start(self, max_workers: int) -> None:
        inference_servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                (
                    "grpc.max_receive_message_length",
                    self._kwargs.get("grpc_max_receive_message_length"),
                ),
            ],
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            inference_servicer, self._server
        )
        self._server.add_generic_rpc_handlers((model_config_handler(self._data_plane),))
        listen_addr = f"[::]:{self._port}"
        self._server.add_insecure_port(listen_addr)
        logger.info("Starting gRPC server with %s workers on %s", max_workers, listen_addr)
        await self._server.start()
        await self._server.wait_for_termination()
