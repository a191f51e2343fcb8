"""GPU-only checks, run by hack/gpu_check.sh; skipped where no CUDA device is visible."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from predictor.engine.generation import Generator
from predictor.engine.loading import load_model
from predictor.engine.running_batch import RunningBatch, describe
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.rows import Row
from predictor.settings import Settings
from tests import images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(settings: Settings, compile_step: bool = False) -> list:
    loaded = load_model(settings)
    generator = Generator(loaded.model, loaded.processor)
    image = fit_to_budget(images.gradient((128, 96)), generator.default_budget, 32)
    rows = [Row.single(image, "Describe this image.", SamplingParams(max_new_tokens=8))] * 2
    batch = RunningBatch(generator, max_rows=4, max_len=512, compile_step=compile_step)
    batch.warm_up()
    done = dict(batch.admit(rows, [0, 1], [None, None]))
    while len(batch):
        done.update(batch.step())
    return [done[0], done[1]]


def test_bf16_on_cuda_by_default(tiny_qwen3_vl: Path) -> None:
    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl)))
    assert loaded.device.type == "cuda" and loaded.dtype == torch.bfloat16
    completions = run(Settings(model_dir=str(tiny_qwen3_vl)))
    assert [c.generated_tokens for c in completions] == [8, 8]


@pytest.mark.parametrize("mode", ["4bit", "8bit"])
def test_quantized_loading(tiny_qwen3_vl: Path, mode: str) -> None:
    pytest.importorskip("bitsandbytes")
    completions = run(Settings(model_dir=str(tiny_qwen3_vl), quantization=mode))
    assert all(c.generated_tokens == 8 for c in completions)


def test_cuda_graphs_of_the_decoding_step_give_the_eager_tokens(tiny_qwen3_vl: Path) -> None:
    """float32: the compiled step (CUDA graphs) and the eager one must agree exactly."""
    settings = Settings(model_dir=str(tiny_qwen3_vl), dtype="float32")
    eager = run(settings)
    assert [c.text for c in run(settings, compile_step=True)] == [c.text for c in eager]


def test_continuous_batching_on_cuda_gives_the_tokens_generate_gives(tiny_qwen3_vl: Path) -> None:
    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl), dtype="float32"))
    generator = Generator(loaded.model, loaded.processor)
    budget = generator.default_budget
    rows = [
        Row.single(fit_to_budget(picture, budget, 32), prompt, SamplingParams(max_new_tokens=n))
        for picture, prompt, n in (
            (images.gradient((128, 96)), "Describe this image.", 24),
            (images.solid((64, 64), (0, 0, 255)), "What colour is it?", 12),
        )
    ]
    expected = [describe(generator, [row])[0] for row in rows]
    batch = RunningBatch(generator)
    finished = dict(batch.admit([rows[0]], [0], [None]))
    for _ in range(4):
        finished.update(batch.step())
    finished.update(batch.admit([rows[1]], [1], [None]))
    while len(batch):
        finished.update(batch.step())
    assert [finished[0], finished[1]] == expected


def test_guided_rows_on_cuda_with_the_compiled_step(tiny_qwen3_vl: Path) -> None:
    """The grammar's mask lands on the device's logits (CUDA graphs' output included), and
    every stopped output matches its schema."""
    import json
    from dataclasses import replace

    from predictor.engine.loading import vocab_size
    from predictor.inputs.guides import GuideCompiler
    from predictor.params import Guide

    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl)))
    generator = Generator(loaded.model, loaded.processor)
    schema = {
        "type": "object",
        "properties": {
            "caption": {"type": "string", "maxLength": 30},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
        "required": ["caption", "n"],
    }
    guide = Guide("json_schema", json.dumps(schema))
    compiler = GuideCompiler(generator.tokenizer, vocab_size(loaded.model.config))
    sampling = SamplingParams(max_new_tokens=48, guide=guide)
    rows = []
    for color in ((200, 40, 40), (40, 200, 40), (40, 40, 200)):
        image = fit_to_budget(images.solid((64, 48), color), generator.default_budget, 32)
        row = Row.single(image, "Describe this image.", sampling)
        rows.append(replace(row, grammar=compiler.compile(guide)))
    free = Row.single(rows[0].images[0], "Describe this image.", SamplingParams(max_new_tokens=8))
    batch = RunningBatch(generator, max_rows=4, max_len=512, compile_step=True)
    batch.warm_up()
    done = dict(batch.admit([*rows, free], [0, 1, 2, 3], [None] * 4))
    while len(batch):
        done.update(batch.step())
    stopped = [done[i] for i in range(3) if done[i].finish_reason == "stop"]
    assert stopped and done[3].generated_tokens == 8
    for completion in stopped:  # the schema, checked by hand (no jsonschema on that machine)
        value = json.loads(completion.text)
        assert set(value) == {"caption", "n"} and isinstance(value["n"], int)
        assert isinstance(value["caption"], str) and len(value["caption"]) <= 30
    compiler.close()


def test_sampled_rows_on_cuda_are_batched_and_a_seed_repeats_itself(tiny_qwen3_vl: Path) -> None:
    """The batched on-device sampler on CUDA: seeded rows repeat their text whatever runs
    beside them, and unseeded rows with the checkpoints' kind of settings still finish."""
    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl), dtype="float32"))
    generator = Generator(loaded.model, loaded.processor)
    image = fit_to_budget(images.gradient((128, 96)), generator.default_budget, 32)
    seeded = SamplingParams(max_new_tokens=12, temperature=0.7, top_p=0.8, top_k=20, seed=5)
    free = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, repetition_penalty=1.1)
    row = Row.single(image, "Describe this image.", seeded)
    alone = describe(generator, [row])[0]
    crowd = [Row.single(image, "Describe this image.", free)] * 5
    together = describe(generator, [*crowd[:2], row, *crowd[2:]])
    assert together[2].text == alone.text
    assert all(c.generated_tokens >= 1 for c in together)


