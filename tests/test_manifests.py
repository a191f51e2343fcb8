"""The Kubernetes packaging: every overlay rendered by a real kustomize (kubectl v1.33), every
object validated against its upstream schema, and the cross-object promises checked: GPUs where
promised, pools that select the predictor pods, routes to pools that exist, metric names a real
predictor exposes, runtime flags the predictor's own parser accepts. The CRD schemas are the
unmodified upstream copies in hack/crds/; kubectl runs offline (tests/k8s/kubectl.py).
"""

from __future__ import annotations

import copy
import hashlib
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.k8s import checks, kubectl, schemas
from tests.live_server import start_server

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS_DIR = ROOT / "kustomize" / "overlays"
COMPONENTS_DIR = ROOT / "kustomize" / "components"
ADAPTER_RULES = COMPONENTS_DIR / "autoscaling" / "prometheus-adapter-rules.yaml"
# The upstream CRDs vendored in hack/crds/ ($CRD_DIR overrides). Missing schemas fail the tests
# below; none of them skips.
CRD_DIR = schemas.CRD_DIR

EXPECTED_OBJECTS = {
    "dev": {"Namespace/qwen-vl-dev", "ServingRuntime/qwen-vl", "InferenceService/qwen-vl"},
    "staging": {
        "Namespace/qwen-vl-staging",
        "ServingRuntime/qwen-vl",
        "InferenceService/qwen-vl",
        "PodMonitor/qwen-vl-predictor",
        "PodMonitor/qwen-vl-epp",
    },
    "prod": {
        "Namespace/qwen-vl-prod",
        "ServingRuntime/qwen-vl",
        "InferenceService/qwen-vl",
        "InferenceService/qwen-vl-canary",
        "InferencePool/qwen-vl",
        "InferencePool/qwen-vl-canary",
        "Deployment/qwen-vl-epp",
        "Deployment/qwen-vl-epp-canary",
        "Service/qwen-vl-epp",
        "Service/qwen-vl-epp-canary",
        "ServiceAccount/qwen-vl-epp",
        "ServiceAccount/qwen-vl-epp-canary",
        "Role/qwen-vl-epp",
        "Role/qwen-vl-epp-canary",
        "RoleBinding/qwen-vl-epp",
        "RoleBinding/qwen-vl-epp-canary",
        "ConfigMap/qwen-vl-epp",
        "ConfigMap/qwen-vl-epp-canary",
        "HTTPRoute/qwen-vl",
        "Gateway/qwen-vl-gateway",
        "RequestAuthentication/qwen-vl-jwt",
        "AuthorizationPolicy/qwen-vl-require-jwt",
        "EnvoyFilter/qwen-vl-gateway-ratelimit",
        "HorizontalPodAutoscaler/qwen-vl-predictor",
        "PodMonitor/qwen-vl-predictor",
        "PodMonitor/qwen-vl-epp",
        "NetworkPolicy/qwen-vl-predictor",
        "NetworkPolicy/qwen-vl-epp",
        "PodDisruptionBudget/qwen-vl-predictor",
    },
}

_rendered: dict[str, list[dict[str, Any]]] = {}


def rendered(overlay: str) -> list[dict[str, Any]]:
    """The overlay's objects, rendered once per test session (copies: tests may mutate)."""
    if overlay not in _rendered:
        _rendered[overlay] = kubectl.render(OVERLAYS_DIR / overlay)
    return copy.deepcopy(_rendered[overlay])


def refs(objs: list[dict[str, Any]]) -> set[str]:
    return {f"{o['kind']}/{o['metadata']['name']}" for o in objs}


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


# --- rendering ----------------------------------------------------------------------------------


def test_kubectl_is_a_real_kubectl_with_kustomize_v5() -> None:
    version = kubectl.kubectl("version", "--client")
    assert "Client Version: v1.33" in version
    assert re.search(r"Kustomize Version: v5\.", version), version


