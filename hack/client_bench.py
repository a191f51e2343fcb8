#!/usr/bin/env python3
"""Triton's perf_analyzer and NVIDIA's aiperf against the real server, as users run them.

perf_analyzer (REST and gRPC, concurrency 1 and 8) reads the model's metadata and configuration
(Triton's model-configuration extension), then sends one image per request (`--shape image:1`)
from an input-data file, with the binary tensor extension over REST and `raw_input_contents`
over gRPC, over keep-alive connections. It comes from hack/perf_analyzer.sh (the PyPI wheel's
binary, run through Debian trixie's C runtime).

aiperf (hack/aiperf.sh, its own venv) streams OpenAI chat completions with a synthetic image
each, `--extra-inputs ignore_eos:true` (so every request generates exactly its output length,
as in vLLM's benchmarks) and its tokenizer pointed at the served checkpoint. Token counts are
the server's (`--use-server-token-count`): the random test model's text does not re-tokenize
to the tokens that made it.

Usage: python hack/client_bench.py [--tokens 16] [--requests 32] [--json OUT.json]
       (also: python hack/bench.py --perf-analyzer)
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 8)


def install_perf_analyzer() -> Path:
    """The perf_analyzer wrapper (installed once by hack/perf_analyzer.sh)."""
    done = subprocess.run(
        ["bash", str(ROOT / "hack" / "perf_analyzer.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},  # one with pip, to download the wheel
    )
    if done.returncode != 0:
        raise RuntimeError(f"hack/perf_analyzer.sh failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def write_input_data(path: Path, pictures: list[bytes]) -> Path:
    """perf_analyzer's JSON input data: one request per picture. A BYTES tensor's "b64" is its
    raw serialised form (a 4-byte little-endian length before each element)."""
    steps = [
        {"image": {"b64": base64.b64encode(struct.pack("<I", len(p)) + p).decode()}}
        for p in pictures
    ]
    path.write_text(json.dumps({"data": steps}))
    return path


def run_perf_analyzer(
    binary: Path,
    target: str,
    protocol: str,
    input_data: Path,
    work: Path,
    *,
    model: str = "qwen-vl",
    requests: int = 32,
    concurrency: tuple[int, ...] = CONCURRENCY,
    extra: tuple[str, ...] = (),
    stability_percent: int = 100,
) -> list[dict[str, float]]:
    """One perf_analyzer run; returns its CSV rows (throughput and latencies, microseconds).

    count_windows with a loose stability rule (the last 3 windows' throughput and latency
    within `stability_percent` of their mean): on a small shared machine windows rarely agree
    within perf_analyzer's default 10%."""
    report = work / f"perf_analyzer-{protocol}.csv"
    low, high = min(concurrency), max(concurrency)
    step = max(high - low, 1)
    command = [
        str(binary),
        "-m", model,
        "-u", target,
        "-i", protocol,
        "--shape", "image:1",
        "--input-data", str(input_data),
        "--concurrency-range", f"{low}:{high}:{step}",
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(requests),
        "--stability-percentage", str(stability_percent),
        "--max-trials", "10",
        "-f", str(report),
        *extra,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or not report.exists():
        raise RuntimeError(
            f"perf_analyzer {protocol} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    with report.open() as file:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(file)]


def install_aiperf() -> Path:
    """The aiperf executable (installed once into its own venv by hack/aiperf.sh)."""
    done = subprocess.run(
        ["bash", str(ROOT / "hack" / "aiperf.sh")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": sys.executable},  # its venv is built from this Python
    )
    if done.returncode != 0:
        raise RuntimeError(f"hack/aiperf.sh failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def run_aiperf(
    binary: Path,
    url: str,
    tokenizer: Path,
    work: Path,
    *,
    model: str = "qwen-vl",
    requests: int = 16,
    concurrency: int = 4,
    tokens: int = 16,
) -> dict:
    """One `aiperf profile` of streaming chat completions with images; its summary JSON."""
    artifacts = work / f"aiperf-c{concurrency}"
    command = [
        str(binary), "profile",
        "--model", model,
        "--url", url,
        "--endpoint-type", "chat",
        "--streaming",
        "--tokenizer", str(tokenizer),
        "--use-server-token-count",
        "--image-width-mean", "128", "--image-height-mean", "96", "--image-batch-size", "1",
        "--synthetic-input-tokens-mean", "16",
        "--output-tokens-mean", str(tokens),
        "--extra-inputs", "ignore_eos:true",
        "--concurrency", str(concurrency),
        "--request-count", str(requests),
        "--random-seed", "1",
        "--artifact-dir", str(artifacts),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=work)
    summary = artifacts / "profile_export_aiperf.json"
    if done.returncode != 0 or not summary.exists():
        raise RuntimeError(f"aiperf failed ({done.returncode}):\n{done.stdout[-6000:]}")
    return json.loads(summary.read_text())


def aiperf_table(runs: dict[int, dict]) -> str:
    lines = [
        "| concurrency | requests | errors | req/s | output tok/s | TTFT p50 ms "
        "| ITL avg ms | latency p50 ms | output tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for concurrency, run in runs.items():
        lines.append(
            f"| {concurrency} | {run['request_count']['avg']:.0f} | {len(run['error_summary'])} "
            f"| {run['request_throughput']['avg']:.1f} "
            f"| {run['output_token_throughput']['avg']:.0f} "
            f"| {run['time_to_first_token']['p50']:.0f} | {run['inter_token_latency']['avg']:.1f} "
            f"| {run['request_latency']['p50']:.0f} | {run['output_sequence_length']['avg']:.0f} |"
        )
    return "\n".join(lines)


def table(results: dict[str, list[dict[str, float]]]) -> str:
    lines = [
        "| protocol | concurrency | infer/s | p50 ms | p90 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for protocol, rows in results.items():
        for row in rows:
            lines.append(
                f"| {protocol} | {row['Concurrency']:.0f} | {row['Inferences/Second']:.1f} "
                f"| {row['p50 latency'] / 1000:.0f} | {row['p90 latency'] / 1000:.0f} "
                f"| {row['p99 latency'] / 1000:.0f} |"
            )
    return "\n".join(lines)


def bench_clients(tokens: int = 16, requests: int = 32) -> dict:
    """Start the tiny model's server; run perf_analyzer (REST, gRPC) and aiperf against it."""
    from hack.make_tiny_model import make_tiny_model
    from tests import images
    from tests.live_server import start_server

    perf_analyzer, aiperf = install_perf_analyzer(), install_aiperf()
    with tempfile.TemporaryDirectory(prefix="qwen-vl-client-bench-") as tmp:
        work = Path(tmp)
        model_dir = make_tiny_model(work / "tiny", "qwen3-vl")
        pictures = [images.jpeg(color=(40 * i, 90, 160)) for i in range(4)]
        data = write_input_data(work / "input.json", pictures)
        args = ("--max_new_tokens", str(tokens))
        with start_server(model_dir, work / "server.log", *args) as server:
            http_target = f"127.0.0.1:{server.http_port}"
            results = {
                "rest": run_perf_analyzer(
                    perf_analyzer, http_target, "http", data, work, requests=requests
                ),
                "grpc": run_perf_analyzer(
                    perf_analyzer, server.grpc_target, "grpc", data, work, requests=requests
                ),
            }
            chat = {
                c: run_aiperf(
                    aiperf, server.url, model_dir, work, requests=requests, concurrency=c,
                    tokens=tokens,
                )
                for c in CONCURRENCY
            }  # fmt: skip
    print(f"perf_analyzer 2.60, tiny model, {tokens} tokens per image, 1 image per request")
    print(table(results))
    print(f"\naiperf 0.13, streaming chat, 1 image of 128x96, ignore_eos, {tokens} tokens")
    print(aiperf_table(chat))
    keep = ("request_count", "request_throughput", "output_token_throughput", "time_to_first_token")
    aiperf_summary = {c: {k: run[k] for k in keep} for c, run in chat.items()}
    return {"tokens": tokens, "perf_analyzer": results, "aiperf": aiperf_summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16, help="the server's --max_new_tokens")
    parser.add_argument("--requests", type=int, default=32, help="requests per measurement")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    results = bench_clients(args.tokens, args.requests)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
