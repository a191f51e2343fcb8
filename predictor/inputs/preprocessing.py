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
from typing import Any

import torch
from PIL import Image

from predictor.params import PixelBudget
from predictor.rows import EncodedRow, Row

TEXT_CACHE_SIZE = 256  # conversations whose tokenized text `Preprocessor.processed` keeps


class Preprocessor:
    """The checkpoint's processor with a cache of tokenized conversations. Thread-safe."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Batched generation appends new tokens on the right, so prompts are padded on the left.
        self.tokenizer.padding_side = "left"
        self.text_inputs: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self._text_lock = threading.Lock()  # runs on many request threads

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
        return self.processor.apply_chat_template(
            list(row.messages), tokenize=False, add_generation_prompt=True
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
