"""A STAND-IN for the Kubernetes API server, on 127.0.0.1: no cluster runs here.

It is not Kubernetes. It serves GET and PATCH of the two resources the canary tool touches
(InferenceServices `serving.kserve.io/v1beta1`, HTTPRoutes `gateway.networking.k8s.io/v1`) in
the shapes the API server uses (objects, `Status` errors, JSON merge patch and JSON patch with
`test`), checks the kubeconfig's bearer token, and records every request so tests can assert
exactly what the tool sent. A small imitation of KServe's controller updates an
InferenceService's status after each patch (generation observed, Ready, and in Knative mode the
revisions and their traffic) so the tool's waits and reads see what a cluster would show.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

TOKEN = "stand-in-token"
RESOURCES = {
    ("serving.kserve.io", "v1beta1", "inferenceservices"): "InferenceService",
    ("gateway.networking.k8s.io", "v1", "httproutes"): "HTTPRoute",
}
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class PatchFailed(Exception):
    """A JSON patch `test` failed or a path does not exist: the API server answers 422."""


@dataclass
class Recorded:
    method: str
    path: str
    content_type: str | None
    body: Any


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge, null removes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]


def json_patch(target: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add, replace, remove and test; anything else fails the whole patch."""
    doc = copy.deepcopy(target)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node = doc
        try:
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if op["op"] == "test":
                current = node[int(last)] if isinstance(node, list) else node[last]
                if current != op["value"]:
                    raise PatchFailed(
                        f"test failed at {op['path']}: {current!r} != {op['value']!r}"
                    )
            elif op["op"] in ("add", "replace"):
                if isinstance(node, list):
                    index = len(node) if last == "-" else int(last)
                    if op["op"] == "add":
                        node.insert(index, copy.deepcopy(op["value"]))
                    else:
                        node[index] = copy.deepcopy(op["value"])
                else:
                    if op["op"] == "replace" and last not in node:
                        raise PatchFailed(f"replace of missing {op['path']}")
                    node[last] = copy.deepcopy(op["value"])
            elif op["op"] == "remove":
                del node[int(last) if isinstance(node, list) else last]
            else:
                raise PatchFailed(f"unsupported op {op['op']}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise PatchFailed(f"{op['op']} {op['path']}: {exc!r}") from exc
    return doc


def _ready(obj: dict[str, Any]) -> None:
    status = obj.setdefault("status", {})
    status["observedGeneration"] = obj["metadata"].get("generation", 1)
    status["conditions"] = [
        {"type": t, "status": "True"} for t in ("IngressReady", "PredictorReady", "Ready")
    ]


def knative_status(obj: dict[str, Any], revisions: list[str], percent: int | None) -> None:
    """What KServe reports for a Knative-mode predictor with these revisions, newest last."""
    predictor = (
        obj.setdefault("status", {}).setdefault("components", {}).setdefault("predictor", {})
    )
    latest = revisions[-1]
    predictor["latestCreatedRevision"] = predictor["latestReadyRevision"] = latest
    if percent is None or len(revisions) == 1:
        # Promoted (or the first revision): the newest takes everything.
        predictor["traffic"] = [
            {"revisionName": latest, "percent": 100, "latestRevision": True, "tag": "latest"}
        ]
        predictor["previousRolledoutRevision"] = predictor.get("latestRolledoutRevision")
        predictor["latestRolledoutRevision"] = latest
    else:
        previous = predictor.get("latestRolledoutRevision") or revisions[-2]
        predictor["traffic"] = [
            {"revisionName": latest, "percent": percent, "latestRevision": True, "tag": "latest"},
            {
                "revisionName": previous,
                "percent": 100 - percent,
                "latestRevision": False,
                "tag": "prev",
            },
        ]
    _ready(obj)


class StandInApi:
    """The stand-in server. `objects` are keyed by (plural, name); one namespace only."""

    def __init__(self, namespace: str, objects: list[dict[str, Any]]) -> None:
        self.namespace = namespace
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.revisions: dict[str, list[str]] = {}
        self.requests: list[Recorded] = []
        self.never_ready: set[str] = set()
        self.ready_after_gets: dict[str, int] = {}
        self._rolling: dict[str, int] = {}
        self.lock = threading.Lock()
        for obj in objects:
            plural = {v: k[2] for k, v in RESOURCES.items()}[obj["kind"]]
            obj = copy.deepcopy(obj)
            obj["metadata"].setdefault("generation", 1)
            obj["metadata"]["namespace"] = namespace
            self.objects[(plural, obj["metadata"]["name"])] = obj
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- the imitation of KServe's controller --------------------------------------------------

    def start_knative(self, name: str, revisions: list[str]) -> None:
        """Mark InferenceService `name` as Knative-mode with these revisions (newest last)."""
        obj = self.objects[("inferenceservices", name)]
        self.revisions[name] = list(revisions)
        if len(revisions) > 1:
            obj["status"] = {
                "components": {"predictor": {"latestRolledoutRevision": revisions[-2]}}
            }
        percent = obj["spec"]["predictor"].get("canaryTrafficPercent")
        knative_status(obj, self.revisions[name], percent)

    def mark_ready(self, name: str) -> None:
        _ready(self.objects[("inferenceservices", name)])

    def _reconcile(self, before: dict[str, Any], obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name in self.never_ready:
            # New pods that never pass their readiness probe: Ready stays Unknown.
            obj.setdefault("status", {})["observedGeneration"] = obj["metadata"]["generation"]
            obj["status"]["conditions"] = [{"type": "Ready", "status": "Unknown"}]
            return
        if name not in self.revisions:
            # Standard mode: the Deployment rolls out, Ready after `ready_after_gets` reads.
            if self.ready_after_gets.get(name):
                self._rolling[name] = self.ready_after_gets[name]
                obj.setdefault("status", {})["conditions"] = [
                    {"type": "Ready", "status": "Unknown", "reason": "ProgressDeadline"}
                ]
            else:
                _ready(obj)
            return
        if before["spec"]["predictor"].get("model") != obj["spec"]["predictor"].get("model"):
            revisions = self.revisions[name]
            number = int(revisions[-1].rsplit("-", 1)[1]) + 1
            revisions.append(f"{name}-predictor-{number:05d}")
        knative_status(
            obj, self.revisions[name], obj["spec"]["predictor"].get("canaryTrafficPercent")
        )

    # --- HTTP ------------------------------------------------------------------------------------

    def get(self, plural: str, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.objects[(plural, name)])

    def patches(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "PATCH"]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def write_kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "stand-in", "user": {"token": TOKEN}}],
            "contexts": [
                {
                    "name": "stand-in",
                    "context": {
                        "cluster": "stand-in",
                        "user": "stand-in",
                        "namespace": self.namespace,
                    },
                }
            ],
            "current-context": "stand-in",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def __enter__(self) -> StandInApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(
                    code,
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "status": "Failure",
                        "reason": reason,
                        "message": message,
                        "code": code,
                    },
                )

            def _target(self) -> tuple[str, str] | None:
                parts = self.path.split("?")[0].strip("/").split("/")
                # apis/{group}/{version}/namespaces/{ns}/{plural}/{name}
                if len(parts) != 7 or parts[0] != "apis" or parts[3] != "namespaces":
                    return None
                _, group, version, _, ns, plural, name = parts
                if (group, version, plural) not in RESOURCES or ns != api.namespace:
                    return None
                return plural, name

            def _common(self, body: Any) -> tuple[str, str] | None:
                api.requests.append(
                    Recorded(self.command, self.path, self.headers.get("Content-Type"), body)
                )
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self._status(401, "Unauthorized", "the stand-in wants the kubeconfig's token")
                    return None
                target = self._target()
                if target is None or target not in api.objects:
                    self._status(404, "NotFound", f"{self.path} not found")
                    return None
                return target

            def do_GET(self) -> None:
                with api.lock:
                    target = self._common(None)
                    if target is None:
                        return
                    name = target[1]
                    if target[0] == "inferenceservices" and name in api._rolling:
                        api._rolling[name] -= 1
                        if api._rolling[name] <= 0:
                            del api._rolling[name]
                            _ready(api.objects[target])
                    self._send(200, api.objects[target])

            def do_PATCH(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = json.loads(raw) if raw else None
                with api.lock:
                    target = self._common(body)
                    if target is None:
                        return
                    kind = self.headers.get("Content-Type", "").split(";")[0]
                    before = api.objects[target]
                    try:
                        if kind == MERGE_PATCH:
                            after = merge_patch(before, body)
                        elif kind == JSON_PATCH:
                            after = json_patch(before, body)
                        else:
                            self._status(415, "UnsupportedMediaType", f"{kind} not supported")
                            return
                    except PatchFailed as exc:
                        self._status(422, "Invalid", str(exc))
                        return
                    if after.get("spec") != before.get("spec"):
                        after["metadata"]["generation"] = before["metadata"]["generation"] + 1
                    if target[0] == "inferenceservices":
                        api._reconcile(before, after)
                    api.objects[target] = after
                    self._send(200, after)

        return Handler