def test_kubectl_reaches_no_server_whatever_the_kubeconfig_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kubeconfig (the user's, through $KUBECONFIG) pointing at a listening server: a kubectl
    # subcommand that needs a server must neither read it nor fall back to localhost:8080 (the
    # predictor's own port), and fail at once instead.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        config = tmp_path / "kubeconfig"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                    "users": [{"name": "u", "user": {"token": "t"}}],
                    "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "x",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(config))
        with pytest.raises(RuntimeError) as failure:
            kubectl.kubectl("get", "namespaces", "--request-timeout=5s")
        with pytest.raises(BlockingIOError):
            server.accept()
    message = str(failure.value)
    assert f"{kubectl.UNREACHABLE_SERVER}/api" in message, message
    assert "connection refused" in message, message
    assert "8080" not in message and str(port) not in message, message


@pytest.mark.parametrize("overlay", sorted(checks.OVERLAYS))
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    objs = rendered(overlay)
    assert refs(objs) == EXPECTED_OBJECTS[overlay]
    namespace = f"qwen-vl-{overlay}"
    for obj in objs:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]


def test_overlays_are_discovered() -> None:
    on_disk = {p.parent.name for p in OVERLAYS_DIR.glob("*/kustomization.yaml")}
    assert on_disk == set(checks.OVERLAYS)


# --- schemas ------------------------------------------------------------------------------------

SOURCES = schemas.VENDORED_CRD_DIR / "SOURCES.md"
CHECKSUM_LINE = re.compile(r"^([0-9a-f]{64})  (\S+\.yaml)$", re.MULTILINE)


def test_vendored_crds_are_the_listed_unmodified_copies() -> None:
    listed = {name: digest for digest, name in CHECKSUM_LINE.findall(SOURCES.read_text())}
    on_disk = {p.name: p for p in schemas.VENDORED_CRD_DIR.glob("*.yaml")}
    assert on_disk, f"no CRDs in {schemas.VENDORED_CRD_DIR}"
    assert set(listed) == set(on_disk)
    changed = [
        name
        for name, path in on_disk.items()
        if hashlib.sha256(path.read_bytes()).hexdigest() != listed[name]
    ]
    assert not changed, f"edited or replaced without updating SOURCES.md: {changed}"
    table_rows = set(re.findall(r"^\| (\S+\.yaml) \|", SOURCES.read_text(), re.MULTILINE))
    assert table_rows == set(on_disk), "every file needs its upstream and version in SOURCES.md"


