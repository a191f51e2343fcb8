"""The traced vision encoder gives exactly the eager encoder's features, per image grid, for
every family, and falls back to eager whenever a trace cannot be trusted."""

from __future__ import annotations

import gc
import threading
from typing import Any

import psutil
import pytest
import torch
from torch.utils._pytree import tree_flatten

from predictor.engine import vision_graphs
from predictor.engine.generation import Generator
from predictor.engine.loading import LoadedModel
from predictor.engine.running_batch import describe
from predictor.engine.vision_graphs import VisionEncoder
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.rows import Row
from tests import images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generator(loaded_family: LoadedModel) -> Generator:
    return Generator(loaded_family.model, loaded_family.processor, trace_vision=False)


def pixels(generator: Generator, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's pixel patches and grid for a gradient of `size`."""
    picture = fit_to_budget(
        images.gradient(size), generator.default_budget, generator.resize_factor
    )
    row = Row.single(picture, "Describe.", SamplingParams(max_new_tokens=4))
    tensors = generator._process_images(row.images)
    return tensors["pixel_values"], tensors["image_grid_thw"]


def settled(encoder: VisionEncoder, values: torch.Tensor, grid: torch.Tensor) -> Any:
    """One call, then the wait for any trace it queued (traces run on a thread of their own)."""
    output = encoder(values, grid)
    encoder.wait_for_traces()
    return output


def assert_same(actual: Any, expected: Any) -> None:
    got, got_spec = tree_flatten(actual)
    want, want_spec = tree_flatten(expected)
    assert type(actual) is type(expected) and got_spec == want_spec
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_a_grid_is_traced_at_its_second_sighting_and_gives_the_eager_features(
    generator: Generator,
) -> None:
    encoder = VisionEncoder(generator.model)
    values, grid = pixels(generator, (128, 96))
    expected = encoder.eager(values, grid)
    assert_same(settled(encoder, values, grid), expected)
    assert encoder.traced_grids == []  # seen once: eager
    assert_same(settled(encoder, values, grid), expected)
    assert len(encoder.traced_grids) == 1  # seen twice: traced (and checked against eager)
    assert_same(settled(encoder, values, grid), expected)  # now from the graph


def test_a_graph_is_never_used_for_another_grid(generator: Generator) -> None:
    encoder = VisionEncoder(generator.model, trace_after=1)
    small, small_grid = pixels(generator, (64, 64))
    wide, wide_grid = pixels(generator, (160, 64))
    assert not torch.equal(small_grid, wide_grid)
    settled(encoder, small, small_grid)
    assert len(encoder.traced_grids) == 1
    assert_same(settled(encoder, wide, wide_grid), encoder.eager(wide, wide_grid))
    assert_same(settled(encoder, small, small_grid), encoder.eager(small, small_grid))
    assert len(encoder.traced_grids) == 2


def test_several_images_in_one_call_are_one_grid(generator: Generator) -> None:
    encoder = VisionEncoder(generator.model, trace_after=1)
    first, first_grid = pixels(generator, (64, 64))
    second, second_grid = pixels(generator, (96, 64))
    values, grid = torch.cat([first, second]), torch.cat([first_grid, second_grid])
    expected = encoder.eager(values, grid)
    assert_same(settled(encoder, values, grid), expected)
    assert_same(settled(encoder, values, grid), expected)
    assert len(encoder.traced_grids) == 1


def test_concurrent_callers_get_correct_features(generator: Generator) -> None:
    encoder = VisionEncoder(generator.model)
    values, grid = pixels(generator, (128, 96))
    expected = encoder.eager(values, grid)
    failures: list[BaseException] = []

    def call() -> None:
        try:
            for _ in range(3):
                assert_same(encoder(values, grid), expected)
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    encoder.wait_for_traces()
    assert failures == []
    assert len(encoder.traced_grids) == 1


def test_trace_off_never_traces(generator: Generator) -> None:
    encoder = VisionEncoder(generator.model, trace=False)
    values, grid = pixels(generator, (64, 64))
    for _ in range(3):
        assert_same(settled(encoder, values, grid), encoder.eager(values, grid))
    assert encoder.traced_grids == []


def assert_stays_eager(generator: Generator) -> None:
    """Every call gives the eager features and no graph is kept (tracing at first sight)."""
    encoder = VisionEncoder(generator.model, trace_after=1)
    values, grid = pixels(generator, (64, 64))
    expected = encoder.eager(values, grid)
    for _ in range(3):
        assert_same(settled(encoder, values, grid), expected)
    assert encoder.traced_grids == []


# Fault injection below: a tracer that fails, or a graph whose output is wrong, cannot be
# produced on demand from a real model, so the test makes one.


def test_a_failing_trace_leaves_the_grid_eager(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_trace(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(vision_graphs.torch._C, "_create_graph_by_tracing", broken_trace)
    assert_stays_eager(generator)


def test_a_graph_that_differs_from_eager_is_not_used(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_call = vision_graphs._Graph.__call__

    def off_by_one(self: vision_graphs._Graph, *args: torch.Tensor) -> Any:
        output = real_call(self, *args)
        output["pooler_output"] = tuple(t + 1 for t in output["pooler_output"])
        return output

    monkeypatch.setattr(vision_graphs._Graph, "__call__", off_by_one)
    assert_stays_eager(generator)


def test_only_the_most_recent_grids_keep_graphs(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vision_graphs, "MAX_GRAPHS", 2)
    encoder = VisionEncoder(generator.model, trace_after=1)
    grids = []
    for size in [(64, 64), (96, 64), (128, 64)]:
        values, grid = pixels(generator, size)
        settled(encoder, values, grid)
        grids.append(tuple(grid.flatten().tolist()))
    assert [key[0] for key in encoder.traced_grids] == grids[1:]


def test_generation_is_the_same_with_traced_and_eager_vision(generator: Generator) -> None:
    traced = Generator(generator.model, generator.processor, trace_vision=True)
    picture = fit_to_budget(
        images.gradient((128, 96)), generator.default_budget, generator.resize_factor
    )
    row = Row.single(picture, "Describe this image.", SamplingParams(max_new_tokens=8))
    expected = describe(generator, [row])[0].text
    for _ in range(3):  # eager, then traced at the second sighting, then the graph
        assert describe(traced, [row])[0].text == expected
        traced.vision.wait_for_traces()
    assert len(traced.vision.traced_grids) == 1


def test_graphs_dropped_from_the_cache_free_their_memory(
    generator: Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cycling more grids than the cache holds re-traces every grid each round; memory must
    level off after the first round (each trace once leaked its grid's graph for good)."""
    monkeypatch.setattr(vision_graphs, "MAX_GRAPHS", 2)
    encoder = VisionEncoder(generator.model, trace_after=1)
    inputs = [pixels(generator, (64 + 32 * i, 96)) for i in range(12)]
    process = psutil.Process()
    rss = []
    for _ in range(4):
        for values, grid in inputs:
            settled(encoder, values, grid)
        gc.collect()
        rss.append(process.memory_info().rss)
    assert len(encoder.traced_grids) == 2
    growth_mb = (rss[-1] - rss[0]) / 2**20
    assert growth_mb < 20, f"RSS grew {growth_mb:.0f} MB over three rounds of 12 traces"
