"""Triton's model-configuration extension: `GET /v2/models/{name}/config` and gRPC `ModelConfig`.

Why: Triton's clients and its load generator, perf_analyzer, read a model's configuration
before they send anything (its inputs, their data types and dims, `max_batch_size`, whether the
model is decoupled). KServe has no such route. The configuration is derived from the same
tensor metadata as `GET /v2/models/{name}`, so the two cannot disagree:

- `max_batch_size` 0 with variable dims `[-1]`: the model takes one request of N images, not a
  batch dimension Triton would add itself (the server batches requests on its own, row by row);
- `prompt` is `optional`; `image`, `text` and `finish_reason` are `TYPE_STRING` (BYTES);
- `model_transaction_policy.decoupled` is false: an infer request gets exactly one response
  (token streaming is the OpenAI route's, not the v2 protocol's).

The gRPC messages are the subset of Triton's `model_config.proto` that the answer uses, built
from a descriptor here with Triton's field numbers, so the wire form is Triton's. They live in a
private descriptor pool: KServe's `inference` protos and Triton's cannot share one process.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

from predictor.protocol import INPUT_METADATA, OPTIONAL_INPUTS, OUTPUT_METADATA

PLATFORM = "pytorch"
BACKEND = "qwen-vl-predictor"
# KServe datatype names -> Triton's model-config DataType enum names.
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP32": "TYPE_FP32",
    "BYTES": "TYPE_STRING",
}


def model_config(model_name: str) -> dict[str, Any]:
    """The model's configuration in Triton's JSON form (the REST answer)."""
    inputs = [
        {
            "name": spec["name"],
            "data_type": _TRITON_TYPES[spec["datatype"]],
            "format": "FORMAT_NONE",
            "dims": list(spec["shape"]),
            "optional": spec["name"] in OPTIONAL_INPUTS,
        }
        for spec in INPUT_METADATA
    ]
    outputs = [
        {"name": spec["name"], "data_type": _TRITON_TYPES[spec["datatype"]], "dims": spec["shape"]}
        for spec in OUTPUT_METADATA
    ]
    return {
        "name": model_name,
        "platform": PLATFORM,
        "backend": BACKEND,
        "max_batch_size": 0,
        "input": inputs,
        "output": outputs,
        "model_transaction_policy": {"decoupled": False},
    }


# ---- gRPC: Triton's ModelConfigRequest / ModelConfigResponse, field numbers as in Triton ----

_F = descriptor_pb2.FieldDescriptorProto
_FIELDS: dict[str, list[tuple[str, int, int, int, str]]] = {
    # message: (field, number, type, label, type name for enums and messages)
    "ModelInput": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("data_type", 2, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, ".triton.DataType"),
        ("format", 3, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, ".triton.Format"),
        ("dims", 4, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
        ("optional", 8, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, ""),
    ],
    "ModelOutput": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("data_type", 2, _F.TYPE_ENUM, _F.LABEL_OPTIONAL, ".triton.DataType"),
        ("dims", 3, _F.TYPE_INT64, _F.LABEL_REPEATED, ""),
    ],
    "ModelTransactionPolicy": [("decoupled", 1, _F.TYPE_BOOL, _F.LABEL_OPTIONAL, "")],
    "ModelConfig": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("platform", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("backend", 17, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("max_batch_size", 4, _F.TYPE_INT32, _F.LABEL_OPTIONAL, ""),
        ("input", 5, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".triton.ModelInput"),
        ("output", 6, _F.TYPE_MESSAGE, _F.LABEL_REPEATED, ".triton.ModelOutput"),
        (
            "model_transaction_policy",
            19,
            _F.TYPE_MESSAGE,
            _F.LABEL_OPTIONAL,
            ".triton.ModelTransactionPolicy",
        ),
    ],
    "ModelConfigRequest": [
        ("name", 1, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
        ("version", 2, _F.TYPE_STRING, _F.LABEL_OPTIONAL, ""),
    ],
    "ModelConfigResponse": [
        ("config", 1, _F.TYPE_MESSAGE, _F.LABEL_OPTIONAL, ".triton.ModelConfig")
    ],
}
_ENUMS = {
    "DataType": [
        "TYPE_INVALID",
        "TYPE_BOOL",
        "TYPE_UINT8",
        "TYPE_UINT16",
        "TYPE_UINT32",
        "TYPE_UINT64",
        "TYPE_INT8",
        "TYPE_INT16",
        "TYPE_INT32",
        "TYPE_INT64",
        "TYPE_FP16",
        "TYPE_FP32",
        "TYPE_FP64",
        "TYPE_STRING",
        "TYPE_BF16",
    ],
    "Format": ["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"],
}


def _build_messages() -> dict[str, type]:
    file = descriptor_pb2.FileDescriptorProto(
        name="qwen_vl_predictor/triton_model_config.proto", package="triton", syntax="proto3"
    )
    for enum_name, values in _ENUMS.items():
        enum = file.enum_type.add(name=enum_name)
        for number, value in enumerate(values):
            enum.value.add(name=value, number=number)
    for message_name, fields in _FIELDS.items():
        message = file.message_type.add(name=message_name)
        for name, number, type_, label, type_name in fields:
            field = message.field.add(name=name, number=number, type=type_, label=label)
            if type_name:
                field.type_name = type_name
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"triton.{name}"))
        for name in ("ModelConfigRequest", "ModelConfigResponse")
    }


_MESSAGES = _build_messages()
ModelConfigRequest = _MESSAGES["ModelConfigRequest"]
ModelConfigResponse = _MESSAGES["ModelConfigResponse"]


def model_config_response(model_name: str) -> Any:
    """The gRPC `ModelConfigResponse` for the model."""
    return json_format.ParseDict({"config": model_config(model_name)}, ModelConfigResponse())