def test_a_missing_or_empty_crd_folder_is_an_error_not_a_skip(tmp_path: Path) -> None:
    obj = find(rendered("prod"), "InferencePool", "qwen-vl")
    for folder in (tmp_path / "absent", tmp_path):
        with pytest.raises(schemas.CrdsMissing):
            schemas.validate(obj, folder)
    script = ROOT / "hack" / "manifests_check.py"
    result = subprocess.run(
        [sys.executable, str(script), "--crds", str(tmp_path / "absent"), "dev"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "no CRD folder" in result.stderr, result.stderr


@pytest.mark.parametrize("overlay", sorted(checks.OVERLAYS))
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    results = list(schemas.validate_all(rendered(overlay), CRD_DIR))
    invalid = {r.ref: r.errors for r in results if r.status == "invalid"}
    assert not invalid
    # Every object has a schema: a kind whose CRD is missing from the folder fails here.
    assert not {r.ref for r in results if r.status == "no-schema"}
    assert not [u for r in results for u in r.rules_unevaluated]


def test_cel_rules_of_the_crds_are_evaluated() -> None:
    results = {r.ref: r for r in schemas.validate_all(rendered("prod"), CRD_DIR)}
    assert results["InferencePool/qwen-vl"].rules_evaluated == 2
    assert results["HTTPRoute/qwen-vl"].rules_evaluated > 10


def test_istio_objects_are_validated_against_the_istio_crds() -> None:
    results = {r.ref: r for r in schemas.validate_all(rendered("prod"), CRD_DIR)}
    expected = {
        "RequestAuthentication/qwen-vl-jwt": "security.istio.io_requestauthentications.yaml",
        "AuthorizationPolicy/qwen-vl-require-jwt": "security.istio.io_authorizationpolicies.yaml",
        "EnvoyFilter/qwen-vl-gateway-ratelimit": "networking.istio.io_envoyfilters.yaml",
    }
    for ref, source in expected.items():
        assert (results[ref].status, results[ref].source) == ("ok", source), results[ref]
        assert results[ref].rules_evaluated > 0, ref


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "expected"),
    [
        (
            "InferenceService",
            "qwen-vl",
            lambda o: o["spec"]["predictor"]["model"].update(storageURI="hf://x"),
            "Additional properties are not allowed ('storageURI'",
        ),
        (
            "InferencePool",
            "qwen-vl",
            lambda o: o["spec"]["targetPorts"].append({"number": 8080}),
            "port number must be unique",
        ),
        (
            "InferencePool",
            "qwen-vl",
            lambda o: o["spec"]["endpointPickerRef"].pop("port"),
            "port is required when kind is 'Service'",
        ),
        (
            "HTTPRoute",
            "qwen-vl",
            lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(weight="ten"),
            "'ten' is not of type 'integer'",
        ),
        (
            "InferenceService",
            "qwen-vl",
            lambda o: o["metadata"].update(label={"a": "b"}),
            "Additional properties are not allowed ('label'",
        ),
        (
            "Deployment",
            "qwen-vl-epp",
            lambda o: o["spec"]["template"]["spec"]["containers"][0].update(port=9002),
            "Additional properties are not allowed ('port'",
        ),
        (
            "AuthorizationPolicy",
            "qwen-vl-require-jwt",
            lambda o: o["spec"].update(action="PERMIT"),
            "'PERMIT' is not one of ['ALLOW', 'DENY', 'AUDIT', 'CUSTOM']",
        ),
        (
            "AuthorizationPolicy",
            "qwen-vl-require-jwt",
            lambda o: o["spec"].update(selector={"matchLabels": {"app": "x"}}),
            "only one of targetRefs or selector can be set",
        ),
        (
            "RequestAuthentication",
            "qwen-vl-jwt",
            lambda o: o["spec"]["jwtRules"][0].update(jwks="{}"),
            "only one of jwks or jwksUri can be set",
        ),
        (
            "EnvoyFilter",
            "qwen-vl-gateway-ratelimit",
            lambda o: o["spec"]["configPatches"][0].update(applyTo="HTTP_FILTERS"),
            "'HTTP_FILTERS' is not one of",
        ),
    ],
)
def test_schema_validation_rejects_broken_objects(
    kind: str, name: str, mutate: Any, expected: str
) -> None:
    obj = find(rendered("prod"), kind, name)
    mutate(obj)
    result = schemas.validate(obj, CRD_DIR)
    assert result.status == "invalid"
    assert any(expected in error for error in result.errors), result.errors


# --- what schemas cannot check --------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(checks.OVERLAYS))
def test_objects_fit_together(overlay: str) -> None:
    assert checks.semantic_problems(rendered(overlay), checks.OVERLAYS[overlay]) == []


def test_prod_pools_select_their_own_predictor_pods() -> None:
    objs = rendered("prod")
    for pool, isvc in (("qwen-vl", "qwen-vl"), ("qwen-vl-canary", "qwen-vl-canary")):
        selector = find(objs, "InferencePool", pool)["spec"]["selector"]["matchLabels"]
        labels = checks.predictor_pod_labels(find(objs, "InferenceService", isvc))
        assert checks.selects(selector, labels)
    route = find(objs, "HTTPRoute", "qwen-vl")
    weights = {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}
    assert weights == {"qwen-vl-canary": 10, "qwen-vl": 90}
    # Patches for the stable InferenceService must not reach the canary (and vice versa).
    stable = find(objs, "InferenceService", "qwen-vl")
    canary = find(objs, "InferenceService", "qwen-vl-canary")
    assert (
        stable["spec"]["predictor"]["minReplicas"],
        stable["spec"]["predictor"]["maxReplicas"],
    ) == (2, 6)
    assert (
        canary["spec"]["predictor"]["minReplicas"],
        canary["spec"]["predictor"]["maxReplicas"],
    ) == (1, 1)
    assert "serving.kserve.io/autoscalerClass" not in canary["metadata"]["annotations"]
    assert canary["spec"]["predictor"]["model"]["runtimeVersion"] == "0.1.1"
    assert "runtimeVersion" not in stable["spec"]["predictor"]["model"]


