"""The canary analysis against a REAL Prometheus scraping two REAL predictors.

One module-wide stack: a stable and a canary predictor (the tiny model, free loopback ports) and
Debian's `prometheus` scraping both every second, each target labelled as the monitoring
component's PodMonitor labels pods in a cluster (namespace, pod, InferenceService), once as prod
(pool mode) and once as staging (Knative revisions). Test traffic of chosen cost and error rate
is sent to each, then the real CLI (`hack/canary.py analyze`) judges the window that traffic
covered. The canary is started as a release with two real weaknesses: a queue of one request
and a 4 s request timeout. Light traffic never meets them; the error scenario does (real 503s
and 504s). Latency is made by cost: the canary's requests ask for more tokens.

`auto` runs end to end in both modes with the Kubernetes API played by the stand-in of
tests/canary_support/stand_in_api.py (no cluster runs here) and the test as the gateway: each
request goes to the canary with the share the stand-in holds at that moment.
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from predictor.canary import cli as canary_cli
from tests.canary_support import clusters
from tests.canary_support.prometheus_server import (
    SCRAPE_INTERVAL_S,
    PrometheusServer,
    Target,
    prometheus_binary,
    start_prometheus,
)
from tests.canary_support.traffic import (
    Backend,
    Stream,
    drive,
    fixed,
    knative_share,
    pool_share,
    weighted,
)
from tests.live_server import LiveServer, full_length_picture, start_server

PROMETHEUS = prometheus_binary()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="no `prometheus` binary on PATH: install Debian's prometheus package "
        "(apt-get install prometheus), as .ci/run does",
    ),
]

ROOT = Path(__file__).resolve().parent.parent
CANARY_CLI = ROOT / "hack" / "canary.py"
CHEAP, SLOW, HUGE = 4, 150, 3000  # max_new_tokens: ~0.05 s, ~0.6 s, far past the 4 s timeout
STABLE_ARGS = ("--max_new_tokens_limit", "4000")
# One batch slot and a one-request queue: capacity 2 (free slots count), so concurrent load
# meets 503s.
CANARY_ARGS = (
    *STABLE_ARGS,
    "--max_batch_size", "1", "--max_queue_size", "1", "--request_timeout_s", "4",
)  # fmt: skip
# Test-sized limits: small windows carry tens of requests, not thousands.
THRESHOLDS = (
    "--min-requests", "10",
    "--max-error-ratio", "0.05",
    "--max-error-ratio-increase", "0.05",
    "--max-latency-ratio", "2",
    "--max-ttft-ratio", "2",
    "--latency-slack", "200ms",
)  # fmt: skip
PROD = 'namespace="qwen-vl-prod",serving_kserve_io_inferenceservice='
POOL_STABLE, POOL_CANARY = f'{PROD}"qwen-vl"', f'{PROD}"qwen-vl-canary"'
STAGING = 'namespace="qwen-vl-staging",serving_kserve_io_inferenceservice="qwen-vl",pod=~'
KNATIVE_STABLE = f'{STAGING}"qwen-vl-predictor-00001-deployment-.*"'
KNATIVE_CANARY = f'{STAGING}"qwen-vl-predictor-00002-deployment-.*"'
CHECK_LINE = re.compile(r"^  (traffic|error ratio|p95 latency|p95 TTFT)\s+([A-Z]+)\s", re.M)


@dataclass
class Stack:
    stable: LiveServer
    canary: LiveServer
    prometheus: PrometheusServer
    picture: bytes


def targets(stable: LiveServer, canary: LiveServer) -> list[Target]:
    """Each predictor twice: labelled as a prod pool pod and as a staging Knative revision pod."""
    s, c = f"127.0.0.1:{stable.http_port}", f"127.0.0.1:{canary.http_port}"
    isvc = "serving_kserve_io_inferenceservice"
    prod = {"namespace": "qwen-vl-prod"}
    staging = {"namespace": "qwen-vl-staging", isvc: "qwen-vl"}
    return [
        Target(s, {**prod, isvc: "qwen-vl", "pod": "qwen-vl-predictor-7d4f9-x2k7p"}),
        Target(c, {**prod, isvc: "qwen-vl-canary", "pod": "qwen-vl-canary-predictor-5c8b6-q9m2n"}),
        Target(s, {**staging, "pod": "qwen-vl-predictor-00001-deployment-6b7c9-abcde"}),
        Target(c, {**staging, "pod": "qwen-vl-predictor-00002-deployment-8f5d2-fghij"}),
    ]


@contextlib.contextmanager
def both(*managers: contextlib.AbstractContextManager) -> Iterator[list]:
    """Enter context managers at once (two predictors load in parallel), exit them all."""
    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(m.__enter__) for m in managers]
        entered, failure = [], None
        for manager, future in zip(managers, futures, strict=True):
            try:
                entered.append(future.result())
                stack.push(manager.__exit__)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        yield entered


@pytest.fixture(scope="module")
def stack(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("canary-live")
    servers = both(
        start_server(tiny_qwen3_vl, work / "stable.log", *STABLE_ARGS),
        start_server(tiny_qwen3_vl, work / "canary.log", *CANARY_ARGS),
    )
    with contextlib.ExitStack() as running:
        stable, canary = running.enter_context(servers)
        prom = running.enter_context(
            start_prometheus(PROMETHEUS, targets(stable, canary), work / "prom")
        )
        prom.wait_for_samples("count(up == 1) == 4")
        yield Stack(stable, canary, prom, full_length_picture(stable, 64))


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    """The real CLI, as a user runs it."""
    command = [sys.executable, str(CANARY_CLI), *args, "--prometheus-url", stack.prometheus.url]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def analyze(
    stack: Stack, since: float, canary: str, stable: str, scrape_wait: bool = True
) -> subprocess.CompletedProcess:
    """Judge the window from `since` to now, once Prometheus has scraped the last answers.

    The CLI's own `run` in this process (the subprocess tests below cover the entry point):
    it saves an interpreter start per verdict on a busy 2-core machine.
    """
    if scrape_wait:
        time.sleep(2.5 * SCRAPE_INTERVAL_S)
    end = time.time()
    argv = [
        "analyze",
        "--prometheus-url", stack.prometheus.url,
        "--canary-selector", canary,
        "--stable-selector", stable,
        "--window", f"{end - since:.3f}",
        "--end", f"{end:.3f}",
        *THRESHOLDS,
    ]  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = canary_cli.run(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def checks(result: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(CHECK_LINE.findall(result.stdout))


def scenario(stack: Stack, streams: list[Stream], seconds: float) -> tuple[float, Counter]:
    """Run traffic; the window starts 1.5 scrapes earlier, so it holds a sample from before the
    first request (`increase` only counts what happens between samples inside the window)."""
    since = time.time()
    time.sleep(1.5 * SCRAPE_INTERVAL_S)
    return since, drive(streams, seconds, stack.picture)


def explain(result: subprocess.CompletedProcess, tally: Counter) -> str:
    return f"traffic {dict(tally)}\n{result.stdout}\n{result.stderr}"


# --- the four verdicts ---------------------------------------------------------------------------


def test_canary_like_stable_passes(stack: Stack) -> None:
    since, tally = scenario(
        stack,
        [
            Stream(fixed("stable", stack.stable.infer_url, CHEAP)),
            Stream(fixed("canary", stack.canary.infer_url, CHEAP)),
        ],
        8,
    )
    pool = analyze(stack, since, POOL_CANARY, POOL_STABLE)
    print(pool.stdout)
    assert pool.returncode == 0, explain(pool, tally)
    assert set(checks(pool).values()) == {"PASS"}, explain(pool, tally)
    assert "verdict: PASS: every limit held" in pool.stdout
    # The same series found the way Knative mode finds them: by revision in the pod name.
    knative = analyze(stack, since, KNATIVE_CANARY, KNATIVE_STABLE, scrape_wait=False)
    assert knative.returncode == 0, explain(knative, tally)


def test_canary_with_server_errors_fails_on_errors(stack: Stack) -> None:
    since, tally = scenario(
        stack,
        [
            Stream(fixed("stable", stack.stable.infer_url, CHEAP)),
            # Concurrent load meets the canary's one slot and one-request queue: 503s.
            Stream(fixed("canary", stack.canary.infer_url, 16), clients=4),
            # Long generations run past its 4 s request timeout: 504s.
            Stream(fixed("canary", stack.canary.infer_url, HUGE)),
        ],
        8,
    )
    assert tally[("canary", 503)] and tally[("canary", 504)], tally
    result = analyze(stack, since, POOL_CANARY, POOL_STABLE)
    print(result.stdout)
    assert result.returncode == 1, explain(result, tally)
    assert checks(result)["error ratio"] == "FAIL", explain(result, tally)
    assert "verdict: FAIL: error ratio" in result.stdout


def test_slower_canary_fails_on_latency(stack: Stack) -> None:
    since, tally = scenario(
        stack,
        [
            Stream(fixed("stable", stack.stable.infer_url, CHEAP)),
            Stream(fixed("canary", stack.canary.infer_url, SLOW)),
        ],
        12,
    )
    assert set(tally) == {("stable", 200), ("canary", 200)}, tally
    result = analyze(stack, since, POOL_CANARY, POOL_STABLE)
    print(result.stdout)
    assert result.returncode == 1, explain(result, tally)
    found = checks(result)
    assert found["p95 latency"] == "FAIL", explain(result, tally)
    assert found["error ratio"] == "PASS", explain(result, tally)


def test_too_little_canary_traffic_is_inconclusive(stack: Stack) -> None:
    since, tally = scenario(
        stack,
        [
            Stream(fixed("stable", stack.stable.infer_url, CHEAP)),
            Stream(fixed("canary", stack.canary.infer_url, CHEAP), requests=5),
        ],
        5,
    )
    assert tally[("canary", 200)] == 5, tally
    result = analyze(stack, since, POOL_CANARY, POOL_STABLE)
    print(result.stdout)
    assert result.returncode == 3, explain(result, tally)
    assert checks(result)["traffic"] == "INCONCLUSIVE", explain(result, tally)
    assert "verdict: INCONCLUSIVE: too little canary traffic" in result.stdout


# --- auto, end to end: stand-in API, real Prometheus, real predictors --------------------------


@contextlib.contextmanager
def gateway(stack: Stack, route) -> Iterator[Counter]:
    """Send traffic through `route` in the background until the block ends.

    One client: two at once would meet the canary's one-request queue and fail it on 503s
    (the error scenario above shows that), which is not what these tests are about.
    """
    tally: Counter = Counter()
    stop = threading.Event()
    thread = threading.Thread(
        target=lambda: tally.update(drive([Stream(route)], 300, stack.picture, stop)),
        daemon=True,
    )
    thread.start()
    try:
        yield tally
    finally:
        stop.set()
        thread.join()


def test_auto_in_pool_mode_steps_up_and_promotes_a_healthy_canary(stack, tmp_path) -> None:
    with clusters.prod() as api:
        kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        route = weighted(
            lambda: pool_share(api.get("httproutes", "qwen-vl")),
            Backend("stable", stack.stable.infer_url, CHEAP),
            Backend("canary", stack.canary.infer_url, CHEAP),
            seed=1,
        )
        with gateway(stack, route) as tally:
            time.sleep(4)
            status = cli(stack, "status", "--kubeconfig", kubeconfig, "--window", "4s")
            auto = cli(
                stack,
                "auto",
                "--kubeconfig", kubeconfig,
                "--steps", "50,100",
                "--interval", "6s",
                *THRESHOLDS,
            )  # fmt: skip
        print(status.stdout, auto.stdout, auto.stderr, sep="\n")
        assert status.returncode == 0, status.stderr
        assert "mode: pool" in status.stdout and "(10% canary)" in status.stdout
        assert "verdict:" in status.stdout
        assert auto.returncode == 0, explain(auto, tally)
        assert "decision: canary passed at 50% -> step 100%" in auto.stdout
        assert "decision: every step passed -> promoted" in auto.stdout
        sent = [p.body for p in api.patches()]
        weights = [ops[1]["value"] for ops in sent if isinstance(ops, list)]
        assert weights == [50, 100, 0]
        assert {"spec": {"predictor": {"model": {"runtimeVersion": "0.1.1"}}}} in sent
        assert tally[("canary", 200)] > 20, tally


def test_auto_in_knative_mode_rolls_back_a_slow_canary(stack, tmp_path) -> None:
    with clusters.staging() as api:
        kubeconfig = str(api.write_kubeconfig(tmp_path / "kubeconfig"))
        route = weighted(
            lambda: knative_share(api.get("inferenceservices", "qwen-vl")),
            Backend("stable", stack.stable.infer_url, CHEAP),
            # Twice SLOW: a 25% share of one client's traffic is a few requests an interval,
            # so the gap to stable is made wide enough that a handful decides it.
            Backend("canary", stack.canary.infer_url, 2 * SLOW),
            seed=2,
        )
        with gateway(stack, route) as tally:
            auto = cli(
                stack,
                "auto",
                "--kubeconfig", kubeconfig,
                "--steps", "25,50",
                "--interval", "8s",
                *THRESHOLDS,
                "--min-requests", "5",
            )  # fmt: skip
        print(auto.stdout, auto.stderr, sep="\n")
        assert auto.returncode == 1, explain(auto, tally)
        assert "decision: canary failed at 25% (p95 latency" in auto.stdout
        sent = [p.body["spec"]["predictor"]["canaryTrafficPercent"] for p in api.patches()]
        assert sent == [25, 0]
        # The selectors came from the stand-in's revisions, as they would from a cluster's.
        assert 'pod=~"qwen-vl-predictor-00002-deployment-.*"' in auto.stdout
