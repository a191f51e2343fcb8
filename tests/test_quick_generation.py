"""One quick generation per engine path, in the fast layer (not marked slow).

Why: every other test that generates is marked slow, so `pytest -m "not slow"` passed on
transformers versions the server cannot run on (5.17 fails at warm-up, 5.18-5.23 in the
continuous decode loop). This test runs the predictor's own loading, both engine paths and two
families in a few seconds, so a broken dependency fails the fast layer too.
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


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2.5-vl"])
def test_continuous_and_whole_batch_paths_generate_the_same_tokens(
    request: pytest.FixtureRequest, family: str
) -> None:
    model_dir = request.getfixturevalue(TINY_MODEL_FIXTURES[family])
    loaded = load_model(Settings(model_dir=str(model_dir), device="cpu"))
    generator = Generator(loaded.model, loaded.processor)
    budget, factor = generator.default_budget, generator.resize_factor
    rows = [
        Row.single(fit_to_budget(picture, budget, factor), prompt, SamplingParams(max_new_tokens=n))
        for picture, prompt, n in (
            (images.gradient((128, 96)), "Describe this image.", 6),
            (images.solid((64, 64), (0, 0, 255)), "What colour is it?", 4),
        )
    ]
    expected = [generator.describe([row])[0] for row in rows]  # whole-batch: `generate`
    assert [c.generated_tokens for c in expected] == [6, 4]
    batch = RunningBatch(generator)
    finished = dict(batch.admit([rows[0]], [0], [None]))
    finished.update(batch.step())
    finished.update(batch.admit([rows[1]], [1], [None]))  # joins a running batch
    while len(batch):
        finished.update(batch.step())
    assert [finished[0], finished[1]] == expected
