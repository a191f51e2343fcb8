"""The two rollout modes as the cluster holds them: what the split is, and the patches that move it.

- **Knative** (staging): one InferenceService whose `predictor.canaryTrafficPercent` sends that
  share to the newest revision; KServe keeps the rest on the last rolled-out one. Promote
  removes the field (100% to the newest), roll back sets it to 0 (100% to the previous one).
- **Pool** (prod, Standard mode, where `canaryTrafficPercent` does nothing): InferenceServices
  `qwen-vl` and `qwen-vl-canary`, each with its InferencePool, and one HTTPRoute whose rule has
  a weighted backendRef per pool. Steps and rollbacks change `backendRefs[].weight`; promote
  copies the canary's version onto the stable InferenceService, waits for it, then sends all
  traffic back to the stable pool.

Every change is a `Patch` (JSON merge patch for InferenceServices, JSON patch with `test`
guards for the route's list of backendRefs), so `--dry-run` prints exactly what would be sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
POOL_GROUP = "inference.networking.k8s.io"
POOL_KIND = "InferencePool"
# The predictor fields `start` sets and a pool promotion copies from canary to stable.
VERSION_FIELDS = ("runtimeVersion", "storageUri")
KNATIVE_MODES = ("Knative", "Serverless")
# Who owns the fields the tool sets (managedFields), sent with every PATCH.
FIELD_MANAGER = "qwen-vl-canary"


class ClusterError(RuntimeError):
    """The cluster does not hold what the command needs, or refused a request."""


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str

    def path(self, namespace: str, name: str) -> str:
        return f"/apis/{self.group}/{self.version}/namespaces/{namespace}/{self.plural}/{name}"


ISVC = Resource("serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService")
ROUTE = Resource("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute")


@dataclass(frozen=True)
class Patch:
    """One PATCH request: a JSON patch when the body is a list, a JSON merge patch otherwise."""

    resource: Resource
    name: str
    body: dict[str, Any] | list[dict[str, Any]]
    why: str

    @property
    def content_type(self) -> str:
        return JSON_PATCH if isinstance(self.body, list) else MERGE_PATCH

    def render(self, namespace: str) -> str:
        """The request as `--dry-run` prints it, and the same change as a kubectl command."""
        compact = json.dumps(self.body, separators=(",", ":"))
        if isinstance(self.body, list):
            kind = "json"
            # One operation a line: a JSON patch reads as a list of steps.
            body = "[\n" + ",\n".join(f"  {json.dumps(op)}" for op in self.body) + "\n]"
        else:
            kind, body = "merge", json.dumps(self.body, indent=2)
        return "\n".join(
            [
                f"# {self.why}",
                f"PATCH {self.resource.path(namespace, self.name)}?fieldManager={FIELD_MANAGER}",
                f"Content-Type: {self.content_type}",
                body,
                f"# = kubectl -n {namespace} patch {self.resource.plural}.{self.resource.group} "
                f"{self.name} --field-manager={FIELD_MANAGER} --type {kind} -p '{compact}'",
            ]
        )


@dataclass(frozen=True)
class WaitReady:
    """Wait until an InferenceService serves the spec just patched (`--wait-timeout`)."""

    name: str
    why: str

    def render(self, namespace: str) -> str:
        return f"# then wait until InferenceService {namespace}/{self.name} is Ready: {self.why}"


Action = Patch | WaitReady


@dataclass
class State:
    """The split as the cluster holds it, and how to find each side's series in Prometheus."""

    mode: str
    namespace: str
    canary_percent: int | None  # None: no canary in flight
    stable: str
    canary: str | None
    stable_selector: str
    canary_selector: str
    lines: list[str] = field(default_factory=list)


