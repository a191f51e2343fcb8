"""Guided decoding's engine half: a grammar matcher per constrained row, and the logits of those
rows masked to the tokens their grammar allows, before the next token is picked.

The running batch (`predictor.engine.running_batch`) calls three things: `constraint_for` when
a row joins (its matcher, or None for a free row), `mask` on a step's logits right before the
tokens are picked, and `advance` with the picked tokens. A row whose grammar is complete can
only pick a stop token, so it ends as any row does ("stop"); one that reaches its token limit
first ends with "length", its text possibly incomplete (as in vLLM and OpenAI).

Cost: free rows pay nothing (no bitmask, no work when no row in the batch is constrained).
For each constrained row xgrammar fills a bitmask row (microseconds once its masks are
cached), and the mask lands on the logits as one addition of a penalty row (0 or -inf per
token). Penalty rows are cached by the bitmask's bytes (`_PenaltyCache`): a grammar's masks
repeat (every step inside a JSON string allows the same tokens), so a step's penalties are
usually a lookup, and a new one is built with one embedding lookup (each bitmask byte indexes
a table of eight 0 / -inf values). On a CPU that costs a fraction of xgrammar's own CPU
kernel, whose per-bit branches cost 5.5 ms for 16 rows of 151,936 tokens; on a GPU it is the
same few tensor operations, with no kernel to compile. The logits are never written in place
(a CUDA graph may own them). Picking (greedy, sampled, with any penalty) then sees only
allowed tokens.

Not thread-safe: the engine's worker thread is the only caller.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
PENALTY_ROWS = 64  # cached penalty rows per dtype and device: 39 MB in float32 for Qwen


class Constraint:
    """One row's grammar matcher (xgrammar's), over the engine's own stop tokens."""

    __slots__ = ("failed", "matcher")

    def __init__(self, compiled: Any, stop_ids: Sequence[int]):
        import xgrammar

        if compiled.grammar is None:
            raise ValueError("a guided row reached the engine without its compiled grammar")
        self.matcher = xgrammar.GrammarMatcher(
            compiled.grammar, override_stop_tokens=list(stop_ids)
        )
        self.failed = False

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token taken: nothing more can follow."""
        return self.matcher.is_terminated()

    def accept(self, token: int) -> None:
        if self.failed or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token):  # the mask allowed it: never expected
            self.failed = True
            logger.error("a guided row took token %d, which its grammar refuses", token)


def constraint_for(row: Any, stop_ids: Sequence[int]) -> Constraint | None:
    """The row's constraint if it is guided (`row.grammar` set by the front), else None."""
    return None if row.grammar is None else Constraint(row.grammar, stop_ids)


def mask(members: Sequence[Any], logits: torch.Tensor) -> torch.Tensor:
    """`logits` ([rows, vocab], row i for members[i]) with every token that a constrained
    member's grammar does not allow next set to -inf: a new tensor (the model's output, which
    a CUDA graph may own, is never written), or `logits` itself, with no work at all, when no
    member has a `constraint`."""
    rows = [i for i, m in enumerate(members) if m.constraint is not None]
    if not rows:
        return logits
    vocab = logits.shape[-1]
    bitmask = torch.empty((len(rows), (vocab + 31) // 32), dtype=torch.int32)
    keys = []
    for k, row in enumerate(rows):
        members[row].constraint.matcher.fill_next_token_bitmask(bitmask, k)
        keys.append(bitmask[k].numpy().tobytes())
    cache = _penalty_cache(logits.dtype, logits.device, vocab)
    if len(set(keys)) > cache.size:  # more distinct masks than the cache holds: build them
        penalty = torch.zeros_like(logits)
        penalty[rows] = penalties(bitmask, vocab, logits.dtype, logits.device)
        return logits + penalty
    slots = [0] * logits.shape[0]  # the zero row: free rows' logits come out unchanged
    for k, row in enumerate(rows):
        slots[row] = cache.slot(keys[k], bitmask[k])
    if len(set(slots)) == 1:
        return logits + cache.table[slots[0]]  # every row the same mask: one row, broadcast
    return logits + cache.table.index_select(0, torch.tensor(slots, device=logits.device))


def advance(members: Sequence[Any], tokens: Sequence[int]) -> None:
    """Each constrained member's matcher takes the token it picked (not a broken member's:
    its logits held a NaN, its token is arbitrary, and it leaves with an error)."""
    for member, token in zip(members, tokens, strict=True):
        if member.constraint is not None and not getattr(member, "broken", False):
            member.constraint.accept(token)


def penalties(
    bitmask: torch.Tensor, vocab: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[rows, vocab]: 0 where the bitmask ([rows, words] int32, bit i of a row = token i
    allowed, as xgrammar fills it) has a 1, -inf where it has a 0."""
    key = (dtype, device)
    table = _TABLES.get(key)
    if table is None:
        bits = torch.arange(8)
        allowed = (torch.arange(256).view(-1, 1) >> bits) & 1  # byte value -> its 8 bits
        table = torch.zeros((256, 8), dtype=dtype).masked_fill(allowed == 0, -float("inf"))
        table = _TABLES.setdefault(key, table.to(device))
    codes = bitmask.view(torch.uint8).to(device, non_blocking=True).int()  # little-endian
    return torch.nn.functional.embedding(codes, table).view(bitmask.shape[0], -1)[:, :vocab]


class _PenaltyCache:
    """Penalty rows by the bitmask they come from, the most recently used kept, in one table
    whose row 0 is zeros (free rows), so a batch's penalties are one row lookup each.

    Why: a grammar's masks repeat. Every step inside a JSON string (or a regex's character
    class) allows the same tokens, and rows at the same point of their grammars share a
    mask; looking one up by the mask's bytes (19 KB for Qwen's vocabulary) costs
    microseconds, building it again an embedding over the vocabulary."""

    def __init__(self, dtype: torch.dtype, device: torch.device, vocab: int, size: int):
        self.size = size
        self.table = torch.zeros((size + 1, vocab), dtype=dtype, device=device)
        self.slots: OrderedDict[bytes, int] = OrderedDict()  # mask -> its row, oldest first

    def slot(self, key: bytes, bitmask: torch.Tensor) -> int:
        """The table row of this mask's penalty, built in a free (or the oldest) row if new.
        A call's distinct masks must number at most `size` (the oldest is not one of them)."""
        found = self.slots.get(key)
        if found is not None:
            self.slots.move_to_end(key)
            return found
        if len(self.slots) < self.size:
            found = len(self.slots) + 1
        else:
            _, found = self.slots.popitem(last=False)
        vocab = self.table.shape[-1]
        self.table[found] = penalties(
            bitmask.view(1, -1), vocab, self.table.dtype, self.table.device
        )[0]
        self.slots[key] = found
        return found


_CACHES: dict[tuple[torch.dtype, torch.device, int], _PenaltyCache] = {}


def _penalty_cache(dtype: torch.dtype, device: torch.device, vocab: int) -> _PenaltyCache:
    key = (dtype, device, vocab)
    cache = _CACHES.get(key)
    if cache is None:
        cache = _CACHES.setdefault(key, _PenaltyCache(dtype, device, vocab, PENALTY_ROWS))
    return cache
