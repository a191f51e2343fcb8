"""What no schema can check: that the objects of one rendered overlay fit together.

Each check takes the rendered objects and returns a list of problems (empty: fine). The model of
KServe used here is small and written down: the labels KServe puts on predictor pods, the name of
the Deployment it creates in Standard mode, how it merges the runtime container with the
InferenceService's (`{{.Name}}` replaced, InferenceService args appended).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

# Labels KServe sets on every predictor pod (pkg/constants: InferenceServicePodLabelKey,
# KServiceComponentLabel), besides the InferenceService's spec.predictor.labels.
KSERVE_ISVC_LABEL = "serving.kserve.io/inferenceservice"
KSERVE_COMPONENT_LABEL = "component"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
AUTOSCALER_CLASS = "serving.kserve.io/autoscalerClass"
ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
GPU = "nvidia.com/gpu"
ENV_PREFIX = "QWEN_VL_"


@dataclass(frozen=True)
class Expectation:
    """What an overlay promises (README "Deploy")."""

    gpu: bool
    mode: str
    pool: bool = False


OVERLAYS = {
    "dev": Expectation(gpu=False, mode="Standard"),
    "staging": Expectation(gpu=True, mode="Knative"),
    "prod": Expectation(gpu=True, mode="Standard", pool=True),
}


def of_kind(objs: Iterable[Obj], kind: str) -> list[Obj]:
    return [obj for obj in objs if obj.get("kind") == kind]


def name(obj: Obj) -> str:
    return obj["metadata"]["name"]


def by_name(objs: Iterable[Obj], kind: str) -> dict[str, Obj]:
    return {name(obj): obj for obj in of_kind(objs, kind)}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def match_labels(selector: dict[str, Any]) -> dict[str, str]:
    """matchLabels of a LabelSelector; matchExpressions are not used by these manifests."""
    if selector.get("matchExpressions"):
        raise ValueError(f"matchExpressions not modelled: {selector}")
    return selector.get("matchLabels", {})


# --- KServe model ---------------------------------------------------------------------------


def predictor_pod_labels(isvc: Obj) -> dict[str, str]:
    """The labels of the predictor pods KServe creates for `isvc`: its own labels, the
    predictor's `labels`, then KServe's."""
    labels = dict(isvc["metadata"].get("labels", {}))
    labels.update(isvc["spec"]["predictor"].get("labels", {}))
    labels[KSERVE_ISVC_LABEL] = name(isvc)
    labels[KSERVE_COMPONENT_LABEL] = "predictor"
    return labels


def deployment_mode(isvc: Obj) -> str:
    return isvc["metadata"].get("annotations", {}).get(DEPLOYMENT_MODE, "Standard")


def runtime_of(objs: list[Obj], isvc: Obj) -> Obj | None:
    runtime = isvc["spec"]["predictor"]["model"].get("runtime")
    return by_name(objs, "ServingRuntime").get(runtime) if runtime else None


def predictor_argv(objs: list[Obj], isvc: Obj) -> list[str]:
    """The predictor's command-line flags as KServe would run them for `isvc`: the runtime's
    args with {{.Name}} replaced, then the InferenceService's args, then each QWEN_VL_* env var
    as the flag it stands for (flags are stricter than env: they are checked against choices)."""
    runtime = runtime_of(objs, isvc)
    container = runtime["spec"]["containers"][0] if runtime else {}
    model = isvc["spec"]["predictor"]["model"]
    argv = [arg.replace("{{.Name}}", name(isvc)) for arg in container.get("args", [])]
    argv += list(model.get("args", []))
    for env in [*container.get("env", []), *model.get("env", [])]:
        if env["name"].startswith(ENV_PREFIX):
            argv.append(f"--{env['name'][len(ENV_PREFIX) :].lower()}={env.get('value', '')}")
    return argv


def model_resources(isvc: Obj) -> dict[str, dict[str, Any]]:
    return isvc["spec"]["predictor"]["model"].get("resources", {})


# --- checks -----------------------------------------------------------------------------------


def check_gpu(objs: list[Obj], expect: Expectation) -> list[str]:
    problems = []
    for isvc in of_kind(objs, "InferenceService"):
        where = f"InferenceService/{name(isvc)}"
        res = model_resources(isvc)
        limit = str(res.get("limits", {}).get(GPU, "0"))
        request = str(res.get("requests", {}).get(GPU, limit))
        if expect.gpu and int(limit) < 1:
            problems.append(f"{where}: overlay promises a GPU, no {GPU} limit")
        if expect.gpu and request != limit:
            problems.append(f"{where}: {GPU} request {request} != limit")
        if not expect.gpu and int(limit) > 0:
            problems.append(f"{where}: CPU overlay asks for {GPU}")
        quantized = {"--quantization=4bit", "--quantization=8bit"} & set(predictor_argv(objs, isvc))
        if quantized and not int(limit):
            problems.append(f"{where}: bitsandbytes quantization needs CUDA")
    return problems


def check_deployment_mode(objs: list[Obj], expect: Expectation) -> list[str]:
    problems = []
    for isvc in of_kind(objs, "InferenceService"):
        mode = deployment_mode(isvc)
        if mode != expect.mode:
            problems.append(f"InferenceService/{name(isvc)}: mode {mode}, expected {expect.mode}")
        if mode != "Knative" and "canaryTrafficPercent" in isvc["spec"]["predictor"]:
            problems.append(
                f"InferenceService/{name(isvc)}: canaryTrafficPercent does nothing in {mode} mode"
            )
        if mode == "Knative":
            if "terminationGracePeriodSeconds" in isvc["spec"]["predictor"]:
                problems.append(f"InferenceService/{name(isvc)}: Knative sets the grace period")
            runtime = runtime_of(objs, isvc) or {"spec": {"containers": [{}]}}
            container = runtime["spec"]["containers"][0]
            if len(container.get("ports", [])) > 1:
                problems.append("ServingRuntime: a Knative container may expose one port only")
            if "lifecycle" in container:
                problems.append("ServingRuntime: Knative rejects container lifecycle hooks")
    return problems


def check_runtime_probes(objs: list[Obj]) -> list[str]:
    """Probes point at the predictor's routes on its HTTP port."""
    problems = []
    for runtime in of_kind(objs, "ServingRuntime"):
        container = runtime["spec"]["containers"][0]
        http_port = container["ports"][0]["containerPort"]
        expected = {
            "startupProbe": "/v2/health/live",
            "livenessProbe": "/v2/health/live",
            "readinessProbe": "/v2/models/{{.Name}}/ready",
        }
        for probe, path in expected.items():
            get = container.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") != http_port:
                problems.append(f"ServingRuntime/{name(runtime)}: {probe} not {path}:{http_port}")
    return problems


