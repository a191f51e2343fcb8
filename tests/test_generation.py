"""The tiny models through the predictor's own loading and generation code, exact outputs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from predictor.engine.generation import Generator, _RowState
from predictor.engine.loading import load_model
from predictor.engine.running_batch import RunningBatch, describe
from predictor.inputs.images import ImageLimits, fit_to_budget, load_image, prepare_image
from predictor.params import SamplingParams
from predictor.rows import Row
from predictor.settings import Settings
from tests import images
from tests.reference import reference_greedy

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module", params=["qwen3-vl", "qwen2.5-vl"])
def generator(request: pytest.FixtureRequest) -> Generator:
    fixture = {"qwen3-vl": "tiny_qwen3_vl", "qwen2.5-vl": "tiny_qwen2_5_vl"}[request.param]
    model_dir: Path = request.getfixturevalue(fixture)
    loaded = load_model(Settings(model_dir=str(model_dir), device="cpu", dtype="float32"))
    assert loaded.dtype == torch.float32  # dtype auto on CPU
    return Generator(loaded.model, loaded.processor)


def rows_for(generator: Generator, sampling: SamplingParams = GREEDY) -> list[Row]:
    budget, factor = generator.default_budget, generator.resize_factor
    pictures = [
        images.gradient((128, 96)),
        images.solid((40, 90), (0, 0, 255)),
        images.gradient((64, 64)),
    ]
    prompts = ["Describe this image.", "What colour is it?", "Write one word."]
    return [
        Row.single(fit_to_budget(p, budget, factor), prompt, sampling)
        for p, prompt in zip(pictures, prompts, strict=True)
    ]


def test_greedy_matches_plain_transformers_exactly(generator: Generator) -> None:
    rows = rows_for(generator)
    for row in rows:
        (completion,) = describe(generator, [row])
        assert completion.text == reference_greedy(generator, row)
        assert completion.text.strip()
        assert completion.generated_tokens == 8 and completion.finish_reason == "length"
        assert completion.prompt_tokens > 20  # chat template plus image tokens


def test_greedy_row_is_the_same_alone_or_in_a_batch(generator: Generator) -> None:
    rows = rows_for(generator)
    alone = [describe(generator, [row])[0] for row in rows]
    together = describe(generator, rows)
    assert together == alone
    assert len({c.text for c in together}) > 1  # the rows really differ


def test_fixed_seed_reproduces_and_other_seed_differs(generator: Generator) -> None:
    seeded = rows_for(generator, SamplingParams(max_new_tokens=8, temperature=1.0, seed=5))
    first = describe(generator, seeded)
    assert describe(generator, seeded) == first
    other = rows_for(generator, SamplingParams(max_new_tokens=8, temperature=1.0, seed=6))
    assert [c.text for c in describe(generator, other)] != [c.text for c in first]
    greedy = describe(generator, rows_for(generator))
    assert [c.text for c in first] != [c.text for c in greedy]


def test_rows_with_different_limits_each_stop_at_their_own(generator: Generator) -> None:
    rows = rows_for(generator)
    mixed = [
        replace(rows[0], sampling=SamplingParams(max_new_tokens=3)),
        replace(rows[1], sampling=SamplingParams(max_new_tokens=6)),
        replace(rows[2], sampling=SamplingParams(max_new_tokens=3)),
    ]
    completions = describe(generator, mixed)
    assert [c.generated_tokens for c in completions] == [3, 6, 3]
    assert completions[1] == describe(generator, [mixed[1]])[0]


def test_stop_token_ends_a_completion(generator: Generator) -> None:
    stop = generator.stop_token_ids[0]
    words = generator.tokenizer.encode("a red car")
    row = rows_for(generator)[0]
    state = _RowState(generator, row)
    for token in [*words, stop, stop, stop]:
        state.push(token)
    completion = state.completion(prompt_tokens=30)
    assert (completion.text, completion.finish_reason) == ("a red car", "stop")
    assert completion.generated_tokens == len(words) + 1


def test_warm_up_runs(generator: Generator) -> None:
    batch = RunningBatch(generator, max_rows=2, max_len=512)
    batch.warm_up()
    assert len(batch) == 0


def test_processor_keeps_the_pre_resized_grid(generator: Generator) -> None:
    """Images resized by the predictor reach the model at exactly the processor's grid."""
    image = images.gradient((300, 200))
    budget, factor = generator.default_budget, generator.resize_factor
    row = Row.single(fit_to_budget(image, budget, factor), "x", GREEDY)
    fast = generator.inputs_for([row])
    slow = generator.processor(
        text=[generator._prompt_text(row)], images=[image], return_tensors="pt"
    )
    assert fast["image_grid_thw"].tolist() == slow["image_grid_thw"].tolist()


