"""The continuous path's per-row sampler draws from the distribution transformers' warpers
give (`generate`'s order: repetition penalty, temperature, top_k, top_p), while looking
at only the candidates that can survive. No model: logits of a Qwen-sized vocabulary."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from predictor.engine.running_batch import _Sampler
from predictor.params import SamplingParams

VOCAB = 151_936
HISTORY = torch.tensor([5, 17, 17, 40_000, 151_645])


def reference(sampling: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    processors = LogitsProcessorList()
    if sampling.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty))
    processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
        processors.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(sampling.top_p))
    scores = processors(HISTORY.view(1, -1), logits.view(1, -1).float())
    return torch.softmax(scores, dim=-1)[0]


def logits_of(kind: str) -> torch.Tensor:
    random = torch.Generator().manual_seed(3)
    base = torch.randn(VOCAB, generator=random)
    if kind == "peaked":  # a trained model's shape: a few tokens hold most of the mass
        base[torch.randperm(VOCAB, generator=random)[:8]] += 12.0
    return base * {"flat": 0.5, "spread": 3.0, "peaked": 1.0}[kind]


@pytest.mark.parametrize("kind", ["flat", "spread", "peaked"])
@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(8, temperature=0.7, top_p=0.8, top_k=20),  # Qwen3-VL's defaults
        SamplingParams(8, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05),
        SamplingParams(8, temperature=1.0, top_p=0.9),
        SamplingParams(8, temperature=1.3, top_p=0.95, top_k=40, repetition_penalty=1.2),
        SamplingParams(8, temperature=0.5, top_k=3),
        SamplingParams(8, temperature=1.0),
    ],
    ids=["qwen3-vl", "qwen2.5-vl", "top-p", "all", "top-k", "plain"],
)
def test_the_sampler_draws_from_transformers_distribution(sampling, kind) -> None:
    logits = logits_of(kind)
    sampler = _Sampler(sampling, HISTORY)
    ids, probs = sampler.candidates(logits)
    ours = torch.zeros(VOCAB).index_add_(0, ids, probs)
    expected = reference(sampling, logits)
    # The same distribution: summing probabilities in another order can move a token whose
    # probability is about 1e-5 across the top_p boundary, nothing more.
    assert (ours - expected).abs().sum() < 1e-4
    assert ((ours > 0) != (expected > 0)).sum() <= 2
    token = sampler.pick(logits)
    assert expected[token] > 0


def test_greedy_with_a_penalty_takes_the_penalised_argmax() -> None:
    logits = logits_of("spread")
    logits[17] = logits.max() + 0.01  # best, but already in the history
    sampler = _Sampler(SamplingParams(8, repetition_penalty=1.5), HISTORY)
    assert not sampler.batched_greedy
    assert sampler.pick(logits) != 17
    assert _Sampler(SamplingParams(8), HISTORY).pick(logits) == 17


def test_a_seeded_sampler_repeats_itself() -> None:
    logits = logits_of("flat")
    sampling = SamplingParams(8, temperature=1.0, top_k=50, seed=9)
    picks = [_Sampler(sampling, HISTORY).pick(logits) for _ in range(3)]
    assert picks[0] == picks[1] == picks[2]
    first = _Sampler(sampling, HISTORY)
    assert len({first.pick(logits) for _ in range(20)}) > 1  # it does sample
