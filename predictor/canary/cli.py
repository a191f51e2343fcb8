"""`qwen-vl-canary` (also `python hack/canary.py`): subcommands over the cluster and Prometheus.

Exit codes: 0 done (analysis PASS, `auto` promoted); 1 analysis FAIL (`auto` rolled back);
2 bad usage, or the cluster or Prometheus refused; 3 analysis INCONCLUSIVE (`auto` rolled back
after holding too long); 130 interrupted (`auto` leaves the split where it was and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import datetime

from predictor.canary import analysis as an
from predictor.canary.auto import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_INCONCLUSIVE,
    EXIT_OK,
    Plan,
    default_analyse,
    parse_steps,
    run_auto,
)
from predictor.canary.durations import parse_duration
from predictor.canary.k8s import Api, ClusterError, Executor, Rollout, connect, detect
from predictor.canary.prometheus import Prometheus, PrometheusError

EXIT_INTERRUPTED = 130
VERDICT_EXIT = {
    an.Outcome.PASS: EXIT_OK,
    an.Outcome.FAIL: EXIT_FAILED,
    an.Outcome.INCONCLUSIVE: EXIT_INCONCLUSIVE,
}


def _percent(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be 0 to 100, got {value}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _limit(text: str) -> float | None:
    """A threshold, or `off` to switch it off."""
    if text.strip().lower() in ("off", "none"):
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (or off), got {value}")
    return value


def _seconds_limit(text: str) -> float | None:
    if text.strip().lower() in ("off", "none"):
        return None
    return _duration(text)


def _quantile(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def _time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a time: {text!r} (unix seconds or ISO 8601)"
        ) from None


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _cluster_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("cluster")
    g.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    g.add_argument("--context", help="kubeconfig context (default: the current one)")
    g.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    g.add_argument("--name", default="qwen-vl", help="stable InferenceService (and pool) name")
    g.add_argument(
        "--canary-name", help="pool mode: canary InferenceService and pool (default NAME-canary)"
    )
    g.add_argument("--route", help="pool mode: the HTTPRoute that splits (default NAME)")
    g.add_argument(
        "--mode",
        choices=("auto", "knative", "pool"),
        default="auto",
        help="rollout mode; auto: pool if the route splits the two pools, else knative",
    )
    g.add_argument(
        "--dry-run", action="store_true", help="print the exact patches instead of applying them"
    )
    g.add_argument(
        "--wait-timeout",
        type=_duration,
        default=1200.0,
        help="how long to wait for an InferenceService to become Ready (default 20m)",
    )
    return p


def _analysis_flags() -> argparse.ArgumentParser:
    d = an.Thresholds()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("analysis (limits: a number, or off)")
    g.add_argument(
        "--prometheus-url",
        default=os.environ.get("PROMETHEUS_URL"),
        help="Prometheus base URL (default $PROMETHEUS_URL)",
    )
    g.add_argument(
        "--prometheus-header",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra header for Prometheus (e.g. Authorization), repeatable",
    )
    g.add_argument("--canary-selector", help="PromQL label matchers of the canary's series")
    g.add_argument("--stable-selector", help="PromQL label matchers of the stable's series")
    g.add_argument(
        "--min-requests",
        type=int,
        default=d.min_requests,
        help=f"canary requests needed for a verdict; fewer: INCONCLUSIVE ({d.min_requests})",
    )
    g.add_argument(
        "--max-error-ratio",
        type=_limit,
        default=d.max_error_ratio,
        help=f"canary's 5xx+rejected share, absolute ({d.max_error_ratio})",
    )
    g.add_argument(
        "--max-error-ratio-increase",
        type=_limit,
        default=d.max_error_ratio_increase,
        help=f"canary's share minus stable's ({d.max_error_ratio_increase})",
    )
    g.add_argument("--quantile", type=_quantile, default=d.quantile, help=f"({d.quantile})")
    g.add_argument(
        "--max-latency",
        type=_seconds_limit,
        default=d.max_latency_s,
        help="canary's latency quantile, absolute, e.g. 30s (off)",
    )
    g.add_argument(
        "--max-latency-ratio",
        type=_limit,
        default=d.max_latency_ratio,
        help=f"canary's latency quantile ÷ stable's, before the slack ({d.max_latency_ratio})",
    )
    g.add_argument(
        "--max-ttft",
        type=_seconds_limit,
        default=d.max_ttft_s,
        help="canary's time-to-first-token quantile, absolute (off)",
    )
    g.add_argument(
        "--max-ttft-ratio",
        type=_limit,
        default=d.max_ttft_ratio,
        help=f"canary's TTFT quantile ÷ stable's, before the slack ({d.max_ttft_ratio})",
    )
    g.add_argument(
        "--latency-slack",
        type=_duration,
        default=d.latency_slack_s,
        help=f"seconds added to relative latency limits ({d.latency_slack_s:g}s)",
    )
    g.add_argument(
        "--latency-metric",
        default=d.latency_metric,
        help=f"histogram for request latency ({d.latency_metric})",
    )
    g.add_argument(
        "--ttft-metric", default=d.ttft_metric, help=f"histogram for TTFT ({d.ttft_metric})"
    )
    g.add_argument("--show-queries", action="store_true", help="print the PromQL of each side")
    return p


def build_parser() -> argparse.ArgumentParser:
    cluster, analysis = _cluster_flags(), _analysis_flags()
    parser = argparse.ArgumentParser(
        prog="qwen-vl-canary",
        description="Step, analyse, promote and roll back a qwen-vl canary (Knative "
        "canaryTrafficPercent, or two InferencePools behind one HTTPRoute).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    status = sub.add_parser(
        "status", parents=[cluster, analysis], help="current split, and health if Prometheus"
    )
    status.add_argument("--window", type=_duration, default=300.0, help="analysis window (5m)")

    analyze = sub.add_parser(
        "analyze",
        parents=[cluster, analysis],
        help="judge the canary over a window (no cluster needed with both selectors)",
    )
    analyze.add_argument("--window", type=_duration, default=300.0, help="(5m)")
    analyze.add_argument("--end", type=_time, help="window end: unix seconds or ISO 8601 (now)")
    analyze.add_argument("--json", action="store_true", help="print the analysis as JSON")

    start = sub.add_parser("start", parents=[cluster], help="start a canary of a new version")
    start.add_argument(
        "--image",
        metavar="TAG",
        help="image tag for the qwen-vl runtime (sets predictor.model.runtimeVersion)",
    )
    start.add_argument("--storage-uri", help="model to load (sets predictor.model.storageUri)")
    start.add_argument("--percent", type=_percent, required=True, help="canary share")

    step = sub.add_parser("step", parents=[cluster], help="set the canary's share")
    step.add_argument("--percent", type=_percent, required=True)

    sub.add_parser("promote", parents=[cluster], help="make the canary the stable version")
    sub.add_parser("rollback", parents=[cluster], help="all traffic back to stable")

    auto = sub.add_parser(
        "auto",
        parents=[cluster, analysis],
        help="step up while the analysis passes, roll back on failure, promote at the end",
    )
    auto.add_argument("--steps", default="10,25,50,100", help="canary percentages (10,25,50,100)")
    auto.add_argument(
        "--interval", type=_duration, default=300.0, help="wait before each analysis (5m)"
    )
    auto.add_argument(
        "--max-inconclusive",
        type=int,
        default=2,
        help="extra intervals to hold a step while INCONCLUSIVE before rolling back (2)",
    )
    return parser


def thresholds_from(args: argparse.Namespace) -> an.Thresholds:
    return an.Thresholds(
        min_requests=args.min_requests,
        max_error_ratio=args.max_error_ratio,
        max_error_ratio_increase=args.max_error_ratio_increase,
        quantile=args.quantile,
        max_latency_s=args.max_latency,
        max_latency_ratio=args.max_latency_ratio,
        max_ttft_s=args.max_ttft,
        max_ttft_ratio=args.max_ttft_ratio,
        latency_slack_s=args.latency_slack,
        latency_metric=args.latency_metric,
        ttft_metric=args.ttft_metric,
    )


def _rollout(args: argparse.Namespace) -> tuple[Api, Rollout]:
    api = connect(args.kubeconfig, args.context, args.namespace)
    canary_name = args.canary_name or f"{args.name}-canary"
    return api, detect(api, args.name, canary_name, args.route or args.name, args.mode)


def _prometheus(args: argparse.Namespace) -> Prometheus:
    if not args.prometheus_url:
        raise SystemExit("error: --prometheus-url (or $PROMETHEUS_URL) is needed for analysis")
    return Prometheus(args.prometheus_url, headers=dict(args.prometheus_header))


def _analyse_fn(args: argparse.Namespace):
    prom, thresholds = _prometheus(args), thresholds_from(args)

    def run(canary: str, stable: str, window_s: float, end: float) -> an.Analysis:
        result = an.analyse(prom, canary, stable, window_s, thresholds, end)
        if args.show_queries:
            for side, selector in (("canary", canary), ("stable", stable)):
                for name, query in an.queries_for(selector, window_s, thresholds).items():
                    print(f"  query {side} {name}: {query}")
        return result

    return run


def _executor(args: argparse.Namespace, api: Api) -> Executor:
    return Executor(api, dry_run=args.dry_run, wait_timeout_s=args.wait_timeout)


def cmd_status(args: argparse.Namespace) -> int:
    _, rollout = _rollout(args)
    state = rollout.read()
    percent = "none in flight" if state.canary is None else f"{state.canary_percent}%"
    print(f"mode: {state.mode} (namespace {state.namespace})")
    print(f"stable: {state.stable}")
    print(f"canary: {state.canary or '-'} ({percent})")
    for line in state.lines:
        print(f"  {line}")
    if args.prometheus_url and state.canary is not None:
        run = _analyse_fn(args)
        canary = args.canary_selector or state.canary_selector
        stable = args.stable_selector or state.stable_selector
        print(run(canary, stable, args.window, time.time()).report())
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace) -> int:
    canary, stable = args.canary_selector, args.stable_selector
    if canary is None or stable is None:
        _, rollout = _rollout(args)
        state = rollout.read()
        canary, stable = canary or state.canary_selector, stable or state.stable_selector
    result = _analyse_fn(args)(canary, stable, args.window, args.end or time.time())
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.report())
    return VERDICT_EXIT[result.verdict]


def cmd_start(args: argparse.Namespace) -> int:
    if args.image is None and args.storage_uri is None:
        raise SystemExit("error: start needs --image TAG and/or --storage-uri URI")
    if args.image is not None and (":" in args.image or "/" in args.image):
        raise SystemExit(
            f"error: --image takes the tag only (KServe swaps it into the runtime's image), "
            f"got {args.image!r}"
        )
    api, rollout = _rollout(args)
    _executor(args, api).run(rollout.start(args.image, args.storage_uri, args.percent))
    return EXIT_OK


def cmd_step(args: argparse.Namespace) -> int:
    api, rollout = _rollout(args)
    _executor(args, api).run(rollout.step(args.percent))
    return EXIT_OK


def cmd_promote(args: argparse.Namespace) -> int:
    api, rollout = _rollout(args)
    _executor(args, api).run(rollout.promote())
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    api, rollout = _rollout(args)
    _executor(args, api).run(rollout.rollback())
    return EXIT_OK


def cmd_auto(args: argparse.Namespace) -> int:
    try:
        plan = Plan(parse_steps(args.steps), args.interval, args.max_inconclusive)
    except ValueError as exc:
        raise SystemExit(f"error: --steps: {exc}") from None
    api, rollout = _rollout(args)
    analyse = (
        default_analyse(_analyse_fn(args), args.canary_selector, args.stable_selector)
        if not args.dry_run
        else _no_analysis
    )
    try:
        return run_auto(rollout, _executor(args, api), analyse, plan)
    except KeyboardInterrupt:
        state = rollout.read()
        print(
            f"interrupted: the canary stays at {state.canary_percent}%; run `step`, `promote` "
            "or `rollback` to finish",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


def _no_analysis(*_: object) -> an.Analysis:
    raise AssertionError("a dry run analyses nothing")


COMMANDS = {
    "status": cmd_status,
    "analyze": cmd_analyze,
    "start": cmd_start,
    "step": cmd_step,
    "promote": cmd_promote,
    "rollback": cmd_rollback,
    "auto": cmd_auto,
}


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ClusterError, PrometheusError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return EXIT_ERROR
        raise


def main() -> None:
    """Console script entry point (`qwen-vl-canary`)."""
    sys.exit(run())
