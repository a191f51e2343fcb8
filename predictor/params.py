"""Generation parameters of a request: names, types, ranges and server-side limits.

Why a module of its own: OIP v2 request parameters and (later) OpenAI body fields carry the same
knobs; both are checked here so a value refused on one route is refused on the other, with a
message that names the parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from predictor.errors import InvalidRequest

MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1_000_000


@dataclass(frozen=True)
class PixelBudget:
    """The model-input pixel range of one image, as Qwen-VL's `min_pixels`/`max_pixels`."""

    min_pixels: int
    max_pixels: int


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one description. temperature 0 means greedy decoding."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the text (not included in it)
    # Tokens generated before a stop token or string may end the row: stop tokens are masked
    # until then. `ignore_eos` is min_new_tokens = max_new_tokens (exactly that many tokens).
    min_new_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for each sampling parameter it does not set itself.

    Why: real checkpoints ship sampling defaults in `generation_config.json` (Qwen3-VL:
    temperature 0.7, top_p 0.8, top_k 20; Qwen2.5-VL: temperature 0.1, top_p 0.001, top_k 1,
    repetition_penalty 1.05), and their model cards' numbers are measured with them. With
    `--generation_config auto` a silent request gets them, as vLLM does by default; with
    `none` it gets these greedy defaults. Either way a value the request sends wins, and the
    "off" values (top_k 0, top_p 1, repetition_penalty 1) mean off: both engine paths apply
    exactly the resolved `SamplingParams`, never the checkpoint's file behind them.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, values: Mapping[str, Any]) -> SamplingDefaults:
        """The defaults a `generation_config.json` (as a dict of the values it sets) means
        under transformers' rules: without `do_sample` it decodes greedily, so temperature,
        top_p and top_k only count when it samples; repetition_penalty counts either way."""
        penalty = values.get("repetition_penalty")
        defaults = cls(repetition_penalty=float(penalty) if penalty is not None else 1.0)
        if not values.get("do_sample"):
            return defaults
        temperature = values.get("temperature")
        top_p, top_k = values.get("top_p"), values.get("top_k")
        return cls(
            temperature=float(temperature) if temperature is not None else 1.0,
            top_p=float(top_p) if top_p is not None else 1.0,
            top_k=int(top_k) if top_k is not None else 0,
            repetition_penalty=defaults.repetition_penalty,
        )


def sampling_defaults(setting: str, checkpoint: Mapping[str, Any]) -> SamplingDefaults:
    """The defaults of `--generation_config` (`auto` or `none`) for a checkpoint whose
    generation_config.json sets `checkpoint`."""
    if setting == "auto":
        return SamplingDefaults.from_generation_config(checkpoint)
    return SamplingDefaults()


@dataclass(frozen=True)
class RequestLimits:
    """Server flags that bound what a request may ask for, plus the defaults it gets."""

    max_new_tokens: int
    max_new_tokens_limit: int
    default_budget: PixelBudget
    max_pixels_limit: int
    max_images_per_request: int
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    max_model_len: int = 4096  # prompt and output tokens of one row


GENERATION_PARAMETERS = (
    "max_new_tokens",
    "min_new_tokens",
    "ignore_eos",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "min_pixels",
    "max_pixels",
)
# Parameters that take a whole number, and those that take any number (the rest are floats).
INTEGER_PARAMETERS = frozenset(
    {"max_new_tokens", "min_new_tokens", "top_k", "seed", "min_pixels", "max_pixels"}
)
NUMBER_PARAMETERS = frozenset({"temperature", "top_p", "repetition_penalty"})
_INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
_NUMBER_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def number_from_text(name: str, text: str) -> Any:
    """A numeric parameter sent as text, as the number it spells exactly; otherwise the text.

    Why: KServe's gRPC proto has no double parameter, so its own client can send
    `temperature` 0.5 only as the string "0.5". A string that is exactly a number of the
    parameter's kind ("0.5", "1e-3"; "4" for an integer) is that number; anything else
    ("0.5 ", "nan", "4.0" for an integer) stays a string and is refused as one.
    """
    if name in INTEGER_PARAMETERS and _INTEGER_TEXT.fullmatch(text):
        return int(text)
    if name in NUMBER_PARAMETERS and _NUMBER_TEXT.fullmatch(text):
        return float(text)
    return text


def _int(params: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(name, f"must be an integer, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise InvalidRequest(name, f"must be between {lo} and {hi}, got {value}")
    return value


def _bool(params: Mapping[str, Any], name: str) -> bool | None:
    value = params.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise InvalidRequest(name, f"must be true or false, got {type(value).__name__} {value!r}")


def _float(
    params: Mapping[str, Any], name: str, lo: float, hi: float, *, lo_open: bool = False
) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(name, f"must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    below = value <= lo if lo_open else value < lo
    if math.isnan(value) or below or value > hi:
        bracket = "(" if lo_open else "["
        raise InvalidRequest(name, f"must be in {bracket}{lo}, {hi}], got {value}")
    return value


def parse_generation_params(
    params: Mapping[str, Any], limits: RequestLimits
) -> tuple[SamplingParams, PixelBudget]:
    """Validate the generation parameters in `params` (other keys are the caller's business)."""
    max_new_tokens = _int(params, "max_new_tokens", 1, limits.max_new_tokens_limit)
    max_new_tokens = max_new_tokens or limits.max_new_tokens
    min_new_tokens = _int(params, "min_new_tokens", 0, limits.max_new_tokens_limit) or 0
    if min_new_tokens > max_new_tokens:
        raise InvalidRequest(
            "min_new_tokens",
            f"({min_new_tokens}) must not exceed max_new_tokens ({max_new_tokens})",
        )
    if _bool(params, "ignore_eos"):
        min_new_tokens = max_new_tokens
    default = limits.sampling_defaults
    temperature = _float(params, "temperature", 0.0, MAX_TEMPERATURE)
    top_p = _float(params, "top_p", 0.0, 1.0, lo_open=True)
    top_k = _int(params, "top_k", 0, MAX_TOP_K)
    repetition_penalty = _float(params, "repetition_penalty", 0.0, 10.0, lo_open=True)
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        temperature=default.temperature if temperature is None else temperature,
        top_p=default.top_p if top_p is None else top_p,
        top_k=default.top_k if top_k is None else top_k,
        repetition_penalty=(
            default.repetition_penalty if repetition_penalty is None else repetition_penalty
        ),
        seed=_int(params, "seed", 0, MAX_SEED),
    )
    return sampling, _pixel_budget(params, limits)


def _pixel_budget(params: Mapping[str, Any], limits: RequestLimits) -> PixelBudget:
    default = limits.default_budget
    max_pixels = _int(params, "max_pixels", 1, limits.max_pixels_limit)
    min_pixels = _int(params, "min_pixels", 1, limits.max_pixels_limit)
    budget = PixelBudget(
        min_pixels=min_pixels if min_pixels is not None else default.min_pixels,
        max_pixels=max_pixels if max_pixels is not None else default.max_pixels,
    )
    if budget.min_pixels > budget.max_pixels:
        field = "min_pixels" if min_pixels is not None else "max_pixels"
        raise InvalidRequest(
            field,
            f"min_pixels ({budget.min_pixels}) must not exceed max_pixels ({budget.max_pixels})",
        )
    return budget
