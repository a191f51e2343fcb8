"""Canary vs stable from Prometheus: error ratio, latency and time-to-first-token quantiles.

Why these numbers: a bad release of a model server shows as server errors (500, 504 past the
request timeout, 503 when its queue overflows), as slower requests, or as a longer wait for the
first token. Each is read for both sides over the same window, compared with an absolute limit
and a limit relative to stable, and too little canary traffic is "inconclusive", never "pass":
a canary that served ten requests has not shown anything yet.

Series are chosen by PromQL label matchers (`namespace="x",serving_kserve_io_inferenceservice=
"qwen-vl-canary"`); `k8s` derives them from the rollout mode, flags can override them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum

from predictor.canary.durations import format_duration, promql_range
from predictor.canary.prometheus import Prometheus

REQUESTS_METRIC = "qwen_vl_requests_total"
# Outcomes of qwen_vl_requests_total that are the server's fault: 500, 504, 503 (queue full).
ERROR_OUTCOMES = ("error", "timeout", "rejected")
# A 400 is the client's fault: it is neither an error nor a request the canary was judged on.
IGNORED_OUTCOMES = ("invalid",)


class Outcome(str, Enum):
    PASS = "PASS"
    FAIL = "FAIL"
    INCONCLUSIVE = "INCONCLUSIVE"
    SKIPPED = "SKIPPED"  # no limit applies (none set, or stable too quiet to compare with)


@dataclass(frozen=True)
class Thresholds:
    """Limits of one analysis. None switches a limit off; the tighter of the two applies."""

    min_requests: int = 100
    max_error_ratio: float | None = 0.01
    max_error_ratio_increase: float | None = 0.005
    quantile: float = 0.95
    max_latency_s: float | None = None
    max_latency_ratio: float | None = 1.5
    max_ttft_s: float | None = None
    max_ttft_ratio: float | None = 1.5
    # Added to relative latency limits: histogram buckets make fast quantiles coarse (0.05 vs
    # 0.1 s is one bucket apart), so "1.5x stable" alone would fail canaries on noise.
    latency_slack_s: float = 0.1
    latency_metric: str = "request_predict_seconds"
    ttft_metric: str = "qwen_vl_time_to_first_token_seconds"


@dataclass(frozen=True)
class Quantile:
    """A histogram quantile and the histogram's largest finite bucket bound.

    `histogram_quantile` answers the largest finite bound when the quantile lies in the +Inf
    bucket, so a value at that bound only says "at least this much".
    """

    value: float | None
    top_bucket: float | None

    @property
    def saturated(self) -> bool:
        return (
            self.value is not None
            and self.top_bucket is not None
            and (self.value >= self.top_bucket)
        )

    def text(self) -> str:
        if self.value is None:
            return "no data"
        return f"{'≥ ' if self.saturated else ''}{self.value:.3f} s"


@dataclass(frozen=True)
class Side:
    """One side's numbers over the window."""

    selector: str
    requests: float
    errors: float
    latency: Quantile
    ttft: Quantile

    @property
    def error_ratio(self) -> float | None:
        return self.errors / self.requests if self.requests > 0 else None


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str


