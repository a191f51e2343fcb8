"""The canary analysis' decisions on given numbers (no Prometheus): limits, minimum traffic,
histogram saturation, and the flags that set them. The same code runs against a real Prometheus
in tests/test_canary_live.py."""

from __future__ import annotations

import pytest

from predictor.canary import analysis as an
from predictor.canary.auto import parse_steps
from predictor.canary.cli import build_parser, thresholds_from
from predictor.canary.durations import format_duration, parse_duration, promql_range

T = an.Thresholds(min_requests=100)


def side(
    requests: float,
    errors: float = 0,
    latency: float | None = 0.2,
    ttft: float | None = 0.05,
    top: float = 10.0,
) -> an.Side:
    return an.Side("x", requests, errors, an.Quantile(latency, top), an.Quantile(ttft, 30.0))


def outcomes(canary: an.Side, stable: an.Side, t: an.Thresholds = T) -> dict[str, an.Outcome]:
    return {c.name: c.outcome for c in an.judge(canary, stable, 60.0, t)}


def verdict(canary: an.Side, stable: an.Side, t: an.Thresholds = T) -> an.Outcome:
    return an.verdict(an.judge(canary, stable, 60.0, t))[0]


def test_a_canary_like_stable_passes() -> None:
    assert verdict(side(500), side(5000)) is an.Outcome.PASS


def test_too_little_traffic_is_inconclusive_even_when_every_number_is_bad() -> None:
    assert verdict(side(99, errors=99, latency=9.0), side(5000)) is an.Outcome.INCONCLUSIVE


def test_error_limit_is_the_tighter_of_absolute_and_stable_plus_increase() -> None:
    # Stable 0%: limit 0.5% (stable + 0.5 pp), tighter than the absolute 1%.
    checks = an.judge(side(1000, errors=8), side(5000), 60.0, T)
    assert checks[1].outcome is an.Outcome.FAIL
    assert "limit 0.50% (stable + 0.50 pp)" in checks[1].detail
    # Stable 2%: stable + 0.5 pp = 2.5%, so the absolute 1% applies.
    checks = an.judge(side(1000, errors=12), side(5000, errors=100), 60.0, T)
    assert checks[1].outcome is an.Outcome.FAIL and "limit 1.00% (absolute)" in checks[1].detail


def test_latency_limit_is_relative_to_stable_plus_slack() -> None:
    # 0.2 s × 1.5 + 0.1 s = 0.4 s
    assert outcomes(side(500, latency=0.39), side(5000))["p95 latency"] is an.Outcome.PASS
    assert outcomes(side(500, latency=0.41), side(5000))["p95 latency"] is an.Outcome.FAIL
    t = an.Thresholds(max_latency_s=0.3)
    assert outcomes(side(500, latency=0.35), side(5000), t)["p95 latency"] is an.Outcome.FAIL


def test_quiet_stable_skips_relative_limits_and_says_so() -> None:
    checks = an.judge(side(500, latency=5.0), side(3), 60.0, T)
    latency = checks[2]
    assert latency.outcome is an.Outcome.SKIPPED
    assert "not compared with stable (3 requests)" in latency.detail
    # The absolute error limit still applies.
    assert checks[1].outcome is an.Outcome.PASS
    assert verdict(side(500, latency=5.0), side(3)) is an.Outcome.PASS


def test_latency_beyond_the_last_bucket_fails_only_when_the_limit_is_below_it() -> None:
    beyond = side(500, latency=10.0, top=10.0)  # histogram_quantile's answer in the +Inf bucket
    t = an.Thresholds(max_latency_s=5.0, max_latency_ratio=None)
    assert outcomes(beyond, side(5000), t)["p95 latency"] is an.Outcome.FAIL
    t = an.Thresholds(max_latency_s=20.0, max_latency_ratio=None)
    checks = an.judge(beyond, side(5000), 60.0, t)
    assert checks[2].outcome is an.Outcome.INCONCLUSIVE
    assert "≥ 10.000 s" in checks[2].detail and "beyond the last bucket" in checks[2].detail


def test_no_canary_observations_cannot_pass_but_errors_still_fail() -> None:
    # Every request refused at admission: no latency observed, the error ratio decides.
    assert verdict(side(500, errors=500, latency=None, ttft=None), side(5000)) is an.Outcome.FAIL
    assert verdict(side(500, latency=None), side(5000)) is an.Outcome.INCONCLUSIVE


def test_report_prints_every_number_and_the_verdict() -> None:
    canary, stable = side(500, errors=1), side(5000)
    checks = an.judge(canary, stable, 60.0, T)
    outcome, reason = an.verdict(checks)
    report = an.Analysis(60.0, 0.0, canary, stable, T, checks, outcome, reason).report()
    assert "analysis over 1m ending 1970-01-01T00:00:00Z" in report
    assert "canary 500 requests (8.33/s), stable 5000 (83.33/s)" in report
    assert "canary 0.20% (1 of 500), stable 0.00% (0 of 5000)" in report
    assert report.endswith("verdict: PASS: every limit held")


def test_queries_use_the_metric_names_and_outcomes() -> None:
    q = an.queries_for('namespace="p",pod="a"', 300, T)
    assert q["requests"] == (
        'sum(increase(qwen_vl_requests_total{namespace="p",pod="a",outcome!~"invalid"}[300000ms]))'
    )
    assert 'outcome=~"error|timeout|rejected"' in q["errors"]
    assert q["latency"] == (
        "histogram_quantile(0.95, sum by (le) "
        '(rate(request_predict_seconds_bucket{namespace="p",pod="a"}[300000ms])))'
    )
    assert "qwen_vl_time_to_first_token_seconds_bucket" in q["ttft"]


def test_flags_set_and_switch_off_thresholds() -> None:
    args = build_parser().parse_args(
        [
            "analyze",
            "--max-error-ratio",
            "off",
            "--max-latency",
            "30s",
            "--latency-slack",
            "250ms",
            "--min-requests",
            "20",
        ]
    )
    t = thresholds_from(args)
    assert t.max_error_ratio is None and t.max_latency_s == 30.0
    assert t.latency_slack_s == 0.25 and t.min_requests == 20


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


def test_bad_durations_and_steps_are_refused() -> None:
    for bad in ("", "5 m", "m5", "-1s", "0"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_steps("10,25,50,100") == (10, 25, 50, 100)
    for bad in ("", "0,50", "50,25", "10,10", "101", "a"):
        with pytest.raises(ValueError):
            parse_steps(bad)
    assert promql_range(12.3456) == "12346ms"
