"""One quick generation on the engine's decode path, in the fast layer (not marked slow).

Why: every other test that generates is marked slow, so `pytest -m "not slow"` passed on
transformers versions the server cannot run on (5.17 fails at warm-up, 5.18-5.23 in the
decode loop). This test runs the predictor's own loading and its one decode path (rows joining
a running batch) for two families against plain transformers `generate`, in a few seconds, so a
broken dependency fails the fast layer too.
"""

from __future__ import annotations

import pytest

from predictor.engine.generation import Generator
from predictor.engine.loading import load_model
from predictor.engine.running_batch import RunningBatch
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.rows import Row
from predictor.settings import Settings
from tests import images
from tests.conftest import TINY_MODEL_FIXTURES
from tests.reference import reference_greedy_completion


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl"])
def test_rows_joining_a_running_batch_generate_what_generate_does(
    request: pytest.FixtureRequest, family: str
) -> None:
    model_dir = request.getfixturevalue(TINY_MODEL_FIXTURES[family])
    loaded = load_model(Settings(model_dir=str(model_dir), device="cpu", dtype="float32"))
    generator = Generator(loaded.model, loaded.processor)
    budget, factor = generator.default_budget, generator.resize_factor
    rows = [
        Row.single(fit_to_budget(picture, budget, factor), prompt, SamplingParams(max_new_tokens=n))
        for picture, prompt, n in (
            (images.gradient((128, 96)), "Describe this image.", 6),
            (images.solid((64, 64), (0, 0, 255)), "What colour is it?", 4),
        )
    ]
    batch = RunningBatch(generator, max_rows=4, max_len=512)
    finished = dict(batch.admit([rows[0]], [0], [None]))
    finished.update(batch.step())
    finished.update(batch.admit([rows[1]], [1], [None]))  # joins a running batch
    while len(batch):
        finished.update(batch.step())
    got = [(finished[i].text, finished[i].generated_tokens) for i in (0, 1)]
    assert got == [reference_greedy_completion(generator, row) for row in rows]
