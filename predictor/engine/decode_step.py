"""One decoding step for every running row, over a preallocated cache: static shapes.

Why not the model's own forward: transformers' `DynamicCache` grows by concatenation every
step and batches rows by left padding, so every step has new shapes, allocates, and each row
carries the padding of the longest. A compiler cannot capture that, and on a GPU most of an
eager step is Python and kernel launches, not arithmetic. Here:

- `SlotCache` holds keys and values for `slots` rows of up to `max_len` tokens per layer,
  allocated once. A row owns a slot; its cache is filled from position 0 with no padding, and
  its own length says how much of it counts.
- `DecodeStep` runs the checkpoint's own layers (its projections, norms, rotary embedding and
  MLP: the arithmetic is transformers', so greedy text matches `generate`) on one new token per
  row. The rows of a step are slots `0..B-1` with `B` a batch-size bucket (1, 2, 4, ...), the
  keys it reads are the first `span` positions (a multiple of `SPAN_STEP`), and every index is a
  tensor: the same shapes recur, so `torch.compile` builds a graph per bucket once (CUDA graphs
  on a GPU), and nothing in the step waits for the host.

Decoding a text token needs one rotary position per row: Qwen-VL's multimodal RoPE gives a text
token equal temporal, height and width positions, so each row's next position is one number.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

SPAN_STEP = 256  # keys read per step come in multiples of this (bounds the compiled shapes)


def batch_buckets(max_rows: int) -> list[int]:
    """The step sizes: powers of two below `max_rows`, and `max_rows` itself."""
    sizes = [1]
    while sizes[-1] * 2 < max_rows:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_rows:
        sizes.append(max_rows)
    return sizes


def bucket_for(rows: int, buckets: list[int]) -> int:
    return next(size for size in buckets if size >= rows)


def span_for(longest: int, max_len: int) -> int:
    """Keys a step reads when its longest row holds `longest` tokens (the new one included)."""
    return min(max_len, -(-longest // SPAN_STEP) * SPAN_STEP)


class SlotCache:
    """Keys and values of every running row, `[slots, kv_heads, max_len, head_dim]` a layer.

    During a step the model's attention layers call `update` (the interface of transformers'
    caches): it writes each row's new key and value at that row's length and returns the first
    `span` positions of the step's slots for attention to read.
    """

    def __init__(
        self,
        layers: int,
        slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.max_len = slots, max_len
        self._rows: torch.Tensor | None = None
        self._at: torch.Tensor | None = None
        self._span = 0

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def begin_step(self, rows: torch.Tensor, lengths: torch.Tensor, span: int) -> None:
        self._rows, self._at, self._span = rows, lengths, span

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._rows is not None and self._at is not None
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        count = key_states.shape[0]
        keys[self._rows, :, self._at] = key_states[:, :, 0]
        values[self._rows, :, self._at] = value_states[:, :, 0]
        return keys[:count, :, : self._span], values[:count, :, : self._span]

    def fill(self, slot: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """A prefilled row's keys and values (`[kv_heads, length, head_dim]`) into its slot."""
        length = keys.shape[1]
        self.keys[layer][slot, :, :length].copy_(keys)
        self.values[layer][slot, :, :length].copy_(values)

    def move(self, source: int, target: int, length: int) -> None:
        """Give the row in slot `source` slot `target` (its first `length` positions)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :length].copy_(keys[source, :, :length])
            values[target, :, :length].copy_(values[source, :, :length])


class DecodeStep:
    """The checkpoint's text decoder on one token per row, reading a `SlotCache`."""

    def __init__(self, model: Any, cache: SlotCache, compile_step: bool = False):
        language = model.model.language_model
        self.embed = language.embed_tokens
        self.layers = list(language.layers)
        self.norm = language.norm
        self.rotary = language.rotary_emb
        self.lm_head = model.lm_head
        self.cache = cache
        self.device = model.device
        dtype = model.dtype
        self.masked = torch.finfo(dtype).min
        self.dtype = dtype
        self.positions = torch.arange(cache.max_len, device=self.device)
        self.compiled = compile_step
        self._run: Callable[..., torch.Tensor] = self._forward
        if compile_step:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            # Symbolic in the bucket and the span from the start: one graph for a batch of one
            # (dynamo specialises sizes of 1) and one for the rest, whatever the span, instead
            # of a compile per shape. On a GPU, "reduce-overhead" records a CUDA graph per
            # shape from those (the buckets and spans bound how many).
            self._run = torch.compile(self._forward, mode=mode, dynamic=True)

    @staticmethod
    def of_model(model: Any, slots: int, max_len: int, compile_step: bool = False) -> DecodeStep:
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        cache = SlotCache(
            config.num_hidden_layers,
            slots,
            max_len,
            config.num_key_value_heads,
            head_dim,
            model.dtype,
            model.device,
        )
        return DecodeStep(model, cache, compile_step)

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, span: int
    ) -> torch.Tensor:
        """Next-token logits (`[B, vocab]`) for slots `0..B-1`: `tokens`, their rotary
        `positions`, and the `lengths` of their caches (where the new keys go)."""
        return self._run(tokens, positions, lengths, span)

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, span: int
    ) -> torch.Tensor:
        rows = tokens.shape[0]
        hidden = self.embed(tokens.view(rows, 1))
        rope = positions.view(1, rows, 1).expand(3, rows, 1)
        position_embeddings = self.rotary(hidden, rope)
        keep = self.positions[:span].view(1, span) <= lengths.view(rows, 1)
        mask = torch.zeros(keep.shape, dtype=self.dtype, device=keep.device)
        mask = mask.masked_fill(~keep, self.masked).view(rows, 1, 1, span)
        self.cache.begin_step(torch.arange(rows, device=tokens.device), lengths, span)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                position_ids=None,
                cache=self.cache,
                use_cache=True,
            )
        return self.lm_head(self.norm(hidden)[:, -1])


def configure_compile_cache(directory: str | None) -> None:
    """Where inductor keeps compiled graphs, so a restart reuses them (the image keeps
    `/var/cache/qwen-vl`); an unwritable directory only means compiling again."""
    if not directory:
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        logger.warning("compile cache %s unusable (%s); compiling without it", directory, exc)
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(directory, "inductor"))
