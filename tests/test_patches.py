"""The front's own pixel patches (`predictor.inputs.patches`) equal the checkpoint's image
processor's output, cast to the engine's dtype, bit for bit, and the input cache
(`predictor.inputs.input_cache`) keeps what it should: hit, bound, another budget a miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from predictor.inputs.images import ImageLimits, prepare_image
from predictor.inputs.input_cache import InputCache, ProcessedImage, cache_key
from predictor.inputs.patches import Patched, Patcher
from predictor.params import PixelBudget
from tests import images

FAMILIES = ("qwen3-vl", "qwen2.5-vl", "qwen2-vl")


@pytest.fixture(scope="module")
def image_processors() -> dict:
    """Each family's image processor, from its real preprocessor_config.json."""
    from transformers import Qwen2VLImageProcessor

    from hack.make_tiny_model import PREPROCESSOR_CONFIGS

    return {
        family: Qwen2VLImageProcessor(
            **{k: v for k, v in config.items() if not k.endswith(("processor_class", "type"))}
        )
        for family, config in PREPROCESSOR_CONFIGS.items()
    }


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Every channel value appears: noise over the whole 0-255 range."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_patches_equal_the_image_processors(image_processors, family, dtype) -> None:
    processor = image_processors[family]
    patcher = Patcher(processor)
    assert patcher.fast
    factor = processor.patch_size * processor.merge_size
    for width, height in ((factor, factor), (448, 448), (640, 480), (factor * 3, factor * 11)):
        image = _noise((width, height), seed=width)
        pixels = width * height
        reference = processor(
            images=[image],
            size={"shortest_edge": pixels, "longest_edge": pixels},
            return_tensors="pt",
        )
        patched = patcher.patches(image, dtype)
        assert patched.pixel_values.dtype == dtype
        assert torch.equal(patched.pixel_values, reference["pixel_values"].to(dtype)), (
            width,
            height,
        )
        assert torch.equal(patched.image_grid_thw, reference["image_grid_thw"])


@pytest.mark.parametrize("family", FAMILIES)
def test_frames_are_the_images_bytes_once(image_processors, family) -> None:
    """What the front sends: uint8, the decoded image's bytes in raster order (an eighth of
    float32's bytes with the repeated frame), which the engine's `gather` puts in
    `patchify`'s layout and `normalise` turns into the processor's patches."""
    processor = image_processors[family]
    patcher = Patcher(processor)
    image = _noise((448, 448))
    frames = patcher.frames(image)
    assert frames is not None and frames.pixel_values.dtype == torch.uint8
    assert frames.pixel_values.numpy().tobytes() == image.tobytes()
    patches = patcher.patches(image, torch.float32)
    assert frames.pixel_values.numel() * processor.temporal_patch_size == (
        patches.pixel_values.numel()
    )
    assert torch.equal(frames.image_grid_thw, patches.image_grid_thw)
    assert patcher.frames(_noise((100, 70))) is None  # off the grid: the processor's path


@pytest.mark.parametrize("family", FAMILIES)
def test_several_images_frames_gather_one_after_another(image_processors, family) -> None:
    """Frames of images of different sizes, concatenated as a row of several images carries
    them, normalise to the processor's patches of those images, in order."""
    processor = image_processors[family]
    patcher = Patcher(processor)
    factor = processor.patch_size * processor.merge_size
    pictures = [_noise((factor * 3, factor * 2), seed=1), _noise((factor, factor * 4), seed=2)]
    framed = [patcher.frames(picture) for picture in pictures]
    frames = torch.cat([f.pixel_values for f in framed])
    grids = torch.cat([f.image_grid_thw for f in framed])
    reference = processor(
        images=pictures,
        size={"shortest_edge": factor * factor, "longest_edge": factor * factor * 6},
        return_tensors="pt",
    )
    assert torch.equal(grids, reference["image_grid_thw"])
    assert torch.equal(patcher.normalise(frames, grids, torch.float32), reference["pixel_values"])
    with pytest.raises(ValueError, match="patches of frames"):
        patcher.gather(frames[:-1], grids)


