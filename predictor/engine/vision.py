"""The vision encoder: the model's own `get_image_features`, eager, on a stream of its own.

Why eager: the encoder computes positions, windows and attention boundaries from
`image_grid_thw` in Python, so each image size is a different graph. Measured on this
project's CPU benchmark machine (tiny Qwen3-VL, bf16, one call per size after a warm call):
eager took 9.4 / 5.4 / 28.3 ms for 448² / 256² / 640² images, and `torch.compile(dynamic=True)`
took 34 s to compile the first size and then 11.5 / 5.3 / 26.3 ms: no faster, because the
grid-dependent Python breaks the graph into pieces. The encoder used to run as TorchScript
graphs traced per grid, built with a private tracing API of a runtime PyTorch deprecates;
those cost a background tracing thread, a per-grid LRU of graphs and an equality check per
trace, for a 10-17% gain in 16-client throughput on the 2-core benchmark machine. Eager is
what transformers itself runs, on public APIs only.

Why a stream of its own (CUDA only): images are encoded on request threads while the engine
thread decodes. On the default stream every decoding step would queue behind the encoder's
kernels; on a separate stream the two overlap, and the caller waits for its own work only
(the features are synchronised before they are handed to the decode thread's stream).
"""

from __future__ import annotations

import threading
from typing import Any

import torch


class VisionEncoder:
    """`model.get_image_features` without the encoder's unmerged last hidden state.

    Safe to call from many threads: on CUDA each calling thread gets a stream of its own."""

    def __init__(self, model: Any):
        self.model = model
        self._streams = threading.local()

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        stream = self._stream(pixel_values.device)
        if stream is None:
            return self._encode(pixel_values, image_grid_thw)
        # The inputs were copied to the device on the caller's current stream.
        stream.wait_stream(torch.cuda.current_stream(pixel_values.device))
        with torch.cuda.stream(stream):
            output = self._encode(pixel_values, image_grid_thw)
        # The decode thread reads the features on its own stream: finish them first, so that
        # no kernel of another stream is still writing them (and their memory is not reused).
        stream.synchronize()
        return output

    def _encode(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> Any:
        output = self.model.get_image_features(
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, return_dict=True
        )
        # Keep what the language model consumes (per-image embeddings, and Qwen3-VL's
        # deepstack features); the encoder's unmerged last hidden state is 4x larger.
        return type(output)(**{k: v for k, v in output.items() if k != "last_hidden_state"})

    def _stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda":
            return None
        stream = getattr(self._streams, "stream", None)
        if stream is None:
            stream = torch.cuda.Stream(device=device)
            self._streams.stream = stream
        return stream
