"""The shared arena rows' pixel patches cross to the engine core in (predictor.engine.transfer).

The region is read in another process through `torch.multiprocessing`'s spawn, as the engine
core does; the allocator is checked for reuse and merging, since a leak would send every row
inline after a while and an overlap would hand one row another's pixels.
"""

from __future__ import annotations

import torch
import torch.multiprocessing as torch_mp

from predictor.engine.transfer import ALIGNMENT, INLINE_LIMIT, SharedArena, Span


def _read_in_child(buffer: torch.Tensor, packed, out) -> None:
    arena = SharedArena.attach(buffer)
    out.send(arena.unpack(packed).float().sum().item())


def test_large_tensors_go_through_the_arena_and_read_back_exactly():
    arena = SharedArena(8 * 1024 * 1024)
    pixels = torch.randn(784, 1536)
    spans: list[Span] = []
    packed = arena.pack(pixels, spans)
    assert packed.span is not None and packed.data is None and len(spans) == 1
    assert torch.equal(arena.unpack(packed), pixels)
    assert arena.free_bytes == arena.size - spans[0].size


def test_small_and_unshared_tensors_travel_inline_in_their_dtype():
    arena = SharedArena(1024 * 1024)
    spans: list[Span] = []
    ids = torch.arange(222).view(1, -1)
    grid = torch.tensor([[1, 28, 28]])
    patches = torch.randn(256, 256).to(torch.bfloat16)  # 128 KiB, above the inline limit
    for tensor, shared in ((ids, True), (grid, True), (patches, False)):
        packed = arena.pack(tensor, spans, shared=shared)
        assert packed.span is None and packed.data is not None
        back = arena.unpack(packed)
        assert back.dtype == tensor.dtype and torch.equal(back, tensor)
    assert spans == [] and arena.free_bytes == arena.size
    empty = arena.unpack(arena.pack(torch.zeros(0, 4), spans))
    assert empty.shape == (0, 4)


def test_a_full_arena_sends_inline_instead_of_refusing():
    arena = SharedArena(INLINE_LIMIT * 2)
    spans: list[Span] = []
    first = arena.pack(torch.ones(INLINE_LIMIT // 4 + 1), spans)  # a little over half
    second = arena.pack(torch.full((INLINE_LIMIT // 4 + 1,), 2.0), spans)
    assert first.span is not None and second.span is None
    assert torch.equal(arena.unpack(second), torch.full((INLINE_LIMIT // 4 + 1,), 2.0))
    assert torch.equal(arena.unpack(first), torch.ones(INLINE_LIMIT // 4 + 1))


def test_freed_spans_merge_so_a_long_run_does_not_fragment_the_region():
    arena = SharedArena(ALIGNMENT * 64)
    spans = [arena.allocate(ALIGNMENT * 8) for _ in range(8)]
    assert all(spans) and arena.allocate(1) is None  # full
    starts = [s.offset for s in spans if s]
    assert len(set(starts)) == 8  # no overlap
    for index in (1, 3, 5, 7, 0, 2, 6, 4):  # out of order
        span = spans[index]
        assert span is not None
        arena.free(span)
    assert arena.free_bytes == arena.size
    whole = arena.allocate(arena.size)  # one run again, not eight pieces
    assert whole == Span(0, arena.size)


def test_the_spawned_core_reads_what_the_front_wrote():
    context = torch_mp.get_context("spawn")
    arena = SharedArena(4 * 1024 * 1024)
    pixels = torch.randn(512, 1536)
    packed = arena.pack(pixels, [])
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_read_in_child, args=(arena.buffer, packed, send))
    child.start()
    assert receive.poll(60)
    assert abs(receive.recv() - pixels.sum().item()) < 1e-2
    child.join(30)
    assert child.exitcode == 0
