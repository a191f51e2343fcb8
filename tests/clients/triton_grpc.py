"""Describe images with tritonclient.grpc and print the result as JSON.

Run as a separate process: tritonclient and KServe both register the `inference` protobuf
package, and one Python process cannot import both.

Usage: python -m tests.clients.triton_grpc TARGET MODEL IMAGE_PATH... [--raw]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc


def main(argv: list[str]) -> None:
    target, model, *paths = [a for a in argv if a != "--raw"]
    client = triton_grpc.InferenceServerClient(target)
    data = np.array([Path(p).read_bytes() for p in paths], dtype=object)
    image = triton_grpc.InferInput("image", [len(paths)], "BYTES")
    image.set_data_from_numpy(data)
    try:
        result = client.infer(model, [image], parameters={"max_new_tokens": 4, "temperature": 0.0})
    except triton_grpc.InferenceServerException as error:
        print(json.dumps({"status": error.status(), "message": error.message()}))
        return
    print(
        json.dumps(
            {
                "status": "OK",
                "text": [t.decode() for t in result.as_numpy("text")],
                "finish_reason": [t.decode() for t in result.as_numpy("finish_reason")],
                "generated_tokens": result.as_numpy("generated_tokens").tolist(),
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1:])
