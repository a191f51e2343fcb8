"""The matmul patch embedding computes what the checkpoint's Conv3d computes."""

from __future__ import annotations

import torch
from torch import nn

from predictor.engine.patch_embedding import PatchConv3d, use_matmul_patch_embeddings


def test_matmul_patch_embedding_equals_the_convolution() -> None:
    torch.manual_seed(0)
    conv = nn.Conv3d(3, 32, kernel_size=(2, 16, 16), stride=(2, 16, 16), bias=True)
    patches = torch.randn(50, 3, 2, 16, 16)
    expected = conv(patches)
    model = nn.Sequential(conv, nn.Conv3d(3, 8, kernel_size=3, padding=1))  # second: overlaps
    assert use_matmul_patch_embeddings(model) == 1
    assert type(model[0]) is PatchConv3d and type(model[1]) is nn.Conv3d
    torch.testing.assert_close(model[0](patches), expected)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias"}


def test_other_input_shapes_still_go_through_the_convolution() -> None:
    conv = nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4))
    frames = torch.randn(1, 3, 4, 8, 8)  # several patches per input: not a single patch
    expected = conv(frames)
    use_matmul_patch_embeddings(conv)
    torch.testing.assert_close(conv(frames), expected)
