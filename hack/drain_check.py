#!/usr/bin/env python
"""Shutdown under live traffic, measured: closed-loop clients keep sending through SIGTERM.

For each protocol (v2 REST, OpenAI plain, OpenAI streaming, gRPC) a server on loopback with
default flags, `--clients` closed-loop clients (tests/closed_loop.py says what each outcome
means), SIGTERM once every client's request is in the engine, and a Markdown table: the
requests in flight at the signal, those sent after it (before and after the process exited)
and what they got, when the last answer came and the process exited, and how many times the
log says the weights loaded. With `--kill_engine` the engine process is killed first
(SIGKILL), and SIGTERM follows `--after_kill_s` later.

    python hack/drain_check.py [--model_dir DIR] [--protocols v2,grpc] [--together]

Bounded: every wait has a timeout; nothing leaves loopback.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import images  # noqa: E402
from tests.closed_loop import (  # noqa: E402
    OK,
    PROTOCOLS,
    Traffic,
    in_flight_at,
    kinds,
    sent_after,
)
from tests.live_server import engine_process, start_server, wait_running  # noqa: E402

NAMES = {"v2": "v2 REST (httpx)", "openai": "OpenAI plain", "stream": "OpenAI streaming",
         "grpc": "gRPC (a channel per client)"}  # fmt: skip
EXIT_TIMEOUT_S = 120


def tiny_model(directory: Path) -> Path:
    out = directory / "qwen3-vl"
    command = [sys.executable, str(ROOT / "hack" / "make_tiny_model.py"), str(out)]
    subprocess.run([*command, "--family", "qwen3-vl"], check=True, capture_output=True)
    return out


def described(counts: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


def run(model_dir: Path, log: Path, protocols: list[str], args: argparse.Namespace) -> list[str]:
    with start_server(model_dir, log) as server:
        traffic = Traffic(server, protocols, images.jpeg(), args.clients, args.max_tokens)
        traffic.start()
        try:
            traffic.wait_for(
                lambda outcomes: all(
                    sum(o.protocol == p and o.kind == OK for o in outcomes) >= args.clients
                    for p in protocols
                ),
                timeout_s=120,
            )
            # Every client's request admitted and in the engine: none is on its way at the signal.
            wait_running(server, args.clients * len(protocols), timeout_s=60, queued=True)
            killed = None
            if args.kill_engine:
                engine_process(server).send_signal(signal.SIGKILL)
                killed = time.monotonic()
                time.sleep(args.after_kill_s)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = server.process.wait(timeout=EXIT_TIMEOUT_S)
            exited = time.monotonic()
            time.sleep(0.5)  # what clients get once the process is gone
        finally:
            traffic.stop()
        outcomes = traffic.snapshot()
        loads = server.weight_loads()
    rows = []
    moment = killed if killed is not None else signalled
    for protocol in protocols:
        mine = [o for o in outcomes if o.protocol == protocol]
        before_exit = [o for o in sent_after(mine, moment) if o.started < exited]
        after_exit = sent_after(mine, exited)
        answers = [o.ended for o in mine if o.kind == OK]
        last = f"{max(answers) - moment:.1f} s" if answers else "-"
        lost = [o for o in mine if o.kind == "lost"]
        rows.append(
            f"| {NAMES[protocol]} | {described(kinds(in_flight_at(mine, moment)))} "
            f"| {described(kinds(before_exit))} | {described(kinds(after_exit))} "
            f"| {last} | {exited - signalled:.1f} s (code {code}) | {loads} | {len(lost)} |"
        )
        for outcome in lost[:5]:
            print(f"  lost ({protocol}): {outcome.detail}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", type=Path, help="default: a tiny Qwen3-VL, built here")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--clients", type=int, default=16, help="per protocol")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--together", action="store_true", help="one server for all protocols")
    parser.add_argument("--kill_engine", action="store_true")
    parser.add_argument("--after_kill_s", type=float, default=2.0)
    parser.add_argument("--log_dir", type=Path, help="keep the servers' logs here")
    args = parser.parse_args()
    protocols = [p for p in args.protocols.split(",") if p]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model_dir or tiny_model(Path(scratch))
        event = "engine SIGKILL" if args.kill_engine else "SIGTERM"
        print(
            f"| protocol | in flight at {event} | sent after {event}, before the exit "
            f"| sent after the exit | last answer after {event} | exit after SIGTERM "
            "| weight loads in log | lost |\n|---|---|---|---|---|---|---|---|"
        )
        groups = [protocols] if args.together else [[p] for p in protocols]
        for group in groups:
            log = (args.log_dir or Path(scratch)) / f"{'-'.join(group)}.log"
            for row in run(model_dir, log, group, args):
                print(row, flush=True)


if __name__ == "__main__":
    main()
