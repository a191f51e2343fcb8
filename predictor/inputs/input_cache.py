"""A bounded cache of processed images, keyed by content: the same bytes at the same pixel
budget skip decoding and patching (`--input_cache_mb`).

Why: clients send the same image again. The captioning client retries through restarts and
errors, the playground re-runs a picture with another prompt or temperature, and "caption,
then tags" workflows ask twice about one photo. For a 12-megapixel JPEG that is tens of
milliseconds of the front's CPU each time (vLLM keeps a processor cache for the same reason).

The key is a digest of the encoded bytes with the pixel budget (which fixes the model-input
size, hence the patches) and the patches' dtype; nothing else about a request changes them.
The prompt does not: the text part has its own cache (`predictor.inputs.preprocessing`).
Entries are bounded by the bytes their tensors hold and the least recently used go first. A
hit returns the cached tensors themselves, which nothing downstream writes to (the front
copies them into the shared arena; the in-process engine only reads them).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from predictor.inputs.patches import Patched
from predictor.params import PixelBudget

MIB = 1024 * 1024


CacheKey = tuple[bytes, int, int, str]


@dataclass(frozen=True)
class ProcessedImage:
    """An image ready for the model: its model-input size and its processor tensors."""

    size: tuple[int, int]  # (width, height) at the model's input
    patched: Patched
    key: CacheKey | None = None  # the content key it was made from (`cache_key`)

    @property
    def nbytes(self) -> int:
        return self.patched.nbytes


K = TypeVar("K")
V = TypeVar("V")


def cache_key(data: bytes, budget: PixelBudget, dtype: torch.dtype) -> CacheKey:
    """The content key: SHA-256 of the bytes (CPUs hash it in hardware: 0.05 ms for 100 KB,
    1.9 ms for a 3.3 MB 12 MP JPEG, half of BLAKE2b's time here), the pixel budget and the
    dtype."""
    digest = hashlib.sha256(data).digest()
    return digest, budget.min_pixels, budget.max_pixels, str(dtype)


def pixel_key(keys: Sequence[CacheKey]) -> bytes:
    """One digest for a row's images from their content keys, which fix their pixels (the
    same bytes at the same budget decode to the same model input). Why: the engine's vision
    cache (`predictor.engine.vision_cache`) needs a key for the pixels it is handed, and
    hashing them again there cost 0.76 ms of the engine per 448x448 image (3.6 ms at
    1024x1024), where the front's key over the encoded bytes already exists."""
    return hashlib.sha256(repr(tuple(keys)).encode()).digest()


class BoundedCache(Generic[K, V]):
    """Least-recently-used entries up to `max_bytes`, each as large as `size_of` says.
    Thread-safe. `max_bytes` 0 disables it (every lookup misses, nothing is kept). The input
    cache here and the engine's vision cache (`predictor.engine.vision_cache`) are two."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]):
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V) -> None:
        """Keep `value`, dropping the least recently used to stay within the bound; a value
        larger than the whole bound is not kept."""
        size = self._size_of(value)
        if size > self.max_bytes:
            return
        with self._lock:
            previous = self._entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[1]
            self._entries[key] = (value, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes


class InputCache(BoundedCache[CacheKey, ProcessedImage]):
    """Least-recently-used `ProcessedImage`s up to `max_bytes` of tensors."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes, lambda entry: entry.nbytes)
