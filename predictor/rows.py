"""The unit of work between the front and the engine: a row is one conversation to complete.

Why a module of its own: the request path builds rows (`predictor.model`, `predictor.openai`),
the processor fills in their model inputs (`predictor.inputs.preprocessing`) and the engine
decodes them (`predictor.engine`). Each of those imports this module and none imports another
for it, so the front's packages and the engine's stay apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from predictor.errors import InvalidRequest
from predictor.params import SamplingParams

StopCheck = Callable[[], bool]
TextSink = Callable[[str], None]


@dataclass(frozen=True)
class EncodedRow:
    """A row's model inputs, computed before its batch: the processor's tensors (CPU; with
    `pixel_values` until the vision encoder has run) and the vision encoder's output."""

    tensors: dict[str, torch.Tensor]
    image_features: Any = None  # the vision encoder's output (a transformers ModelOutput)
    # What the pixels were made from (`predictor.inputs.input_cache.pixel_key`): the vision
    # cache's key without hashing the pixels again. None: the engine hashes the pixels.
    pixel_key: bytes | None = None

    @property
    def needs_vision(self) -> bool:
        return "pixel_values" in self.tensors


@dataclass(frozen=True)
class Row:
    """One conversation to complete: chat messages whose `{"type": "image"}` parts stand for
    `images`, in order. Images are already at their model-input size (`images.prepare_image`).
    """

    images: tuple[Image.Image, ...]
    messages: tuple[dict[str, Any], ...]
    sampling: SamplingParams
    group: int = 0  # the request it belongs to; only matters for seeded rows
    inputs: EncodedRow | None = field(default=None, compare=False)  # see Generator.encode
    on_text: TextSink | None = field(default=None, compare=False)  # streamed text deltas
    # `sampling.guide` compiled (`predictor.inputs.guides.CompiledGuide`): the front compiles
    # it, and it crosses to the engine process as xgrammar's serialised form.
    grammar: Any = field(default=None, compare=False)

    @classmethod
    def single(cls, image: Image.Image, prompt: str, sampling: SamplingParams, **kw: Any) -> Row:
        """The OIP v2 case: one user turn, the image then the prompt."""
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        return cls((image,), ({"role": "user", "content": content},), sampling, **kw)

    @property
    def batch_key(self) -> tuple:
        """Rows with equal keys can share one generate call."""
        s = self.sampling
        key = (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.min_new_tokens, s.seed)
        return key if s.seed is None else (*key, self.group)


StopCheck = Callable[[], bool]
TextSink = Callable[[str], None]


def check_fits(row: Row, max_model_len: int, field: str) -> None:
    """Refuse (400, naming `field`) a row whose prompt and token limit exceed the tokens a
    batch slot holds (`--max_model_len`), before it reaches the engine; `row.inputs` must be
    encoded (its token count includes the image tokens)."""
    assert row.inputs is not None
    prompt = int(row.inputs.tensors["input_ids"].shape[1])
    wanted = row.sampling.max_new_tokens
    if prompt + wanted > max_model_len:
        raise InvalidRequest(
            field,
            f"the prompt's {prompt} tokens (images included) and {wanted} new tokens exceed "
            f"this server's context of {max_model_len} tokens (--max_model_len)",
        )
