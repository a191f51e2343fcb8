"""`auto`: step the canary up while the analysis passes, roll back on failure, promote at the end.

Each step: move the split, wait one interval, analyse the window since the step began.
PASS goes to the next step; FAIL rolls back at once; INCONCLUSIVE (too little traffic, or a
latency beyond the histogram) holds the step and analyses again over the longer window, up to
`max_inconclusive` more intervals, then rolls back: an automated rollout must not pass a
canary nobody has seen serve, nor leave it half-way without a decision.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from predictor.canary.analysis import Analysis, Outcome
from predictor.canary.durations import format_duration
from predictor.canary.k8s import ClusterError, Executor, Rollout, State

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INCONCLUSIVE = 3

Analyse = Callable[[State, float, float], Analysis]


@dataclass(frozen=True)
class Plan:
    steps: tuple[int, ...]
    interval_s: float
    max_inconclusive: int = 2


def parse_steps(text: str) -> tuple[int, ...]:
    """`10,25,50,100` -> (10, 25, 50, 100): strictly increasing percentages, 1 to 100."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"steps must be comma-separated percentages, got {text!r}") from None
    if not steps or any(not 1 <= s <= 100 for s in steps):
        raise ValueError(f"every step must be a percentage from 1 to 100, got {text!r}")
    if any(a >= b for a, b in itertools.pairwise(steps)):
        raise ValueError(f"steps must increase, got {text!r}")
    return steps


def _print_plan(rollout: Rollout, executor: Executor, plan: Plan, out: Callable[[str], None]):
    interval = format_duration(plan.interval_s)
    for number, percent in enumerate(plan.steps, 1):
        out(f"== step {number}: canary {percent}%")
        executor.run(rollout.step(percent))
        out(
            f"# then wait {interval} and analyse the window since the step began: PASS -> "
            f"{'next step' if number < len(plan.steps) else 'promote'}; FAIL -> roll back; "
            f"INCONCLUSIVE -> wait another {interval} (at most {plan.max_inconclusive} times), "
            "then roll back"
        )
    out("== after the last step passes: promote")
    executor.run(rollout.promote())
    out("== on FAIL, or INCONCLUSIVE too long: roll back")
    executor.run(rollout.rollback())


def run_auto(
    rollout: Rollout,
    executor: Executor,
    analyse: Analyse,
    plan: Plan,
    out: Callable[[str], None] = print,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run the plan to a promotion (0), a rollback on failure (1) or on lasting doubt (3)."""
    state = rollout.read()
    if state.canary is None:
        raise ClusterError("no canary in flight: start one with `start` first")
    steps = ", ".join(f"{s}%" for s in plan.steps)
    out(
        f"auto: {state.mode} mode, canary {state.canary} at {state.canary_percent}%, stable "
        f"{state.stable}; steps {steps}, every {format_duration(plan.interval_s)}"
    )
    if executor.dry_run:
        _print_plan(rollout, executor, plan, out)
        return EXIT_OK
    for number, percent in enumerate(plan.steps, 1):
        if state.canary_percent is not None and percent < state.canary_percent:
            out(f"step {percent}%: skipped, the canary already has {state.canary_percent}%")
            continue
        out(f"== step {number}: canary {percent}%")
        executor.run(rollout.step(percent))
        started = clock()
        inconclusive = 0
        while True:
            sleep(plan.interval_s)
            now = clock()
            analysis = analyse(state, now - started, now)
            out(analysis.report())
            if analysis.verdict is Outcome.PASS:
                after = f"step {plan.steps[number]}%" if number < len(plan.steps) else "promote"
                out(f"decision: canary passed at {percent}% -> {after}")
                break
            if analysis.verdict is Outcome.FAIL:
                out(f"decision: canary failed at {percent}% ({analysis.reason}) -> roll back")
                executor.run(rollout.rollback())
                return EXIT_FAILED
            inconclusive += 1
            if inconclusive > plan.max_inconclusive:
                out(
                    f"decision: still inconclusive at {percent}% after {inconclusive} "
                    f"analyses ({analysis.reason}) -> roll back"
                )
                executor.run(rollout.rollback())
                return EXIT_INCONCLUSIVE
            out(
                f"decision: inconclusive at {percent}% ({analysis.reason}) -> hold, analyse "
                f"again in {format_duration(plan.interval_s)} "
                f"({inconclusive} of {plan.max_inconclusive})"
            )
    executor.run(rollout.promote())
    out("decision: every step passed -> promoted")
    return EXIT_OK


def default_analyse(
    analyse_fn: Callable[[str, str, float, float], Analysis],
    canary_selector: str | None,
    stable_selector: str | None,
) -> Analyse:
    """Bind the selectors: flags win over what the rollout mode derives from the cluster."""

    def run(state: State, window_s: float, end: float) -> Analysis:
        return analyse_fn(
            canary_selector or state.canary_selector,
            stable_selector or state.stable_selector,
            window_s,
            end,
        )

    return run
