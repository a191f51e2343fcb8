"""Generation parameters of a request: names, types, ranges and server-side limits.

Why a module of its own: OIP v2 request parameters and (later) OpenAI body fields carry the same
knobs; both are checked here so a value refused on one route is refused on the other, with a
message that names the parameter.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from predictor.errors import InvalidRequest

MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 2.0
MAX_TOP_K = 1_000_000
DEFAULT_MAX_GUIDE_BYTES = 64 * 1024

# Guided decoding on OIP v2, with TensorRT-LLM's Triton names (request parameters, or optional
# BYTES inputs of shape [1] as its Triton models declare them).
GUIDE_TYPE_PARAMETER = "guided_decoding_guide_type"
GUIDE_PARAMETER = "guided_decoding_guide"
# Its guide types -> ours. `json` (TensorRT-LLM: any JSON) is a schema of our own.
GUIDE_TYPES = {
    "json": "json_schema",
    "json_schema": "json_schema",
    "regex": "regex",
    "ebnf_grammar": "ebnf",
}
ANY_JSON_SCHEMA = '{"type": ["object", "array"]}'
JSON_OBJECT_SCHEMA = '{"type": "object"}'


@dataclass(frozen=True)
class Guide:
    """What a row's whole output must match: guided (constrained) decoding.

    The front compiles it (`predictor.inputs.guides`) before the row reaches the engine, and
    the engine masks, at every step, the tokens the grammar does not allow.
    kind: `json_schema` (text: the schema, JSON), `regex`, `choice` (text: a JSON list of the
    allowed strings) or `ebnf` (xgrammar's EBNF, with a `root` rule). `field` is the request
    field an error names; it is not part of what the guide means.
    """

    kind: str
    text: str
    field: str = field(default="", compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.text)

    @classmethod
    def choice(cls, choices: list[str], field: str) -> Guide:
        """One of `choices`, exactly (an empty list or an empty choice is refused)."""
        if not choices:
            raise InvalidRequest(field, "must list at least one choice")
        if any(not isinstance(c, str) or not c for c in choices):
            raise InvalidRequest(field, "choices must be non-empty strings")
        return cls("choice", json.dumps(choices, ensure_ascii=False), field)


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
    guide: Guide | None = None  # what the output must match (guided decoding), if anything

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
    max_guide_bytes: int = DEFAULT_MAX_GUIDE_BYTES  # a schema, regex, grammar or choice list


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
    GUIDE_TYPE_PARAMETER,
    GUIDE_PARAMETER,
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
    params: Mapping[str, Any], limits: RequestLimits, guide: Guide | None = None
) -> tuple[SamplingParams, PixelBudget]:
    """Validate the generation parameters in `params` (other keys are the caller's business).
    `guide` is a guide the caller read from its own fields (the OpenAI route's); otherwise
    the v2 guide parameters in `params` give it."""
    if guide is None:
        guide = parse_guide(params.get(GUIDE_TYPE_PARAMETER), params.get(GUIDE_PARAMETER))
    if guide is not None:
        check_guide_size(guide, limits)
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
        if guide is not None:
            raise InvalidRequest(
                "ignore_eos", "cannot be combined with guided decoding, which ends the output"
            )
    if min_new_tokens and guide is not None:
        raise InvalidRequest(
            "min_new_tokens",
            "cannot be combined with guided decoding: the grammar decides where the output ends",
        )
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
        guide=guide,
    )
    return sampling, _pixel_budget(params, limits)


def parse_guide(guide_type: Any, guide: Any) -> Guide | None:
    """The v2 guide parameters (`guided_decoding_guide_type`, `guided_decoding_guide`) as a
    `Guide`, or None when neither is set. Only the form is checked here; whether the guide
    compiles is `predictor.inputs.guides`' business."""
    if guide_type is None and guide is None:
        return None
    accepted = ", ".join(GUIDE_TYPES)
    if guide_type is None:
        raise InvalidRequest(
            GUIDE_TYPE_PARAMETER, f"is required with {GUIDE_PARAMETER} (one of {accepted})"
        )
    if not isinstance(guide_type, str) or guide_type not in GUIDE_TYPES:
        raise InvalidRequest(GUIDE_TYPE_PARAMETER, f"must be one of {accepted}, got {guide_type!r}")
    if guide_type == "json":
        if guide not in (None, ""):
            raise InvalidRequest(
                GUIDE_PARAMETER, "is not used with guide type json (any JSON); use json_schema"
            )
        return Guide("json_schema", ANY_JSON_SCHEMA, GUIDE_PARAMETER)
    if not isinstance(guide, str) or not guide:
        raise InvalidRequest(
            GUIDE_PARAMETER, f"must be a non-empty string with guide type {guide_type}"
        )
    return Guide(GUIDE_TYPES[guide_type], guide, GUIDE_PARAMETER)


def check_guide_size(guide: Guide, limits: RequestLimits) -> None:
    size = len(guide.text.encode("utf-8"))
    if size > limits.max_guide_bytes:
        raise InvalidRequest(
            guide.field,
            f"is {size} bytes, more than this server's limit of {limits.max_guide_bytes} "
            "(--max_guide_bytes)",
        )


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
