"""The text decoder's linear layers with their weights in oneDNN's blocked layout (bfloat16 on
a CPU).

Why: a decoding step reads every weight of the text decoder once per token, so on a CPU its
speed is the speed at which the matrix products stream their weights. `F.linear` on a plain
row-major bfloat16 weight streamed 6.7 GB/s at one row and 4.5 GB/s at 16 rows on this
project's CPU, against a plain copy's 9.1 GB/s; the same products on weights reordered once
into oneDNN's blocked layout streamed 9.6 and 6.1 GB/s (40 weights of 6144 x 2048, 1 GB, so
nothing stayed in cache). On the Qwen3-VL-2B shapes this took the 16-row step from 1,037 ms to
710 ms. It is what inductor's `freezing` does to a frozen graph; here the layers stay modules,
so the prefill (the model's own forward) uses them too, and the decoding step's compiled graph
calls them as one opaque operator (`qwen_vl::packed_linear`: inductor accepts a blocked weight
only as a constant of a frozen graph, and one graph serves all 28 layers).

Only bfloat16: float32 keeps `F.linear` so that exact-text comparisons against transformers
(which the tests make in float32) see the same sums. Not for bitsandbytes layers, not on a GPU.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


@torch.library.custom_op("qwen_vl::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """`F.linear(x, W, bias)` for a 2-D `x`, with `weight` W reordered by
    `torch.ops.mkldnn._reorder_linear_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight lives in oneDNN's blocked layout (made once, at start-up)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The layout is chosen for one row; oneDNN runs it for any number of rows.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = packed_linear(flat, self.packed, self.bias, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN blocked"


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model of `dtype` on `device` gets packed layers (unless quantized): bfloat16
    on a CPU with oneDNN's bfloat16 kernels."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def can_pack(model: Any) -> bool:
    """Whether `pack_text_decoder` applies: `packable`, and not loaded through bitsandbytes."""
    return (
        packable(model.device, model.dtype)
        and not getattr(model, "is_loaded_in_4bit", False)
        and not getattr(model, "is_loaded_in_8bit", False)
    )


def pack_text_decoder(model: Any) -> int:
    """Replace the text decoder's `nn.Linear` layers and the output layer by `PackedLinear`
    where `can_pack`; returns how many were replaced (0 when already packed or not packable).

    The output layer is usually tied to the token embedding: the embedding keeps its table
    (looked up by row) and the output layer gets its own blocked copy, vocabulary x hidden
    bfloat16 more (0.62 GB for Qwen3-VL-2B), which the output layer's speed pays for: it is a
    fifth of the weights a 2B step reads."""
    if not can_pack(model):
        return 0
    # A served model is never trained: without gradients on its other parameters, a step run
    # outside inference mode is not traced for a backward that the packed operator lacks.
    model.requires_grad_(False)
    replaced = 0
    for parent in model.model.language_model.layers.modules():
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear(child))
                replaced += 1
    if type(model.lm_head) is torch.nn.Linear:
        model.lm_head = PackedLinear(model.lm_head)
        replaced += 1
    if replaced:
        logger.info("%d linear layers of the text decoder reordered for oneDNN", replaced)
    return replaced
