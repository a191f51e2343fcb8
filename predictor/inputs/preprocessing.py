"""The processor's CPU work for a row: chat template, tokens, image patches.

Why apart from `predictor.engine.generation`: this part needs the checkpoint's processor but not the
model, so it can run wherever requests are parsed (the server's request threads) while the
model, its vision encoder and the decode loop live elsewhere (the engine, possibly in a process
of its own: `predictor.engine.core`). Tensors come out on the CPU; the vision encoder runs
later, where the model is.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from predictor.inputs.images import ImageLimits, prepare_image
from predictor.inputs.input_cache import InputCache, ProcessedImage, cache_key, pixel_key
from predictor.inputs.patches import Patcher
from predictor.params import PixelBudget
from predictor.rows import EncodedRow, Row

TEXT_CACHE_SIZE = 256  # conversations whose tokenized text `Preprocessor.processed` keeps


class Preprocessor:
    """The checkpoint's processor with a cache of tokenized conversations. Thread-safe."""

    def __init__(self, processor: Any, cache_bytes: int = 0):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Batched generation appends new tokens on the right, so prompts are padded on the left.
        self.tokenizer.padding_side = "left"
        self.text_inputs: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._prompts: OrderedDict[str, str] = OrderedDict()  # conversation -> template text
        self._text_lock = threading.Lock()  # runs on many request threads
        self.patcher = Patcher(processor.image_processor)
        self.cache = InputCache(cache_bytes)
        # The engine's dtype, once known: for an image processor `Patcher.frames` does not
        # know, patches are made in it (the vision encoder casts to it anyway).
        self.pixel_dtype = torch.float32

    @property
    def resize_factor(self) -> int:
        """Image sides must be multiples of this: patch size x spatial merge size."""
        image_processor = self.processor.image_processor
        return int(image_processor.patch_size) * int(image_processor.merge_size)

    @property
    def default_budget(self) -> PixelBudget:
        """The checkpoint's own min/max pixels (from its preprocessor config)."""
        size = self.processor.image_processor.size
        get = size.get if hasattr(size, "get") else lambda key: getattr(size, key, None)
        return PixelBudget(
            min_pixels=int(get("shortest_edge")), max_pixels=int(get("longest_edge"))
        )

    def prompt_text(self, row: Row) -> str:
        """The chat template's text for the row's conversation (the last `TEXT_CACHE_SIZE`
        kept: one prompt usually serves many requests, and the template costs 0.1 ms)."""
        key = repr(row.messages)
        with self._text_lock:
            text = self._prompts.get(key)
        if text is None:
            text = self.processor.apply_chat_template(
                list(row.messages), tokenize=False, add_generation_prompt=True
            )
            with self._text_lock:
                self._prompts[key] = text
                while len(self._prompts) > TEXT_CACHE_SIZE:
                    self._prompts.popitem(last=False)
        return text

    def image(
        self, data: bytes, limits: ImageLimits, field: str, budget: PixelBudget
    ) -> tuple[ProcessedImage, bool]:
        """Encoded image bytes to the model's input (decoded, checked, resized, patched), and
        whether it came from the input cache (`predictor.inputs.input_cache`)."""
        # Computed even with the cache off: the engine's vision cache keys on it (`pixel_key`).
        key = cache_key(data, budget, self.pixel_dtype)
        if self.cache.enabled:
            cached = self.cache.get(key)
            if cached is not None:
                return cached, True
        image = prepare_image(data, limits, field, budget, self.resize_factor)
        # uint8 frames the engine normalises (`Patcher.normalise`), or, for an image processor
        # the patcher does not know, the processor's own patches in the engine's dtype.
        patched = self.patcher.frames(image) or self.patcher.patches(image, self.pixel_dtype)
        processed = ProcessedImage(image.size, patched, key)
        if self.cache.enabled:
            self.cache.put(key, processed)
        return processed, False

    def encode_processed(self, row: Row, images: Sequence[ProcessedImage]) -> EncodedRow:
        """A row's processor tensors from its conversation and its images, already processed
        (`image`); the row itself carries no images. Its text part comes from the same cache
        as `processed`'s; on a miss the processor runs on blank images of the same sizes (the
        text depends only on the images' grids)."""
        key = (self.prompt_text(row), tuple(image.size for image in images))
        with self._text_lock:
            text = self.text_inputs.get(key)
            if text is not None:
                self.text_inputs.move_to_end(key)
        if text is None:
            blanks = tuple(Image.new("RGB", image.size) for image in images)
            processed = dict(self.process([replace(row, images=blanks)]))
            text = {
                k: v for k, v in processed.items() if k not in ("pixel_values", "image_grid_thw")
            }
            with self._text_lock:
                self.text_inputs[key] = text
                while len(self.text_inputs) > TEXT_CACHE_SIZE:
                    self.text_inputs.popitem(last=False)
        if not images:
            return EncodedRow(dict(text))
        pixels = [image.patched.pixel_values for image in images]
        grids = [image.patched.image_grid_thw for image in images]
        if len({p.dtype for p in pixels}) > 1:  # frames beside float patches (an image off the
            # model-input grid, never on the request path): one dtype for the concatenation
            pixels = [
                self.patcher.normalise(p, grid, self.pixel_dtype) if p.dtype == torch.uint8 else p
                for p, grid in zip(pixels, grids, strict=True)
            ]
        keys = [image.key for image in images if image.key is not None]
        return EncodedRow(
            {
                **text,
                "pixel_values": pixels[0] if len(pixels) == 1 else torch.cat(pixels),
                "image_grid_thw": grids[0] if len(grids) == 1 else torch.cat(grids),
            },
            pixel_key=pixel_key(keys) if len(keys) == len(images) else None,
        )

    def encode(self, row: Row) -> EncodedRow:
        """The row's processor tensors, images still as pixel patches."""
        return EncodedRow(self.processed(row))

    def processed(self, row: Row) -> dict[str, torch.Tensor]:
        """The processor's output for one row. Its text part (chat template, image placeholders
        expanded, tokens) depends only on the conversation and the image grids, and most
        requests repeat both (one prompt for a folder of same-size photos), so it is kept for
        the last `TEXT_CACHE_SIZE` of them and only the images go through the processor.
        Images arrive at their model-input size, which fixes their grid, so the sizes key it."""
        if not row.images:
            return dict(self.process([row]))
        key = (self.prompt_text(row), tuple(image.size for image in row.images))
        with self._text_lock:
            text = self.text_inputs.get(key)
            if text is not None:
                self.text_inputs.move_to_end(key)
        if text is not None:
            return {**text, **self.process_images(row.images)}
        processed = dict(self.process([row]))
        text = {k: v for k, v in processed.items() if k not in ("pixel_values", "image_grid_thw")}
        with self._text_lock:
            self.text_inputs[key] = text
            while len(self.text_inputs) > TEXT_CACHE_SIZE:
                self.text_inputs.popitem(last=False)
        return processed

    def process_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return dict(
            self.processor.image_processor(
                images=list(images), size=_size_range(images), return_tensors="pt"
            )
        )

    def process(self, rows: Sequence[Row]) -> Any:
        """The processor on rows whose images are already at their model-input size."""
        images = [image for row in rows for image in row.images]
        return self.processor(
            text=[self.prompt_text(row) for row in rows],
            images=images,
            padding=True,
            return_tensors="pt",
            size=_size_range(images),
        )


def _size_range(images: Sequence[Image.Image]) -> dict[str, int]:
    """A processor `size` whose pixel range holds every image as it is, so the processor
    does not resize them again (that would change the grid and cost time)."""
    pixels = [image.width * image.height for image in images]
    return {"shortest_edge": min(pixels), "longest_edge": max(pixels)}