def test_an_image_off_the_grid_goes_through_the_processor(image_processors) -> None:
    """Not a model-input size (never the case on the request path): the processor's own
    path, which resizes it."""
    processor = image_processors["qwen3-vl"]
    image = _noise((100, 70))
    patched = Patcher(processor).patches(image)
    reference = processor(images=[image], size={"shortest_edge": 7000, "longest_edge": 7000})
    assert torch.equal(patched.image_grid_thw, torch.as_tensor(reference["image_grid_thw"]))


def _entry(megabytes: float) -> ProcessedImage:
    values = torch.zeros(int(megabytes * 1024 * 1024 / 4), dtype=torch.float32)
    return ProcessedImage((32, 32), Patched(values.view(-1, 1), torch.tensor([[1, 2, 2]])))


def test_the_key_is_the_bytes_the_budget_and_the_dtype() -> None:
    budget = PixelBudget(65_536, 1_003_520)
    data = images.jpeg()
    key = cache_key(data, budget, torch.bfloat16)
    assert key == cache_key(bytes(data), budget, torch.bfloat16)
    assert key != cache_key(data + b"\0", budget, torch.bfloat16)
    assert key != cache_key(data, PixelBudget(65_536, 262_144), torch.bfloat16)
    assert key != cache_key(data, PixelBudget(4_096, 1_003_520), torch.bfloat16)
    assert key != cache_key(data, budget, torch.float32)


def test_the_cache_is_bounded_by_bytes_least_recently_used_first() -> None:
    cache = InputCache(3 * 1024 * 1024)
    for name in "abc":
        cache.put((name.encode(), 0, 0, ""), _entry(1))
    assert len(cache) == 3 and cache.bytes == 3 * 1024 * 1024
    assert cache.get((b"a", 0, 0, "")) is not None  # a is now the most recent
    cache.put((b"d", 0, 0, ""), _entry(1))
    assert cache.get((b"b", 0, 0, "")) is None  # b was the least recently used
    assert {k for k in (b"a", b"c", b"d") if cache.get((k, 0, 0, ""))} == {b"a", b"c", b"d"}
    cache.put((b"big", 0, 0, ""), _entry(4))  # larger than the whole bound: not kept
    assert cache.get((b"big", 0, 0, "")) is None and len(cache) == 3
    assert cache.bytes <= cache.max_bytes


def test_a_cache_of_zero_bytes_is_off() -> None:
    cache = InputCache(0)
    assert not cache.enabled
    cache.put((b"a", 0, 0, ""), _entry(0.001))
    assert len(cache) == 0


@pytest.fixture(scope="module")
def preprocessor(tiny_qwen3_vl):
    from predictor.engine.loading import load_processor
    from predictor.inputs.preprocessing import Preprocessor
    from predictor.settings import Settings

    return Preprocessor(load_processor(Settings(model_dir=str(tiny_qwen3_vl))), 64 * 1024 * 1024)


def test_the_same_bytes_hit_and_another_budget_misses(preprocessor) -> None:
    limits = ImageLimits(10_000_000, 50_000_000)
    data = images.encode(_noise((640, 480)), "JPEG", quality=90)
    budget = preprocessor.default_budget
    first, hit = preprocessor.image(data, limits, "image", budget)
    assert not hit
    again, hit = preprocessor.image(data, limits, "image", budget)
    assert hit and again is first
    smaller = PixelBudget(budget.min_pixels, 65_536)
    other, hit = preprocessor.image(data, limits, "image", smaller)
    assert not hit and other.size != first.size
    _, hit = preprocessor.image(data, limits, "image", smaller)
    assert hit
    # What a hit returns is what decoding and patching the bytes gives.
    image = prepare_image(data, limits, "image", budget, preprocessor.resize_factor)
    fresh = preprocessor.patcher.frames(image)
    assert fresh is not None
    assert torch.equal(again.patched.pixel_values, fresh.pixel_values)


