"""The loaded model with its processor: rows in, model inputs and text out.

A row is one conversation (for OIP v2: one image and its prompt). `Generator` owns what every
part of decoding needs besides the decode loop itself (`predictor.engine.running_batch`): the
stop tokens, turning rows into model inputs (the processor's tensors and the vision encoder's
features, computed ahead of a row's batch by `encode`), merging rows for one prefill, and
turning tokens into text (`_RowState`, which also applies stop strings and streams deltas).

`encode` may run on many threads; everything else runs on the engine's worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from predictor.engine.vision import VisionEncoder
from predictor.engine.vision_cache import VisionCache, vision_key
from predictor.errors import OutOfDeviceMemory
from predictor.inputs.preprocessing import Preprocessor
from predictor.params import PixelBudget
from predictor.protocol import Completion
from predictor.rows import EncodedRow, Row

logger = logging.getLogger(__name__)


# Processor outputs laid out along the token sequence (padded on the left when batching).
_SEQUENCE_KEYS = {"input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"}


class _RowState:
    """One row's output while it generates: its tokens, its text so far, why it ended."""

    def __init__(self, generator: Generator, row: Row):
        self.decode = generator.decode
        self.stop_ids = generator.stop_token_ids
        self.limit = row.sampling.max_new_tokens
        self.stop_strings = row.sampling.stop
        self.min_new_tokens = row.sampling.min_new_tokens
        self.search_from = 0  # stop strings count only in text after min_new_tokens
        self.on_text = row.on_text
        self.tokens: list[int] = []
        self.generated = 0
        self.finish_reason: str | None = None
        self.text: str | None = None  # set when a stop string cut it
        self.emitted = 0  # characters already sent to on_text

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> bool:
        """Take the row's next token; True once the row has ended."""
        if self.finished:
            return True  # padding after the end
        self.generated += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return True
        self.tokens.append(token)
        if self.stop_strings or self.on_text:
            self._follow_text()
        if not self.finished and len(self.tokens) >= self.limit:
            self.finish_reason = "length"
        return self.finished

    def _follow_text(self) -> None:
        text = self.decode(self.tokens)
        if len(self.tokens) < self.min_new_tokens:
            self.search_from = len(text.rstrip("\ufffd"))
            self._emit(text[: self.search_from])
            return
        found = (text.find(s, self.search_from) for s in self.stop_strings)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish_reason = text[:cut], "stop"
            self._emit(self.text)
            return
        # Hold back an unfinished UTF-8 character and anything a stop string may start with.
        safe = len(text.rstrip("\ufffd"))
        for stop in self.stop_strings:
            for size in range(min(len(stop) - 1, safe), 0, -1):
                if text[safe - size : safe] == stop[:size]:
                    safe -= size
                    break
        self._emit(text[:safe])

    def _emit(self, text: str) -> None:
        if self.on_text is not None and len(text) > self.emitted:
            self.on_text(text[self.emitted :])
            self.emitted = len(text)

    def completion(self, prompt_tokens: int) -> Completion:
        text = self.text if self.text is not None else self.decode(self.tokens)
        self._emit(text)
        return Completion(
            text=text,
            finish_reason=self.finish_reason or "length",
            generated_tokens=self.generated,
            prompt_tokens=prompt_tokens,
        )


