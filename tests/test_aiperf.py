"""NVIDIA's aiperf, unmodified, against the real server's OpenAI route.

The run vLLM users make: streaming chat completions with a synthetic image each and
`--extra-inputs ignore_eos:true`, aiperf's tokenizer pointed at the served checkpoint. aiperf
lives in a venv of its own (hack/aiperf.sh: its dependencies must not touch the project's).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hack.client_bench import install_aiperf, run_aiperf
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def aiperf() -> Path:
    return install_aiperf()


@pytest.fixture(scope="module")
def server(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("aiperf") / "server.log"
    with start_server(tiny_qwen3_vl, log) as live:
        yield live


def test_aiperf_streaming_chat_with_images_and_ignore_eos(
    aiperf: Path, server: LiveServer, tiny_qwen3_vl: Path, tmp_path: Path
) -> None:
    run = run_aiperf(
        aiperf, server.url, tiny_qwen3_vl, tmp_path, requests=8, concurrency=2, tokens=12
    )
    assert run["is_complete"] and not run["was_cancelled"]
    assert run["error_summary"] == []
    assert run["request_count"]["avg"] == 8
    lengths = run["output_sequence_length"]
    assert lengths["min"] == lengths["max"] == 12  # ignore_eos: every request ran to its limit
    assert run["time_to_first_token"]["p50"] > 0 and run["num_images"]["avg"] == 1
