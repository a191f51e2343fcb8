"""The continuous-batching decode loop on every tiny Qwen-VL family, against `generate`.

Rows join a `RunningBatch` at different steps (each in a cache slot of its own, at its own
length; rows that leave hand their slot to the last row) and must still give exactly the text
plain transformers `generate` gives each of them alone.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from predictor.engine.generation import Generator
from predictor.engine.loading import LoadedModel
from predictor.engine.running_batch import RunningBatch, describe
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.protocol import Completion
from predictor.rows import Row
from tests import images
from tests.reference import reference_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generator(loaded_family: LoadedModel) -> Generator:
    return Generator(loaded_family.model, loaded_family.processor)


def rows_for(generator: Generator) -> list[Row]:
    budget, factor = generator.default_budget, generator.resize_factor
    cases = [
        (images.gradient((160, 120)), "Describe this image.", 40),
        (images.solid((48, 96), (0, 0, 255)), "Hi", 25),
        (images.gradient((64, 64)), "What colour is it? Answer in one sentence now.", 60),
        (images.solid((90, 40), (250, 200, 0)), "x", 1),
    ]
    return [
        Row.single(fit_to_budget(p, budget, factor), prompt, SamplingParams(max_new_tokens=n))
        for p, prompt, n in cases
    ]


def test_each_row_fills_its_own_slot_from_the_start_with_no_padding(generator: Generator) -> None:
    rows = rows_for(generator)[:3]
    batch = RunningBatch(generator, max_rows=4, max_len=512)
    batch.admit(rows, [0, 1, 2], [None, None, None])
    prompts = [m.prompt_tokens for m in batch.members]
    assert len(set(prompts)) == 3  # different prompt lengths, no common padded length
    assert [m.length for m in batch.members] == prompts
    keys = batch.decode.cache.keys[0]
    for slot, member in enumerate(batch.members):
        assert keys[slot, :, member.length - 1].abs().sum() > 0  # its last prompt token
        assert keys[slot, :, member.length :].abs().sum() == 0  # nothing past its length


def test_rows_joining_at_different_steps_give_the_tokens_generate_gives(
    generator: Generator,
) -> None:
    rows = rows_for(generator)
    alone = [describe(generator, [row])[0] for row in rows]
    assert [c.text for c in alone] == [reference_greedy(generator, row) for row in rows]
    batch = RunningBatch(generator)
    done: dict[int, Completion] = {}
    sizes = []

    def collect(finished) -> None:
        done.update(finished)

    collect(batch.admit([rows[0]], [0], [None]))
    for _ in range(5):
        collect(batch.step())
    collect(batch.admit(rows[1:3], [1, 2], [None, None]))  # prefilled together, then joined
    for _ in range(3):
        collect(batch.step())
    collect(batch.admit([rows[3]], [3], [None]))  # a one-token row finishes at its prefill
    while len(batch):
        sizes.append(len(batch))
        collect(batch.step())
    assert [done[i] for i in range(4)] == alone
    assert [c.generated_tokens for c in alone] == [40, 25, 60, 1]
    assert max(sizes) == 3 and sizes[-1] == 1  # rows left as they finished


def test_a_stopped_row_leaves_and_the_others_are_unchanged(generator: Generator) -> None:
    rows = rows_for(generator)[:3]
    alone = [describe(generator, [row])[0] for row in rows[1:]]
    stop = {"now": False}
    batch = RunningBatch(generator)
    finished = dict(batch.admit(rows, [0, 1, 2], [lambda: stop["now"], None, None]))
    for _ in range(3):
        finished.update(batch.step())
    stop["now"] = True
    finished.update(batch.step())
    assert 0 in finished and len(batch) == 2  # row 0 left at the next step
    while len(batch):
        finished.update(batch.step())
    assert [finished[1], finished[2]] == alone


def test_a_seeded_row_samples_the_same_text_alone_or_beside_others(
    generator: Generator,
) -> None:
    sampled = SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.9, top_k=40, seed=11)
    rows = rows_for(generator)
    seeded = replace(rows[0], sampling=sampled)

    def run(batch_rows: list[Row]) -> Completion:
        batch = RunningBatch(generator)
        finished = dict(batch.admit(batch_rows, list(range(len(batch_rows))), [None] * 3))
        while len(batch):
            finished.update(batch.step())
        return finished[1]

    first = run([rows[1], seeded, rows[2]])
    second = run([rows[2], seeded, replace(rows[3], sampling=sampled)])
    assert first == second and first.generated_tokens == 12


def test_repetition_penalty_matches_generate(generator: Generator) -> None:
    row = replace(
        rows_for(generator)[0], sampling=SamplingParams(max_new_tokens=20, repetition_penalty=1.5)
    )
    batch = RunningBatch(generator)
    finished = dict(batch.admit([row], [0], [None]))
    while len(batch):
        finished.update(batch.step())
    assert finished[0].text == reference_greedy(generator, row)


def test_running_out_of_memory_while_joining_leaves_the_running_rows_as_they_were(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = rows_for(generator)
    expected = describe(generator, [rows[0]])[0]
    batch = RunningBatch(generator)
    finished = dict(batch.admit([rows[0]], [0], [None]))
    for _ in range(3):
        finished.update(batch.step())
    fill, calls = batch.decode.cache.fill, []

    def failing(slot: int, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        calls.append(layer)
        if layer == 1:  # the second layer: the first one is copied already
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        fill(slot, layer, keys, values)

    monkeypatch.setattr(batch.decode.cache, "fill", failing)
    with pytest.raises(torch.OutOfMemoryError):
        batch.admit([rows[1]], [1], [None])
    monkeypatch.setattr(batch.decode.cache, "fill", fill)
    assert len(batch) == 1
    while len(batch):
        finished.update(batch.step())
    assert finished[0] == expected


def first_new_token(tokens: list[int]) -> int:
    """The index of a token that does not occur before it, past the first (so the row has
    some text before it stops; a random tiny model may repeat one token after its first)."""
    return next(k for k in range(1, len(tokens)) if tokens[k] not in tokens[:k])


def test_min_new_tokens_masks_the_stop_tokens(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ignore_eos / min_tokens: with the k-th greedy token made a stop token, a plain row
    stops there; with min_new_tokens it cannot."""
    row = rows_for(generator)[0]  # 40 greedy tokens, no stop
    batch = RunningBatch(generator)
    batch.admit([row], [0], [None])
    for _ in range(12):
        batch.step()
    tokens = list(batch.members[0].state.tokens)
    k = first_new_token(tokens)
    monkeypatch.setattr(generator, "stop_token_ids", [tokens[k]])

    def run(min_new_tokens: int) -> Completion:
        sampled = replace(row, sampling=replace(row.sampling, min_new_tokens=min_new_tokens))
        running = RunningBatch(generator)
        done = running.admit([sampled], [0], [None])
        while not done:
            done = running.step()
        return done[0][1]

    stopped = run(0)
    assert (stopped.generated_tokens, stopped.finish_reason) == (k + 1, "stop")
    longer = run(k + 3)
    assert longer.generated_tokens >= k + 3
    exact = run(40)
    assert (exact.generated_tokens, exact.finish_reason) == (40, "length")
    assert exact.text.startswith(stopped.text)
