"""Image decoding and validation, with no model."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from predictor.errors import InvalidRequest
from predictor.inputs.images import (
    ImageLimits,
    fit_to_budget,
    load_image,
    prepare_image,
    target_size,
)
from predictor.params import PixelBudget
from predictor.protocol import decode_base64
from tests import images

LIMITS = ImageLimits(max_bytes=1_000_000, max_decoded_pixels=4_000_000)


@pytest.mark.parametrize("fmt", sorted(images.every_format()))
def test_every_supported_format_decodes_to_rgb(fmt: str) -> None:
    image = load_image(images.every_format()[fmt], LIMITS, "image[0]")
    assert image.mode == "RGB"
    assert image.width > 0 and image.height > 0


def test_animated_gif_uses_first_frame() -> None:
    image = load_image(images.every_format()["gif"], LIMITS, "image[0]")
    red, _green, blue = image.getpixel((5, 5))
    assert red > 200 and blue < 50  # first frame is red, second blue


def test_alpha_is_flattened_on_white() -> None:
    transparent = images.encode(images.solid((10, 10), (0, 0, 0, 0)), "PNG")
    assert load_image(transparent, LIMITS, "image").getpixel((3, 3)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    image = load_image(images.exif_rotated_jpeg(), LIMITS, "image")
    assert image.size == (20, 60)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "is empty"),
        (b"this is not an image at all", "not an image in a supported format"),
        (images.truncated_jpeg(), "truncated or corrupt"),
        (images.png_header_only(5000, 5000), "decompression-bomb guard"),
        (images.png_header_only(4000, 10), "aspect ratio"),
        (images.encode(images.solid((8, 8)), "ICO"), "not an image in a supported format"),
    ],
    ids=["empty", "not-image", "truncated", "bomb", "aspect", "unsupported-format"],
)
def test_bad_images_are_refused_naming_the_field(data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        load_image(data, LIMITS, "image[2]")
    assert str(error.value).startswith("image[2]: ")
    assert message in str(error.value)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    with pytest.raises(InvalidRequest, match="more than the limit of 100 bytes"):
        load_image(images.jpeg(), ImageLimits(max_bytes=100, max_decoded_pixels=10**6), "image")


def test_base64_accepts_plain_and_data_urls() -> None:
    raw = images.jpeg()
    text = base64.b64encode(raw).decode()
    assert decode_base64(text, "image") == raw
    assert decode_base64(f"data:image/jpeg;base64,{text}", "image") == raw


@pytest.mark.parametrize(
    "text", ["not base64!", "data:text/plain;base64,aGk=", "QUJD\x00", "data:image/png,abc"]
)
def test_base64_is_strict(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"^image\[0\]: "):
        decode_base64(text, "image[0]")


@pytest.mark.parametrize(
    ("size", "budget", "factor"),
    [
        ((4000, 3000), PixelBudget(4096, 262_144), 32),
        ((10, 10), PixelBudget(4096, 262_144), 32),
        ((641, 479), PixelBudget(3136, 1_003_520), 28),
        ((1000, 20), PixelBudget(3136, 200_704), 28),
    ],
)
def test_fit_to_budget_matches_processor_rules(size, budget, factor) -> None:
    width, height = target_size(*size, budget, factor)
    assert width % factor == 0 and height % factor == 0
    assert budget.min_pixels <= width * height <= budget.max_pixels
    resized = fit_to_budget(Image.new("RGB", size), budget, factor)
    assert resized.size == (width, height)
    # Already at its target size: nothing left to change (the processor relies on this).
    assert target_size(width, height, budget, factor) == (width, height)


@pytest.mark.parametrize(
    ("data", "shown_size"),
    [
        (images.encode(images.gradient((1600, 1200)), "JPEG"), (1600, 1200)),
        (
            images.encode(images.gradient((1200, 400)), "JPEG", exif=images.rotate_exif(6)),
            (400, 1200),
        ),
        (images.encode(images.gradient((900, 700)), "PNG"), (900, 700)),
    ],
    ids=["jpeg-draft", "jpeg-draft-rotated", "png"],
)
def test_prepare_image_lands_on_the_processor_size(data: bytes, shown_size) -> None:
    budget, factor = PixelBudget(4096, 100_000), 32
    prepared = prepare_image(data, LIMITS, "image", budget, factor)
    assert prepared.mode == "RGB"
    assert prepared.size == target_size(*shown_size, budget, factor)
    full = load_image(data, LIMITS, "image")
    assert full.size == shown_size
    # Same picture: the draft-decoded image is close to the slowly resized one.
    slow = fit_to_budget(full, budget, factor)
    difference = sum(abs(a - b) for a, b in zip(prepared.tobytes(), slow.tobytes(), strict=True))
    assert difference / len(slow.tobytes()) < 8


def _processor_grids() -> list[tuple[str, int, int]]:
    """(family, width, height): sizes from tiny to 12 MP, square to 1:200, both ways round."""
    shapes = set()
    for short in (10, 13, 28, 29, 97, 480, 1000):
        for ratio in (1, 1.5, 3.3, 10, 57, 200):
            long = round(short * ratio)
            if short * long <= 12_000_000:
                shapes.update({(long, short), (short, long)})
    return [(f, w, h) for f in ("qwen3-vl", "qwen2.5-vl", "qwen2-vl") for w, h in sorted(shapes)]


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


def _processor_grid(processor, size: tuple[int, int], budget: PixelBudget) -> list[int]:
    limits = {"shortest_edge": budget.min_pixels, "longest_edge": budget.max_pixels}
    out = processor(images=[Image.new("RGB", size)], size=limits, return_tensors="pt")
    return out["image_grid_thw"][0].tolist()


@pytest.mark.parametrize(("family", "width", "height"), _processor_grids())
def test_target_size_is_the_image_processors_own(image_processors, family, width, height) -> None:
    """The server resizes every accepted shape to the grid the checkpoint's processor picks
    from the full image, at the checkpoint's budget and at the server's capped one."""
    processor = image_processors[family]
    factor = processor.patch_size * processor.merge_size
    checkpoint = PixelBudget(processor.size["shortest_edge"], processor.size["longest_edge"])
    for budget in (checkpoint, PixelBudget(checkpoint.min_pixels, 1_003_520)):
        new_width, new_height = target_size(width, height, budget, factor)
        grid = [1, new_height // processor.patch_size, new_width // processor.patch_size]
        assert grid == _processor_grid(processor, (width, height), budget), budget


def test_a_1000x10_image_on_qwen2_5_vl_gets_the_processors_grid(image_processors) -> None:
    processor = image_processors["qwen2.5-vl"]
    budget = PixelBudget(3136, 1_003_520)
    assert target_size(1000, 10, budget, 28) == (560, 28)  # qwen-vl-utils: (1008, 28)
    assert _processor_grid(processor, (1000, 10), budget) == [1, 2, 40]
