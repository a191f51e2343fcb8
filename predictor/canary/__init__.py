"""Canary promotions: step traffic to a canary, judge it from Prometheus, promote or roll back.

Modules, one job each: `durations` (flag values like `5m`), `prometheus` (the HTTP query API),
`analysis` (canary vs stable numbers and verdicts), `k8s` (reading and patching the two rollout
modes), `auto` (the step-analyse-decide loop), `cli` (subcommands). Nothing here imports the model
server: the tool runs on a laptop with a kubeconfig.
"""