def test_the_engine_process_on_cuda_streams_what_it_answers(
    tiny_qwen3_vl: Path, tmp_path: Path
) -> None:
    """The default layout on a GPU: the engine core owns the device in a process of its
    own; a streamed chat completion joins to the plain one."""
    import json

    import httpx

    from tests.live_server import start_server

    picture = images.jpeg((96, 72), (200, 40, 40))
    body = {
        "model": "qwen-vl",
        "max_tokens": 10,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this image."},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/jpeg;base64," + _b64(picture)},
                    },
                ],
            }
        ],
    }
    with start_server(tiny_qwen3_vl, tmp_path / "server.log", "--device", "cuda") as server:
        body["model"] = server.model_name
        plain = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert plain.status_code == 200, plain.text
        deltas = []
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=120
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    deltas.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    assert "".join(deltas) == plain.json()["choices"][0]["message"]["content"]


def test_a_real_out_of_memory_in_the_vision_encoder_is_retryable(tiny_qwen3_vl: Path) -> None:
    """Fill the device, then encode: the CUDA allocator's own error becomes the retryable
    OutOfDeviceMemory, and once the filler is gone the same image encodes."""
    from predictor.errors import OutOfDeviceMemory

    loaded = load_model(Settings(model_dir=str(tiny_qwen3_vl)))
    generator = Generator(loaded.model, loaded.processor)
    image = fit_to_budget(images.gradient((512, 512)), generator.default_budget, 32)
    row = Row.single(image, "Describe this image.", SamplingParams(max_new_tokens=2))
    filler = []
    size, _ = torch.cuda.mem_get_info()
    try:
        while size > 2**20:  # fill the device to within a megabyte
            try:
                filler.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
            except torch.OutOfMemoryError:
                size //= 2
        with pytest.raises(OutOfDeviceMemory):
            generator.encode(row)
    finally:
        filler.clear()
        torch.cuda.empty_cache()
    assert generator.encode(row).image_features is not None


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
