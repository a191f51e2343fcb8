"""An image at its model-input size to the vision encoder's pixel patches, as the checkpoint's
image processor makes them, in a fraction of its time.

Why our own: for a 448x448 image, transformers' `Qwen2VLImageProcessor` took about 2 ms of
the front's CPU per request (a third of it in `patchify`'s float copy of every value twice,
one per temporal frame, the rest in its generic grouping, conversion and validation), the
largest part of what the server spent on a request. Here the front only copies the decoded
image's bytes out of Pillow (`frames`: the raster, rows of RGB pixels, 0.05 ms at 448x448),
and the engine does the rest on its device right before the vision encoder (`normalise`):
the gather into `patchify`'s patch layout (one frame per patch, where `patchify` repeats it
for the temporal axis), the processor's own `rescale_and_normalize`, so the floats are its
floats bit for bit, one cast to the engine's dtype, the frame repeated. On a GPU all of that
is a few kernels on 600 KB; on a CPU engine the gather costs the engine what it spared the
front (0.35 ms at 448x448). The result equals the processor's output cast to that dtype
exactly (tests/test_patches.py checks every family, dtype and several sizes); the
processor's own path stays for any image processor this one does not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

_REQUIRED = (
    "patch_size",
    "temporal_patch_size",
    "merge_size",
    "rescale_and_normalize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
)


@dataclass(frozen=True)
class Patched:
    """One image's processor tensors: `pixel_values` (patches x patch values) and its grid."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor  # [[1, grid_h, grid_w]]

    @property
    def nbytes(self) -> int:
        return self.pixel_values.numel() * self.pixel_values.element_size()


class Patcher:
    """Pixel patches of RGB images already at their model-input size. Thread-safe."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor
        self.fast = all(hasattr(image_processor, name) for name in _REQUIRED) and (
            type(image_processor).__name__.startswith("Qwen2VLImageProcessor")
        )

    def patches(self, image: Image.Image, dtype: torch.dtype = torch.float32) -> Patched:
        """The processor's pixel patches in `dtype`: `frames` then `normalise`, which is what
        the engine's vision encoder receives from the front's uint8 frames."""
        if not self.fast:
            return self._processor_patches(image, dtype)
        framed = self.frames(image)
        if framed is None:
            return self._processor_patches(image, dtype)  # not a model-input size: resize there
        pixels = self.normalise(framed.pixel_values, framed.image_grid_thw, dtype)
        return Patched(pixels, framed.image_grid_thw)

    def frames(self, image: Image.Image) -> Patched | None:
        """The image's pixels as uint8, in raster order (rows of pixels, channels last, as
        Pillow stores them) and shaped `[patches, channel x patch x patch]` like one temporal
        frame of the processor's patches: the same bytes, not yet in the patch layout, which
        `normalise` gives them. None when this patcher cannot make them (`fast` false, or the
        image is not at a model-input size): use `patches` then.

        Why uint8 and raster order: reordering into patches and normalising are work the
        engine does on its device for free (`normalise`), so the front only copies the
        decoded bytes once, and the shared arena carries a quarter of float32's bytes (half
        of bfloat16's), an eighth counting the frame the processor repeats. Several images'
        frames concatenate along the first axis, each image's bytes in one run."""
        if not self.fast:
            return None
        ip = self.image_processor
        patch, merge = int(ip.patch_size), int(ip.merge_size)
        width, height = image.size
        if width % (patch * merge) or height % (patch * merge):
            return None
        # One writable copy of what Pillow holds (np.asarray's is read-only, and torch warns).
        pixels = np.array(image)
        channels = 1 if pixels.ndim == 2 else pixels.shape[2]  # a one-band image: one channel
        grid_h, grid_w = height // patch, width // patch
        return Patched(
            torch.from_numpy(pixels).view(grid_h * grid_w, channels * patch * patch),
            torch.tensor([[1, grid_h, grid_w]], dtype=torch.long),
        )

    def gather(self, frames: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        """uint8 `frames` in raster order (`frames`, one image after another as `grids`
        says) to `patchify`'s patch layout, on their device: per image, `[grid_h/m, grid_w/m,
        m, m, channel, p, p]` from its `[height, width, channel]` pixels."""
        ip = self.image_processor
        patch, merge = int(ip.patch_size), int(ip.merge_size)
        count, values = frames.shape
        channels = values // (patch * patch)
        sizes = [(grid_h, grid_w) for _, grid_h, grid_w in grids.tolist()]
        if sum(grid_h * grid_w for grid_h, grid_w in sizes) != count:
            raise ValueError(f"{count} patches of frames for grids of {grids.tolist()}")
        parts, offset = [], 0
        for grid_h, grid_w in sizes:
            rows = grid_h * grid_w
            shape = (grid_h // merge, merge, patch, grid_w // merge, merge, patch, channels)
            order = (0, 3, 1, 4, 6, 2, 5)
            raster = frames[offset : offset + rows]
            if raster.device.type == "cpu":  # numpy's strided uint8 copy is faster here than
                # torch's for this 7-dimensional permutation (0.35 against 0.6 ms at 448x448)
                gathered = torch.from_numpy(
                    np.ascontiguousarray(raster.numpy().reshape(shape).transpose(order))
                )
            else:
                gathered = raster.reshape(shape).permute(order).contiguous()
            parts.append(gathered.view(rows, values))
            offset += rows
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def normalise(
        self, frames: torch.Tensor, grids: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """uint8 `frames` (`frames`' raster order, on any device; `grids` on the CPU) to the
        processor's pixel patches in `dtype`: `gather` into the patch layout, then its own
        `rescale_and_normalize` (the same float32 operations on every value, so the same
        floats bit for bit), one cast, and each frame repeated `temporal_patch_size` times,
        as `patchify` repeats a still image."""
        ip = self.image_processor
        frames = self.gather(frames, grids)
        count, values = frames.shape
        channels = values // (int(ip.patch_size) ** 2)
        temporal = int(ip.temporal_patch_size)
        normalised = ip.rescale_and_normalize(
            frames.view(count, channels, int(ip.patch_size), int(ip.patch_size)),
            ip.do_rescale,
            ip.rescale_factor,
            ip.do_normalize,
            ip.image_mean,
            ip.image_std,
        )
        if normalised.dtype != dtype:
            normalised = normalised.to(dtype)
        shape = (count, channels, temporal, values // channels)
        repeated = normalised.view(count, channels, 1, -1).expand(shape)
        return repeated.reshape(count, channels * temporal * (values // channels))

    def _processor_patches(self, image: Image.Image, dtype: torch.dtype) -> Patched:
        pixels = image.width * image.height
        processed = self.image_processor(
            images=[image],
            size={"shortest_edge": pixels, "longest_edge": pixels},
            return_tensors="pt",
        )
        return Patched(processed["pixel_values"].to(dtype), processed["image_grid_thw"])