@pytest.mark.parametrize(
    ("overlay", "mutate", "expected"),
    [
        (
            "staging",
            lambda objs: find(objs, "InferenceService", "qwen-vl")["spec"]["predictor"]["model"][
                "resources"
            ].pop("limits"),
            "overlay promises a GPU",
        ),
        (
            "dev",
            lambda objs: find(objs, "InferenceService", "qwen-vl")["spec"]["predictor"][
                "model"
            ].update(resources={"limits": {"nvidia.com/gpu": "1"}}),
            "CPU overlay asks for nvidia.com/gpu",
        ),
        (
            "prod",
            lambda objs: find(objs, "InferencePool", "qwen-vl")["spec"]["selector"][
                "matchLabels"
            ].update({"serving.kserve.io/inferenceservice": "qwen"}),
            "matches the predictor pods of []",
        ),
        (
            "prod",
            lambda objs: find(objs, "HTTPRoute", "qwen-vl")["spec"]["rules"][0]["backendRefs"][
                0
            ].update(name="qwen-vl-next"),
            "backend pool qwen-vl-next does not exist",
        ),
        (
            "prod",
            lambda objs: find(objs, "HTTPRoute", "qwen-vl")["spec"]["rules"][0][
                "backendRefs"
            ].reverse(),
            "must be the last backendRef",
        ),
        (
            "prod",
            lambda objs: find(objs, "Deployment", "qwen-vl-epp-canary")["spec"]["template"]["spec"][
                "containers"
            ][0]["args"].__setitem__(0, "--pool-name=qwen-vl"),
            "not --pool-name=qwen-vl-canary",
        ),
        (
            "prod",
            lambda objs: find(objs, "InferenceService", "qwen-vl")["spec"]["predictor"][
                "labels"
            ].update({"inference.networking.k8s.io/engine-type": "vllm"}),
            "pods are engine-type 'vllm'",
        ),
        (
            "staging",
            lambda objs: find(objs, "InferenceService", "qwen-vl")["metadata"][
                "annotations"
            ].update({"serving.kserve.io/deploymentMode": "Standard"}),
            "canaryTrafficPercent does nothing in Standard mode",
        ),
        (
            "prod",
            lambda objs: find(objs, "InferenceService", "qwen-vl-canary")["metadata"][
                "annotations"
            ].update({"serving.kserve.io/autoscalerClass": "external"}),
            "autoscalerClass external, no HPA",
        ),
    ],
)
def test_semantic_checks_catch_broken_overlays(overlay: str, mutate: Any, expected: str) -> None:
    objs = rendered(overlay)
    mutate(objs)
    problems = checks.semantic_problems(objs, checks.OVERLAYS[overlay])
    assert any(expected in p for p in problems), problems


def _predictor_parser():
    from kserve import model_server

    from predictor.settings import Settings, build_parser

    return build_parser(parents=[model_server.parser]), Settings


@pytest.mark.parametrize("overlay", sorted(checks.OVERLAYS))
def test_predictor_parser_accepts_every_runtime_flag(overlay: str) -> None:
    parser, settings_cls = _predictor_parser()
    objs = rendered(overlay)
    for isvc in checks.of_kind(objs, "InferenceService"):
        argv = checks.predictor_argv(objs, isvc)
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{isvc['metadata']['name']}: the predictor refuses {argv}")
        settings = settings_cls.from_args(args)
        # Clients call /v2/models/qwen-vl whichever pool answers (the canary included).
        assert settings.model_name == "qwen-vl"
        assert settings.model_dir == "/mnt/models"
        assert (args.http_port, args.grpc_port) == (8080, 8081)


@pytest.mark.slow
def test_metric_names_in_picker_and_autoscaler_are_served_by_a_real_predictor(
    tiny_qwen3_vl: Path, tmp_path: Path
) -> None:
    objs = rendered("prod")
    picker = checks.picker_metric_names(objs)
    autoscaler = checks.autoscaler_metric_names(objs, ADAPTER_RULES)
    assert picker == {
        "qwen_vl_num_requests_waiting",
        "qwen_vl_num_requests_running",
        "qwen_vl_utilization",
    }
    assert autoscaler == {"qwen_vl_num_requests_waiting"}
    with start_server(tiny_qwen3_vl, tmp_path / "server.log") as server:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for metric in picker | autoscaler:
        assert metric in families, f"{metric} is not on /metrics of a running predictor"
        # The picker and the HPA read instantaneous values: they must be gauges.
        assert families[metric].type == "gauge", families[metric].type
        assert any(s.labels.get("model_name") == "qwen-vl" for s in families[metric].samples)


