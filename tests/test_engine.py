"""The batching engine in-process, on the real tiny model: its one decode path, a `RunningBatch`.

The model is the real one; the `Recording*` wrappers only record what they are handed, and the
`Poisoned*` / `OutOfMemory*` ones inject a failure (no real input can make the tiny model fail
after validation, and there is no GPU to run out of memory, so the fault is injected to test
that it stays with its request).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from predictor import metrics
from predictor.engine.generation import Generator
from predictor.engine.loading import load_model
from predictor.engine.running_batch import RunningBatch, describe
from predictor.engine.scheduler import Engine, EngineConfig
from predictor.errors import DeadlineExceeded, OutOfDeviceMemory, QueueFull, Unavailable
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.protocol import Completion
from predictor.rows import Row
from predictor.settings import Settings
from tests import images

pytestmark = pytest.mark.slow
POISON = "POISON"


def is_poisoned(rows) -> bool:
    return any(row.messages[-1]["content"][-1]["text"] == POISON for row in rows)


@pytest.fixture(scope="module")
def generator(tiny_qwen3_vl: Path) -> Generator:
    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl), device="cpu", dtype="float32"))
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


def assert_poisoned_request_fails_alone(engine: Engine, generator: Generator) -> None:
    """Two good requests and a poisoned one arrive together: only the poisoned one fails,
    the others get their own text, and the engine serves the next request (then stops)."""
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
    assert first == describe(generator, [good[0]]) and second == describe(generator, [good[1]])
    assert after == first


def submit_together(engine: Engine, rows: list[Row]) -> list[list[Completion]]:
    """Each row as a request of its own, all at once; the engine is stopped afterwards."""

    async def scenario():
        return await asyncio.gather(*(engine.submit([row]) for row in rows))

    try:
        return asyncio.run(scenario())
    finally:
        engine.stop()


def assert_concurrent_requests_get_their_own_text(engine: Engine, generator: Generator) -> None:
    """Four one-row requests at once each get what they would get alone (then stops)."""
    rows = make_rows(generator, 4)
    results = submit_together(engine, rows)
    assert [r[0] for r in results] == [describe(generator, [row])[0] for row in rows]


def six_together_then_alone(engine: Engine, generator: Generator) -> list[list[Completion]]:
    """Six one-row requests at once give what each gives alone, and not all the same text
    (then stops); returns the concurrent completions."""
    rows = make_rows(generator, 6)

    async def scenario():
        together = await asyncio.gather(*(engine.submit([row]) for row in rows))
        alone = [await engine.submit([row]) for row in rows]
        return together, alone

    try:
        together, alone = asyncio.run(scenario())
    finally:
        engine.stop()
    assert together == alone
    assert len({c[0].text for c in together}) > 1
    return together


def short_and_long_together(engine: Engine, generator: Generator) -> tuple[Row, Completion]:
    """A 3-token and a 9-token request at once each stop at their own limit (then stops);
    returns the long row and its completion."""
    short, long = make_rows(generator, 1, 3)[0], make_rows(generator, 2, 9)[1]

    async def scenario():
        return await asyncio.gather(engine.submit([short]), engine.submit([long]))

    try:
        (a,), (b,) = asyncio.run(scenario())
    finally:
        engine.stop()
    assert (a.generated_tokens, b.generated_tokens) == (3, 9)
    assert a == describe(generator, [short])[0]
    return long, b


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


def test_an_idle_engine_admits_its_free_slots_plus_its_queue(generator) -> None:
    """A burst at an idle server: requests still decoding their images are headed for free
    batch slots, so the capacity is the free slots plus the queue, not the queue alone."""
    engine = engine_with(generator, max_batch_size=4, max_queue_size=2)
    try:
        admitted = [engine.reserve() for _ in range(6)]
        with pytest.raises(QueueFull):
            engine.reserve()
        with pytest.raises(QueueFull):
            engine.check_capacity()
        admitted.pop().release()
        admitted.append(engine.reserve())  # a released place is free again
    finally:
        for reservation in admitted:
            reservation.release()
        engine.stop()


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


# ---- the running batch ----------------------------------------------------------------


class RecordingBatch(RunningBatch):
    """Records the rows of each admission (prefill) and the batch size at each step."""

    admissions: list[int]
    steps: list[int]

    def __init__(self, generator: Generator, *args):
        super().__init__(generator, *args)
        self.admissions, self.steps = [], []

    def admit(self, rows, owners, stop_checks):
        self.admissions.append(len(rows))
        return super().admit(rows, owners, stop_checks)

    def step(self):
        self.steps.append(len(self))
        return super().step()


def continuous_engine(generator, batch_class=RecordingBatch, **config):
    batches: list[RecordingBatch] = []

    def make(gen, *args):
        batch = batch_class(gen, *args)
        batches.append(batch)
        return batch

    engine = Engine(generator, "engine-test", EngineConfig(**config), running_batch=make)
    return engine, batches


def test_concurrent_requests_decode_together_with_the_same_greedy_tokens(generator) -> None:
    engine, batches = continuous_engine(generator, max_batch_size=8, batch_wait_ms=200)
    together = six_together_then_alone(engine, generator)
    (batch,) = batches
    assert batch.admissions[0] == 6 and batch.steps[0] == 6  # one prefill, steps of six rows
    rows = make_rows(generator, 6)
    assert [c[0] for c in together] == [describe(generator, [row])[0] for row in rows]


def test_rows_of_very_different_prompt_lengths_prefill_apart_and_decode_together(
    generator,
) -> None:
    """Small and large images taken in at once: one prefill per length (the short rows
    first, none padded to the long ones), then one decoding step for all, each row with the
    text it gets alone."""
    engine, batches = continuous_engine(generator, max_batch_size=8, batch_wait_ms=200)
    budget, factor = generator.default_budget, generator.resize_factor
    small = make_rows(generator, 3)
    large = [
        replace(row, images=(fit_to_budget(images.solid((448, 448), color), budget, factor),))
        for row, color in zip(make_rows(generator, 2), [(10, 200, 30), (200, 10, 30)], strict=True)
    ]
    rows = [large[0], *small, large[1]]
    # Encoded as the front encodes them (their prompt lengths known before the engine).
    encoded = [replace(row, inputs=generator.preprocessor.encode(row)) for row in rows]
    together = submit_together(engine, encoded)
    (batch,) = batches
    assert batch.admissions[:2] == [3, 2] and batch.steps[0] == 5
    assert [c[0] for c in together] == [describe(generator, [row])[0] for row in rows]


def test_a_request_arriving_mid_decode_joins_the_running_batch(generator) -> None:
    engine, batches = continuous_engine(generator, max_batch_size=8)
    long, short = make_rows(generator, 1, 400)[0], make_rows(generator, 2, 5)[1]

    async def scenario():
        running = asyncio.create_task(engine.submit([long]))
        await wait_until(lambda: batches and len(batches[0].steps) >= 10)
        (joined,) = await engine.submit([short])
        still_running = not running.done()
        (finished,) = await running
        return joined, still_running, finished

    try:
        joined, still_running, finished = asyncio.run(scenario())
    finally:
        engine.stop()
    steps = batches[0].steps
    assert still_running  # the short request was answered while the long one decoded
    assert steps[0] == 1 and max(steps) == 2 and steps[-1] == 1
    assert finished.generated_tokens == 400
    assert joined == describe(generator, [short])[0]
    assert finished == describe(generator, [long])[0]


def test_rows_with_different_max_new_tokens_decode_together_and_stop_at_their_own(
    generator,
) -> None:
    engine, batches = continuous_engine(generator, max_batch_size=8, batch_wait_ms=200)
    long, b = short_and_long_together(engine, generator)
    assert batches[0].admissions == [2]
    assert batches[0].steps[:2] == [2, 2] and batches[0].steps[-1] == 1
    assert b == describe(generator, [long])[0]


def test_a_seeded_sampled_request_gives_the_same_text_alone_or_beside_others(generator) -> None:
    engine, _ = continuous_engine(generator, max_batch_size=8, batch_wait_ms=200)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.95, seed=7)
    (seeded,) = [replace(r, sampling=sampled) for r in make_rows(generator, 1)]
    others = make_rows(generator, 3)

    async def scenario():
        alone = await engine.submit([seeded])
        together = await asyncio.gather(
            engine.submit([others[1]]), engine.submit([seeded]), engine.submit([others[2]])
        )
        return alone, together[1]

    try:
        alone, beside = asyncio.run(scenario())
    finally:
        engine.stop()
    assert alone == beside


def test_a_cancelled_request_leaves_the_running_batch(generator) -> None:
    engine, batches = continuous_engine(generator, max_batch_size=1)

    async def scenario():
        task = asyncio.create_task(engine.submit(make_rows(generator, 1, 3000)))
        await wait_until(lambda: batches and len(batches[0].steps) >= 5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await wait_until(lambda: engine.idle, timeout_s=5)
        cancelled_at = len(batches[0].steps)
        (done,) = await engine.submit(make_rows(generator, 1, 2))
        return done, cancelled_at

    try:
        done, cancelled_at = asyncio.run(scenario())
    finally:
        engine.stop()
    assert done.generated_tokens == 2
    assert cancelled_at < 1000  # stopped long before its 3000 tokens


class PoisonedBatch(RecordingBatch):
    def admit(self, rows, owners, stop_checks):
        if is_poisoned(rows):
            self.admissions.append(len(rows))
            raise RuntimeError("injected failure")
        return super().admit(rows, owners, stop_checks)


def test_a_poisoned_request_fails_alone(generator) -> None:
    engine, batches = continuous_engine(
        generator, PoisonedBatch, max_batch_size=8, batch_wait_ms=200
    )
    assert_poisoned_request_fails_alone(engine, generator)
    assert batches[0].admissions[:4] == [3, 1, 1, 1]  # tried together, then one by one


class OutOfMemoryOnAdmission(RecordingBatch):
    """CUDA's out-of-memory error for any prefill of more than one row (no GPU here)."""

    def admit(self, rows, owners, stop_checks):
        if len(rows) > 1:
            self.admissions.append(len(rows))
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return super().admit(rows, owners, stop_checks)


