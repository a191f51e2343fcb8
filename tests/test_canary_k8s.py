"""The canary tool's Kubernetes side, against a STAND-IN of the Kubernetes API server.

No cluster runs here: `tests/canary_support/stand_in_api.py` serves GET and PATCH of
InferenceServices and HTTPRoutes on 127.0.0.1, seeded with what our staging (Knative) and prod
(two pools) overlays render, imitates the status KServe would write, and records every request.
The tool reaches it through a temp kubeconfig and the official `kubernetes` client, exactly as it
would reach a real API server. What a real cluster adds (KServe and Knative acting on the
patches, a gateway honouring the weights) is not tested here; see the README.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from predictor.canary import cli
from predictor.canary.k8s import ClusterError, Executor, PoolRollout, connect
from tests.canary_support import clusters
from tests.canary_support.stand_in_api import JSON_PATCH, MERGE_PATCH, StandInApi

ROOT = Path(__file__).resolve().parent.parent
QUERY = "?fieldManager=qwen-vl-canary"
ISVC_PATH = "/apis/serving.kserve.io/v1beta1/namespaces/{ns}/inferenceservices/{name}" + QUERY
ROUTE_PATH = "/apis/gateway.networking.k8s.io/v1/namespaces/{ns}/httproutes/qwen-vl" + QUERY


@pytest.fixture
def staging(tmp_path: Path) -> Iterator[tuple[StandInApi, Path]]:
    with clusters.staging() as api:
        yield api, api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def prod(tmp_path: Path) -> Iterator[tuple[StandInApi, Path]]:
    with clusters.prod() as api:
        yield api, api.write_kubeconfig(tmp_path / "kubeconfig")


def canary(kubeconfig: Path, *args: str, wait: str = "5s") -> int:
    """Run the CLI in-process against the stand-in (its output goes to capsys)."""
    return cli.run([*args, "--kubeconfig", str(kubeconfig), "--wait-timeout", wait])


def weights(api: StandInApi) -> dict[str, int]:
    refs = api.get("httproutes", "qwen-vl")["spec"]["rules"][0]["backendRefs"]
    return {ref["name"]: ref["weight"] for ref in refs}


def route_ops(canary_weight: int) -> list[dict]:
    refs = "/spec/rules/0/backendRefs"
    return [
        {"op": "test", "path": f"{refs}/0/name", "value": "qwen-vl-canary"},
        {"op": "add", "path": f"{refs}/0/weight", "value": canary_weight},
        {"op": "test", "path": f"{refs}/1/name", "value": "qwen-vl"},
        {"op": "add", "path": f"{refs}/1/weight", "value": 100 - canary_weight},
    ]


# --- mode detection and status -------------------------------------------------------------------


def test_status_reads_knative_revisions_from_the_stand_in(staging, capsys) -> None:
    api, kubeconfig = staging
    assert canary(kubeconfig, "status") == 0
    out = capsys.readouterr().out
    assert "mode: knative (namespace qwen-vl-staging)" in out
    assert "canary: qwen-vl-predictor-00002 (10%)" in out
    assert "revision qwen-vl-predictor-00001: 90%" in out
    # Every request carried the kubeconfig's token (the stand-in answers 401 otherwise).
    assert api.requests and all(r.method == "GET" for r in api.requests)


def test_status_reads_pool_weights_from_the_stand_in(prod, capsys) -> None:
    _, kubeconfig = prod
    assert canary(kubeconfig, "status") == 0
    out = capsys.readouterr().out
    assert "mode: pool (namespace qwen-vl-prod)" in out
    assert "qwen-vl-canary weight 10, qwen-vl weight 90 (10% canary)" in out
    assert "InferenceService qwen-vl-canary: Ready=True, runtimeVersion=0.1.1" in out


def test_standard_mode_without_a_pool_split_is_refused(tmp_path: Path, capsys) -> None:
    with clusters.dev() as api:
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        assert canary(kubeconfig, "step", "--percent", "50") == 2
        assert not api.patches()
    err = capsys.readouterr().err
    assert "runs in Standard mode" in err and "canaryTrafficPercent only works in Knative" in err


def test_wrong_credentials_are_an_error_not_a_crash(staging, tmp_path: Path, capsys) -> None:
    _, kubeconfig = staging
    bad = tmp_path / "bad-kubeconfig"
    bad.write_text(kubeconfig.read_text().replace("stand-in-token", "wrong"))
    assert canary(bad, "status") == 2
    assert "401" in capsys.readouterr().err


# --- dry runs: the exact patches, nothing sent -------------------------------------------------


def test_dry_run_prints_knative_merge_patches_and_sends_none(staging, capsys) -> None:
    api, kubeconfig = staging
    path = ISVC_PATH.format(ns="qwen-vl-staging", name="qwen-vl")
    expected = {
        ("step", "--percent", "25"): {"canaryTrafficPercent": 25},
        ("promote",): {"canaryTrafficPercent": None},
        ("rollback",): {"canaryTrafficPercent": 0},
    }
    for args, predictor in expected.items():
        assert canary(kubeconfig, *args, "--dry-run") == 0
        out = capsys.readouterr().out
        body = json.dumps({"spec": {"predictor": predictor}}, indent=2)
        assert f"PATCH {path}\nContent-Type: {MERGE_PATCH}\n{body}\n" in out
        compact = json.dumps({"spec": {"predictor": predictor}}, separators=(",", ":"))
        assert f"--type merge -p '{compact}'" in out
    assert not api.patches()


def test_dry_run_prints_pool_json_patches_and_sends_none(prod, capsys) -> None:
    api, kubeconfig = prod
    assert canary(kubeconfig, "step", "--percent", "25", "--dry-run") == 0
    out = capsys.readouterr().out
    lines = "\n".join(f"  {json.dumps(op)}" for op in route_ops(25))
    path = ROUTE_PATH.format(ns="qwen-vl-prod")
    assert f"PATCH {path}\nContent-Type: {JSON_PATCH}\n[\n" + lines.replace("\n", ",\n") in out
    assert not api.patches()
    assert weights(api) == {"qwen-vl-canary": 10, "qwen-vl": 90}


def test_dry_run_prints_what_the_real_run_sends(prod, capsys) -> None:
    api, kubeconfig = prod
    assert canary(kubeconfig, "step", "--percent", "35", "--dry-run") == 0
    printed = capsys.readouterr().out.splitlines()
    assert canary(kubeconfig, "step", "--percent", "35") == 0
    (sent,) = api.patches()
    request_line = printed.index(f"PATCH {sent.path}")
    assert printed[request_line + 1] == f"Content-Type: {sent.content_type}"
    body = printed[request_line + 2 : printed.index("]", request_line) + 1]
    assert json.loads("\n".join(body)) == sent.body


def test_dry_run_of_auto_prints_the_whole_plan(prod, capsys) -> None:
    api, kubeconfig = prod
    assert canary(kubeconfig, "auto", "--steps", "25,100", "--interval", "1m", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "== step 1: canary 25%" in out and "== step 2: canary 100%" in out
    assert "then wait 1m and analyse" in out
    assert "== after the last step passes: promote" in out
    assert "== on FAIL, or INCONCLUSIVE too long: roll back" in out
    assert not api.patches()


# --- applying: what reaches the API server -----------------------------------------------------


def test_knative_step_promote_and_rollback_send_merge_patches(staging) -> None:
    api, kubeconfig = staging
    assert canary(kubeconfig, "step", "--percent", "40") == 0
    traffic = api.get("inferenceservices", "qwen-vl")["status"]["components"]["predictor"]
    assert {t["revisionName"]: t["percent"] for t in traffic["traffic"]} == {
        "qwen-vl-predictor-00002": 40,
        "qwen-vl-predictor-00001": 60,
    }
    assert canary(kubeconfig, "rollback") == 0
    assert canary(kubeconfig, "promote") == 0
    sent = [(p.path, p.content_type, p.body) for p in api.patches()]
    path = ISVC_PATH.format(ns="qwen-vl-staging", name="qwen-vl")
    assert sent == [
        (path, MERGE_PATCH, {"spec": {"predictor": {"canaryTrafficPercent": pct}}})
        for pct in (40, 0, None)
    ]
    isvc = api.get("inferenceservices", "qwen-vl")
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    # Promoted: the newest revision takes everything, so there is no canary left to step.
    assert canary(kubeconfig, "step", "--percent", "10") == 2


def test_knative_start_sets_version_and_percent_in_one_patch_and_waits(staging, capsys) -> None:
    api, kubeconfig = staging
    assert canary(kubeconfig, "promote") == 0
    assert canary(kubeconfig, "start", "--image", "0.1.2", "--percent", "5") == 0
    assert api.patches()[-1].body == {
        "spec": {"predictor": {"canaryTrafficPercent": 5, "model": {"runtimeVersion": "0.1.2"}}}
    }
    out = capsys.readouterr().out
    assert "waiting for InferenceService qwen-vl" in out and "is Ready" in out
    status = api.get("inferenceservices", "qwen-vl")["status"]["components"]["predictor"]
    assert status["latestReadyRevision"] == "qwen-vl-predictor-00003"


def test_pool_step_and_rollback_send_guarded_json_patches(prod) -> None:
    api, kubeconfig = prod
    assert canary(kubeconfig, "step", "--percent", "50") == 0
    assert weights(api) == {"qwen-vl-canary": 50, "qwen-vl": 50}
    assert canary(kubeconfig, "rollback") == 0
    assert weights(api) == {"qwen-vl-canary": 0, "qwen-vl": 100}
    sent = [(p.path, p.content_type, p.body) for p in api.patches()]
    path = ROUTE_PATH.format(ns="qwen-vl-prod")
    assert sent == [(path, JSON_PATCH, route_ops(50)), (path, JSON_PATCH, route_ops(0))]


def test_pool_promote_updates_stable_waits_then_moves_weights(prod) -> None:
    api, kubeconfig = prod
    api.ready_after_gets["qwen-vl"] = 3  # the stable Deployment takes a few polls to roll out
    assert canary(kubeconfig, "step", "--percent", "100") == 0
    assert canary(kubeconfig, "promote") == 0
    first, second, third = api.patches()
    assert first.body == route_ops(100)
    assert second.path == ISVC_PATH.format(ns="qwen-vl-prod", name="qwen-vl")
    assert second.body == {"spec": {"predictor": {"model": {"runtimeVersion": "0.1.1"}}}}
    assert third.body == route_ops(0)
    # Between the two patches the tool read the stable InferenceService until it was Ready.
    between = api.requests[api.requests.index(second) + 1 : api.requests.index(third)]
    stable_reads = [r for r in between if r.method == "GET" and r.path in second.path]
    assert len(stable_reads) >= 3
    model = api.get("inferenceservices", "qwen-vl")["spec"]["predictor"]["model"]
    assert model["runtimeVersion"] == "0.1.1"


def test_pool_start_leaves_weights_alone_when_the_canary_never_gets_ready(prod, capsys) -> None:
    api, kubeconfig = prod
    api.never_ready.add("qwen-vl-canary")
    assert (
        canary(kubeconfig, "start", "--storage-uri", "hf://Qwen/Qwen3-VL-4B", "--percent", "20")
        == 2
    )
    assert "not ready after 5s" in capsys.readouterr().err
    (only,) = api.patches()
    assert only.path == ISVC_PATH.format(ns="qwen-vl-prod", name="qwen-vl-canary")
    assert weights(api) == {"qwen-vl-canary": 10, "qwen-vl": 90}


def test_reordered_backend_refs_fail_the_patch_instead_of_moving_the_wrong_pool(prod) -> None:
    api, kubeconfig = prod
    rollout = PoolRollout(
        connect(str(kubeconfig), None, None), "qwen-vl", "qwen-vl-canary", "qwen-vl"
    )
    patch = rollout.weights(30, "test")
    refs = api.objects[("httproutes", "qwen-vl")]["spec"]["rules"][0]["backendRefs"]
    refs.reverse()  # someone re-applied the route with the pools in the other order
    with pytest.raises(ClusterError, match="422"):
        Executor(rollout.api, dry_run=False, out=lambda _: None).run([patch])
    assert {r["name"]: r["weight"] for r in refs} == {"qwen-vl-canary": 10, "qwen-vl": 90}


def test_start_takes_an_image_tag_not_a_reference(prod, capsys) -> None:
    api, kubeconfig = prod
    assert canary(kubeconfig, "start", "--image", "ghcr.io/x/y:0.2", "--percent", "10") == 2
    assert "tag only" in capsys.readouterr().err
    assert not api.requests


def test_hack_entry_point_runs_the_same_cli(prod) -> None:
    _, kubeconfig = prod
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "canary.py"), "status", "--kubeconfig", kubeconfig],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "mode: pool" in result.stdout
