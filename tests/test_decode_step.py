"""The decoding step compiled, both ways (`torch.compile` of one layer shared by all, what a CPU
runs; of the whole step, what a GPU runs as CUDA graphs), against the same step eager.

In float32 on the tiny model the compiled graphs must give exactly the eager step's tokens: for
greedy rows joining a running batch at different steps, for rows whose stop tokens are masked,
and for a seeded sampled row. Also the helpers that bound the compiled shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from predictor.engine.decode_step import SPAN_STEP, batch_buckets, bucket_for, span_for
from predictor.engine.generation import Generator
from predictor.engine.loading import LoadedModel
from predictor.engine.running_batch import RunningBatch
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.rows import Row
from tests import images


def test_buckets_and_spans_bound_the_shapes() -> None:
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(1) == [1]
    assert [bucket_for(n, batch_buckets(16)) for n in (1, 2, 3, 9, 16)] == [1, 2, 4, 16, 16]
    assert span_for(1, 4096) == SPAN_STEP
    assert span_for(SPAN_STEP + 1, 4096) == 2 * SPAN_STEP
    assert span_for(4000, 4096) == 4096


@pytest.fixture(scope="module")
def generator(tiny_qwen3_vl, tmp_path_factory) -> Generator:
    from predictor.engine.loading import load_model
    from predictor.settings import Settings

    loaded: LoadedModel = load_model(
        Settings(model_dir=str(tiny_qwen3_vl), device="cpu", dtype="float32")
    )
    return Generator(loaded.model, loaded.processor)


def rows_for(generator: Generator) -> list[Row]:
    budget, factor = generator.default_budget, generator.resize_factor
    sampled = SamplingParams(max_new_tokens=14, temperature=1.2, top_k=30, seed=5)
    return [
        Row.single(fit_to_budget(images.gradient((128, 96)), budget, factor), "Describe.",
                   SamplingParams(max_new_tokens=20)),
        Row.single(fit_to_budget(images.solid((64, 64), (0, 0, 255)), budget, factor), "Hi",
                   SamplingParams(max_new_tokens=12, min_new_tokens=12)),
        Row.single(fit_to_budget(images.gradient((96, 160)), budget, factor), "x", sampled),
    ]  # fmt: skip


def run(batch: RunningBatch, rows: list[Row]) -> list[tuple[str, int]]:
    done = dict(batch.admit(rows[:1], [0], [None]))
    for _ in range(3):
        done.update(batch.step())
    done.update(batch.admit(rows[1:], [1, 2], [None, None]))  # join a running batch
    while len(batch):
        done.update(batch.step())
    return [(done[i].text, done[i].generated_tokens) for i in range(len(rows))]


@pytest.mark.slow
@pytest.mark.parametrize("whole_step", [False, True], ids=["layer", "whole-step"])
def test_the_compiled_step_gives_the_eager_steps_tokens(
    generator: Generator, whole_step: bool
) -> None:
    rows = rows_for(generator)
    eager = run(RunningBatch(generator, max_rows=4, max_len=512), rows)
    batch = RunningBatch(generator, max_rows=4, max_len=512)
    batch.decode.compiled = True
    batch.decode._compile(whole_step=whole_step)
    batch.warm_up()
    assert run(batch, rows) == eager
    assert [n for _, n in eager] == [20, 12, 14]
    # Longer than one span: the step reads more keys without another compile going wrong.
    long = replace(rows[0], sampling=SamplingParams(max_new_tokens=SPAN_STEP + 20))
    assert run(batch, [long, *rows[1:]]) == run(
        RunningBatch(generator, max_rows=4, max_len=512), [long, *rows[1:]]
    )
