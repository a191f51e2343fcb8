"""Tensors from the server process to the engine core process, copied once.

Why not torch.multiprocessing's own sharing: it gives every tensor it pickles a shared-memory
file of its own (shm_open, ftruncate, mmap) and passes the descriptor through a helper thread
and a Unix socket. For the five tensors of every row (pixel patches, token ids, mask, token
types, image grid) that cost more CPU than the processor's work on the image itself: under 16
clients it was a fifth of the server process's time, spent on its event loop.

Instead the front allocates one shared region when it starts the core (`SharedArena`; the core
maps it once, at spawn) and copies each row's pixel patches into a span of it: one memcpy, no
system call. Small tensors travel inline in the pipe's pickle as raw bytes. The core reads a
span in place while its vision encoder runs and then says so (`release`), which frees the
span. A row whose patches do not fit the free space travels inline (slower, never refused).
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass

import torch

ALIGNMENT = 256  # span starts, in bytes: cache lines and vector loads stay aligned
INLINE_LIMIT = 64 * 1024  # tensors smaller than this travel in the pickle itself


@dataclass(frozen=True)
class Span:
    offset: int
    size: int


@dataclass(frozen=True)
class PackedTensor:
    """A tensor as the pipe carries it: in the arena (`span`) or as raw bytes (`data`)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    span: Span | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class PackedRow:
    """A row's processor tensors as the pipe carries them, and the content key of its pixels
    (`predictor.rows.EncodedRow.pixel_key`), which spares the core hashing them."""

    tensors: dict[str, PackedTensor]
    pixel_key: bytes | None = None


class SharedArena:
    """One shared-memory region with a first-fit allocator; the front allocates and frees,
    the core only reads (`view`). Thread-safe.

    The region is a torch uint8 tensor in shared memory, so it travels to the spawned core as
    an argument (one descriptor, once) and is freed when both processes drop it. Its pages
    count as memory only once written (/dev/shm is a tmpfs: the manifests mount one large
    enough)."""

    def __init__(self, size: int, buffer: torch.Tensor | None = None):
        self.size = size
        self.buffer = buffer if buffer is not None else torch.empty(size, dtype=torch.uint8)
        if buffer is None:
            self.buffer.share_memory_()
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, size), sorted by offset

    @classmethod
    def attach(cls, buffer: torch.Tensor) -> SharedArena:
        """The core's side: the same region, received at spawn."""
        return cls(buffer.numel(), buffer)

    def allocate(self, size: int) -> Span | None:
        """A span of at least `size` bytes, or None when no free run is that large."""
        size = -(-size // ALIGNMENT) * ALIGNMENT
        with self._lock:
            for index, (offset, free) in enumerate(self._free):
                if free >= size:
                    if free == size:
                        del self._free[index]
                    else:
                        self._free[index] = (offset + size, free - size)
                    return Span(offset, size)
        return None

    def free(self, span: Span) -> None:
        """Return a span, merging it with free neighbours."""
        with self._lock:
            index = bisect.bisect(self._free, (span.offset, 0))
            offset, size = span.offset, span.size
            if index < len(self._free) and self._free[index][0] == offset + size:
                size += self._free.pop(index)[1]
            if index > 0 and sum(self._free[index - 1]) == offset:
                offset, previous = self._free.pop(index - 1)
                size += previous
                index -= 1
            self._free.insert(index, (offset, size))

    def reset(self) -> None:
        """Everything free again (the core that read the region has gone)."""
        with self._lock:
            self._free = [(0, self.size)]

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(size for _, size in self._free)

    def pack(self, tensor: torch.Tensor, spans: list[Span], shared: bool = True) -> PackedTensor:
        """`tensor` as the pipe will carry it; a span it takes is appended to `spans`.
        `shared=False` keeps it inline whatever its size (a tensor the core keeps)."""
        tensor = tensor.detach().contiguous().cpu()
        raw = tensor.reshape(-1).view(torch.uint8)
        shape = tuple(tensor.shape)
        if shared and raw.numel() >= INLINE_LIMIT:
            span = self.allocate(raw.numel())
            if span is not None:
                self.buffer[span.offset : span.offset + raw.numel()].copy_(raw)
                spans.append(span)
                return PackedTensor(tensor.dtype, shape, span=span)
        return PackedTensor(tensor.dtype, shape, data=raw.numpy().tobytes())

    def unpack(self, packed: PackedTensor) -> torch.Tensor:
        """The tensor again. One in the arena is a view of it: valid until its span is
        released, so a caller that keeps it must copy it."""
        size = math.prod(packed.shape) * packed.dtype.itemsize
        if packed.span is not None:
            raw = self.buffer[packed.span.offset : packed.span.offset + size]
        elif size == 0:  # frombuffer refuses an empty buffer
            return torch.empty(packed.shape, dtype=packed.dtype)
        else:
            assert packed.data is not None
            raw = torch.frombuffer(bytearray(packed.data), dtype=torch.uint8)
        return raw.view(packed.dtype).view(packed.shape)