def check_pools(objs: list[Obj], expect: Expectation) -> list[str]:
    pools = of_kind(objs, "InferencePool")
    if expect.pool and not pools:
        return ["overlay promises inference-pool routing but renders no InferencePool"]
    problems = []
    services = by_name(objs, "Service")
    deployments = of_kind(objs, "Deployment")
    configmaps = by_name(objs, "ConfigMap")
    isvcs = of_kind(objs, "InferenceService")
    for pool in pools:
        where = f"InferencePool/{name(pool)}"
        selector = match_labels(pool["spec"]["selector"])
        members = [i for i in isvcs if selects(selector, predictor_pod_labels(i))]
        if len(members) != 1:
            problems.append(
                f"{where}: selector {selector} matches the predictor pods of "
                f"{[name(i) for i in members]} (want exactly one InferenceService)"
            )
            continue
        isvc = members[0]
        if deployment_mode(isvc) != "Standard":
            problems.append(f"{where}: {name(isvc)} is not in Standard mode")
        runtime = runtime_of(objs, isvc)
        port = runtime["spec"]["containers"][0]["ports"][0]["containerPort"] if runtime else None
        if pool["spec"]["targetPorts"][0]["number"] != port:
            problems.append(f"{where}: targetPorts[0] is not the predictor's HTTP port {port}")
        ref = pool["spec"]["endpointPickerRef"]
        service = services.get(ref["name"])
        if ref.get("kind", "Service") != "Service" or service is None:
            problems.append(f"{where}: endpointPickerRef names no Service in the render")
            continue
        if ref["port"]["number"] not in [p["port"] for p in service["spec"]["ports"]]:
            problems.append(f"{where}: Service/{ref['name']} has no port {ref['port']['number']}")
        pickers = [
            d
            for d in deployments
            if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        if len(pickers) != 1:
            problems.append(f"{where}: Service/{ref['name']} selects {len(pickers)} Deployments")
            continue
        picker = pickers[0]["spec"]["template"]["spec"]
        args = picker["containers"][0]["args"]
        if f"--pool-name={name(pool)}" not in args:
            problems.append(f"{where}: its picker runs {args[0]}, not --pool-name={name(pool)}")
        config = picker_config(picker, configmaps)
        if config is None:
            problems.append(f"{where}: the picker's --config-file is not in a rendered ConfigMap")
            continue
        problems += [f"{where}: {p}" for p in check_picker_config(config)]
        engine = predictor_pod_labels(isvc).get(ENGINE_LABEL)
        engines = {e["name"] for e in engine_configs(config)}
        if engine not in engines:
            problems.append(f"{where}: pods are engine-type {engine!r}, picker knows {engines}")
    return problems


def picker_config(pod_spec: Obj, configmaps: dict[str, Obj]) -> Obj | None:
    """The EndpointPickerConfig a picker pod reads (its --config-file in a ConfigMap volume)."""
    container = pod_spec["containers"][0]
    flag = next((a for a in container["args"] if a.startswith("--config-file=")), None)
    if flag is None:
        return None
    path = Path(flag.split("=", 1)[1])
    for mount in container.get("volumeMounts", []):
        if Path(mount["mountPath"]) == path.parent:
            volume = next(v for v in pod_spec["volumes"] if v["name"] == mount["name"])
            configmap = configmaps.get(volume.get("configMap", {}).get("name", ""))
            if configmap and path.name in configmap.get("data", {}):
                return yaml.safe_load(configmap["data"][path.name])
    return None


def engine_configs(config: Obj) -> list[Obj]:
    return [
        engine
        for plugin in config.get("plugins", [])
        if plugin["type"] == "core-metrics-extractor"
        for engine in plugin.get("parameters", {}).get("engineConfigs", [])
    ]


def check_picker_config(config: Obj) -> list[str]:
    problems = []
    if config.get("apiVersion") != "inference.networking.x-k8s.io/v1alpha1":
        problems.append(f"EndpointPickerConfig apiVersion is {config.get('apiVersion')}")
    if config.get("kind") != "EndpointPickerConfig":
        problems.append("ConfigMap does not hold an EndpointPickerConfig")
    names = {p.get("name") or p["type"] for p in config.get("plugins", [])}
    refs = [p["pluginRef"] for prof in config["schedulingProfiles"] for p in prof["plugins"]]
    refs += [config["parser"]["pluginRef"]] if "parser" in config else []
    for source in config.get("dataLayer", {}).get("sources", []):
        refs += [source["pluginRef"], *(e["pluginRef"] for e in source["extractors"])]
    problems += [f"pluginRef {ref!r} names no plugin" for ref in refs if ref not in names]
    parser = next((p for p in config["plugins"] if p["type"].endswith("-parser")), None)
    if parser is None or parser["type"] != "passthrough-parser":
        problems.append("requests are OIP v2, not OpenAI: the picker needs passthrough-parser")
    engines = engine_configs(config)
    if not engines:
        problems.append("core-metrics-extractor has no engineConfigs for the predictor")
    for engine in engines:
        if engine.get("loraSpec", None) != "":
            problems.append(f'engine {engine["name"]}: LoRA must be disabled (loraSpec: "")')
    return problems


def picker_metric_names(objs: list[Obj]) -> set[str]:
    """Metric names the pickers read from the predictors (label matchers stripped)."""
    configmaps = by_name(objs, "ConfigMap")
    out: set[str] = set()
    for deployment in of_kind(objs, "Deployment"):
        config = picker_config(deployment["spec"]["template"]["spec"], configmaps)
        for engine in engine_configs(config or {}):
            for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
                out.add(re.sub(r"\{.*\}$", "", engine[key]))
    return out


def autoscaler_metric_names(objs: list[Obj], adapter_rules: Path | None = None) -> set[str]:
    """Metric names the autoscaler reads: the HPA's metrics and the adapter rules' queries."""
    out: set[str] = set()
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        for metric in hpa["spec"].get("metrics", []):
            if metric["type"] in ("Pods", "Object", "External"):
                out.add(metric[metric["type"].lower()]["metric"]["name"])
    if adapter_rules is not None and out:
        for rule in yaml.safe_load(adapter_rules.read_text())["rules"]:
            for query in (rule["seriesQuery"], rule["metricsQuery"]):
                out.update(re.findall(r"\b(qwen_vl_[a-z_]+)\b", query))
    return out


def check_autoscaling(objs: list[Obj]) -> list[str]:
    problems = []
    isvcs = by_name(objs, "InferenceService")
    targets = {
        h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objs, "HorizontalPodAutoscaler")
    }
    for isvc in isvcs.values():
        external = isvc["metadata"].get("annotations", {}).get(AUTOSCALER_CLASS) == "external"
        if external and f"{name(isvc)}-predictor" not in targets:
            problems.append(f"InferenceService/{name(isvc)}: autoscalerClass external, no HPA")
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        owner = isvcs.get(target.removesuffix("-predictor"))
        if owner is None or deployment_mode(owner) != "Standard":
            problems.append(f"HPA/{name(hpa)}: {target} is no Standard-mode predictor Deployment")
            continue
        if owner["metadata"].get("annotations", {}).get(AUTOSCALER_CLASS) != "external":
            problems.append(f"HPA/{name(hpa)}: KServe would add its own HPA (autoscalerClass)")
        spec = owner["spec"]["predictor"]
        if hpa["spec"]["minReplicas"] != spec.get("minReplicas"):
            problems.append(f"HPA/{name(hpa)}: minReplicas differs from the InferenceService's")
        if hpa["spec"]["maxReplicas"] != spec.get("maxReplicas"):
            problems.append(f"HPA/{name(hpa)}: maxReplicas differs from the InferenceService's")
    return problems


