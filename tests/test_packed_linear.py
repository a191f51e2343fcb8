"""The text decoder's linear layers in oneDNN's blocked layout (bfloat16 on a CPU): the same
products as `F.linear`, the same greedy tokens through the engine's step, eager and compiled,
and left alone where they do not apply (float32, which the exact-text tests use)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from predictor.engine.generation import Generator
from predictor.engine.packed_linear import PackedLinear, can_pack, pack_text_decoder
from predictor.engine.running_batch import RunningBatch
from predictor.inputs.images import fit_to_budget
from predictor.params import SamplingParams
from predictor.rows import Row
from tests import images
from tests.reference import reference_greedy

pytestmark = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU has no oneDNN bfloat16 kernels",
)


def _generator(model_dir, dtype: str, pack: bool = True) -> Generator:
    from predictor.engine.loading import load_model
    from predictor.settings import Settings

    loaded = load_model(Settings(model_dir=str(model_dir), device="cpu", dtype=dtype), pack=pack)
    return Generator(loaded.model, loaded.processor)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 16, 300])
def test_a_packed_layer_gives_what_the_linear_layer_gives(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = torch.nn.Linear(64, 160, bias=bias).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, dtype=torch.bfloat16)
    expected = linear(x)
    got = PackedLinear(linear)(x)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1.6e-2, atol=1e-2)


def _rows(generator: Generator) -> list[Row]:
    budget, factor = generator.default_budget, generator.resize_factor
    return [
        Row.single(fit_to_budget(images.gradient((128, 96)), budget, factor), "Describe.",
                   SamplingParams(max_new_tokens=12)),
        Row.single(fit_to_budget(images.solid((64, 64), (0, 0, 255)), budget, factor), "Hi",
                   SamplingParams(max_new_tokens=8)),
    ]  # fmt: skip


def _tokens(batch: RunningBatch, rows: list[Row]) -> list[str]:
    done = dict(batch.admit(rows, list(range(len(rows))), [None] * len(rows)))
    while len(batch):
        done.update(batch.step())
    return [done[i].text for i in range(len(rows))]


@pytest.mark.slow
def test_bfloat16_on_a_cpu_packs_the_text_decoder_and_decodes_the_same(tiny_qwen3_vl) -> None:
    plain = _generator(tiny_qwen3_vl, "bfloat16", pack=False)
    rows = _rows(plain)
    expected = [reference_greedy(plain, row) for row in rows]  # plain transformers
    plain_layers = sum(type(m) is torch.nn.Linear for m in plain.model.modules())
    del plain  # its weights are views of transformers' mapping of the checkpoint
    gc.collect()
    packed = _generator(tiny_qwen3_vl, "bfloat16")  # packed as it loads
    maps = Path("/proc/self/maps").read_text()
    assert str(tiny_qwen3_vl) not in maps  # read without a mapping: no pages left resident
    language = packed.model.model.language_model
    per_layer = 7  # q, k, v, o, gate, up, down
    assert sum(isinstance(m, PackedLinear) for m in language.modules()) == per_layer * len(
        language.layers
    )
    assert isinstance(packed.model.lm_head, PackedLinear)
    assert pack_text_decoder(packed.model) == 0  # once only
    assert sum(type(m) is torch.nn.Linear for m in packed.model.modules()) == plain_layers - (
        per_layer * len(language.layers) + 1
    )
    assert _tokens(RunningBatch(packed, max_rows=2, max_len=512), rows) == expected
    compiled = RunningBatch(packed, max_rows=2, max_len=512, compile_step=True)
    compiled.warm_up()
    assert _tokens(compiled, rows) == expected


@pytest.mark.slow
def test_float32_is_not_packed(tiny_qwen3_vl) -> None:
    generator = _generator(tiny_qwen3_vl, "float32")
    assert not can_pack(generator.model)
    RunningBatch(generator, max_rows=1, max_len=256)
    assert not any(isinstance(m, PackedLinear) for m in generator.model.modules())


@pytest.mark.slow
def test_the_compiled_packed_step_runs_outside_inference_mode(tiny_qwen3_vl) -> None:
    """A served model has no gradients: the compiled step is not traced for a backward that
    the packed operator has no formula for, wherever it is called from."""
    packed = _generator(tiny_qwen3_vl, "bfloat16")
    assert not any(p.requires_grad for p in packed.model.parameters())
    batch = RunningBatch(packed, max_rows=2, max_len=256, compile_step=True)
    idle = torch.zeros((3, 2), dtype=torch.long)
    logits = batch.decode(idle[0], idle[1], idle[2], batch.decode.span_step)
    assert logits.shape == (2, packed.model.config.get_text_config().vocab_size)