@dataclass(frozen=True)
class Analysis:
    window_s: float
    end: float
    canary: Side
    stable: Side
    thresholds: Thresholds
    checks: tuple[Check, ...]
    verdict: Outcome
    reason: str
    queries: dict[str, str] = field(default_factory=dict)

    def report(self) -> str:
        """The decision and every number behind it, as printed by the CLI."""
        when = datetime.fromtimestamp(self.end, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lines = [
            f"analysis over {format_duration(self.window_s)} ending {when}",
            f"  canary        {{{self.canary.selector}}}",
            f"  stable        {{{self.stable.selector}}}",
        ]
        lines += [f"  {c.name:<13} {c.outcome.value:<12} {c.detail}" for c in self.checks]
        lines.append(f"verdict: {self.verdict.value}: {self.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["verdict"] = self.verdict.value
        data["checks"] = [{**asdict(c), "outcome": c.outcome.value} for c in self.checks]
        return data


def _matchers(*parts: str) -> str:
    return ",".join(p for p in parts if p)


def queries_for(selector: str, window_s: float, t: Thresholds) -> dict[str, str]:
    """The PromQL of one side, by name (printed with `--show-queries`, checked by tests)."""
    rng = promql_range(window_s)
    counted = _matchers(selector, f'outcome!~"{"|".join(IGNORED_OUTCOMES)}"')
    failed = _matchers(selector, f'outcome=~"{"|".join(ERROR_OUTCOMES)}"')

    def quantile(metric: str) -> str:
        return (
            f"histogram_quantile({t.quantile}, "
            f"sum by (le) (rate({metric}_bucket{{{selector}}}[{rng}])))"
        )

    return {
        "requests": f"sum(increase({REQUESTS_METRIC}{{{counted}}}[{rng}]))",
        "errors": f"sum(increase({REQUESTS_METRIC}{{{failed}}}[{rng}]))",
        "latency": quantile(t.latency_metric),
        "latency_buckets": f"count by (le) ({t.latency_metric}_bucket{{{selector}}})",
        "ttft": quantile(t.ttft_metric),
        "ttft_buckets": f"count by (le) ({t.ttft_metric}_bucket{{{selector}}})",
    }


def _top_bucket(prom: Prometheus, query: str, at: float) -> float | None:
    bounds = [float(labels["le"]) for labels, _ in prom.vector(query, at) if "le" in labels]
    finite = [b for b in bounds if math.isfinite(b)]
    return max(finite) if finite else None


def measure(prom: Prometheus, selector: str, window_s: float, end: float, t: Thresholds) -> Side:
    """Read one side's numbers for the window that ends at `end`."""
    q = queries_for(selector, window_s, t)
    return Side(
        selector=selector,
        requests=prom.scalar(q["requests"], end) or 0.0,
        errors=prom.scalar(q["errors"], end) or 0.0,
        latency=Quantile(
            prom.scalar(q["latency"], end), _top_bucket(prom, q["latency_buckets"], end)
        ),
        ttft=Quantile(prom.scalar(q["ttft"], end), _top_bucket(prom, q["ttft_buckets"], end)),
    )


def _pct(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.2f}%"


def _traffic_check(canary: Side, stable: Side, window_s: float, t: Thresholds) -> Check:
    detail = (
        f"canary {canary.requests:.0f} requests ({canary.requests / window_s:.2f}/s), "
        f"stable {stable.requests:.0f} ({stable.requests / window_s:.2f}/s); "
        f"at least {t.min_requests} needed on the canary"
    )
    ok = canary.requests >= t.min_requests
    return Check("traffic", Outcome.PASS if ok else Outcome.INCONCLUSIVE, detail)


def _error_check(canary: Side, stable: Side, t: Thresholds) -> Check:
    numbers = (
        f"canary {_pct(canary.error_ratio)} ({canary.errors:.0f} of {canary.requests:.0f}), "
        f"stable {_pct(stable.error_ratio)} ({stable.errors:.0f} of {stable.requests:.0f})"
    )
    if canary.error_ratio is None:
        return Check("error ratio", Outcome.INCONCLUSIVE, f"{numbers}; the canary served nothing")
    limits: list[tuple[float, str]] = []
    notes: list[str] = []
    if t.max_error_ratio is not None:
        limits.append((t.max_error_ratio, "absolute"))
    if t.max_error_ratio_increase is not None:
        if stable.requests >= t.min_requests and stable.error_ratio is not None:
            limit = stable.error_ratio + t.max_error_ratio_increase
            limits.append((limit, f"stable + {t.max_error_ratio_increase * 100:.2f} pp"))
        else:
            notes.append(f"not compared with stable ({stable.requests:.0f} requests)")
    if not limits:
        return Check("error ratio", Outcome.SKIPPED, "; ".join([numbers, "no limit", *notes]))
    limit, why = min(limits)
    outcome = Outcome.PASS if canary.error_ratio <= limit else Outcome.FAIL
    detail = "; ".join([numbers, f"limit {_pct(limit)} ({why})", *notes])
    return Check("error ratio", outcome, detail)


def _latency_check(
    name: str,
    metric: str,
    canary: Quantile,
    stable: Quantile,
    stable_requests: float,
    absolute: float | None,
    ratio: float | None,
    t: Thresholds,
) -> Check:
    numbers = f"canary {canary.text()}, stable {stable.text()}"
    if canary.value is None:
        return Check(name, Outcome.INCONCLUSIVE, f"{numbers}; no canary observations [{metric}]")
    limits: list[tuple[float, str]] = []
    notes: list[str] = []
    if absolute is not None:
        limits.append((absolute, "absolute"))
    if ratio is not None:
        if stable_requests < t.min_requests or stable.value is None:
            notes.append(f"not compared with stable ({stable_requests:.0f} requests)")
        else:
            limit = stable.value * ratio + t.latency_slack_s
            limits.append((limit, f"stable × {ratio:g} + {t.latency_slack_s:g} s"))
    if not limits:
        return Check(name, Outcome.SKIPPED, "; ".join([numbers, "no limit", *notes, metric]))
    limit, why = min(limits)
    if canary.saturated:
        # The true quantile is at least canary.value: above a limit below it is a clear fail.
        outcome = Outcome.FAIL if canary.value > limit else Outcome.INCONCLUSIVE
        notes.append(f"canary beyond the last bucket ({canary.top_bucket:g} s)")
    else:
        outcome = Outcome.PASS if canary.value <= limit else Outcome.FAIL
    detail = "; ".join([numbers, f"limit {limit:.3f} s ({why})", *notes, metric])
    return Check(name, outcome, detail)


def judge(canary: Side, stable: Side, window_s: float, t: Thresholds) -> tuple[Check, ...]:
    """Every check of one analysis, in the order printed."""
    label = f"p{t.quantile * 100:g}"
    return (
        _traffic_check(canary, stable, window_s, t),
        _error_check(canary, stable, t),
        _latency_check(
            f"{label} latency",
            t.latency_metric,
            canary.latency,
            stable.latency,
            stable.requests,
            t.max_latency_s,
            t.max_latency_ratio,
            t,
        ),
        _latency_check(
            f"{label} TTFT",
            t.ttft_metric,
            canary.ttft,
            stable.ttft,
            stable.requests,
            t.max_ttft_s,
            t.max_ttft_ratio,
            t,
        ),
    )


def verdict(checks: tuple[Check, ...]) -> tuple[Outcome, str]:
    """Too little traffic decides nothing; otherwise any failed check fails the canary."""
    traffic, *rest = checks
    if traffic.outcome is not Outcome.PASS:
        return Outcome.INCONCLUSIVE, "too little canary traffic to judge"
    failed = [c.name for c in rest if c.outcome is Outcome.FAIL]
    if failed:
        return Outcome.FAIL, f"{', '.join(failed)} over the limit"
    unsure = [c.name for c in rest if c.outcome is Outcome.INCONCLUSIVE]
    if unsure:
        return Outcome.INCONCLUSIVE, f"cannot judge {', '.join(unsure)}"
    return Outcome.PASS, "every limit held"


def analyse(
    prom: Prometheus,
    canary_selector: str,
    stable_selector: str,
    window_s: float,
    thresholds: Thresholds,
    end: float | None = None,
) -> Analysis:
    """Measure both sides over the window ending at `end` (now if None) and judge the canary."""
    end = time.time() if end is None else end
    canary = measure(prom, canary_selector, window_s, end, thresholds)
    stable = measure(prom, stable_selector, window_s, end, thresholds)
    checks = judge(canary, stable, window_s, thresholds)
    outcome, reason = verdict(checks)
    return Analysis(
        window_s=window_s,
        end=end,
        canary=canary,
        stable=stable,
        thresholds=thresholds,
        checks=checks,
        verdict=outcome,
        reason=reason,
        queries=queries_for(canary_selector, window_s, thresholds),
    )
