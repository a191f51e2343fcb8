"""Triton's `ModelConfig` method on KServe's gRPC service.

Why: KServe's servicer implements only the methods of its own copy of the v2 proto, and
Triton's clients (tritonclient.grpc, perf_analyzer) also call
`inference.GRPCInferenceService/ModelConfig`. gRPC routes by full method name, so a second
handler for that one method on the same service name sits beside KServe's;
`predictor.server.kserve_servers.QuietGRPCServer` adds it when it builds the server.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio
from kserve.errors import ModelNotFound
from kserve.protocol.dataplane import DataPlane

from predictor.server.triton_config import (
    ModelConfigRequest,
    ModelConfigResponse,
    model_config_response,
)

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
