"""Encoded test images of every supported format, and broken ones, made in memory."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def solid(size: tuple[int, int] = (96, 72), color: tuple[int, ...] = (200, 40, 40)) -> Image.Image:
    mode = "RGBA" if len(color) == 4 else "RGB"
    return Image.new(mode, size, color)


def jpeg(size: tuple[int, int] = (96, 72), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    return encode(solid(size, color), "JPEG", quality=90)


def gradient(size: tuple[int, int] = (128, 96)) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size)
    image.putdata(
        [(x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)]
    )
    return image


def every_format() -> dict[str, bytes]:
    """One small image per supported format (GIF animated, PNG with alpha)."""
    frames = [solid((40, 30), (255, 0, 0)), solid((40, 30), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    return {
        "jpeg": jpeg(),
        "png": encode(solid((50, 40), (10, 200, 10, 128)), "PNG"),
        "webp": encode(solid((50, 40)), "WEBP"),
        "gif": gif.getvalue(),
        "bmp": encode(solid((50, 40)), "BMP"),
        "tiff": encode(solid((50, 40)), "TIFF"),
    }


def rotate_exif(orientation: int) -> bytes:
    """EXIF bytes with only an orientation tag (6: shown rotated 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def exif_rotated_jpeg() -> bytes:
    """A 60x20 JPEG whose EXIF orientation (6: rotate 90° clockwise) makes it 20x60."""
    return encode(solid((60, 20)), "JPEG", exif=rotate_exif(6))


def truncated_jpeg() -> bytes:
    data = encode(gradient((256, 256)), "JPEG", quality=95)
    return data[: len(data) // 2]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds one tiny compressed row: a bomb's header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )
