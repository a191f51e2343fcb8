"""Durations as people and Prometheus write them (`90s`, `5m`, `1h30m`), in seconds."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """`5m` -> 300.0; a bare number is seconds. Raises ValueError on anything else."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"not a duration: {text!r} (examples: 30s, 5m, 1h30m)") from None
        seconds = sum(float(number) * _SECONDS[unit] for number, unit in parts)
    if seconds <= 0:
        raise ValueError(f"a duration must be more than 0, got {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """300.0 -> `5m`, 95.25 -> `1m35.25s`: short, and readable back by `parse_duration`."""
    minutes, rest = divmod(round(seconds, 3), 60)
    hours, minutes = divmod(int(minutes), 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    if rest or not text:
        text += f"{rest:g}s"
    return text


def promql_range(seconds: float) -> str:
    """A range selector for PromQL: whole milliseconds, which every Prometheus accepts."""
    return f"{max(1, round(seconds * 1000))}ms"
