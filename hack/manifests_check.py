"""Render the kustomize overlays and validate them, without a cluster.

For each overlay: `kubectl kustomize` (a real kubectl v1.33 from PyPI), every object against its
schema (the upstream CRDs vendored in hack/crds/ with their CEL rules, Kubernetes' OpenAPI for
built-in kinds; an object with no schema is an error), the cross-object checks of
tests/k8s/checks.py, and the runtime flags through the predictor's own parser. With --live, a
predictor is started on the tiny test model and the metric names the endpoint picker and the
autoscaler read must be on its /metrics.

    .venv/bin/python hack/manifests_check.py [--crds DIR] [--live] [OVERLAY ...]

Run through hack/validate_manifests.sh. Exit status 1 if anything is wrong.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.k8s import checks, kubectl, schemas  # noqa: E402

ADAPTER_RULES = ROOT / "kustomize" / "components" / "autoscaling" / "prometheus-adapter-rules.yaml"


def parser_problems(objs: list[dict]) -> list[str]:
    from kserve import model_server

    from predictor.settings import Settings, build_parser

    parser = build_parser(parents=[model_server.parser])
    problems = []
    for isvc in checks.of_kind(objs, "InferenceService"):
        argv = checks.predictor_argv(objs, isvc)
        try:
            Settings.from_args(parser.parse_args(argv))
        except (SystemExit, ValueError):
            problems.append(f"InferenceService/{checks.name(isvc)}: predictor refuses {argv}")
    return problems


def live_metric_names() -> set[str]:
    """Metric names on /metrics of a predictor started on the tiny model."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests.live_server import start_server

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tiny"
        subprocess.run(
            [sys.executable, str(ROOT / "hack" / "make_tiny_model.py"), str(model)],
            check=True,
            capture_output=True,
        )
        with start_server(model, Path(tmp) / "server.log") as server:
            text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        family.name
        for family in text_string_to_metric_families(text)
        if family.type == "gauge" and any(s.labels.get("model_name") for s in family.samples)
    }


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("overlays", nargs="*", default=sorted(checks.OVERLAYS))
    cli.add_argument("--crds", type=Path, default=schemas.CRD_DIR, help="upstream CRD folder")
    cli.add_argument("--live", action="store_true", help="check metric names on a live predictor")
    args = cli.parse_args()
    try:
        crds = schemas.crd_schemas(args.crds)
    except schemas.CrdsMissing as exc:
        print(f"{exc} (pass --crds or CRD_DIR)", file=sys.stderr)
        return 1

    failed = False
    wanted: set[str] = set()
    print(f"kubectl: {kubectl.kubectl('version', '--client').splitlines()[0]}")
    files = sorted({crd.source for crd in crds.values()})
    print(f"CRD schemas: {len(crds)} kinds/versions from {len(files)} files in {args.crds}")
    for overlay in args.overlays:
        objs = kubectl.render(ROOT / "kustomize" / "overlays" / overlay)
        print(f"\n== {overlay}: {len(objs)} objects")
        for result in schemas.validate_all(objs, args.crds):
            line = f"  {result.status:9} {result.obj['apiVersion']:36} {result.ref}"
            if result.rules_evaluated:
                line += f"  ({result.rules_evaluated} CEL rules)"
            print(line)
            for error in [*result.errors, *result.rules_unevaluated]:
                print(f"      {error}")
            failed |= result.status == "invalid" or bool(result.rules_unevaluated)
            if result.status == "no-schema":
                print(f"      ERROR: no CRD for this kind in {args.crds}, so it is not validated")
                failed = True
        problems = checks.semantic_problems(objs, checks.OVERLAYS[overlay])
        problems += parser_problems(objs)
        for problem in problems:
            print(f"  PROBLEM {problem}")
        failed |= bool(problems)
        wanted |= checks.picker_metric_names(objs)
        wanted |= checks.autoscaler_metric_names(objs, ADAPTER_RULES)

    print(f"\nmetric names read by pickers and autoscalers: {sorted(wanted)}")
    if args.live:
        missing = wanted - live_metric_names()
        print(f"live predictor: {'all present' if not missing else f'MISSING {sorted(missing)}'}")
        failed |= bool(missing)
    print("\nFAILED" if failed else "\nOK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
