"""Continuous batching: rows decode together one token per step and join or leave between steps.

Why: with one `generate` call per batch, a request that arrives while a batch runs waits for
the whole batch, and clients that send their next request when the last one is answered
arrive in waves that leave the model idle while their images are decoded. Here the engine
keeps one `RunningBatch`: between two decoding steps it prefills newly arrived rows and adds
them, and a row that is finished (its own `max_new_tokens`, a stop token or string, or its
caller gone) leaves at once, so its slot is free for the next step.

How rows of different lengths share a step: each row owns a slot of a preallocated cache
(`predictor.engine.decode_step.SlotCache`) filled from position 0, with its own length and its
own next rotary position (Qwen-VL's multimodal RoPE), so no row carries another's padding and
the step's shapes depend only on the batch-size bucket and the span of keys read. The running
rows always hold slots `0..n-1`: a row that leaves hands its slot to the last row. The prefill
stays the model's own forward (eager, any image layout), and its keys and values are copied
into the new rows' slots. Greedy rows give the same tokens as transformers' `generate` (tested
for every family). Each row samples with its own settings; a row with a `seed` draws from its
own random generator, so its text does not depend on what else is running.

Not thread-safe: the engine's worker thread is the only caller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache

from predictor.engine import grammar, sampling
from predictor.engine.decode_step import DecodeStep, batch_buckets, bucket_for, span_for
from predictor.engine.generation import Generator, _RowState
from predictor.engine.sampling import RowSampling
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.protocol import Completion
from predictor.rows import Row, StopCheck

logger = logging.getLogger(__name__)


@dataclass
class _Member:
    """One row in the running batch, with whatever the engine uses to find its owner."""

    owner: Any
    state: _RowState
    sampler: RowSampling
    stop_check: StopCheck | None
    prompt_tokens: int
    length: int = 0  # tokens in its cache slot
    position: int = 0  # the rotary position of its next token
    token: int = 0  # its last token, the input of the next step
    broken: bool = False  # its logits held a NaN: it fails, alone
    constraint: grammar.Constraint | None = None  # guided decoding: its grammar's matcher

    def done(self) -> bool:
        return (
            self.broken
            or self.state.finished
            or (self.stop_check is not None and self.stop_check())
        )


Finished = tuple[Any, Completion]  # (owner, completion); a stopped row's text is cut short


class ContextTooLong(ValueError):
    """A row whose prompt and token limit do not fit `max_len` (the front refuses it first)."""


class RunningBatch:
    """The rows being decoded: member `i` owns cache slot `i`, in admission order."""

    def __init__(
        self,
        generator: Generator,
        max_rows: int = 16,
        max_len: int = 4096,
        compile_step: bool = False,
    ):
        self.generator = generator
        self.model = generator.model
        self.max_rows, self.max_len = max_rows, max_len
        self.buckets = batch_buckets(max_rows)
        if compile_step and is_quantized(self.model):
            # bitsandbytes' layers are custom kernels that dynamo breaks its graphs around
            # (and CUDA graphs cannot capture across): the same step runs eager instead.
            logger.info("4-bit/8-bit weights: the decoding step runs eager, not compiled")
            compile_step = False
        self.decode = DecodeStep.of_model(self.model, max_rows, max_len, compile_step)
        self.members: list[_Member] = []
        self._broken_owners: list[Any] = []  # rows whose logits held a NaN, until `take_failed`

    def __len__(self) -> int:
        return len(self.members)

    @torch.inference_mode()
    def admit(
        self, rows: Sequence[Row], owners: Sequence[Any], stop_checks: Sequence[StopCheck | None]
    ) -> list[Finished]:
        """Prefill `rows` in one forward pass, take each row's first token, and add the rows
        to the batch. Returns rows already finished (a one-token limit, an immediate stop)."""
        if len(self.members) + len(rows) > self.max_rows:
            raise ValueError(f"{len(rows)} rows do not fit the {self.max_rows} slots")
        inputs = self.generator.inputs_for(rows)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        lengths = [int(n) for n in mask.sum(dim=1).tolist()]
        for row, length in zip(rows, lengths, strict=True):
            if length + row.sampling.max_new_tokens > self.max_len:
                raise ContextTooLong(
                    f"{length} prompt tokens and max_new_tokens {row.sampling.max_new_tokens} "
                    f"exceed --max_model_len {self.max_len}"
                )
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
        # The next text token's rotary position (temporal = height = width for text).
        next_positions = (positions[1, :, -1] + 1).tolist()
        members = [
            _Member(
                owner,
                _RowState(self.generator, row),
                RowSampling(
                    row.sampling,
                    ids[i][mask[i].bool()],
                    self.generator.stop_token_ids,
                    vocab_size=logits.shape[-1],
                ),
                check,
                lengths[i],
                length=lengths[i],
                position=int(next_positions[i]),
                constraint=grammar.constraint_for(row, self.generator.stop_token_ids),
            )
            for i, (row, owner, check) in enumerate(zip(rows, owners, stop_checks, strict=True))
        ]
        logits = grammar.mask(members, logits)  # guided rows: only what their grammar allows
        tokens = self._pick(members, logits)
        first = len(self.members)
        for index, member in enumerate(members):
            slot, length = first + index, member.length
            for layer, cached in enumerate(cache.layers):
                self.decode.cache.fill(
                    slot, layer, cached.keys[index, :, -length:], cached.values[index, :, -length:]
                )
        _feed(members, tokens)
        grammar.advance(members, tokens)
        self.members = self.members + members
        return self._retire()

    @torch.inference_mode()
    def step(self) -> list[Finished]:
        """Decode one token for every row; rows that finish leave the batch.

        A failure leaves the batch as it was before the step: the keys the step wrote sit past
        every row's length and are overwritten by the next step, and no length, position or
        token moves until every row's token is picked."""
        if not self.members:
            return []
        count = len(self.members)
        rows = bucket_for(count, self.buckets)
        padding = rows - count  # idle slots ride along: one position each, never read
        lengths = [m.length for m in self.members] + [0] * padding
        inputs = torch.tensor(
            [
                [m.token for m in self.members] + [0] * padding,
                [m.position for m in self.members] + [0] * padding,
                lengths,
            ],
            dtype=torch.long,
        ).to(self.generator.device)
        span = span_for(max(lengths) + 1, self.max_len, self.decode.span_step)
        logits = self.decode(inputs[0], inputs[1], inputs[2], span)[:count]
        logits = grammar.mask(self.members, logits)  # guided rows: only what their grammar allows
        tokens = self._pick(self.members, logits)
        for member in self.members:
            member.length += 1
            member.position += 1
        _feed(self.members, tokens)
        grammar.advance(self.members, tokens)
        return self._retire()

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Before ready: one short real row (processor, vision encoder, prefill, a step), then
        with `--compile` every batch-size bucket at two spans, which compiles the step for all
        the shapes it will meet (the second span and bucket make those sizes symbolic)."""
        gray = Image.new("RGB", (256, 256), (128, 128, 128))
        image = fit_to_budget(gray, self.generator.default_budget, self.generator.resize_factor)
        row = Row.single(image, "Describe this image.", SamplingParams(max_new_tokens=2))
        self.admit([row], [None], [None])
        while len(self):
            self.step()
        if not self.decode.compiled:
            return
        started = time.perf_counter()
        step = self.decode.span_step
        spans = sorted({span_for(1, self.max_len, step), span_for(step + 1, self.max_len, step)})
        for span in spans:
            for rows in self.buckets:
                idle = torch.zeros((3, rows), dtype=torch.long, device=self.generator.device)
                self.decode(idle[0], idle[1], idle[2], span)
        logger.info(
            "decoding step compiled for batch sizes %s in %.1f s",
            self.buckets,
            time.perf_counter() - started,
        )

    def take_failed(self) -> list[Any]:
        """The owners of rows that left because their logits held a NaN (since last asked)."""
        failed, self._broken_owners = self._broken_owners, []
        return failed

    def evict(self, count: int) -> list[Any]:
        """Remove the `count` most recently admitted rows; returns their owners."""
        count = min(count, len(self.members))
        keep = len(self.members) - count
        owners = [m.owner for m in self.members[keep:]]
        self.members = self.members[:keep]  # the last slots: nothing moves
        return owners

    def clear(self) -> list[Any]:
        """Forget every row (after a failed step); returns their owners."""
        owners = [m.owner for m in self.members]
        self.members = []
        return owners

    # ---- internals --------------------------------------------------------------------

    @staticmethod
    def _pick(members: Sequence[_Member], logits: torch.Tensor) -> list[int]:
        """Every row's next token, all rows at once on the device, one transfer to the host
        (`predictor.engine.sampling`). A row whose logits held a NaN is marked broken: it
        leaves with an error and the others go on."""
        tokens, broken = sampling.pick([m.sampler for m in members], logits)
        for member, bad in zip(members, broken, strict=True):
            member.broken = bad
        return tokens

    def _retire(self) -> list[Finished]:
        """Remove and return the rows that are done; the last rows take their slots."""
        finished: list[Finished] = []
        index = 0
        while index < len(self.members):
            member = self.members[index]
            if not member.done():
                index += 1
                continue
            if member.broken:
                self._broken_owners.append(member.owner)
            else:
                finished.append((member.owner, member.state.completion(member.prompt_tokens)))
            last = self.members.pop()
            if last is not member:
                self.decode.cache.move(len(self.members), index, last.length)
                self.members[index] = last
        return finished


def is_quantized(model: Any) -> bool:
    """Whether transformers loaded the weights through bitsandbytes (`--quantization`)."""
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


def _feed(members: Sequence[_Member], tokens: Sequence[int]) -> None:
    for member, token in zip(members, tokens, strict=True):
        if not member.broken:
            member.state.push(token)
        member.token = token


def describe(
    generator: Generator,
    rows: Sequence[Row],
    stop_checks: Sequence[StopCheck | None] | None = None,
    max_len: int = 4096,
) -> list[Completion]:
    """Completions for `rows`, in order, decoded together on the engine's one path (for
    warm-up, tools and tests; the engine admits rows as they come instead)."""
    checks = list(stop_checks) if stop_checks is not None else [None] * len(rows)
    batch = RunningBatch(generator, max_rows=max(1, len(rows)), max_len=max_len)
    done = dict(batch.admit(rows, list(range(len(rows))), checks))
    while len(batch):
        done.update(batch.step())
    if batch.take_failed():
        raise RuntimeError("generation failed: the model produced NaN")
    return [done[i] for i in range(len(rows))]
