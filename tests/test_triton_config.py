"""Triton's model configuration, in its JSON (REST) and protobuf (gRPC) forms, with no server."""

from __future__ import annotations

from google.protobuf import json_format

from predictor.protocol import INPUT_METADATA, OUTPUT_METADATA
from predictor.server.triton_config import ModelConfigResponse, model_config, model_config_response


def test_config_follows_the_tensor_metadata() -> None:
    config = model_config("qwen-vl")
    assert config["max_batch_size"] == 0 and config["model_transaction_policy"] == {
        "decoupled": False
    }
    assert [i["name"] for i in config["input"]] == [s["name"] for s in INPUT_METADATA]
    assert [o["name"] for o in config["output"]] == [s["name"] for s in OUTPUT_METADATA]
    assert {i["name"]: i["optional"] for i in config["input"]} == {
        "image": False,
        "prompt": True,
        # TensorRT-LLM's guided-decoding inputs, as its Triton models declare them
        "guided_decoding_guide_type": True,
        "guided_decoding_guide": True,
    }
    guide = next(i for i in config["input"] if i["name"] == "guided_decoding_guide")
    assert guide["data_type"] == "TYPE_STRING" and guide["dims"] == [1]


def test_grpc_form_has_triton_s_field_numbers_and_the_same_content() -> None:
    wire = model_config_response("qwen-vl").SerializeToString()
    # ModelConfigResponse.config (1) -> ModelConfig.name (1): tag bytes 0x0a ... 0x0a
    assert wire[0] == 0x0A and b"\x0a\x07qwen-vl" in wire
    back = json_format.MessageToDict(
        ModelConfigResponse.FromString(wire), preserving_proto_field_name=True
    )["config"]
    assert back["input"][0]["data_type"] == "TYPE_STRING"
    assert back["input"][1]["optional"] is True
    assert [int(d) for d in back["input"][0]["dims"]] == [-1]
    assert back["output"][2]["data_type"] == "TYPE_INT32"
