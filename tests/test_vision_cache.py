"""The engine's vision cache (`predictor.engine.vision_cache`): the key is the pixels, the
grids and the dtype; entries are bounded by bytes, least recently used first; and through the
engine's own encoding, a hit gives the very features a new encoding gives."""

from __future__ import annotations

import pytest
import torch

from predictor.engine.generation import Generator
from predictor.engine.loading import LoadedModel
from predictor.engine.running_batch import describe
from predictor.engine.vision_cache import VisionCache, output_bytes, vision_key
from predictor.inputs.images import fit_to_budget
from predictor.inputs.input_cache import MIB
from predictor.params import SamplingParams
from predictor.rows import Row
from tests import images


def test_the_key_is_the_pixels_the_grids_and_the_dtype() -> None:
    pixels = torch.arange(4 * 6, dtype=torch.uint8).view(4, 6)
    grid = torch.tensor([[1, 2, 2]])
    key = vision_key(pixels, grid, torch.bfloat16)
    assert key == vision_key(pixels.clone(), grid.clone(), torch.bfloat16)
    changed = pixels.clone()
    changed[3, 5] += 1
    assert key != vision_key(changed, grid, torch.bfloat16)
    assert key != vision_key(pixels, torch.tensor([[1, 1, 4]]), torch.bfloat16)
    assert key != vision_key(pixels, grid, torch.float32)
    assert key != vision_key(pixels.view(6, 4), grid, torch.bfloat16)  # same bytes, other shape
    assert key != vision_key(pixels.float(), grid, torch.bfloat16)


def test_a_rows_pixel_key_stands_for_the_pixels_digest() -> None:
    """A key from the front's content key needs no hashing of the pixels and never equals a
    key from the pixels themselves; the shape, grids and dtype still count."""
    pixels = torch.arange(4 * 6, dtype=torch.uint8).view(4, 6)
    grid = torch.tensor([[1, 2, 2]])
    named = vision_key(pixels, grid, torch.bfloat16, b"k" * 32)
    assert named == vision_key(torch.zeros_like(pixels), grid, torch.bfloat16, b"k" * 32)
    assert named != vision_key(pixels, grid, torch.bfloat16)
    assert named != vision_key(pixels, grid, torch.bfloat16, b"j" * 32)
    assert named != vision_key(pixels, torch.tensor([[1, 1, 4]]), torch.bfloat16, b"k" * 32)
    assert named != vision_key(pixels, grid, torch.float32, b"k" * 32)


def _output(mib: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    half = int(mib * MIB) // 2
    return torch.zeros(half, dtype=torch.uint8), [torch.zeros(half, dtype=torch.uint8)]


def test_entries_are_bounded_by_bytes_least_recently_used_first() -> None:
    assert output_bytes(_output(1)) == MIB
    cache = VisionCache(3 * MIB)
    for name in (b"a", b"b", b"c"):
        cache.put((name, b"", ""), _output(1))
    assert len(cache) == 3 and cache.bytes == 3 * MIB
    assert cache.get((b"a", b"", "")) is not None  # a is now the most recent
    cache.put((b"d", b"", ""), _output(1))
    assert cache.get((b"b", b"", "")) is None  # b was the least recently used
    cache.put((b"big", b"", ""), _output(4))  # larger than the whole bound: not kept
    assert cache.get((b"big", b"", "")) is None and len(cache) == 3
    assert not VisionCache(0).enabled


def _tensors(output) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in _tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in _tensors(value)]
    return []


@pytest.fixture(scope="module")
def loaded(tiny_qwen3_vl) -> LoadedModel:
    from predictor.engine.loading import load_model
    from predictor.settings import Settings

    return load_model(Settings(model_dir=str(tiny_qwen3_vl), device="cpu", dtype="float32"))


@pytest.mark.slow
def test_a_hit_gives_the_features_a_new_encoding_gives(loaded: LoadedModel) -> None:
    plain = Generator(loaded.model, loaded.processor)
    cached = Generator(loaded.model, loaded.processor)
    cached.vision_cache = VisionCache(64 * MIB)
    budget, factor = plain.default_budget, plain.resize_factor
    picture = fit_to_budget(images.gradient((128, 96)), budget, factor)
    row = Row.single(picture, "Describe.", SamplingParams(max_new_tokens=8))
    first = cached.encode(row)
    again = cached.encode(row)
    assert again.image_features is first.image_features  # found, not encoded again
    assert len(cached.vision_cache) == 1
    fresh = plain.encode(row)
    ours, theirs = _tensors(again.image_features), _tensors(fresh.image_features)
    assert len(ours) == len(theirs) > 0
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    other = Row.single(fit_to_budget(images.solid((96, 96)), budget, factor), "Describe.",
                       SamplingParams(max_new_tokens=8))  # fmt: skip
    assert cached.encode(other).image_features is not first.image_features
    assert len(cached.vision_cache) == 2
    # And the text: rows whose features came from the cache decode as fresh ones do.
    with_cache = describe(cached, [row, other])
    assert [c.text for c in with_cache] == [c.text for c in describe(plain, [row, other])]


@pytest.mark.slow
def test_a_row_named_by_its_content_is_looked_up_by_that_name(loaded: LoadedModel) -> None:
    """Rows the front encodes carry their pixels' content key: the engine keys its cache by
    it (no hash of the pixels), and a row with the same key finds the entry."""
    from predictor.inputs.input_cache import cache_key, pixel_key
    from predictor.rows import EncodedRow

    generator = Generator(loaded.model, loaded.processor)
    generator.vision_cache = VisionCache(64 * MIB)
    budget, factor = generator.default_budget, generator.resize_factor
    picture = fit_to_budget(images.gradient((128, 96)), budget, factor)
    row = Row.single(picture, "Describe.", SamplingParams(max_new_tokens=8))
    tensors = generator.preprocessor.encode(row).tensors
    name = pixel_key([cache_key(b"the encoded bytes", budget, torch.float32)])
    first = generator.encode_images(EncodedRow(tensors, pixel_key=name))
    ((digest, _, _),) = generator.vision_cache._entries  # one entry, under the row's name
    assert digest == b"from:" + name
    again = generator.encode_images(EncodedRow(tensors, pixel_key=name))
    assert again.image_features is first.image_features
