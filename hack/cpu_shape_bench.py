#!/usr/bin/env python3
"""The engine's decoding step on a real model's shapes, on this machine's CPU.

Random weights with Qwen3-VL-2B's real configuration (no download), in bfloat16, through the
engine's own loading and decoding step (`RunningBatch`, compiled as the server compiles it):
  roofline   text weight bytes ÷ the copy bandwidth measured in the same run, ÷ the batch-1
             decoding step's time (goal >= 0.7: the step is close to reading its weights once)
  rows 16/1  decode-phase tokens/s with 16 rows ÷ with 1 row (goal >= 12)
  4-bit RSS  peak resident memory of a process that loads the model and decodes, 4-bit ÷
             bfloat16 (goal <= 0.4), as shipped (the vision tower in bf16), and beside it
             with --quantize_vision true

Run by `hack/bench.py` (its CPU run) or alone:
  python hack/cpu_shape_bench.py [--shape qwen3-vl-2b] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOALS = {"roofline": (">=", 0.7), "rows_16_over_1": (">=", 12.0), "rss_4bit_over_bf16": ("<=", 0.4)}
STEPS = 24  # decoding steps timed per batch size
RSS_MAX_LEN = 1024  # the cache of the memory runs: the same in both, small beside the weights


def verdict(name: str, value: float) -> str:
    op, goal = GOALS[name]
    ok = value >= goal if op == ">=" else value <= goal
    return f"goal {op} {goal:g}: {'PASS' if ok else 'MISS'}"


def copy_bandwidth_gbps(threads: int) -> float:
    """Bytes per second a large tensor copy moves (the source's bytes), best of five."""
    import torch

    torch.set_num_threads(threads)
    source = torch.ones(512 * 1024 * 1024 // 2, dtype=torch.bfloat16)  # 512 MiB
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(5))
    return source.numel() * source.element_size() / best / 1e9


def _timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def text_weight_bytes(model) -> int:
    """Bytes a decoding step reads: the language model's weights and the output layer, not
    the vision tower's, nor the token embedding's (a step looks up one row of it; when the
    output layer is tied to it, the output layer counts it once). A layer packed for oneDNN
    (`predictor.engine.packed_linear`) reads its weight's bytes in another layout."""
    from predictor.engine.packed_linear import PackedLinear

    def size(module) -> int:
        if isinstance(module, PackedLinear):
            return module.in_features * module.out_features * module.packed.element_size()
        return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))

    language = model.model.language_model
    return size(model.lm_head) + sum(
        size(module) for module in language.modules() if module is not language.embed_tokens
    )


def decode_figures(checkpoint: Path, threads: int) -> dict:
    """Median decoding-step time at 1 and at 16 rows, through the engine's compiled step."""
    import torch
    from PIL import Image

    from predictor.engine.generation import Generator
    from predictor.engine.loading import load_model
    from predictor.engine.running_batch import RunningBatch
    from predictor.inputs.images import fit_to_budget
    from predictor.params import PixelBudget, SamplingParams
    from predictor.rows import Row
    from predictor.settings import Settings

    settings = Settings(model_dir=str(checkpoint), device="cpu", dtype="auto", cpu_threads=threads)
    loaded = load_model(settings)
    torch.set_num_threads(threads)
    generator = Generator(loaded.model, loaded.processor)
    weights = text_weight_bytes(loaded.model)
    started = time.perf_counter()
    batch = RunningBatch(generator, max_rows=16, max_len=1024, compile_step=True)
    batch.warm_up()
    compile_s = time.perf_counter() - started
    budget = PixelBudget(200_704, 200_704)  # 448x448: 256 image tokens
    picture = fit_to_budget(Image.new("RGB", (448, 448), (90, 120, 60)), budget, 32)
    sampling = SamplingParams(max_new_tokens=STEPS + 8, min_new_tokens=STEPS + 8)
    row = Row.single(picture, "Describe this image.", sampling)
    figures: dict = {"dtype": str(loaded.dtype), "threads": threads, "compile_s": compile_s}
    for rows in (1, 16):
        batch.admit([row] * rows, list(range(rows)), [None] * rows)
        batch.step()  # the first step at this size and span
        times = [_timed(batch.step) for _ in range(STEPS)]
        batch.clear()
        figures[f"step_ms_{rows}"] = statistics.median(times) * 1000
    figures["weight_gb"] = weights / 1e9
    return figures


