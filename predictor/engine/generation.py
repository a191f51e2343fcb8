"""Batched image description with a loaded Qwen-VL model: rows in, completions out.

A row is one conversation (for OIP v2: one image and its prompt). How rows share a call:
`generate` takes one `GenerationConfig`, so rows are grouped
by their sampling settings (temperature, top_p, top_k, repetition_penalty) and each group runs
as one left-padded batch. `max_new_tokens` does not split groups: the batch runs to the largest
limit and a per-row stopping criterion ends each row at its own (a finished row only receives
padding afterwards, which is cut). The same criterion stops rows whose client went away.
Rows with a `seed` only share a call with rows of the same request (`group`), so a seeded
request gives the same text whatever else is running. Greedy rows give the same tokens alone
or in a batch (tested in fp32).

`describe` is not thread-safe: one caller at a time (the engine's worker thread), which also
keeps `seed` reproducible with torch's global generator. `encode` may run on many threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from predictor.engine.vision_graphs import VisionEncoder
from predictor.inputs.images import fit_to_budget
from predictor.inputs.preprocessing import Preprocessor
from predictor.params import PixelBudget, SamplingParams
from predictor.protocol import Completion
from predictor.rows import EncodedRow, Row, StopCheck

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


class _RowTracker(StoppingCriteria):
    """Called by `generate` after every token: feeds each row's state, ends rows that are done
    (own max_new_tokens, stop token or string, or their caller asking them to stop)."""

    def __init__(
        self,
        states: Sequence[_RowState],
        stop_checks: Sequence[StopCheck | None],
        on_step: Callable[[], None] | None,
    ):
        self.states = states
        self.stop_checks = stop_checks
        self.on_step = on_step

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        if self.on_step is not None:
            self.on_step()
        last = input_ids[:, -1].tolist()
        done = [
            state.push(token) or (check is not None and check())
            for state, token, check in zip(self.states, last, self.stop_checks, strict=True)
        ]
        return torch.tensor(done, device=input_ids.device)


class Generator:
    """Owns the model and processor; turns rows into completions."""

    def __init__(
        self, model: Any, processor: Any, static_cache: bool = False, trace_vision: bool = True
    ):
        self.model = model
        self.vision = VisionEncoder(model, trace=trace_vision)  # see predictor.engine.vision_graphs
        # A static KV cache makes decoding shapes fixed, which lets transformers compile the
        # decoding step with torch.compile on CUDA (its auto-compile for compileable caches).
        self.static_cache = static_cache
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

    def describe(
        self,
        rows: Sequence[Row],
        stop_checks: Sequence[StopCheck | None] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> list[Completion]:
        """Completions in the order of `rows`.

        `stop_checks[i]()` is polled after every token; True ends row i early (its completion
        is then meaningless). `on_step` is called after every decoding step.
        """
        checks = list(stop_checks) if stop_checks is not None else [None] * len(rows)
        results: list[Completion | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(row.batch_key, []).append(index)
        for indexes in groups.values():
            batch = [rows[i] for i in indexes]
            completions = self._generate(batch, [checks[i] for i in indexes], on_step)
            for index, completion in zip(indexes, completions, strict=True):
                results[index] = completion
        return [r for r in results if r is not None]

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
        features = self.vision(
            pixel_values.to(self.device, dtype=self.model.dtype),
            tensors["image_grid_thw"].to(self.device),
        )
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

    def _generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        """Every sampling value set, "off" ones included: `generate` fills any value left
        `None` from the checkpoint's generation_config.json (and then from transformers' own
        defaults, top_k 50), which would apply defaults a request turned off. The request's
        resolved `SamplingParams` (predictor.params) are the only source, as on the
        continuous path."""
        greedy = sampling.greedy
        options: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": self.stop_token_ids,
            "pad_token_id": self.pad_token_id,
            "repetition_penalty": sampling.repetition_penalty,
            "min_new_tokens": sampling.min_new_tokens,
            "do_sample": not greedy,
            "temperature": 1.0 if greedy else sampling.temperature,
            "top_p": 1.0 if greedy else sampling.top_p,
            "top_k": 0 if greedy else sampling.top_k,
        }
        if self.static_cache:
            options["cache_implementation"] = "static"
        return GenerationConfig(**options)

    @property
    def checkpoint_sampling(self) -> dict[str, Any]:
        """The values the checkpoint's generation_config.json sets (what transformers loaded
        from it, without its own defaults)."""
        return self.model.generation_config.to_diff_dict()

    @torch.inference_mode()
    def _generate(
        self,
        rows: Sequence[Row],
        stop_checks: Sequence[StopCheck | None],
        on_step: Callable[[], None] | None,
    ) -> list[Completion]:
        inputs = self.inputs_for(rows)
        states = [_RowState(self, row) for row in rows]
        sampling = replace(rows[0].sampling, max_new_tokens=max(s.limit for s in states))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        self.model.generate(
            **inputs,
            generation_config=self._generation_config(sampling),
            stopping_criteria=StoppingCriteriaList([_RowTracker(states, stop_checks, on_step)]),
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        return [state.completion(int(n)) for state, n in zip(states, prompt_tokens, strict=True)]

    def _completion(self, tokens: Sequence[int], row: Row, prompt_tokens: int = 0) -> Completion:
        """The completion `tokens` would give `row` (what `generate` feeds the row's state)."""
        state = _RowState(self, row)
        for token in tokens:
            if state.push(token):
                break
        return state.completion(prompt_tokens)

    def warm_up(self) -> None:
        """One short generation, so the first client does not pay for lazy initialisation."""
        gray = Image.new("RGB", (256, 256), (128, 128, 128))
        image = fit_to_budget(gray, self.default_budget, self.resize_factor)
        self.describe([Row.single(image, "Describe this image.", SamplingParams(max_new_tokens=2))])


def _join(parts: Sequence[Any]) -> Any:
    """Join per-row image features: tuples hold one tensor per image, lists one entry per
    layer (Qwen3-VL's deepstack features)."""
    first = parts[0]
    if isinstance(first, tuple):
        return tuple(item for part in parts for item in part)
    if isinstance(first, list):
        return [_join([part[i] for part in parts]) for i in range(len(first))]
    raise TypeError(f"unexpected image feature type {type(first).__name__}")
