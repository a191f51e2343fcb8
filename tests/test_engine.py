"""The batching engine in-process, on the real tiny model.

The generator is the real one; `RecordingGenerator` only records the batches it is handed, and
`PoisonedGenerator` injects a failure for one marked prompt (no real input can make the tiny
model fail after validation, so the fault is injected to test that it stays with its request).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from predictor import metrics
from predictor.engine import Engine, EngineConfig
from predictor.errors import DeadlineExceeded, QueueFull
from predictor.generation import Generator, Row
from predictor.images import fit_to_budget
from predictor.loading import load_model
from predictor.params import SamplingParams
from predictor.settings import Settings
from tests import images

pytestmark = pytest.mark.slow
POISON = "POISON"


class RecordingGenerator:
    def __init__(self, generator: Generator):
        self.generator = generator
        self.batches: list[int] = []

    def describe(self, rows, stop_checks=None, on_step=None):
        self.batches.append(len(rows))
        return self.generator.describe(rows, stop_checks, on_step)


class PoisonedGenerator(RecordingGenerator):
    def describe(self, rows, stop_checks=None, on_step=None):
        if any(row.messages[-1]["content"][-1]["text"] == POISON for row in rows):
            self.batches.append(len(rows))
            raise RuntimeError("injected failure")
        return super().describe(rows, stop_checks, on_step)


@pytest.fixture(scope="module")
def generator(tiny_qwen3_vl: Path) -> Generator:
    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl), device="cpu"))
    return Generator(loaded.model, loaded.processor)


def make_rows(
    generator: Generator, count: int, max_new_tokens: int = 6, prompt: str = "Describe."
) -> list[Row]:
    budget, factor = generator.default_budget, generator.resize_factor
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 0, 0), (90, 90, 90)]
    return [
        Row.single(
            fit_to_budget(images.solid((64 + 8 * i, 64), colors[i % len(colors)]), budget, factor),
            prompt,
            SamplingParams(max_new_tokens=max_new_tokens),
        )
        for i in range(count)
    ]


def engine_with(generator, **config) -> Engine:
    return Engine(generator, "engine-test", EngineConfig(**config))


def gauge(collector) -> float:
    return collector.labels("engine-test")._value.get()


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_concurrent_requests_share_a_generate_call_with_the_same_greedy_tokens(generator) -> None:
    recorder = RecordingGenerator(generator)
    engine = engine_with(recorder, max_batch_size=8, batch_wait_ms=200)
    rows = make_rows(generator, 6)

    async def scenario():
        together = await asyncio.gather(*(engine.submit([row]) for row in rows))
        alone = [await engine.submit([row]) for row in rows]
        return together, alone

    try:
        together, alone = asyncio.run(scenario())
    finally:
        engine.stop()
    assert recorder.batches[0] == 6  # six requests, one generate call
    assert together == alone
    assert len({c[0].text for c in together}) > 1


def test_rows_with_different_max_new_tokens_batch_and_stop_at_their_own(generator) -> None:
    recorder = RecordingGenerator(generator)
    engine = engine_with(recorder, max_batch_size=8, batch_wait_ms=200)
    short, long = make_rows(generator, 1, 3)[0], make_rows(generator, 2, 9)[1]

    async def scenario():
        return await asyncio.gather(engine.submit([short]), engine.submit([long]))

    try:
        (a,), (b,) = asyncio.run(scenario())
    finally:
        engine.stop()
    assert recorder.batches == [2]
    assert (a.generated_tokens, b.generated_tokens) == (3, 9)
    assert a == generator.describe([short])[0]


def test_full_queue_refuses_at_once(generator) -> None:
    engine = engine_with(generator, max_batch_size=1, batch_wait_ms=0, max_queue_size=1)
    long = make_rows(generator, 1, 3000)

    async def scenario():
        running = asyncio.create_task(engine.submit(long))
        await wait_until(lambda: gauge(metrics.REQUESTS_RUNNING) == 1)
        waiting = asyncio.create_task(engine.submit(long))
        await wait_until(lambda: gauge(metrics.REQUESTS_WAITING) == 1)
        rejected_before = metrics.REJECTED.labels("engine-test")._value.get()
        started = time.perf_counter()
        with pytest.raises(QueueFull):
            await engine.submit(long)
        refused_in = time.perf_counter() - started
        assert metrics.REJECTED.labels("engine-test")._value.get() == rejected_before + 1
        for task in (running, waiting):
            task.cancel()
        await asyncio.gather(running, waiting, return_exceptions=True)
        await wait_until(lambda: engine.idle)
        return refused_in

    try:
        refused_in = asyncio.run(scenario())
    finally:
        engine.stop()
    assert refused_in < 0.05
    assert gauge(metrics.REQUESTS_WAITING) == 0 and gauge(metrics.REQUESTS_RUNNING) == 0


def test_a_cancelled_request_stops_generating_and_frees_its_slot(generator) -> None:
    steps = []
    recorder = RecordingGenerator(generator)
    original = recorder.describe

    def counting(rows, stop_checks=None, on_step=None):
        def step():
            steps.append(1)
            if on_step:
                on_step()

        return original(rows, stop_checks, step)

    recorder.describe = counting
    engine = engine_with(recorder, max_batch_size=1, batch_wait_ms=0)

    async def scenario():
        task = asyncio.create_task(engine.submit(make_rows(generator, 1, 3000)))
        await wait_until(lambda: len(steps) >= 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_until(lambda: engine.idle, timeout_s=5)
        started = time.perf_counter()
        (done,) = await engine.submit(make_rows(generator, 1, 2))
        return done, time.perf_counter() - started

    try:
        done, took = asyncio.run(scenario())
    finally:
        engine.stop()
    assert done.generated_tokens == 2
    assert len(steps) < 1000  # stopped long before its 3000 tokens
    assert took < 5


def test_a_poisoned_request_fails_alone(generator) -> None:
    poisoned = PoisonedGenerator(generator)
    engine = engine_with(poisoned, max_batch_size=8, batch_wait_ms=200)
    good = make_rows(generator, 2)
    bad = make_rows(generator, 1, prompt=POISON)

    async def scenario():
        return await asyncio.gather(
            engine.submit([good[0]]),
            engine.submit(bad),
            engine.submit([good[1]]),
            return_exceptions=True,
        )

    try:
        first, failed, second = asyncio.run(scenario())
        after = asyncio.run(engine.submit([good[0]]))
    finally:
        engine.stop()
    assert isinstance(failed, RuntimeError) and "injected failure" in str(failed)
    assert first == generator.describe([good[0]]) and second == generator.describe([good[1]])
    assert poisoned.batches[0] == 3  # they were batched together, then isolated
    assert after == first


def test_deadline_ends_a_request_and_frees_the_engine(generator) -> None:
    engine = engine_with(generator, max_batch_size=1, batch_wait_ms=0, request_timeout_s=0.5)

    async def scenario():
        with pytest.raises(DeadlineExceeded):
            await engine.submit(make_rows(generator, 1, 3000))
        await wait_until(lambda: engine.idle, timeout_s=5)

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


class OutOfMemoryOnBatches(RecordingGenerator):
    """Injects CUDA's out-of-memory error for any batch of more than one row (no GPU here)."""

    def describe(self, rows, stop_checks=None, on_step=None):
        self.batches.append(len(rows))
        if len(rows) > 1:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return self.generator.describe(rows, stop_checks, on_step)


def test_out_of_memory_splits_the_batch_until_it_fits(generator) -> None:
    oom = OutOfMemoryOnBatches(generator)
    engine = engine_with(oom, max_batch_size=8, batch_wait_ms=200)
    rows = make_rows(generator, 4)

    async def scenario():
        return await asyncio.gather(*(engine.submit([row]) for row in rows))

    try:
        results = asyncio.run(scenario())
    finally:
        engine.stop()
    assert oom.batches == [4, 2, 1, 1, 2, 1, 1]
    assert [r[0] for r in results] == [generator.describe([row])[0] for row in rows]