def peak_rss_worker(
    checkpoint: str, quantization: str, threads: int, quantize_vision: bool = False
) -> None:
    """In a process of its own: load, decode a few steps, print the peak RSS in MB, with the
    peak and the RSS right after loading (transformers may hold bf16 copies while it
    quantizes, so the load can be the peak)."""
    import torch
    from PIL import Image

    from predictor.engine.generation import Generator
    from predictor.engine.loading import load_model
    from predictor.engine.running_batch import describe
    from predictor.params import SamplingParams
    from predictor.rows import Row
    from predictor.settings import Settings

    settings = Settings(
        model_dir=checkpoint,
        device="cpu",
        dtype="auto",
        quantization=quantization,
        quantize_vision=quantize_vision,
    )
    loaded = load_model(settings)
    after_load = {"load_peak_rss_mb": _high_water_mb(), "load_rss_mb": _status_mb("VmRSS")}
    torch.set_num_threads(threads)
    generator = Generator(loaded.model, loaded.processor)
    picture = Image.new("RGB", (448, 448), (90, 120, 60))
    row = Row.single(picture, "Describe this image.", SamplingParams(max_new_tokens=4))
    describe(generator, [row], max_len=RSS_MAX_LEN)
    after_decode = {"peak_rss_mb": _high_water_mb(), "rss_mb": _status_mb("VmRSS")}
    print(json.dumps({**after_decode, **after_load}))


def _high_water_mb() -> float:
    """This process's peak resident memory (VmHWM). Not `getrusage`'s ru_maxrss: Linux keeps
    that across exec, so a worker started by a process holding a model reports the parent's."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_mb(
    checkpoint: Path, quantization: str, threads: int, quantize_vision: bool = False
) -> dict:
    """{"peak_rss_mb", "rss_mb", "load_peak_rss_mb", "load_rss_mb"} of a worker process: its
    peak and its RSS after decoding, and the same two right after loading."""
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-worker",
            str(checkpoint),
            quantization,
            str(threads),
            str(quantize_vision).lower(),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(shape: str = "qwen3-vl-2b", threads: int = 1) -> dict:
    from hack.model_shapes import write_shaped_checkpoint

    with tempfile.TemporaryDirectory(prefix="qwen-vl-cpu-shape-") as tmp:
        started = time.perf_counter()
        checkpoint = write_shaped_checkpoint(shape, Path(tmp) / shape)
        print(f"{shape}: random bf16 checkpoint written in {time.perf_counter() - started:.0f} s")
        bandwidth = copy_bandwidth_gbps(threads)
        figures = decode_figures(checkpoint, threads)
        roofline_ms = figures["weight_gb"] / bandwidth * 1000
        figures["copy_gbps"] = bandwidth
        figures["roofline"] = roofline_ms / figures["step_ms_1"]
        figures["rows_16_over_1"] = 16 * figures["step_ms_1"] / figures["step_ms_16"]
        print(
            f"{shape} on {threads} CPU thread(s), {figures['dtype']}, step compiled in "
            f"{figures['compile_s']:.0f} s: {figures['weight_gb']:.2f} GB of text weights, copy "
            f"{bandwidth:.1f} GB/s, roofline {roofline_ms:.0f} ms; batch-1 step "
            f"{figures['step_ms_1']:.0f} ms: roofline ratio {figures['roofline']:.2f}  "
            f"{verdict('roofline', figures['roofline'])}"
        )
        scaling = figures["rows_16_over_1"]
        print(
            f"{shape}: 16-row step {figures['step_ms_16']:.0f} ms: decode tokens/s 16 rows / 1 "
            f"{scaling:.1f}  {verdict('rows_16_over_1', scaling)}"
        )
        bf16 = memory_mb(checkpoint, "none", threads)
        four = memory_mb(checkpoint, "4bit", threads)
        vision = memory_mb(checkpoint, "4bit", threads, quantize_vision=True)
        ratio = four["peak_rss_mb"] / bf16["peak_rss_mb"]
        figures.update(
            rss_bf16_mb=bf16["peak_rss_mb"],
            rss_4bit_mb=four["peak_rss_mb"],
            rss_4bit_over_bf16=ratio,
            rss_after_decode_bf16_mb=bf16["rss_mb"],
            rss_after_decode_4bit_mb=four["rss_mb"],
            rss_load_peak_bf16_mb=bf16["load_peak_rss_mb"],
            rss_load_peak_4bit_mb=four["load_peak_rss_mb"],
            rss_4bit_vision_mb=vision["peak_rss_mb"],
            rss_4bit_vision_over_bf16=vision["peak_rss_mb"] / bf16["peak_rss_mb"],
        )
        print(
            f"{shape}: peak RSS 4-bit {four['peak_rss_mb']:.0f} MB / bf16 "
            f"{bf16['peak_rss_mb']:.0f} MB: {ratio:.2f}  {verdict('rss_4bit_over_bf16', ratio)}"
            f"; loading's peak {four['load_peak_rss_mb']:.0f} MB / "
            f"{bf16['load_peak_rss_mb']:.0f} MB; after loading and decoding: "
            f"{four['rss_mb']:.0f} MB / {bf16['rss_mb']:.0f} MB"
        )
        print(
            f"{shape}: with --quantize_vision true (the vision tower in 4 bits too): peak RSS "
            f"{vision['peak_rss_mb']:.0f} MB, {figures['rss_4bit_vision_over_bf16']:.2f} of bf16"
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-vl-2b", choices=("qwen3-vl-2b", "qwen3-vl-8b"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rss-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_worker:
        checkpoint, quantization, threads, quantize_vision = args.rss_worker
        peak_rss_worker(checkpoint, quantization, int(threads), quantize_vision == "true")
        return
    figures = run(args.shape, args.threads)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