def test_out_of_memory_on_admission_splits_the_rows_until_they_fit(generator) -> None:
    engine, batches = continuous_engine(
        generator, OutOfMemoryOnAdmission, max_batch_size=8, batch_wait_ms=200
    )
    assert_concurrent_requests_get_their_own_text(engine, generator)
    assert batches[0].admissions == [4, 2, 1, 1, 2, 1, 1]


class OutOfMemoryOnceWhileDecoding(RecordingBatch):
    """CUDA's out-of-memory error in the last layer's MLP in the third step, once: every layer
    has already written its keys for the step, so the step must leave the rows as they were."""

    def step(self):
        if len(self.steps) == 2 and not getattr(self, "failed", False):
            self.failed = True
            mlp = self.decode.layers[-1].mlp  # after that layer's attention wrote its keys
            original = mlp.forward

            def failing(*args, **kwargs):
                mlp.forward = original
                raise torch.OutOfMemoryError("injected: CUDA out of memory")

            mlp.forward = failing
        return super().step()


def each_alone_at_once(engine: Engine, rows: list[Row]) -> list:
    """Every row as a request of its own, all at once; results or exceptions, in order. The
    engine is stopped after."""

    async def scenario():
        return await asyncio.gather(*(engine.submit([row]) for row in rows), return_exceptions=True)

    try:
        return asyncio.run(scenario())
    finally:
        engine.stop()


