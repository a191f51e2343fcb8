"""Run the vision tower's patch embedding as one matrix multiply instead of a 3-D convolution.

Why: Qwen-VL embeds each image patch (2 frames x 14 or 16 pixels square x 3 channels) with a
`Conv3d` whose kernel equals its stride, so the patches never overlap: that is exactly a
linear layer over flattened patches. A general 3-D convolution kernel is several times slower
at it (on CPU here, and with cuDNN), and every image of every request pays it. The weights are
the checkpoint's own (a reshaped view), so nothing is copied and the state dict is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class PatchConv3d(nn.Conv3d):
    """A `Conv3d` with kernel == stride that computes patch-sized inputs as a matmul."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 5 or tuple(input.shape[2:]) != tuple(self.kernel_size):
            return super().forward(input)
        rows = input.shape[0]
        weight = self.weight.reshape(self.out_channels, -1)
        output = functional.linear(input.reshape(rows, -1), weight, self.bias)
        return output.view(rows, self.out_channels, 1, 1, 1)


def is_patch_embedding(module: nn.Module) -> bool:
    """A plain non-overlapping 3-D convolution (kernel == stride, no padding or groups)."""
    return (
        type(module) is nn.Conv3d
        and tuple(module.kernel_size) == tuple(module.stride)
        and tuple(module.padding) == (0, 0, 0)
        and tuple(module.dilation) == (1, 1, 1)
        and module.groups == 1
        and module.padding_mode == "zeros"
    )


def use_matmul_patch_embeddings(model: nn.Module) -> int:
    """Switch every patch-embedding convolution of `model` to `PatchConv3d`; returns how many."""
    switched = 0
    for module in model.modules():
        if is_patch_embedding(module):
            module.__class__ = PatchConv3d
            switched += 1
    return switched
