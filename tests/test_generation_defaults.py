"""Sampling defaults: `--generation_config auto|none`, one rule on every route.

Unit tests resolve request parameters against the real `generation_config.json` values; the
model tests run the tiny Qwen3-VL and Qwen2.5-VL checkpoints, which carry those files, through
the engine's decode path (`RunningBatch`), and check what it actually sampled: the rank of
every generated
token among the model's logits at its step (top_k 20 keeps them under 20; off lets them
anywhere in a vocabulary of 151936 near-uniform logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from hack.make_tiny_model import GENERATION_CONFIGS
from predictor.engine.generation import Generator
from predictor.engine.loading import load_model
from predictor.engine.running_batch import RunningBatch
from predictor.inputs.images import fit_to_budget
from predictor.params import (
    PixelBudget,
    RequestLimits,
    SamplingDefaults,
    SamplingParams,
    parse_generation_params,
    sampling_defaults,
)
from predictor.rows import Row
from predictor.settings import Settings
from tests import images
from tests.conftest import TINY_MODEL_FIXTURES

QWEN3 = SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.0)
QWEN2_5 = SamplingDefaults(temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05)
SEEDS = range(6)


def limits(defaults: SamplingDefaults) -> RequestLimits:
    return RequestLimits(16, 64, PixelBudget(4096, 100_000), 100_000, 4, defaults)


def resolved(request: dict[str, Any], defaults: SamplingDefaults) -> SamplingParams:
    return parse_generation_params(request, limits(defaults))[0]


@pytest.mark.parametrize(("family", "expected"), [("qwen3-vl", QWEN3), ("qwen2.5-vl", QWEN2_5)])
def test_auto_takes_the_real_generation_config(family: str, expected: SamplingDefaults) -> None:
    assert sampling_defaults("auto", GENERATION_CONFIGS[family]) == expected
    assert sampling_defaults("none", GENERATION_CONFIGS[family]) == SamplingDefaults()


def test_without_do_sample_a_checkpoint_decodes_greedily_but_keeps_its_penalty() -> None:
    greedy = {"do_sample": False, "temperature": 0.7, "top_k": 20, "repetition_penalty": 1.1}
    assert sampling_defaults("auto", greedy) == SamplingDefaults(repetition_penalty=1.1)


def test_a_silent_request_gets_the_defaults() -> None:
    params = resolved({}, QWEN3)
    assert (params.temperature, params.top_p, params.top_k) == (0.7, 0.8, 20)
    assert resolved({}, SamplingDefaults()).greedy


def test_the_request_wins_and_off_means_off() -> None:
    params = resolved(
        {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}, QWEN2_5
    )
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (
        1.0,
        0,
        1.0,
        1.0,
    )
    assert resolved({"temperature": 0}, QWEN3).greedy
    mixed = resolved({"top_k": 5}, QWEN3)
    assert (mixed.temperature, mixed.top_p, mixed.top_k) == (0.7, 0.8, 5)


# ---- on the tiny checkpoints, through the decoding step ---------------------------------------


@pytest.fixture(scope="module", params=["qwen3-vl", "qwen2.5-vl"])
def family_generator(request: pytest.FixtureRequest) -> tuple[str, Generator]:
    model_dir: Path = request.getfixturevalue(TINY_MODEL_FIXTURES[request.param])
    loaded = load_model(Settings(model_dir=str(model_dir), device="cpu", dtype="float32"))
    return request.param, Generator(loaded.model, loaded.processor)


def generate(generator: Generator, sampling: SamplingParams) -> list[int]:
    """The tokens one row generates, the end-of-turn token excluded."""
    picture = fit_to_budget(images.gradient((96, 64)), generator.default_budget, 32)
    row = Row.single(picture, "Describe this image.", sampling)
    seen: list[list[int]] = []
    decode = generator.decode
    generator.decode = lambda tokens: seen.append(list(tokens)) or decode(tokens)  # type: ignore[method-assign]
    try:
        batch = RunningBatch(generator, max_rows=2, max_len=512)
        batch.admit([row], [0], [None])
        while len(batch):
            batch.step()
    finally:
        del generator.decode
    return seen[-1]


@torch.inference_mode()
def ranks(generator: Generator, tokens: list[int]) -> list[int]:
    """Each token's rank among the logits the model gives at its step (teacher forcing)."""
    picture = fit_to_budget(images.gradient((96, 64)), generator.default_budget, 32)
    row = Row.single(picture, "Describe this image.", SamplingParams(max_new_tokens=1))
    inputs = generator.inputs_for([row])
    prompt = inputs["input_ids"].shape[1]
    extra = torch.tensor([tokens], dtype=torch.long)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1
        )
    logits = generator.model(**inputs).logits[0, prompt - 1 : -1]
    chosen = logits.gather(1, extra.view(-1, 1))
    return (logits > chosen).sum(dim=1).tolist()


def defaults_of(generator: Generator, setting: str) -> SamplingDefaults:
    return sampling_defaults(setting, generator.checkpoint_sampling)


@pytest.mark.slow
def test_auto_applies_and_none_leaves_out_the_checkpoint_defaults(family_generator):
    family, generator = family_generator
    expected = {"qwen3-vl": QWEN3, "qwen2.5-vl": QWEN2_5}[family]
    assert defaults_of(generator, "auto") == expected
    auto, none = limits(expected), limits(defaults_of(generator, "none"))

    def texts(request: dict[str, Any], request_limits: RequestLimits) -> list[list[int]]:
        return [
            generate(generator, parse_generation_params({**request, "seed": s}, request_limits)[0])
            for s in SEEDS
        ]

    greedy = generate(generator, SamplingParams(max_new_tokens=16))
    if family == "qwen3-vl":
        sampled = texts({}, auto)  # temperature 0.7, top_p 0.8, top_k 20
        assert len({tuple(t) for t in sampled}) > 1
        assert max(max(ranks(generator, t)) for t in sampled) < 20
        assert texts({}, none) == [greedy] * len(SEEDS)
    else:
        # top_k 1 and repetition_penalty 1.05: the penalised greedy text, whatever the seed
        penalised = generate(generator, SamplingParams(max_new_tokens=16, repetition_penalty=1.05))
        assert texts({"temperature": 1.0}, auto) == [penalised] * len(SEEDS)
        assert len({tuple(t) for t in texts({"temperature": 1.0}, none)}) > 1
    # Off means off under auto: unrestricted sampling reaches far beyond the top 20.
    off = texts({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}, auto)
    assert max(max(ranks(generator, t)) for t in off) > 1000
