"""Helpers of the canary tests: a stand-in Kubernetes API, a real Prometheus, test traffic."""