class Api:
    """GET and PATCH of custom resources in one namespace, through the official client."""

    def __init__(self, namespace: str, api_client: client.ApiClient) -> None:
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)

    def get(self, resource: Resource, name: str) -> dict[str, Any] | None:
        try:
            return self.custom.get_namespaced_custom_object(
                resource.group, resource.version, self.namespace, resource.plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ClusterError(_api_error("GET", resource, self.namespace, name, exc)) from exc

    def patch(self, patch: Patch) -> dict[str, Any]:
        r = patch.resource
        try:
            return self.custom.patch_namespaced_custom_object(
                r.group,
                r.version,
                self.namespace,
                r.plural,
                patch.name,
                patch.body,
                field_manager=FIELD_MANAGER,
                _content_type=patch.content_type,
            )
        except ApiException as exc:
            raise ClusterError(_api_error("PATCH", r, self.namespace, patch.name, exc)) from exc


def _api_error(verb: str, r: Resource, namespace: str, name: str, exc: ApiException) -> str:
    message = exc.reason
    with contextlib.suppress(TypeError, ValueError, AttributeError):
        message = json.loads(exc.body).get("message", message)
    return f"{verb} {r.kind} {namespace}/{name}: {exc.status} {message}"


def connect(kubeconfig: str | None, context: str | None, namespace: str | None) -> Api:
    """An `Api` on the user's kubeconfig (or in-cluster credentials when there is none)."""
    try:
        api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
        if namespace is None:
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            if context is not None:
                active = next((c for c in contexts if c["name"] == context), active)
            namespace = active.get("context", {}).get("namespace") or "default"
    except config.ConfigException as exc:
        if kubeconfig is not None or "KUBERNETES_SERVICE_HOST" not in os.environ:
            raise ClusterError(f"kubeconfig: {exc}") from exc
        config.load_incluster_config()
        api_client = client.ApiClient()
        namespace = namespace or _incluster_namespace()
    return Api(namespace, api_client)


def _incluster_namespace() -> str:
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip()
    except OSError:
        return "default"


def _conditions(obj: dict[str, Any]) -> dict[str, str]:
    return {
        c.get("type", ""): c.get("status", "Unknown")
        for c in obj.get("status", {}).get("conditions") or []
    }


def _model(obj: dict[str, Any]) -> dict[str, Any]:
    return obj.get("spec", {}).get("predictor", {}).get("model") or {}


def _describe_isvc(obj: dict[str, Any]) -> str:
    model = _model(obj)
    version = ", ".join(f"{k}={model[k]}" for k in VERSION_FIELDS if model.get(k)) or "no version"
    ready = _conditions(obj).get("Ready", "Unknown")
    return f"InferenceService {obj['metadata']['name']}: Ready={ready}, {version}"


def version_patch(image_tag: str | None, storage_uri: str | None) -> dict[str, Any]:
    """The `predictor.model` fields that make a new version: only those given are sent."""
    model: dict[str, Any] = {}
    if image_tag is not None:
        model["runtimeVersion"] = image_tag
    if storage_uri is not None:
        model["storageUri"] = storage_uri
    return model


class Rollout(Protocol):
    """What each mode offers: read the split, and the actions of every subcommand."""

    mode: str
    api: Api

    def read(self) -> State: ...
    def start(
        self, image_tag: str | None, storage_uri: str | None, percent: int
    ) -> list[Action]: ...
    def step(self, percent: int) -> list[Action]: ...
    def promote(self) -> list[Action]: ...
    def rollback(self) -> list[Action]: ...


class KnativeRollout:
    """`predictor.canaryTrafficPercent` on one Knative-mode InferenceService."""

    mode = "knative"

    def __init__(self, api: Api, name: str) -> None:
        self.api, self.name = api, name

    def _isvc(self) -> dict[str, Any]:
        obj = self.api.get(ISVC, self.name)
        if obj is None:
            raise ClusterError(f"InferenceService {self.api.namespace}/{self.name} not found")
        return obj

    def read(self) -> State:
        obj = self._isvc()
        ns = self.api.namespace
        predictor = obj.get("status", {}).get("components", {}).get("predictor", {})
        traffic = predictor.get("traffic") or []
        latest = next((t for t in traffic if t.get("latestRevision")), None)
        previous = next((t for t in traffic if not t.get("latestRevision")), None)
        spec_percent = obj.get("spec", {}).get("predictor", {}).get("canaryTrafficPercent")
        base = f'namespace="{ns}",serving_kserve_io_inferenceservice="{self.name}"'
        lines = [
            _describe_isvc(obj),
            f"spec.predictor.canaryTrafficPercent: {spec_percent}",
            *(
                f"revision {t.get('revisionName')}: {t.get('percent', 0)}%"
                f"{' (latest)' if t.get('latestRevision') else ''}"
                for t in traffic
            ),
        ]
        if latest is None or previous is None:
            # One revision takes everything: no canary in flight.
            only = (latest or previous or {}).get("revisionName") or predictor.get(
                "latestReadyRevision", "?"
            )
            return State(
                self.mode,
                ns,
                None,
                only,
                None,
                f'{base},pod=~"{only}-deployment-.*"',
                f'{base},pod=~"{only}-deployment-.*"',
                lines,
            )
        stable, canary = previous["revisionName"], latest["revisionName"]
        # Knative names a revision's Deployment <revision>-deployment; pod names start with it.
        return State(
            self.mode,
            ns,
            int(latest.get("percent", 0)),
            stable,
            canary,
            f'{base},pod=~"{stable}-deployment-.*"',
            f'{base},pod=~"{canary}-deployment-.*"',
            lines,
        )

    def _percent(self, percent: int | None, why: str) -> Patch:
        body = {"spec": {"predictor": {"canaryTrafficPercent": percent}}}
        return Patch(ISVC, self.name, body, why)

    def start(self, image_tag: str | None, storage_uri: str | None, percent: int) -> list[Action]:
        body = {
            "spec": {
                "predictor": {
                    "canaryTrafficPercent": percent,
                    "model": version_patch(image_tag, storage_uri),
                }
            }
        }
        why = f"new revision with {percent}% of the traffic; the last rolled-out one keeps the rest"
        return [Patch(ISVC, self.name, body, why), WaitReady(self.name, "the new revision")]

    def _require_canary(self) -> State:
        state = self.read()
        if state.canary is None:
            raise ClusterError(
                f"InferenceService {state.namespace}/{self.name} has one revision taking all "
                "traffic: no canary in flight (start one with `start`)"
            )
        return state

    def step(self, percent: int) -> list[Action]:
        state = self._require_canary()
        why = f"canary revision {state.canary}: {percent}%, {state.stable}: {100 - percent}%"
        return [self._percent(percent, why)]

    def promote(self) -> list[Action]:
        state = self._require_canary()
        why = f"promote: remove canaryTrafficPercent, 100% to revision {state.canary}"
        return [self._percent(None, why)]

    def rollback(self) -> list[Action]:
        state = self._require_canary()
        why = f"roll back: canaryTrafficPercent 0, 100% to revision {state.stable}"
        return [self._percent(0, why)]


class PoolRollout:
    """Two InferencePools behind one HTTPRoute, split by `backendRefs[].weight`."""

    mode = "pool"

    def __init__(self, api: Api, name: str, canary_name: str, route_name: str) -> None:
        self.api, self.name, self.canary_name, self.route_name = api, name, canary_name, route_name

    def _route(self) -> dict[str, Any]:
        route = self.api.get(ROUTE, self.route_name)
        if route is None:
            raise ClusterError(f"HTTPRoute {self.api.namespace}/{self.route_name} not found")
        return route

    def split_rules(self, route: dict[str, Any]) -> list[tuple[int, int, int]]:
        """(rule index, stable backendRef index, canary backendRef index) of each split rule."""
        found = []
        for i, rule in enumerate(route.get("spec", {}).get("rules") or []):
            refs = rule.get("backendRefs") or []
            index = {
                ref.get("name"): j
                for j, ref in enumerate(refs)
                if ref.get("kind") == POOL_KIND and ref.get("group") == POOL_GROUP
            }
            if self.name in index and self.canary_name in index:
                found.append((i, index[self.name], index[self.canary_name]))
        return found

    def _rules(self, route: dict[str, Any]) -> list[tuple[int, int, int]]:
        rules = self.split_rules(route)
        if not rules:
            raise ClusterError(
                f"HTTPRoute {self.api.namespace}/{self.route_name} has no rule with both "
                f"InferencePools {self.name} and {self.canary_name} (apply the pool-canary "
                "component)"
            )
        return rules

    def read(self) -> State:
        route = self._route()
        rules = self._rules(route)
        ns = self.api.namespace
        lines = []
        percents = []
        for i, s, c in rules:
            refs = route["spec"]["rules"][i]["backendRefs"]
            # Gateway API: weight defaults to 1; the split is proportional.
            ws, wc = refs[s].get("weight", 1), refs[c].get("weight", 1)
            percent = round(100 * wc / (ws + wc)) if ws + wc else 0
            percents.append(percent)
            name = route["spec"]["rules"][i].get("name", i)
            lines.append(
                f"HTTPRoute {self.route_name} rule {name}: {self.canary_name} weight {wc}, "
                f"{self.name} weight {ws} ({percent}% canary)"
            )
        if len(set(percents)) > 1:
            lines.append("rules disagree: the first one's split is reported")
        for isvc_name in (self.name, self.canary_name):
            obj = self.api.get(ISVC, isvc_name)
            lines.append(_describe_isvc(obj) if obj else f"InferenceService {isvc_name}: not found")
        base = f'namespace="{ns}",serving_kserve_io_inferenceservice='
        return State(
            self.mode,
            ns,
            percents[0],
            self.name,
            self.canary_name,
            f'{base}"{self.name}"',
            f'{base}"{self.canary_name}"',
            lines,
        )

    def weights(self, percent: int, why: str) -> Patch:
        """Set the canary's weight to `percent` and the stable's to the rest, in every split rule.

        `test` operations make the patch fail, rather than move the wrong backend, if the route's
        backendRefs were reordered since they were read.
        """
        ops: list[dict[str, Any]] = []
        for i, s, c in self._rules(self._route()):
            for j, name, weight in ((c, self.canary_name, percent), (s, self.name, 100 - percent)):
                path = f"/spec/rules/{i}/backendRefs/{j}"
                ops.append({"op": "test", "path": f"{path}/name", "value": name})
                ops.append({"op": "add", "path": f"{path}/weight", "value": weight})
        return Patch(ROUTE, self.route_name, ops, why)

    def _canary_isvc(self) -> dict[str, Any]:
        obj = self.api.get(ISVC, self.canary_name)
        if obj is None:
            raise ClusterError(
                f"InferenceService {self.api.namespace}/{self.canary_name} not found "
                "(apply the pool-canary component)"
            )
        return obj

    def start(self, image_tag: str | None, storage_uri: str | None, percent: int) -> list[Action]:
        self._canary_isvc()
        body = {"spec": {"predictor": {"model": version_patch(image_tag, storage_uri)}}}
        return [
            Patch(ISVC, self.canary_name, body, "the release under test, in the canary pool"),
            WaitReady(self.canary_name, "the canary pool serves the new version"),
            self.weights(percent, f"canary pool {percent}%, stable pool {100 - percent}%"),
        ]

    def step(self, percent: int) -> list[Action]:
        self._canary_isvc()
        return [self.weights(percent, f"canary pool {percent}%, stable pool {100 - percent}%")]

    def promote(self) -> list[Action]:
        canary = _model(self._canary_isvc())
        stable_obj = self.api.get(ISVC, self.name)
        if stable_obj is None:
            raise ClusterError(f"InferenceService {self.api.namespace}/{self.name} not found")
        stable = _model(stable_obj)
        # Merge patch: null removes a field the canary does not set.
        changes = {k: canary.get(k) for k in VERSION_FIELDS if canary.get(k) != stable.get(k)}
        actions: list[Action] = []
        if changes:
            body = {"spec": {"predictor": {"model": changes}}}
            why = f"promote: the stable InferenceService takes the canary's {', '.join(changes)}"
            actions += [
                Patch(ISVC, self.name, body, why),
                WaitReady(self.name, "every stable pod runs the promoted version"),
            ]
        actions.append(self.weights(0, "promote: all traffic back to the stable pool"))
        return actions

    def rollback(self) -> list[Action]:
        return [self.weights(0, "roll back: canary pool 0%, stable pool 100%")]


def detect(api: Api, name: str, canary_name: str, route_name: str, mode: str = "auto") -> Rollout:
    """Pick the rollout mode from what the cluster holds (or take the one asked for)."""
    pool = PoolRollout(api, name, canary_name, route_name)
    knative = KnativeRollout(api, name)
    if mode == "pool":
        return pool
    if mode == "knative":
        return knative
    route = api.get(ROUTE, route_name)
    if route is not None and pool.split_rules(route):
        return pool
    isvc = api.get(ISVC, name)
    if isvc is None:
        raise ClusterError(
            f"neither an HTTPRoute {api.namespace}/{route_name} splitting InferencePools {name} "
            f"and {canary_name} nor an InferenceService {api.namespace}/{name}"
        )
    annotations = isvc.get("metadata", {}).get("annotations") or {}
    deployment_mode = annotations.get("serving.kserve.io/deploymentMode") or isvc.get(
        "status", {}
    ).get("deploymentMode")
    if deployment_mode in KNATIVE_MODES:
        return knative
    raise ClusterError(
        f"InferenceService {api.namespace}/{name} runs in {deployment_mode or 'an unknown'} mode "
        f"and no HTTPRoute {route_name} splits pools {name} and {canary_name}: "
        "canaryTrafficPercent only works in Knative mode (use the pool-canary component, or "
        "--mode)"
    )


def _ready(obj: dict[str, Any], generation: int | None) -> tuple[bool, str]:
    status = obj.get("status", {})
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return False, f"observedGeneration {observed} < {generation}"
    predictor = status.get("components", {}).get("predictor", {})
    created, ready_rev = (
        predictor.get("latestCreatedRevision"),
        predictor.get("latestReadyRevision"),
    )
    if created and ready_rev and created != ready_rev:
        return False, f"revision {created} not ready yet (latest ready: {ready_rev})"
    ready = _conditions(obj).get("Ready", "Unknown")
    return ready == "True", f"Ready={ready}"


@dataclass
class Executor:
    """Applies actions, or prints them with `dry_run`; waits between them when asked to."""

    api: Api
    dry_run: bool
    out: Callable[[str], None] = print
    wait_timeout_s: float = 1200.0
    poll_s: float = 5.0
    sleep: Callable[[float], None] = time.sleep
    _generations: dict[str, int] = field(default_factory=dict)

    def run(self, actions: list[Action]) -> None:
        for action in actions:
            if self.dry_run:
                self.out(action.render(self.api.namespace))
            elif isinstance(action, Patch):
                result = self.api.patch(action)
                if action.resource == ISVC:
                    self._generations[action.name] = result.get("metadata", {}).get("generation")
                kind = action.resource.kind
                self.out(f"patched {kind} {self.api.namespace}/{action.name}: {action.why}")
            else:
                self.wait(action)

    def wait(self, action: WaitReady) -> None:
        generation = self._generations.get(action.name)
        deadline = time.monotonic() + self.wait_timeout_s
        self.out(f"waiting for InferenceService {action.name}: {action.why}")
        while True:
            obj = self.api.get(ISVC, action.name)
            ok, why = _ready(obj, generation) if obj else (False, "not found")
            if ok:
                self.out(f"InferenceService {action.name} is Ready")
                return
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"InferenceService {self.api.namespace}/{action.name} not ready after "
                    f"{self.wait_timeout_s:.0f}s ({why}); nothing further was changed"
                )
            self.sleep(min(self.poll_s, self.wait_timeout_s / 10))