class Generator:
    """Owns the model and processor; turns rows into completions."""

    def __init__(self, model: Any, processor: Any):
        self.model = model
        self.vision = VisionEncoder(model)  # see predictor.engine.vision
        self.vision_cache = VisionCache(0)  # off until the engine sizes it (--vision_cache_mb)
        self.preprocessor = Preprocessor(processor)  # the processor's CPU work
        self.processor = processor
        self.tokenizer = self.preprocessor.tokenizer
        self.device = model.device
        self.stop_token_ids = self._stop_token_ids()
        self._text_inputs = self.preprocessor.text_inputs
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
        return self.preprocessor.resize_factor

    @property
    def default_budget(self) -> PixelBudget:
        return self.preprocessor.default_budget

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _prompt_text(self, row: Row) -> str:
        return self.preprocessor.prompt_text(row)

    @torch.inference_mode()
    def encode(self, row: Row) -> EncodedRow:
        """One row's model inputs, computed ahead of its batch on the caller's thread.

        Why: the processor's work (normalising, patching, tokenising) and the vision encoder
        then run on the request's thread, in parallel with the batch the engine is decoding,
        instead of on the engine's critical path. The vision encoder sees each image on its
        own anyway (its attention is per image), so encoding an image alone gives the same
        features as encoding it in a batch. `merge` joins encoded rows the way the processor
        and the model would have batched them.
        """
        return self.encode_images(self.preprocessor.encode(row))

    @torch.inference_mode()
    def encode_images(self, encoded: EncodedRow) -> EncodedRow:
        """Run the vision encoder on a row the processor has prepared (`Preprocessor.encode`),
        wherever that ran; a row without pixel patches is returned as it is."""
        if not encoded.needs_vision:
            return encoded
        tensors = dict(encoded.tensors)
        pixel_values = tensors.pop("pixel_values")
        key = None
        if self.vision_cache.enabled:  # an image encoded before is not encoded again
            key = vision_key(
                pixel_values, tensors["image_grid_thw"], self.model.dtype, encoded.pixel_key
            )
            cached = self.vision_cache.get(key)
            if cached is not None:
                return EncodedRow(tensors, cached)
        out_of_memory = False
        try:
            if pixel_values.dtype == torch.uint8:  # the front's frames: normalised here, on
                # the device, where it costs nothing (`Patcher.normalise`: the processor's own
                # arithmetic, bit for bit)
                pixels = self.preprocessor.patcher.normalise(
                    pixel_values.to(self.device), tensors["image_grid_thw"], self.model.dtype
                )
            else:
                pixels = pixel_values.to(self.device, dtype=self.model.dtype)
            features = self.vision(pixels, tensors["image_grid_thw"].to(self.device))
        except torch.OutOfMemoryError:
            # Raised outside this block: inside it the traceback keeps the failed encoder's
            # activations alive, and the cache could not give their memory back.
            out_of_memory = True
        if out_of_memory:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfDeviceMemory("in the vision encoder")
        if key is not None:
            self.vision_cache.put(key, features)
        return EncodedRow(tensors, features)

    def _processed(self, row: Row) -> dict[str, torch.Tensor]:
        return self.preprocessor.processed(row)

    def _process_images(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        return self.preprocessor.process_images(images)

    def _process(self, rows: Sequence[Row]) -> Any:
        return self.preprocessor.process(rows)

    def merge(self, encoded: Sequence[EncodedRow]) -> dict[str, Any]:
        """`generate` arguments for a batch of encoded rows: sequence tensors left-padded to
        one length, the others (image grids) joined, image features joined in row order."""
        length = max(row.tensors["input_ids"].shape[1] for row in encoded)
        merged: dict[str, Any] = {}
        for key in encoded[0].tensors:
            parts = [row.tensors[key] for row in encoded]
            if key in _SEQUENCE_KEYS:
                fill = self.pad_token_id if key == "input_ids" else 0
                parts = [
                    torch.nn.functional.pad(part, (length - part.shape[1], 0), value=fill)
                    for part in parts
                ]
            merged[key] = torch.cat(parts, dim=0).to(self.device)
        features = [row.image_features for row in encoded if row.image_features is not None]
        if features:
            first = features[0]
            joined = {key: _join([f[key] for f in features]) for key in first}
            merged["mm_encoder_outputs"] = {"image": type(first)(**joined)}
        return merged

    def inputs_for(self, rows: Sequence[Row]) -> dict[str, Any]:
        """The model's inputs for rows, encoding those that were not encoded ahead."""
        return self.merge(
            [self.encode_images(row.inputs) if row.inputs else self.encode(row) for row in rows]
        )

    @property
    def checkpoint_sampling(self) -> dict[str, Any]:
        """The values the checkpoint's generation_config.json sets (what transformers loaded
        from it, without its own defaults)."""
        return self.model.generation_config.to_diff_dict()


def _join(parts: Sequence[Any]) -> Any:
    """Join per-row image features: tuples hold one tensor per image, lists one entry per
    layer (Qwen3-VL's deepstack features)."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(item for part in parts for item in part)
    if isinstance(first, list):
        return [_join([part[i] for part in parts]) for i in range(len(first))]
    raise TypeError(f"unexpected image feature type {type(first).__name__}")
