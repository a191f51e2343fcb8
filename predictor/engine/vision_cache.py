"""A bounded cache of the vision encoder's output, keyed by the pixels it was given: an image
encoded once is not encoded again (`--vision_cache_mb`).

Why: the front's input cache (`predictor.inputs.input_cache`) spares a repeated image its
decoding and patching, but the vision encoder is the expensive part of an image's way in. On a
CPU it is most of a request's work that does not batch (115 ms of a 448x448 image's, against a
13 ms decoding step, on the 28-layer test checkpoint); on a GPU a megapixel image costs tens of
milliseconds of attention over ~5,000 patches. The same image comes back with the captioning
client's retries, the playground's re-runs, and "caption, then tags" workflows (vLLM keeps an
encoder cache for the same reason).

The key is the content of the pixel patches as they reach the engine (the front's uint8 frames
or the processor's floats), with the image grids and the model's dtype: the encoder is a
function of those alone, in eval mode, so a hit is the same tensors a new encoding would give.
The content is named by the front's key of the encoded image bytes and pixel budget they were
decoded from, when the row comes with it (every row the request path makes: decoding is
deterministic, so the same key means the same pixels), and otherwise by SHA-256 of the patches
themselves (0.76 ms of the engine for a 448x448 image, 3.6 ms at 1024x1024). Entries
live on the model's device and are bounded by their bytes; the least recently used go first.
A hit returns the cached output itself, which nothing downstream writes to (the prefill joins
row features into new tensors). Thread-safe: images are encoded on many threads.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from predictor import metrics
from predictor.inputs.input_cache import BoundedCache

VisionKey = tuple[bytes, bytes, str]


def vision_key(
    pixel_values: torch.Tensor,
    grids: torch.Tensor,
    dtype: torch.dtype,
    pixel_key: bytes | None = None,
) -> VisionKey:
    """The pixels' digest, the patches' shape and dtype, the grids and the model's dtype. The
    digest is `pixel_key`, the front's key of what the pixels were decoded from, when the row
    has one (`predictor.inputs.input_cache.pixel_key`), else SHA-256 of the patches' bytes
    (read in place from CPU memory)."""
    if pixel_key is not None:
        digest = b"from:" + pixel_key  # never equal to a digest of pixels (32 bytes)
    else:
        pixels = pixel_values.detach().cpu().contiguous()
        digest = hashlib.sha256(memoryview(pixels.view(torch.uint8).numpy())).digest()
    shape = repr((tuple(pixel_values.shape), str(pixel_values.dtype))).encode()
    return digest, shape + grids.cpu().numpy().tobytes(), str(dtype)


def output_bytes(output: Any) -> int:
    """Bytes held by the tensors of a vision encoder's output (nested in tuples, lists and
    transformers' ModelOutput, which is a dict)."""
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, dict):
        return sum(output_bytes(value) for value in output.values())
    if isinstance(output, (tuple, list)):
        return sum(output_bytes(value) for value in output)
    return 0


class VisionCache(BoundedCache[VisionKey, Any]):
    """Least-recently-used vision encoder outputs up to `max_bytes` (0: off, nothing hashed).
    Hits and misses are counted in `qwen_vl_vision_cache_hits` / `_misses` for the model
    `name`."""

    def __init__(self, max_bytes: int, name: str = ""):
        super().__init__(max_bytes, output_bytes)
        self.name = name

    def get(self, key: VisionKey) -> Any | None:
        output = super().get(key)
        # Looked up when counted: in the engine process the collectors are forwarding stand-ins.
        counter = metrics.VISION_CACHE_HITS if output is not None else metrics.VISION_CACHE_MISSES
        counter.labels(self.name).inc()
        return output