def check_routes(objs: list[Obj]) -> list[str]:
    problems = []
    pools = by_name(objs, "InferencePool")
    services = by_name(objs, "Service")
    gateways = by_name(objs, "Gateway")
    for route in of_kind(objs, "HTTPRoute"):
        where = f"HTTPRoute/{name(route)}"
        for parent in route["spec"].get("parentRefs", []):
            if parent.get("kind", "Gateway") == "Gateway" and parent["name"] not in gateways:
                problems.append(f"{where}: parent Gateway/{parent['name']} is not rendered")
        for index, rule in enumerate(route["spec"]["rules"]):
            refs = rule.get("backendRefs", [])
            for ref in refs:
                kind, group = ref.get("kind", "Service"), ref.get("group", "")
                if kind == "InferencePool":
                    if group != "inference.networking.k8s.io" or ref["name"] not in pools:
                        problems.append(f"{where}: backend pool {ref['name']} does not exist")
                elif kind == "Service" and ref["name"] not in services:
                    problems.append(f"{where}: backend Service/{ref['name']} does not exist")
            pool_refs = [r for r in refs if r.get("kind") == "InferencePool"]
            if len(pool_refs) > 1:
                heaviest = max(pool_refs, key=lambda r: r.get("weight", 1))
                if pool_refs[-1] is not heaviest:
                    problems.append(
                        f"{where}: rule {index}: the main (heaviest) pool must be the last "
                        "backendRef (Istio asks only the last pool's picker, istio/istio#61594)"
                    )
    return problems


