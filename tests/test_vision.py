"""The vision encoder gives the model's own image features, from any number of threads at once,
for every family, without the unmerged hidden state the language model never reads."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_flatten

from predictor.engine.generation import Generator
from predictor.engine.loading import LoadedModel
from predictor.engine.vision import VisionEncoder
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.rows import Row
from tests import images


@pytest.fixture(scope="module")
def generator(loaded_family: LoadedModel) -> Generator:
    return Generator(loaded_family.model, loaded_family.processor)


def pixels(generator: Generator, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's pixel patches and grid for a gradient of `size`."""
    picture = fit_to_budget(
        images.gradient(size), generator.default_budget, generator.resize_factor
    )
    row = Row.single(picture, "Describe.", SamplingParams(max_new_tokens=4))
    tensors = generator._process_images(row.images)
    return tensors["pixel_values"], tensors["image_grid_thw"]


def assert_same(actual: Any, expected: Any) -> None:
    got, got_spec = tree_flatten(actual)
    want, want_spec = tree_flatten(expected)
    assert got_spec == want_spec
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@torch.inference_mode()
def test_features_are_the_models_own_without_the_last_hidden_state(
    generator: Generator,
) -> None:
    values, grid = pixels(generator, (96, 64))
    features = VisionEncoder(generator.model)(values, grid)
    own = generator.model.get_image_features(
        pixel_values=values, image_grid_thw=grid, return_dict=True
    )
    assert "last_hidden_state" not in features and own.get("last_hidden_state") is not None
    assert features.keys() and set(features.keys()) < set(own.keys())
    for key in features:
        assert_same(features[key], own[key])


def test_threads_encoding_different_sizes_at_once_each_get_their_own_features(
    generator: Generator,
) -> None:
    encoder = VisionEncoder(generator.model)
    sizes = [(64, 64), (96, 64), (128, 96), (64, 160)]
    inputs = [pixels(generator, size) for size in sizes]
    alone = [encoder(values, grid) for values, grid in inputs]
    together: list[Any] = [None] * len(inputs)

    def encode(index: int) -> None:
        for _ in range(3):
            together[index] = encoder(*inputs[index])

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(together, alone, strict=True):
        assert_same(got, want)
