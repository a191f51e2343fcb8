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
  keys it reads are the first `span` positions (a multiple of `span_step`), and every index is a
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

SPAN_STEP = 256  # keys read per step come in multiples of this on a GPU (one CUDA graph each)
# On a CPU the compiled step is symbolic in the span, so a finer step costs no compile: each row
# reads at most 31 keys past the longest row instead of 255. On Qwen3-VL-2B's shapes at 16
# rows of ~300 tokens, attention read 512 keys a row and was a fifth of the step.
CPU_SPAN_STEP = 32


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


def span_for(longest: int, max_len: int, step: int = SPAN_STEP) -> int:
    """Keys a step reads when its longest row holds `longest` tokens (the new one included)."""
    return min(max_len, -(-longest // step) * step)


class SlotCache:
    """Keys and values of every running row, `[slots, kv_heads, max_len, head_dim]` a layer.

    A step writes each row's new key and value at that row's length and reads the first `span`
    positions of its slots (`decoder_layer_step`).
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
        if device.type == "cuda":
            # Written in place by every step: CUDA graphs may replay over them only if their
            # addresses are known to stay (as transformers' StaticCache marks its tensors).
            for tensor in (*self.keys, *self.values):
                torch._dynamo.mark_static_address(tensor)
        self.slots, self.max_len = slots, max_len

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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def decoder_layer_step(
    layer: Any,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    at: torch.Tensor,
    span: int,
) -> torch.Tensor:
    """One decoder layer on one token per row (`hidden`: `[B, 1, hidden]`), with the layer's
    own modules in transformers' order: norm, projections, per-head q/k norms (Qwen3), RoPE,
    attention over the slot cache, output projection, norm, MLP.

    Why not the layer's `forward`: that reads `layer_idx` to find its cache, so a compiled
    layer would be specialised to each index. Here the layer's cache tensors are arguments and
    nothing depends on which layer it is, so one compiled graph serves all of them
    (regional compilation: a 28-layer step compiles one layer, not 28)."""
    attention = layer.self_attn
    rows = hidden.shape[0]
    head_dim = attention.head_dim
    residual = hidden
    x = layer.input_layernorm(hidden)
    q = attention.q_proj(x).view(rows, 1, -1, head_dim)
    k = attention.k_proj(x).view(rows, 1, -1, head_dim)
    v = attention.v_proj(x).view(rows, 1, -1, head_dim)
    if hasattr(attention, "q_norm"):
        q, k = attention.q_norm(q), attention.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    slots = torch.arange(rows, device=hidden.device)
    keys[slots, :, at] = k[:, :, 0]
    values[slots, :, at] = v[:, :, 0]
    # One query token per row: the query heads of each key/value head become that head's rows
    # of queries (transformers' `pack_gqa`, which its decoding uses too, so the sums and the
    # text are the same), and no key or value is copied.
    heads, kv_heads = q.shape[1], keys.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.reshape(rows, kv_heads, heads // kv_heads, head_dim),
        keys[:rows, :, :span],
        values[:rows, :, :span],
        attn_mask=mask,
        scale=attention.scaling,
    ).reshape(rows, heads, 1, head_dim)
    hidden = residual + attention.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


class DecodeStep:
    """The checkpoint's text decoder on one token per row, reading a `SlotCache`."""

    def __init__(self, model: Any, cache: SlotCache, compile_step: bool = False):
        language = model.model.language_model
        self.embed = language.embed_tokens
        self.layers = list(language.layers)
        self.norm = language.norm
        rotary = language.rotary_emb
        self.inv_freq = rotary.inv_freq.to(model.device, torch.float32)
        self.rope_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.lm_head = model.lm_head
        self.cache = cache
        self.device = model.device
        self.dtype = model.dtype
        self.masked = torch.finfo(self.dtype).min
        self.positions = torch.arange(cache.max_len, device=self.device)
        self.compiled = compile_step
        self.span_step = SPAN_STEP if self.device.type == "cuda" else CPU_SPAN_STEP
        self.layer_step: Callable[..., torch.Tensor] = decoder_layer_step
        self._run: Callable[..., torch.Tensor] = self._forward
        if compile_step:
            self._compile(whole_step=self.device.type == "cuda")

    def _compile(self, whole_step: bool) -> None:
        """Symbolic in the bucket and the span from the start (dynamo specialises sizes of 1,
        so a batch of one has a graph of its own), whatever the span.

        On a GPU the whole step is one graph, run as CUDA graphs ("reduce-overhead": one replay
        a step, recorded per bucket and span, which bound how many); its compile is long for a
        deep model, which the compile cache amortises. On a CPU one decoder layer is compiled
        and serves every layer (regional compilation): a 28-layer model compiles in seconds
        instead of minutes, for about 0.2 ms of dispatch per layer. The guards on the layers'
        modules are dropped: every layer has the same structure and shapes, and checking their
        parameters on each call cost more than a tiny layer's arithmetic."""
        options = {}
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip is not None:  # torch >= 2.8
            options["guard_filter_fn"] = skip
        if whole_step:
            if self.device.type == "cuda":
                options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
            self._run = torch.compile(self._forward, dynamic=True, options=options)
        else:
            self.layer_step = torch.compile(decoder_layer_step, dynamic=True, options=options)

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
        `positions` (Qwen-VL's multimodal RoPE gives a text token the same temporal, height
        and width position, which makes it plain RoPE), and the `lengths` of their caches
        (where the new keys go)."""
        return self._run(tokens, positions, lengths, span)

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor, span: int
    ) -> torch.Tensor:
        rows = tokens.shape[0]
        hidden = self.embed(tokens.view(rows, 1))
        freqs = positions.view(rows, 1, 1).float() * self.inv_freq.view(1, 1, -1)
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scaling).to(self.dtype).unsqueeze(1)
        sin = (angles.sin() * self.rope_scaling).to(self.dtype).unsqueeze(1)
        keep = self.positions[:span].view(1, span) <= lengths.view(rows, 1)
        mask = torch.zeros(keep.shape, dtype=self.dtype, device=keep.device)
        mask = mask.masked_fill(~keep, self.masked).view(rows, 1, 1, span)
        for layer, keys, values in zip(
            self.layers, self.cache.keys, self.cache.values, strict=True
        ):
            hidden = self.layer_step(layer, hidden, cos, sin, mask, keys, values, lengths, span)
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
