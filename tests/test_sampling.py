"""The batched sampler draws every row from the distribution transformers' warpers give
(`generate`'s order: repetition penalty, temperature, top_k, top_p), while looking at only
the candidates that can survive, all rows in one pass. No model: logits of a Qwen-sized
vocabulary."""

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

from predictor.engine import sampling
from predictor.engine.sampling import RowSampling
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


SETTINGS = [
    SamplingParams(8, temperature=0.7, top_p=0.8, top_k=20),  # Qwen3-VL's defaults
    SamplingParams(8, temperature=0.1, top_p=0.001, top_k=1, repetition_penalty=1.05),
    SamplingParams(8, temperature=1.0, top_p=0.9),
    SamplingParams(8, temperature=1.3, top_p=0.95, top_k=40, repetition_penalty=1.2),
    SamplingParams(8, temperature=0.5, top_k=3),
    SamplingParams(8, temperature=1.0),
]
IDS = ["qwen3-vl", "qwen2.5-vl", "top-p", "all", "top-k", "plain"]


def dense(ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(VOCAB).index_add_(0, ids, probs)


def assert_same_distribution(ours: torch.Tensor, expected: torch.Tensor) -> None:
    # Summing probabilities in another order can move a token whose probability is about
    # 1e-5 across the top_p boundary, nothing more.
    assert (ours - expected).abs().sum() < 1e-4
    assert ((ours > 0) != (expected > 0)).sum() <= 2


@pytest.mark.parametrize("kind", ["flat", "spread", "peaked"])
@pytest.mark.parametrize("params", SETTINGS, ids=IDS)
def test_the_sampler_draws_from_transformers_distribution(params, kind) -> None:
    logits = logits_of(kind).view(1, -1)
    row = RowSampling(params, HISTORY, vocab_size=VOCAB)
    ids, probs = sampling.candidates([row], logits)
    expected = reference(params, logits)
    assert_same_distribution(dense(ids[0], probs[0]), expected)
    tokens, broken = sampling.pick([RowSampling(params, HISTORY, vocab_size=VOCAB)], logits)
    assert expected[tokens[0]] > 0 and broken == [False]


def test_rows_with_different_settings_in_one_batch_each_get_their_own_distribution() -> None:
    kinds = ["flat", "spread", "peaked"]
    logits = torch.stack([logits_of(kinds[i % 3]) for i in range(len(SETTINGS))])
    rows = [RowSampling(p, HISTORY, vocab_size=VOCAB) for p in SETTINGS]
    ids, probs = sampling.candidates(rows, logits)
    for index, params in enumerate(SETTINGS):
        expected = reference(params, logits[index])
        assert_same_distribution(dense(ids[index], probs[index]), expected)
    greedy = RowSampling(SamplingParams(8), HISTORY)
    tokens, _ = sampling.pick([*rows, greedy], torch.cat([logits, logits[:1]]))
    for index, params in enumerate(SETTINGS):
        assert reference(params, logits[index])[tokens[index]] > 0
    assert tokens[-1] == int(logits[0].argmax())


def test_greedy_with_a_penalty_takes_the_penalised_argmax() -> None:
    logits = logits_of("spread")
    logits[17] = logits.max() + 0.01  # best, but already in the history
    penalised = RowSampling(SamplingParams(8, repetition_penalty=1.5), HISTORY, vocab_size=VOCAB)
    plain = RowSampling(SamplingParams(8), HISTORY)
    tokens, _ = sampling.pick([penalised, plain], torch.stack([logits, logits]))
    assert tokens[0] != 17 and tokens[1] == 17


def test_the_penalty_counts_the_tokens_a_row_picked() -> None:
    logits = logits_of("spread")
    best = int(logits.argmax())
    row = RowSampling(SamplingParams(8, repetition_penalty=3.0), HISTORY, vocab_size=VOCAB)
    first, _ = sampling.pick([row], logits.view(1, -1))
    second, _ = sampling.pick([row], logits.view(1, -1))
    assert first == [best] and second != [best]


def test_stop_tokens_are_masked_until_min_new_tokens() -> None:
    logits = logits_of("spread")
    stop = int(logits.argmax())
    row = RowSampling(SamplingParams(8, min_new_tokens=2), HISTORY, stop_ids=[stop])
    picks = [sampling.pick([row], logits.view(1, -1))[0][0] for _ in range(3)]
    assert picks[0] != stop and picks[1] != stop and picks[2] == stop


def test_a_seeded_row_repeats_itself_whatever_runs_beside_it() -> None:
    logits = logits_of("flat")
    params = SamplingParams(8, temperature=1.0, top_k=50, seed=9)
    alone = [
        sampling.pick([RowSampling(params, HISTORY)], logits.view(1, -1))[0][0] for _ in range(3)
    ]
    assert alone[0] == alone[1] == alone[2]
    free = SamplingParams(8, temperature=1.0, top_k=50)
    neighbours = [RowSampling(free, HISTORY) for _ in range(3)]
    batch = torch.stack([logits_of("spread"), logits, logits_of("peaked"), logits])
    beside, _ = sampling.pick([neighbours[0], RowSampling(params, HISTORY), *neighbours[1:]], batch)
    assert beside[1] == alone[0]
    row = RowSampling(params, HISTORY)
    assert len({sampling.pick([row], logits.view(1, -1))[0][0] for _ in range(20)}) > 1


def test_a_row_with_nan_logits_is_flagged_alone() -> None:
    logits = torch.stack([logits_of("spread"), logits_of("spread")])
    logits[1, 5] = float("nan")
    rows = [RowSampling(SamplingParams(8, temperature=0.7, top_k=20), HISTORY) for _ in range(2)]
    _, broken = sampling.pick(rows, logits)
    assert broken == [False, True]


def test_a_greedy_row_with_nan_logits_is_flagged_alone() -> None:
    logits = torch.stack([logits_of("spread"), logits_of("spread")]).bfloat16()
    logits[0, 151_000] = float("nan")
    rows = [RowSampling(SamplingParams(8), HISTORY) for _ in range(2)]
    tokens, broken = sampling.pick(rows, logits)
    assert broken == [True, False] and tokens[1] == int(logits[1].float().argmax())


@pytest.mark.parametrize("vocab", [VOCAB, 151_643, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_max_is_max_exactly_ties_and_nan_included(vocab, dtype) -> None:
    random = torch.Generator().manual_seed(vocab)
    # Few distinct values: many rows hold their maximum several times, across blocks.
    scores = torch.randint(0, 7, (9, vocab), generator=random).to(dtype)
    scores[1] = 0.0  # every token ties
    scores[2, vocab // 3] = float("nan")
    scores[3, -1] = 100.0  # the maximum in the last block
    scores[4, [0, vocab - 1]] = 50.0  # first and last token tie: the first wins
    values, indices = sampling.first_max(scores)
    expected = scores.max(dim=-1)
    assert torch.equal(indices, expected.indices)
    assert torch.equal(values.isnan(), expected.values.isnan())
    finite = ~values.isnan()
    assert torch.equal(values[finite], expected.values[finite])


def test_first_max_works_in_and_out_of_inference_mode_whichever_came_first() -> None:
    """Its float32 buffer outlives the call: one made during a decoding step (inference mode)
    must still take a copy outside it (tools, tests), and the other way round."""
    scores = torch.randn(3, 1000).bfloat16()
    expected = scores.max(dim=-1).indices
    with torch.inference_mode():
        assert torch.equal(sampling.first_max(scores)[1], expected)
    assert torch.equal(sampling.first_max(scores)[1], expected)
    bigger = torch.randn(5, 1000).bfloat16()  # a new buffer, made outside
    assert torch.equal(sampling.first_max(bigger)[1], bigger.max(dim=-1).indices)
    with torch.inference_mode():
        assert torch.equal(sampling.first_max(scores)[1], expected)