def test_encoded_rows_name_their_pixels_by_content_and_budget(preprocessor) -> None:
    """The key the engine's vision cache uses for a row: the same for the same bytes at the
    same budget (cache hit or not), another for other bytes or another budget, none for a
    row whose images came without one."""
    from predictor.params import SamplingParams
    from predictor.rows import Row

    limits = ImageLimits(10_000_000, 50_000_000)
    budget = preprocessor.default_budget
    row = Row((), Row.single(_noise((64, 64)), "What is this?", SamplingParams(4)).messages,
              SamplingParams(4))  # fmt: skip

    def key(data: bytes, budget: PixelBudget) -> bytes | None:
        processed, _ = preprocessor.image(data, limits, "image", budget)
        return preprocessor.encode_processed(row, [processed]).pixel_key

    first = images.encode(_noise((500, 300), seed=3), "PNG")
    second = images.encode(_noise((500, 300), seed=4), "PNG")
    assert key(first, budget) is not None
    assert key(first, budget) == key(first, budget)
    assert key(first, budget) != key(second, budget)
    smaller = PixelBudget(budget.min_pixels, budget.min_pixels * 2)
    assert key(first, budget) != key(first, smaller)
    processed, _ = preprocessor.image(first, limits, "image", budget)
    keyless = ProcessedImage(processed.size, processed.patched)
    assert preprocessor.encode_processed(row, [keyless]).pixel_key is None


def test_encoded_rows_equal_the_processors(preprocessor) -> None:
    """A row encoded from processed images (text from blank images of the same size, patches
    from the patcher) equals the processor run on the row with its real image."""
    from predictor.params import SamplingParams
    from predictor.rows import Row

    limits = ImageLimits(10_000_000, 50_000_000)
    data = images.encode(_noise((500, 300), seed=3), "PNG")
    budget = preprocessor.default_budget
    processed, _ = preprocessor.image(data, limits, "image", budget)
    image = prepare_image(data, limits, "image", budget, preprocessor.resize_factor)
    sampling = SamplingParams(max_new_tokens=8)
    with_image = Row.single(image, "What is this?", sampling)
    without = Row((), with_image.messages, sampling)
    for _ in range(2):  # the text cache's miss, then its hit
        encoded = dict(preprocessor.encode_processed(without, [processed]).tensors)
        reference = dict(preprocessor.process([with_image]))
        assert encoded.keys() == reference.keys()
        # The pixels as the engine normalises them before its vision encoder.
        assert encoded["pixel_values"].dtype == torch.uint8
        frames = encoded["pixel_values"]
        encoded["pixel_values"] = preprocessor.patcher.normalise(
            frames, encoded["image_grid_thw"], torch.float32
        )
        for key, value in reference.items():
            assert torch.equal(encoded[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_vision_encoder_receives_the_processors_patches(loaded_family, dtype) -> None:
    """Every family and dtype: the engine normalises the front's uint8 frames into exactly
    the processor's pixel values cast to the model's dtype, what the vision encoder took
    before the frames existed."""
    from predictor.engine.generation import Generator
    from predictor.rows import EncodedRow

    generator = Generator(loaded_family.model.to(dtype), loaded_family.processor)
    received: list[torch.Tensor] = []
    encode = generator.vision._encode

    def recording(pixel_values: torch.Tensor, grid: torch.Tensor):
        received.append(pixel_values)
        return encode(pixel_values, grid)

    generator.vision._encode = recording
    try:
        factor = generator.resize_factor
        image = _noise((factor * 20, factor * 15), seed=5)
        frames = generator.preprocessor.patcher.frames(image)
        assert frames is not None
        encoded = generator.encode_images(
            EncodedRow(
                {"pixel_values": frames.pixel_values, "image_grid_thw": frames.image_grid_thw}
            )
        )
    finally:
        generator.vision._encode = encode
        loaded_family.model.to(torch.float32)
    reference = loaded_family.processor.image_processor(
        images=[image],
        size={
            "shortest_edge": image.width * image.height,
            "longest_edge": image.width * image.height,
        },
        return_tensors="pt",
    )["pixel_values"]
    assert received[0].dtype == dtype
    assert torch.equal(received[0], reference.to(dtype))
    assert encoded.image_features is not None
