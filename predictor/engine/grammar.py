"""Guided decoding's engine half: a grammar matcher per constrained row, and the logits of those
rows masked to the tokens their grammar allows, before the next token is picked.

The running batch (`predictor.engine.running_batch`) calls three things: `constraint_for` when
a row joins (its matcher, or None for a free row), `mask` on a step's logits right before the
tokens are picked, and `advance` with the picked tokens. A row whose grammar is complete can
only pick a stop token, so it ends as any row does ("stop"); one that reaches its token limit
first ends with "length", its text possibly incomplete (as in vLLM and OpenAI).

Cost: free rows pay nothing (no bitmask, no work when no row in the batch is constrained).
For constrained rows xgrammar fills one bitmask row each (one call for the batch; tens of
microseconds a row once its masks are cached), and the mask is applied as an addition: each
bitmask byte indexes a table of eight 0 / -inf values, so the rows' penalties come from one
embedding lookup and land on the logits in one addition. On a CPU that costs a fifth of xgrammar's
own CPU kernel, whose per-bit branches cost 5.5 ms for 16 rows of 151,936 tokens; on a GPU it is
the same few tensor operations, with no kernel to compile. Picking (greedy, sampled, with any
penalty) then sees only allowed tokens.

Not thread-safe: the engine's worker thread is the only caller.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


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
    matchers = [members[i].constraint.matcher for i in rows]
    vocab = logits.shape[-1]
    words = (vocab + 31) // 32
    bitmask = torch.empty((len(rows), words), dtype=torch.int32)
    _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask)
    penalty = penalties(bitmask, vocab, logits.dtype, logits.device)
    if len(rows) == logits.shape[0]:
        return logits + penalty
    return logits.index_add(0, torch.tensor(rows, device=logits.device), penalty)


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


_BATCH: list[Any] = []


def _batch_matcher() -> Any:
    """xgrammar's batch filler, one call for every constrained row (on the calling thread:
    the engine's step is the only other work, and it has the cores)."""
    if not _BATCH:
        import xgrammar

        _BATCH.append(xgrammar.BatchGrammarMatcher(max_threads=1))
    return _BATCH[0]