@pytest.mark.parametrize("exif", [None, images.rotate_exif(6)], ids=["upright", "rotated"])
def test_draft_path_matches_the_slow_path_grid(generator: Generator, exif) -> None:
    """A large JPEG decoded with draft() reaches the model at the grid the processor computes
    from the fully decoded image."""
    photo = images.encode(images.gradient((3000, 2000)), "JPEG", **({"exif": exif} if exif else {}))
    limits = ImageLimits(max_bytes=50_000_000, max_decoded_pixels=50_000_000)
    budget, factor = generator.default_budget, generator.resize_factor
    row = Row.single(prepare_image(photo, limits, "image", budget, factor), "x", GREEDY)
    fast = generator.inputs_for([row])
    slow = generator.processor(
        text=[generator._prompt_text(row)],
        images=[load_image(photo, limits, "image")],
        return_tensors="pt",
    )
    assert fast["image_grid_thw"].tolist() == slow["image_grid_thw"].tolist()


def test_big_image_is_shrunk_to_the_budget(generator: Generator) -> None:
    big = Image.new("RGB", (2000, 1500))
    small = fit_to_budget(big, generator.default_budget, generator.resize_factor)
    assert small.width * small.height <= generator.default_budget.max_pixels


def test_rows_encoded_ahead_merge_exactly_like_a_processor_batch(generator: Generator) -> None:
    rows = rows_for(generator)
    batched = {k: v for k, v in generator._process(rows).items() if k != "pixel_values"}
    merged = generator.merge([generator.encode(r) for r in rows])
    assert sorted(batched) == sorted(k for k in merged if k != "mm_encoder_outputs")
    for key in batched:
        assert torch.equal(batched[key], merged[key]), key


def test_a_repeated_conversation_reuses_its_text_and_matches_the_processor(
    generator: Generator,
) -> None:
    rows = rows_for(generator)
    twin = Row.single(
        rows[0].images[0].transpose(Image.Transpose.ROTATE_180), "Describe this image.", GREEDY
    )
    generator._text_inputs.clear()
    first, again = generator.encode(rows[0]), generator.encode(twin)  # a miss, then a hit
    assert len(generator._text_inputs) == 1
    for encoded, row in ((first, rows[0]), (again, twin)):
        expected = {k: v for k, v in generator._process([row]).items() if k != "pixel_values"}
        assert sorted(encoded.tensors) == sorted(expected)
        for key in expected:
            assert torch.equal(encoded.tensors[key], expected[key]), key
    generator.encode(rows[1])  # another prompt and size: its own entry
    assert len(generator._text_inputs) == 2


def test_image_features_encoded_ahead_match_the_batched_vision_encoder(
    generator: Generator,
) -> None:
    """Each row's images through the vision encoder alone == the whole batch through it."""
    rows = rows_for(generator)
    processed = generator._process(rows)
    with torch.inference_mode():
        batched = generator.model.get_image_features(
            pixel_values=processed["pixel_values"],
            image_grid_thw=processed["image_grid_thw"],
            return_dict=True,
        )
    ahead = generator.merge([generator.encode(r) for r in rows])["mm_encoder_outputs"]["image"]
    assert len(ahead.pooler_output) == len(batched.pooler_output) == len(rows)
    for one, together in zip(ahead.pooler_output, batched.pooler_output, strict=True):
        torch.testing.assert_close(one, together)
    encoded = [replace(r, inputs=generator.encode(r)) for r in rows]
    assert describe(generator, encoded) == describe(generator, rows)
