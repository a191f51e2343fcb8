"""tritonclient.grpc calls the client tests make, each printing its result as one JSON line.

Run as a separate process: tritonclient and KServe both register the `inference` protobuf
package, and one Python process cannot import both.

Usage: python -m tests.clients.triton_grpc_calls TARGET MODEL metadata|config
       python -m tests.clients.triton_grpc_calls TARGET MODEL infer IMAGE_PATH JSON_PARAMETERS
           [JSON_TEXT_INPUTS]  (more BYTES [1] inputs, {name: text}: the guide inputs)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
from google.protobuf import json_format


def main(argv: list[str]) -> None:
    target, model, call, *rest = argv
    client = triton_grpc.InferenceServerClient(target)
    try:
        if call == "metadata":
            result = json_format.MessageToDict(client.get_model_metadata(model))
        elif call == "config":
            result = json_format.MessageToDict(
                client.get_model_config(model), preserving_proto_field_name=True
            )
        else:
            path, parameters, *texts = rest
            image = triton_grpc.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(np.array([Path(path).read_bytes()], dtype=object))
            inputs = [image]
            for name, text in (json.loads(texts[0]) if texts else {}).items():
                inputs.append(triton_grpc.InferInput(name, [1], "BYTES"))
                inputs[-1].set_data_from_numpy(np.array([text.encode()], dtype=object))
            reply = client.infer(model, inputs, parameters=json.loads(parameters))
            result = {
                "text": [t.decode() for t in reply.as_numpy("text")],
                "finish_reason": [t.decode() for t in reply.as_numpy("finish_reason")],
            }
    except triton_grpc.InferenceServerException as error:
        result = {"status": error.status(), "message": error.message()}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