def test_out_of_memory_while_decoding_fails_the_newest_rows_and_the_rest_go_on(
    generator,
) -> None:
    engine, batches = continuous_engine(
        generator, OutOfMemoryOnceWhileDecoding, max_batch_size=8, batch_wait_ms=200
    )
    rows = make_rows(generator, 4, 8)
    results = each_alone_at_once(engine, rows)
    assert batches[0].steps[:4] == [4, 4, 4, 2]  # the third step failed; two rows went on
    assert [isinstance(r, RuntimeError) for r in results] == [False, False, True, True]
    assert "out of device memory" in str(results[2])
    assert [r[0] for r in results[:2]] == [describe(generator, [row])[0] for row in rows[:2]]


class NaNInOneRowOnce(RecordingBatch):
    """The second running row's logits hold a NaN in the third step, once (a poisoned row:
    an overflow in its activations)."""

    def step(self):
        if len(self.steps) == 2 and not getattr(self, "poisoned", False):
            self.poisoned = True
            decode = self.decode
            batch = self

            class Poisoned:
                def __getattr__(self, name):
                    return getattr(decode, name)

                def __call__(self, *args, **kwargs):
                    batch.decode = decode  # once
                    logits = decode(*args, **kwargs).clone()
                    logits[1, 7] = float("nan")
                    return logits

            self.decode = Poisoned()
        return super().step()