def check_selectors(objs: list[Obj]) -> list[str]:
    """PDBs, PodMonitors, NetworkPolicies and Services select pods that the render creates."""
    pods = [predictor_pod_labels(i) for i in of_kind(objs, "InferenceService")]
    pods += [d["spec"]["template"]["metadata"]["labels"] for d in of_kind(objs, "Deployment")]
    problems = []
    for kind, path in (
        ("PodDisruptionBudget", ("spec", "selector")),
        ("PodMonitor", ("spec", "selector")),
        ("NetworkPolicy", ("spec", "podSelector")),
    ):
        for obj in of_kind(objs, kind):
            selector = match_labels(obj[path[0]][path[1]])
            optional = kind == "PodMonitor" and "endpoint-picker" in selector.values()
            if not any(selects(selector, labels) for labels in pods) and not optional:
                problems.append(f"{kind}/{name(obj)}: selects no pod of this overlay")
    for service in of_kind(objs, "Service"):
        if not any(selects(service["spec"].get("selector", {}), labels) for labels in pods):
            problems.append(f"Service/{name(service)}: selects no pod of this overlay")
    return problems


def check_images(objs: list[Obj]) -> list[str]:
    """Every image is pinned by a tag other than latest (or by digest)."""
    problems = []
    for obj in objs:
        spec = obj.get("spec", {})
        containers = spec.get("containers", [])
        containers += spec.get("template", {}).get("spec", {}).get("containers", [])
        for container in containers:
            image = container.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
            if "@sha256:" not in image and tag in ("", "latest"):
                problems.append(f"{obj['kind']}/{name(obj)}: image {image!r} is not pinned")
    return problems


def semantic_problems(objs: list[Obj], expect: Expectation) -> list[str]:
    """Every check above for one overlay. The metric names (picker_metric_names,
    autoscaler_metric_names) and the predictor flags (predictor_argv) are checked by the callers,
    which start a predictor and import its parser."""
    return [
        *check_gpu(objs, expect),
        *check_deployment_mode(objs, expect),
        *check_runtime_probes(objs),
        *check_pools(objs, expect),
        *check_autoscaling(objs),
        *check_routes(objs),
        *check_selectors(objs),
        *check_images(objs),
    ]
