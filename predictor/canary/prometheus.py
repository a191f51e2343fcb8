"""A minimal client for Prometheus' instant-query API (`GET /api/v1/query`).

Why not a client library: the analysis needs one endpoint and plain floats, and every answer
shape it cares about (empty vector, NaN, an error string) is easier to see handled here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import httpx


class PrometheusError(RuntimeError):
    """Prometheus could not be reached or refused the query."""


@dataclass
class Prometheus:
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 30.0

    def vector(self, query: str, at: float | None = None) -> list[tuple[dict[str, str], float]]:
        """The instant vector `query` evaluates to at time `at` (unix seconds; now if None)."""
        params = {"query": query}
        if at is not None:
            params["time"] = f"{at:.3f}"
        try:
            reply = httpx.get(
                f"{self.url.rstrip('/')}/api/v1/query",
                params=params,
                headers=self.headers,
                timeout=self.timeout_s,
            )
        except httpx.HTTPError as exc:
            raise PrometheusError(f"{self.url}: {exc}") from exc
        try:
            body = reply.json()
        except ValueError:
            raise PrometheusError(
                f"{self.url} answered {reply.status_code} without JSON: {reply.text[:200]}"
            ) from None
        if body.get("status") != "success":
            raise PrometheusError(f"query {query!r} failed: {body.get('error', body)}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        if data["resultType"] != "vector":
            raise PrometheusError(f"query {query!r} gave a {data['resultType']}, not a vector")
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def scalar(self, query: str, at: float | None = None) -> float | None:
        """One number, or None where the query matched nothing or is NaN (no observations)."""
        result = self.vector(query, at)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"query {query!r} gave {len(result)} series, expected one")
        value = result[0][1]
        return None if math.isnan(value) else value
