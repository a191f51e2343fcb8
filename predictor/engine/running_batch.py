"""Continuous batching: rows decode together one token per step and join or leave between steps.

Why: with one `generate` call per batch, a request that arrives while a batch runs waits for
the whole batch, and clients that send their next request when the last one is answered
arrive in waves that leave the model idle while their images are decoded. Here the engine
keeps one `RunningBatch`: between two decoding steps it prefills newly arrived rows and adds
them, and a row that is finished (its own `max_new_tokens`, a stop token or string, or its
caller gone) leaves at once, so its slot is free for the next step.

How rows of different lengths share a step: every row's key/value cache is left-padded to one
length and an attention mask hides the padding; each row carries its own next rotary position
(Qwen-VL's multimodal RoPE: a text position plus temporal/height/width positions), so where a
row sits in the padded cache does not change what it computes. Greedy rows give the same
tokens as `Generator.describe` and plain `generate` (tested). Each row samples with its own
settings; a row with a `seed` draws from its own random generator, so its text does not depend
on what else is running.

Not thread-safe: the engine's worker thread is the only caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, RepetitionPenaltyLogitsProcessor
from transformers.cache_utils import DynamicLayer

from predictor.engine.generation import Generator, _RowState
from predictor.params import SamplingParams
from predictor.protocol import Completion
from predictor.rows import Row, StopCheck


def supports_continuous_batching(generator: Generator) -> bool:
    """A dynamic cache of plain full-attention layers is what `RunningBatch` can pad and join
    (every Qwen-VL family); a static cache (`--compile`) keeps whole-batch `generate` calls."""
    if generator.static_cache:
        return False
    cache = DynamicCache(config=generator.model.config)
    return all(type(layer) is DynamicLayer for layer in cache.layers)


class _Sampler:
    """Picks one row's next token with the row's own sampling settings.

    The distribution is transformers' (repetition penalty, temperature, top_k, then top_p,
    as `generate` applies them), but computed on the few candidates that can survive: the
    top_k largest logits, or for top_p alone the smallest prefix of the sorted logits that
    holds top_p of the mass (found among the top `_TOP_P_CANDIDATES` first, which holds it
    unless the distribution is nearly flat). transformers' warpers sort all 151936 logits of
    a Qwen vocabulary for every row and step (8-20 ms a row on a CPU core), which made a
    batch of sampled rows, the checkpoints' default, cost many times its greedy twin.

    Until the row has `min_new_tokens` tokens its stop tokens cannot be picked (their logits
    are masked), which is how `min_tokens` and `ignore_eos` fix a row's length.
    """

    _TOP_P_CANDIDATES = 1024

    def __init__(
        self, sampling: SamplingParams, prompt_ids: torch.Tensor, stop_ids: Sequence[int] = ()
    ):
        self.greedy = sampling.greedy
        self.temperature = sampling.temperature
        self.top_k = sampling.top_k
        self.top_p = sampling.top_p
        self.min_new_tokens = sampling.min_new_tokens
        self.stop_ids = list(stop_ids)
        self.generated = 0
        self.penalty: RepetitionPenaltyLogitsProcessor | None = None
        self.history: torch.Tensor | None = None
        if sampling.repetition_penalty != 1.0:
            self.penalty = RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)
            self.history = prompt_ids.view(1, -1)
        self.random: torch.Generator | None = None
        if sampling.seed is not None and not self.greedy:
            self.random = torch.Generator(device=prompt_ids.device).manual_seed(sampling.seed)

    @property
    def plain_greedy(self) -> bool:
        """Argmax of the raw logits: done for all such rows at once."""
        return self.greedy and self.penalty is None and not self._masking

    @property
    def _masking(self) -> bool:
        return self.generated < self.min_new_tokens and bool(self.stop_ids)

    def _scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits ([1, vocab], float) with stop tokens masked and the penalty on."""
        scores = logits.view(1, -1).float()
        if self._masking:
            scores = scores.clone()
            scores[:, self.stop_ids] = -float("inf")
        if self.penalty is not None:
            assert self.history is not None
            scores = self.penalty(self.history.long(), scores)
        return scores

    def candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids, probabilities) of the tokens this row can draw, the rest having none."""
        scores = self._scores(logits)[0] / self.temperature
        vocab = scores.shape[0]
        if self.top_k:
            values, ids = scores.topk(min(self.top_k, vocab))
        elif self.top_p < 1.0:
            values, ids = scores.topk(min(self._TOP_P_CANDIDATES, vocab))
            mass = torch.exp(values - torch.logsumexp(scores, dim=0)).sum()
            if mass < self.top_p and values.shape[0] < vocab:
                values, ids = scores.sort(descending=True)  # a flat distribution
        else:
            return torch.arange(vocab, device=scores.device), torch.softmax(scores, dim=0)
        probs = torch.softmax(values, dim=0)
        if self.top_p < 1.0:
            # transformers keeps a token when the mass of the tokens above it is below top_p
            # (at least one token).
            above = torch.cumsum(probs, dim=0) - probs
            keep = int((above < self.top_p).sum().clamp(min=1))
            values, ids = values[:keep], ids[:keep]
            probs = torch.softmax(values, dim=0)
        # In token order, as a full-vocabulary draw sees them: float noise (a row padded
        # beside others) can swap two nearly equal logits in the sorted order, and the same
        # random draw would then pick another token.
        ids, order = ids.sort()
        return ids, probs[order]

    def pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(self._scores(logits).argmax(dim=-1))
        ids, probs = self.candidates(logits)
        return int(ids[torch.multinomial(probs, 1, generator=self.random)])

    def took(self, token: int) -> None:
        self.generated += 1
        if self.history is not None:
            self.history = torch.cat([self.history, self.history.new_tensor([[token]])], dim=1)


@dataclass
class _Member:
    """One row in the running batch, with whatever the engine uses to find its owner."""

    owner: Any
    state: _RowState
    sampler: _Sampler
    stop_check: StopCheck | None
    prompt_tokens: int

    def done(self) -> bool:
        return self.state.finished or (self.stop_check is not None and self.stop_check())


Finished = tuple[Any, Completion]  # (owner, completion); a stopped row's text is cut short


class RunningBatch:
    """The rows being decoded, their padded cache, mask and next positions."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.model = generator.model
        self.members: list[_Member] = []
        self.cache: DynamicCache | None = None
        self._reset()

    def __len__(self) -> int:
        return len(self.members)

    @torch.inference_mode()
    def admit(
        self, rows: Sequence[Row], owners: Sequence[Any], stop_checks: Sequence[StopCheck | None]
    ) -> list[Finished]:
        """Prefill `rows` in one forward pass, take each row's first token, and add the rows
        to the batch. Returns rows already finished (a one-token limit, an immediate stop)."""
        inputs = self.generator.inputs_for(rows)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        if "image_grid_thw" in inputs:
            rope, _ = self.model.model.get_rope_index(
                ids,
                mm_token_type_ids=inputs["mm_token_type_ids"],
                image_grid_thw=inputs["image_grid_thw"],
                attention_mask=mask,
            )
        else:
            rope = text[None].expand(3, -1, -1)
        positions = torch.cat([text[None], rope.to(text.device)], dim=0)
        cache = DynamicCache(config=self.model.config)
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        logits = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        ).logits[:, -1]
        members = [
            _Member(
                owner,
                _RowState(self.generator, row),
                _Sampler(row.sampling, ids[i][mask[i].bool()], self.generator.stop_token_ids),
                check,
                int(mask[i].sum()),
            )
            for i, (row, owner, check) in enumerate(zip(rows, owners, stop_checks, strict=True))
        ]
        tokens = self._pick(members, logits)
        _feed(members, tokens)
        self._join(members, cache, mask, positions[:, :, -1] + 1, tokens)
        return self._retire()

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Decode one token for every row; rows that finish leave the batch."""
        if not self.members:
            return []
        mask = torch.cat([self.mask, self.mask.new_ones((len(self.members), 1))], dim=1)
        try:
            logits = self.model(
                input_ids=self.last_tokens.view(-1, 1),
                attention_mask=mask,
                position_ids=self.positions.unsqueeze(-1),
                cache=self.cache,
                use_cache=True,
            ).logits[:, -1]
        except BaseException:
            # Layers that ran before the failure appended this step's keys: drop them, so
            # the batch is as it was before the step and can go on (or shrink: `evict`).
            assert self.cache is not None
            length = self.mask.shape[1]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
            raise
        self.mask = mask
        self.positions = self.positions + 1
        tokens = self._pick(self.members, logits)
        _feed(self.members, tokens)
        self.last_tokens = torch.tensor(tokens, dtype=torch.long, device=self.mask.device)
        return self._retire()

    def evict(self, count: int) -> list[Any]:
        """Remove the `count` most recently admitted rows; returns their owners."""
        count = min(count, len(self.members))
        owners = [m.owner for m in self.members[len(self.members) - count :]]
        self._select(list(range(len(self.members) - count)))
        return owners

    def clear(self) -> list[Any]:
        """Forget every row (after a failed step); returns their owners."""
        owners = [m.owner for m in self.members]
        self._reset()
        return owners

    # ---- internals --------------------------------------------------------------------

    def _reset(self) -> None:
        device = self.generator.device
        self.members = []
        self.cache = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        # Next rotary positions, one column per row: text position, then temporal/height/width.
        self.positions = torch.zeros((4, 0), dtype=torch.long, device=device)
        self.last_tokens = torch.zeros((0,), dtype=torch.long, device=device)

    @staticmethod
    def _pick(members: Sequence[_Member], logits: torch.Tensor) -> list[int]:
        # `max` finds the same first largest logit as `argmax`, about 3x faster on a CPU over
        # a 151,936-token vocabulary (16 rows: 1.3 ms against 3.5 ms, most of a tiny step).
        greedy: list[int] = []
        if any(m.sampler.plain_greedy for m in members):
            greedy = logits.max(dim=-1).indices.tolist()
        return [
            greedy[i] if m.sampler.plain_greedy else m.sampler.pick(logits[i])
            for i, m in enumerate(members)
        ]

    def _retire(self) -> list[Finished]:
        """Remove and return the rows that are done."""
        keep: list[int] = []
        finished: list[Finished] = []
        for index, member in enumerate(self.members):
            if member.done():
                finished.append((member.owner, member.state.completion(member.prompt_tokens)))
            else:
                keep.append(index)
        if len(keep) < len(self.members):
            self._select(keep)
        return finished

    def _join(
        self,
        members: list[_Member],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        tokens: list[int],
    ) -> None:
        new_tokens = torch.tensor(tokens, dtype=torch.long, device=mask.device)
        if self.cache is None or not self.members:
            self.cache, self.mask, self.positions = cache, mask.long(), positions
            self.members, self.last_tokens = members, new_tokens
            return
        rows, old_length = self.mask.shape
        length = max(old_length, mask.shape[1])
        joined = []
        try:
            for old, new in zip(self.cache.layers, cache.layers, strict=True):
                keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)])
                values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)])
                old.keys, old.values = keys, values
                joined.append(old)
        except BaseException:  # out of memory half-way: put the layers already joined back
            start = length - old_length
            for layer in joined:
                layer.keys = layer.keys[:rows, :, start:]
                layer.values = layer.values[:rows, :, start:]
            raise
        self.mask = torch.cat([_pad_left(self.mask, length), _pad_left(mask.long(), length)])
        self.positions = torch.cat([self.positions, positions], dim=1)
        self.last_tokens = torch.cat([self.last_tokens, new_tokens])
        self.members = self.members + members

    def _select(self, keep: list[int]) -> None:
        """Keep only rows `keep`, and drop cache columns that are padding in every row."""
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # the first column some row uses
        self.mask = mask[:, start:]
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.positions = self.positions.index_select(1, index)
        self.last_tokens = self.last_tokens.index_select(0, index)
        self.members = [self.members[i] for i in keep]


def _feed(members: Sequence[_Member], tokens: Sequence[int]) -> None:
    for member, token in zip(members, tokens, strict=True):
        if not member.state.finished:
            member.sampler.took(token)
        member.state.push(token)


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad a mask ([rows, seq]) or cache tensor ([rows, heads, seq, dim]) with zeros on the
    left of its sequence axis up to `length`."""
    axis = 1 if tensor.dim() == 2 else 2
    missing = length - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
