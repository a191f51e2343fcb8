"""Guided decoding in the engine's decode loop, on the tiny random model: under a grammar
every output that stops matches it (a JSON schema, validated with jsonschema; a regex, in
full; a choice, exactly), greedy and sampled, alone and 16 rows at once beside free rows.

A random-weight model's free text never parses; only the mask makes these outputs valid, so
the tests cannot pass by luck."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from predictor.engine.generation import Generator
from predictor.engine.loading import load_model, vocab_size
from predictor.engine.running_batch import RunningBatch, describe
from predictor.inputs.guides import GuideCompiler
from predictor.inputs.images import fit_to_budget
from predictor.params import Guide, SamplingParams
from predictor.protocol import Completion
from predictor.rows import Row
from predictor.settings import Settings
from tests import images

pytestmark = pytest.mark.slow
SCHEMA = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "people": {"type": "boolean"},
        "mood": {"enum": ["calm", "busy", None]},
    },
    "required": ["caption", "tags", "count", "people"],
    "additionalProperties": False,
}
REGEX = r"(a|an|the) (red|green|blue) [a-z]{2,8}( [0-9]{1,2})?"
CHOICES = ["indoor", "outdoor", "under water"]
GUIDES = [
    Guide("json_schema", json.dumps(SCHEMA)),
    Guide("regex", REGEX),
    Guide.choice(CHOICES, "choice"),
]


@pytest.fixture(scope="module")
def generator(tiny_qwen3_vl: Path) -> Generator:
    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl), device="cpu", dtype="float32"))
    return Generator(loaded.model, loaded.processor)


@pytest.fixture(scope="module")
def compiler(generator: Generator) -> GuideCompiler:
    guides = GuideCompiler(generator.tokenizer, vocab_size(generator.model.config))
    yield guides
    guides.close()


def guided_row(generator, compiler, guide, color, *, seed=None, tokens=64) -> Row:
    picture = fit_to_budget(images.solid((64, 48), color), generator.default_budget, 32)
    sampling = SamplingParams(
        max_new_tokens=tokens, guide=guide, temperature=0.0 if seed is None else 1.0, seed=seed
    )
    return replace(
        Row.single(picture, "Describe this image.", sampling), grammar=compiler.compile(guide)
    )


def check(guide: Guide | None, completion: Completion) -> bool:
    """Whether the completion stopped; if it did, it matches its guide."""
    if guide is None or completion.finish_reason != "stop":
        return False
    if guide.kind == "json_schema":
        jsonschema.validate(json.loads(completion.text), json.loads(guide.text))
    elif guide.kind == "regex":
        assert re.fullmatch(guide.text, completion.text), completion.text
    else:
        assert completion.text in json.loads(guide.text), completion.text
    return True


COLORS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (128, 128, 128), (0, 0, 0), (250, 200, 0)]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_each_guide_alone(generator, compiler, sampled: bool) -> None:
    stopped = 0
    for index, guide in enumerate(GUIDES):
        for color in COLORS[:3]:
            seed = index if sampled else None
            row = guided_row(generator, compiler, guide, color, seed=seed)
            (completion,) = describe(generator, [row])
            stopped += check(guide, completion)
    assert stopped >= 6  # most end by their grammar within 64 tokens


def test_sixteen_rows_at_once_mixed_with_free_ones(generator, compiler) -> None:
    rows, guides = [], []
    for index in range(16):
        color = COLORS[index % len(COLORS)]
        if index % 4 == 3:  # a free row every fourth
            picture = fit_to_budget(images.solid((64, 48), color), generator.default_budget, 32)
            rows.append(Row.single(picture, "Describe this image.", SamplingParams(24)))
            guides.append(None)
            continue
        guide = GUIDES[index % 3]
        seed = index if index % 2 else None
        rows.append(guided_row(generator, compiler, guide, color, seed=seed))
        guides.append(guide)
    completions = describe(generator, rows)
    assert sum(check(g, c) for g, c in zip(guides, completions, strict=True)) >= 8
    # Free rows are untouched by their neighbours' masks: what they give alone.
    for row, guide, completion in zip(rows, guides, completions, strict=True):
        if guide is None:
            assert describe(generator, [row])[0] == completion


def test_a_seeded_guided_row_gives_the_same_text_alone_or_batched(generator, compiler) -> None:
    row = guided_row(generator, compiler, GUIDES[0], COLORS[1], seed=7)
    others = [
        guided_row(generator, compiler, g, c) for g, c in zip(GUIDES, COLORS[2:], strict=False)
    ]
    alone = describe(generator, [row])[0]
    assert describe(generator, [*others, row])[-1].text == alone.text


def test_a_row_cut_at_its_token_limit_ends_with_length(generator, compiler) -> None:
    long = {"type": "string", "minLength": 40}  # more than six tokens can write
    schema = {"type": "object", "properties": {"a": long}, "required": ["a"]}
    row = guided_row(
        generator, compiler, Guide("json_schema", json.dumps(schema)), COLORS[0], tokens=6
    )
    (completion,) = describe(generator, [row])
    assert completion.finish_reason == "length" and completion.generated_tokens == 6
    assert completion.text.startswith('{"a":'), completion.text  # as far as it got


def test_rows_that_join_a_running_batch_get_their_own_matchers(generator, compiler) -> None:
    batch = RunningBatch(generator, max_rows=4, max_len=1024)
    first = guided_row(generator, compiler, GUIDES[2], COLORS[0])
    done = dict(batch.admit([first], [0], [None]))
    batch.step()
    later = guided_row(generator, compiler, GUIDES[1], COLORS[1])
    done.update(batch.admit([later], [1], [None]))
    while len(batch):
        done.update(batch.step())
    assert check(GUIDES[2], done[0]) and check(GUIDES[1], done[1])
