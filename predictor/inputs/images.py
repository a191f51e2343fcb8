"""Turn untrusted bytes into an RGB image the model can take, or a 400 that says why not.

Why one module: every protocol (OIP v2 over REST JSON, REST binary, gRPC, and the OpenAI route)
sends images differently but must accept and refuse exactly the same ones. All checks happen
here, before anything touches the processor or the model:

- size: empty or larger than `max_image_bytes`;
- encoding: strict base64 (`validate=True`), `data:image/...;base64,` URLs;
- format: JPEG, PNG, WebP, GIF (first frame), BMP and TIFF only, whatever the bytes claim;
- decompression bombs: the header's width x height is checked before any pixel is decoded;
- truncated or corrupt files: decoding is forced here, so the error is ours, not the model's;
- orientation and colour: EXIF rotation applied, alpha flattened on white, RGB out.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import resize as resize_tensor

from predictor.errors import InvalidRequest
from predictor.params import PixelBudget

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
MAX_ASPECT_RATIO = 200  # Qwen-VL's processors refuse images more elongated than this.


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost the server before it is decoded."""

    max_bytes: int
    max_decoded_pixels: int


@dataclass(frozen=True)
class ResizeTarget:
    """Where decoding should end: the pixel budget and the side multiple of the model."""

    budget: PixelBudget
    factor: int


# EXIF orientations that turn the stored image by 90 or 270 degrees.
_SWAPS_AXES = {5, 6, 7, 8}


def load_image(data: bytes, limits: ImageLimits, field: str) -> Image.Image:
    """Decode encoded image bytes into a full-size RGB image, refusing anything unsafe."""
    return _decode(data, limits, field, target=None)


def prepare_image(
    data: bytes, limits: ImageLimits, field: str, budget: PixelBudget, factor: int
) -> Image.Image:
    """Decode straight to the size Qwen-VL's processor would choose for this image.

    Why: a 12-megapixel photo becomes a few hundred thousand model pixels. For a JPEG,
    Pillow's `draft()` makes the decoder itself scale by 1/2, 1/4 or 1/8 to the nearest size
    still above the target, which skips most of the decoding work; one resize then lands
    exactly on the target. The target is computed from the full-size dimensions, so the grid
    is the one the processor would compute from the full image.
    """
    return _decode(data, limits, field, target=ResizeTarget(budget, factor))


def _decode(
    data: bytes, limits: ImageLimits, field: str, target: ResizeTarget | None
) -> Image.Image:
    if not data:
        raise InvalidRequest(field, "is empty")
    if len(data) > limits.max_bytes:
        raise InvalidRequest(
            field, f"is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes"
        )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its bomb limit and twice that; treat both as errors.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            _check_dimensions(image.size, limits, field)
            size = None
            if target is not None:
                size = _final_size(image, target)
                if image.format == "JPEG":
                    stored = size[::-1] if _orientation(image) in _SWAPS_AXES else size
                    image.draft("RGB", stored)
            image.seek(0)  # animated GIF/WebP/TIFF: describe the first frame
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # the default returns a copy
            image = to_rgb(image)
            if size is not None and image.size != size:
                image = resize(image, size)
            return image
    except InvalidRequest:
        raise
    except UnidentifiedImageError:
        raise InvalidRequest(
            field, f"is not an image in a supported format ({', '.join(ALLOWED_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(field, f"is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidRequest(field, f"could not be decoded: truncated or corrupt ({exc})") from None


def _orientation(image: Image.Image) -> int:
    return int(image.getexif().get(0x0112, 1) or 1)


def _final_size(image: Image.Image, target: ResizeTarget) -> tuple[int, int]:
    """The model-input size of the image as it will be shown (EXIF rotation applied)."""
    width, height = image.size
    if _orientation(image) in _SWAPS_AXES:
        width, height = height, width
    return target_size(width, height, target.budget, target.factor)


def _check_dimensions(size: tuple[int, int], limits: ImageLimits, field: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidRequest(field, f"has zero size ({width}x{height})")
    if width * height > limits.max_decoded_pixels:
        raise InvalidRequest(
            field,
            f"is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{limits.max_decoded_pixels} (decompression-bomb guard)",
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InvalidRequest(
            field, f"aspect ratio {width}x{height} is more elongated than 1:{MAX_ASPECT_RATIO}"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency flattened on white (how a viewer shows a transparent image)."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """(height, width) as the checkpoint's own image processor computes them: each side
    rounded to a multiple of `factor`; if that exceeds `max_pixels`, both sides scaled down
    (floored, at least `factor`); if it falls below `min_pixels`, both scaled up (ceiled).

    Why our own copy: this is transformers' `Qwen2VLImageProcessor` rule, which every family
    (Qwen3-VL included) uses, and which differs from qwen-vl-utils' on very elongated images
    (it has no `max(factor, ...)` before the budget checks, so a 10-pixel side rounds to 0
    and the image is scaled up instead). Whatever the server resizes to must be exactly what
    the processor would pick, or the model sees another grid than a plain transformers run
    (tests/test_images.py checks it against the processor).
    """
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(width: int, height: int, budget: PixelBudget, factor: int) -> tuple[int, int]:
    """The (width, height) Qwen-VL's processor would resize to: multiples of `factor`
    (patch size x merge size) with width x height inside the budget, aspect ratio kept."""
    new_height, new_width = smart_resize(
        height, width, factor=factor, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels
    )
    return new_width, new_height


def fit_to_budget(image: Image.Image, budget: PixelBudget, factor: int) -> Image.Image:
    """Resize once to the processor's target size, so the processor has nothing left to do."""
    size = target_size(image.width, image.height, budget, factor)
    if size == image.size:
        return image
    return resize(to_rgb(image), size)


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """An RGB image resized to (width, height) the way Qwen-VL's image processor resizes:
    torchvision's antialiased bicubic on uint8, about 4x faster here than Pillow's bicubic."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    width, height = size
    resized = resize_tensor(
        pixels, [height, width], interpolation=InterpolationMode.BICUBIC, antialias=True
    )
    return Image.fromarray(resized.permute(1, 2, 0).contiguous().numpy())