def test_a_row_whose_logits_hold_nan_fails_alone_and_the_others_go_on(generator) -> None:
    engine, batches = continuous_engine(
        generator, NaNInOneRowOnce, max_batch_size=8, batch_wait_ms=200
    )
    rows = make_rows(generator, 4, 8)
    results = each_alone_at_once(engine, rows)
    assert batches[0].steps[:4] == [4, 4, 4, 3]  # the poisoned row left at the third step
    assert [isinstance(r, RuntimeError) for r in results] == [False, True, False, False]
    assert "NaN" in str(results[1])
    survivors = [r[0] for i, r in enumerate(results) if i != 1]
    assert survivors == [describe(generator, [row])[0] for i, row in enumerate(rows) if i != 1]


@pytest.mark.parametrize(("ratio", "wait_steps"), [(0.0, 0), (0.5, 3)])
def test_a_lone_waiting_row_joins_a_busy_batch_at_once_or_after_its_wait(
    generator, ratio: float, wait_steps: int
) -> None:
    """`--waiting_served_ratio` / `--max_waiting_tokens` (text-generation-inference's rule):
    one row waiting beside four running rows is taken in at the next step when the rule is off,
    and after `max_waiting_tokens` steps when one row is below the ratio (half of four)."""
    admitted_at: list[int] = []

    class StepCountingBatch(RecordingBatch):
        def admit(self, rows, owners, stop_checks):
            admitted_at.append(engine._steps)
            return super().admit(rows, owners, stop_checks)

    engine, batches = continuous_engine(
        generator,
        StepCountingBatch,
        max_batch_size=8,
        batch_wait_ms=200,
        waiting_served_ratio=ratio,
        max_waiting_tokens=wait_steps,
    )
    long_rows = make_rows(generator, 4, 300)
    short = make_rows(generator, 5, 4)[4]
    queued_at: list[int] = []
    enqueue = engine._enqueue

    def recording_enqueue(*args, **kwargs):
        request = enqueue(*args, **kwargs)
        queued_at.append(request.queued_at_step)
        return request

    engine._enqueue = recording_enqueue

    async def scenario():
        running = [asyncio.create_task(engine.submit([row])) for row in long_rows]
        await wait_until(lambda: batches and len(batches[0].steps) >= 5)
        (joined,) = await engine.submit([short])
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        return joined

    try:
        joined = asyncio.run(scenario())
    finally:
        engine.stop()
    assert len(admitted_at) == 2  # the four long rows together, then the short one
    waited = admitted_at[1] - queued_at[-1]
    assert wait_steps <= waited <= wait_steps + 1
    assert joined == describe(generator, [short])[0]


def test_out_of_memory_in_the_vision_encoder_is_a_retryable_unavailable(
    generator, monkeypatch
) -> None:
    """The encoder's OOM is the same 503-with-Retry-After as the decoder's, on the row's
    thread (encoded ahead) and inside the engine (encoded at prefill), and the engine goes
    on serving."""

    def full(*args, **kwargs):
        raise torch.OutOfMemoryError("injected: CUDA out of memory")

    row = make_rows(generator, 1, 4)[0]
    with monkeypatch.context() as patch:
        patch.setattr(generator.vision, "_encode", full)
        with pytest.raises(OutOfDeviceMemory) as raised:
            generator.encode(row)
        assert isinstance(raised.value, Unavailable) and raised.value.retry_after_s > 0
        engine, _ = continuous_engine(generator, max_batch_size=4)
        try:
            with pytest.raises(OutOfDeviceMemory):
                asyncio.run(engine.submit([row]))
        finally:
            patch.undo()
        try:
            assert asyncio.run(engine.submit([row]))[0] == describe(generator, [row])[0]
        finally:
            engine.stop()
