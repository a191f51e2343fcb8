"""The OpenAPI document's v2 models name what the v2 route really accepts and returns.

The v2 route parses bodies itself (predictor.server.rest, predictor.protocol); these checks keep the
documenting models from drifting from that contract. The served document and real answers
validated against it are tested on the live server (tests/test_clients.py).
"""

from __future__ import annotations

import typing

from predictor.params import GENERATION_PARAMETERS
from predictor.protocol import CLIENT_PARAMETERS, INPUT_METADATA, OUTPUT_METADATA
from predictor.server.openapi import InferParameters, InputTensor, OutputTensor, RequestedOutput


def literal_values(model: type, field: str) -> set[str]:
    return set(typing.get_args(model.model_fields[field].annotation))


def test_documented_parameters_are_the_accepted_ones() -> None:
    assert set(InferParameters.model_fields) == set(GENERATION_PARAMETERS) | set(CLIENT_PARAMETERS)


def test_documented_tensors_are_the_contract_s() -> None:
    assert literal_values(InputTensor, "name") == {spec["name"] for spec in INPUT_METADATA}
    outputs = {spec["name"] for spec in OUTPUT_METADATA}
    assert literal_values(RequestedOutput, "name") == outputs
    assert literal_values(OutputTensor, "name") == outputs
