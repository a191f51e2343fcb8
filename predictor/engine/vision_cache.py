"""A bounded cache of the vision encoder's output, keyed by the pixels it was given: an image
encoded once is not encoded again (`--vision_cache_mb`).

Why: the front's input cache (`predictor.inputs.input_cache`) spares a repeated image its
decoding and patching, but the vision encoder is the expensive part of an image's way in. On a
CPU it is most of a request's work that does not batch (115 ms of a 448x448 image's, against a
13 ms decoding step, on the 28-layer test checkpoint); on a GPU a megapixel image costs tens of
milliseconds of attention over ~5,000 patches. The same image comes back with the captioning
client's retries, the playground's re-runs, and "caption, then tags" workflows (vLLM keeps an
encoder cache for the same reason).

The key is SHA-256 of the pixel patches as they reach the engine (the front's uint8 frames or
the processor's floats), with the image grids and the model's dtype: the encoder is a function
of those alone, in eval mode, so a hit is the same tensors a new encoding would give. Entries
live on the model's device and are bounded by their bytes; the least recently used go first.
A hit returns the cached output itself, which nothing downstream writes to (the prefill joins
row features into new tensors). Thread-safe: images are encoded on many threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import torch

from predictor import metrics

MIB = 1024 * 1024
VisionKey = tuple[bytes, bytes, str]


def vision_key(pixel_values: torch.Tensor, grids: torch.Tensor, dtype: torch.dtype) -> VisionKey:
    """SHA-256 of the patches' bytes (read in place from CPU memory), the grids and the dtype."""
    pixels = pixel_values.detach().cpu().contiguous()
    digest = hashlib.sha256(memoryview(pixels.view(torch.uint8).numpy())).digest()
    shape = repr((tuple(pixels.shape), str(pixels.dtype))).encode()
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


class VisionCache:
    """Least-recently-used vision encoder outputs up to `max_bytes`. `max_bytes` 0 disables it
    (every lookup misses, nothing is kept, nothing is hashed). Hits and misses are counted in
    `qwen_vl_vision_cache_hits` / `_misses` for the model `name`."""

    def __init__(self, max_bytes: int, name: str = ""):
        self.max_bytes = max_bytes
        self.name = name
        self._entries: OrderedDict[VisionKey, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: VisionKey) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        # Looked up when counted: in the engine process the collectors are forwarding stand-ins.
        counter = metrics.VISION_CACHE_HITS if entry is not None else metrics.VISION_CACHE_MISSES
        counter.labels(self.name).inc()
        return None if entry is None else entry[0]

    def put(self, key: VisionKey, output: Any) -> None:
        """Keep `output`, dropping the least recently used to stay within the bound; an output
        larger than the whole bound is not kept."""
        size = output_bytes(output)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (output, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