# --- layout: one component per feature, overlays that only compose -----------------------------


def test_components_are_components_with_a_readme_and_named_patches() -> None:
    components = sorted(p for p in COMPONENTS_DIR.iterdir() if p.is_dir())
    assert {p.name for p in components} >= {
        "gpu",
        "quantization-4bit",
        "knative-canary",
        "inference-pool",
        "pool-canary",
        "autoscaling",
        "monitoring",
        "network-policy",
    }
    for component in components:
        kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component", component
        assert (component / "README.md").is_file(), component
        for patch in component.rglob("patches/*.yaml"):
            kind, purpose, ext = patch.name.split(".")
            assert kind.isalpha() and kind.islower() and purpose and ext == "yaml", patch
        for entry in kustomization.get("patches", []):
            target_kind = entry["target"]["kind"].lower()
            assert Path(entry["path"]).name.startswith(f"{target_kind}."), entry


OVERLAY_KEYS = {"apiVersion", "kind", "namespace", "resources", "components", "images", "patches"}
# What an overlay patch may set: model, image, resources, replicas.
OVERLAY_PATCH_FIELDS = {"storageUri", "runtimeVersion", "resources", "minReplicas", "maxReplicas"}


def _leaf_keys(tree: Any) -> set[str]:
    """The first key below `spec` on every path that is not a plain container of the model."""
    keys: set[str] = set()
    for key, value in tree.items():
        if key in ("predictor", "model") and isinstance(value, dict):
            keys |= _leaf_keys(value)
        else:
            keys.add(key)
    return keys


@pytest.mark.parametrize("overlay", sorted(checks.OVERLAYS))
def test_overlays_only_compose_and_pin(overlay: str) -> None:
    kustomization = yaml.safe_load((OVERLAYS_DIR / overlay / "kustomization.yaml").read_text())
    assert set(kustomization) <= OVERLAY_KEYS
    assert kustomization["resources"] == ["../../base"]
    assert kustomization["namespace"] == f"qwen-vl-{overlay}"
    for component in kustomization.get("components", []):
        assert component.startswith("../../components/"), component
    for entry in kustomization.get("patches", []):
        patch = yaml.safe_load(entry["patch"])
        assert set(patch) == {"apiVersion", "kind", "metadata", "spec"}, patch
        assert set(patch["metadata"]) == {"name"}, patch["metadata"]
        assert _leaf_keys(patch["spec"]) <= OVERLAY_PATCH_FIELDS, patch["spec"]


# A number in a manifest is a decision: each one needs a comment saying why, on its line or in
# the comment block just above its key (or above the block it belongs to).
MAGIC_KEYS = re.compile(
    r"^\s*-?\s*(periodSeconds|failureThreshold|timeoutSeconds|initialDelaySeconds|"
    r"terminationGracePeriodSeconds|seconds|sizeLimit|maxUnavailable|maxSurge|replicas|"
    r"minReplicas|maxReplicas|averageValue|stabilizationWindowSeconds|value|periodSeconds|"
    r"interval|scrapeTimeout|request|cpu|memory|max_tokens|tokens_per_fill|fill_interval|"
    r"weight|canaryTrafficPercent|port|containerPort|number)\s*:\s*\"?[0-9]"
)


def _manifest_files() -> list[Path]:
    files = [*(ROOT / "manifests").rglob("*.yaml"), *(ROOT / "kustomize").rglob("*.yaml")]
    return [f for f in files if f.name != "kustomization.yaml" or "overlays" in f.parts]


def test_every_number_in_a_manifest_has_a_comment_saying_why() -> None:
    missing = []
    for path in _manifest_files():
        lines = path.read_text().splitlines()
        for index, line in enumerate(lines):
            if not MAGIC_KEYS.match(line) or "#" in line:
                continue
            window = lines[max(0, index - 12) : index]
            if not any(w.strip().startswith("#") for w in window):
                missing.append(f"{path.relative_to(ROOT)}:{index + 1}: {line.strip()}")
    assert not missing, "\n".join(missing)
