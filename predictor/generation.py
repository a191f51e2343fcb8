"""Batched image description with a loaded Qwen-VL model: rows in, completions out.

Why rows are grouped by sampling settings: `generate` takes one `GenerationConfig` per call, so
rows that share their settings (the common case: every image of one request, or many clients
using the defaults) run as one left-padded batch, and rows with different settings run as
separate batches. Greedy rows give the same tokens alone or in a batch (tested in fp32).

Not thread-safe: the caller runs one `describe` at a time (the model server does it on one
worker thread), which is also what keeps `seed` reproducible with torch's global generator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig

from predictor.images import PixelBudget, fit_to_budget
from predictor.params import SamplingParams
from predictor.protocol import Completion

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One image to describe, already resized to its pixel budget (see `images.fit_to_budget`)."""

    image: Image.Image
    prompt: str
    sampling: SamplingParams


class Generator:
    """Owns the model and processor; turns rows into completions."""

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Batched generation appends new tokens on the right, so prompts are padded on the left.
        self.tokenizer.padding_side = "left"
        self.device = model.device
        self.stop_token_ids = self._stop_token_ids()
        self.pad_token_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.stop_token_ids[0]
        )

    def _stop_token_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end not in ids:
            ids.append(im_end)
        return [i for i in ids if i is not None]

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

    def describe(self, rows: Sequence[Row]) -> list[Completion]:
        """Completions in the order of `rows`; rows with equal sampling share a batch."""
        results: list[Completion | None] = [None] * len(rows)
        groups: dict[SamplingParams, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(row.sampling, []).append(index)
        for sampling, indexes in groups.items():
            batch = [rows[i] for i in indexes]
            for index, completion in zip(indexes, self._generate(batch, sampling), strict=True):
                results[index] = completion
        return [r for r in results if r is not None]

    def _prompt_text(self, prompt: str) -> str:
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def _inputs(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        # Images arrive at their final size; a size range that contains every one of them keeps
        # the processor from resizing again (which would change the grid and cost time).
        pixels = [row.image.width * row.image.height for row in rows]
        inputs = self.processor(
            text=[self._prompt_text(row.prompt) for row in rows],
            images=[row.image for row in rows],
            padding=True,
            return_tensors="pt",
            size={"shortest_edge": min(pixels), "longest_edge": max(pixels)},
        )
        dtype = self.model.dtype
        return {
            key: value.to(self.device, dtype=dtype)
            if key == "pixel_values" and value.is_floating_point()
            else value.to(self.device)
            for key, value in inputs.items()
        }

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        options: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.pad_token_id,
            "repetition_penalty": sampling.repetition_penalty,
        }
        if sampling.greedy:
            options["do_sample"] = False
        else:
            options.update(
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k or None,
            )
        return GenerationConfig(**options)

    @torch.inference_mode()
    def _generate(self, rows: Sequence[Row], sampling: SamplingParams) -> list[Completion]:
        inputs = self._inputs(rows)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        output = self.model.generate(**inputs, generation_config=self._generation_config(sampling))
        prompt_length = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        new_tokens = output[:, prompt_length:].tolist()
        return [
            self._completion(tokens, int(n_prompt))
            for tokens, n_prompt in zip(new_tokens, prompt_tokens, strict=True)
        ]

    def _completion(self, tokens: list[int], prompt_tokens: int) -> Completion:
        """Cut at the first stop token (rows that stopped early are padded after it)."""
        stop_at = next((i for i, t in enumerate(tokens) if t in self.stop_token_ids), None)
        if stop_at is None:
            kept, finish_reason, generated = tokens, "length", len(tokens)
        else:
            kept, finish_reason, generated = tokens[:stop_at], "stop", stop_at + 1
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(
            text=text,
            finish_reason=finish_reason,
            generated_tokens=generated,
            prompt_tokens=prompt_tokens,
        )

    def warm_up(self) -> None:
        """One short generation, so the first client does not pay for lazy initialisation."""
        gray = Image.new("RGB", (256, 256), (128, 128, 128))
        image = fit_to_budget(gray, self.default_budget, self.resize_factor)
        self.describe([Row(image, "Describe this image.", SamplingParams(max_new_tokens=2))])
