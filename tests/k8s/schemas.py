"""Schema validation of rendered objects, as strict as `kubectl apply --validate=strict`.

Custom resources are checked against the `openAPIV3Schema` of the upstream CRDs vendored in
`hack/crds/` (unmodified release copies, see its SOURCES.md; `$CRD_DIR` overrides the folder),
translated to JSON Schema with the API server's rules: fields a schema does not declare are
errors unless it says `x-kubernetes-preserve-unknown-fields`, `nullable` admits null,
`x-kubernetes-int-or-string` admits both. `metadata` is checked against Kubernetes' ObjectMeta.
Built-in kinds go through `kubernetes-validate` (bundled, offline OpenAPI schemas) in strict
mode. An object with neither (a custom kind whose CRD is not in the folder) comes back
`no-schema`, which every caller treats as an error; a missing or empty CRD folder raises
`CrdsMissing`.

The CRDs' CEL rules (`x-kubernetes-validations`) are evaluated too (tests/k8s/cel.py); a rule
that cannot be evaluated here is reported, not passed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

from tests.k8s import cel

ROOT = Path(__file__).resolve().parents[2]
VENDORED_CRD_DIR = ROOT / "hack" / "crds"
CRD_DIR = Path(os.environ.get("CRD_DIR") or VENDORED_CRD_DIR)
KUBERNETES_VERSION = "1.33"
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"
DEFINITIONS_URI = "https://kubernetes.io/api/_definitions.json"


class CrdsMissing(FileNotFoundError):
    """The CRD folder is missing or holds no CustomResourceDefinition: nothing can be validated."""


@dataclass
class Result:
    """The outcome for one object: ok, invalid (with errors) or no-schema."""

    obj: dict[str, Any]
    status: str
    source: str = ""
    errors: list[str] = field(default_factory=list)
    rules_evaluated: int = 0
    rules_unevaluated: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.obj.get('kind')}/{self.obj.get('metadata', {}).get('name')}"


def _strict(schema: Any) -> Any:
    """An openAPIV3Schema node as JSON Schema with the API server's pruning made an error."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "$defs"):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("anyOf", "allOf", "oneOf"):
            out[key] = _strict(value)
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if schema.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for name in ("apiVersion", "kind"):
            props.setdefault(name, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@dataclass(frozen=True)
class CrdSchema:
    schema: dict[str, Any]
    raw: dict[str, Any]
    source: str


@cache
def _kubernetes_definitions() -> dict[str, Any]:
    """Kubernetes' OpenAPI definitions as bundled by kubernetes-validate (strict variant)."""
    base = resources.files("kubernetes_validate") / "kubernetes-json-schema"
    matches = sorted(
        entry.name
        for entry in base.iterdir()
        if entry.name.startswith(f"v{KUBERNETES_VERSION}.") and entry.name.endswith("-strict")
    )
    if not matches:
        raise RuntimeError(f"kubernetes-validate has no schemas for {KUBERNETES_VERSION}")
    return json.loads((base / matches[-1] / "_definitions.json").read_text())


def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], CrdSchema]:
    """{(apiVersion, kind): schema} for every served version of every CRD in `crd_dir`.

    Raises `CrdsMissing` if the folder does not exist or holds no CRD."""
    if not crd_dir.is_dir():
        raise CrdsMissing(f"no CRD folder at {crd_dir} (the vendored copy is {VENDORED_CRD_DIR})")
    index = _crd_schemas(crd_dir.resolve())
    if not index:
        raise CrdsMissing(f"no CustomResourceDefinition in {crd_dir}/*.yaml")
    return index


@cache
def _crd_schemas(crd_dir: Path) -> dict[tuple[str, str], CrdSchema]:
    # libyaml when available: the KServe InferenceService CRD alone is 2 MB of YAML.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    index: dict[tuple[str, str], CrdSchema] = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                raw = version["schema"]["openAPIV3Schema"]
                schema = _strict(raw)
                props = schema.setdefault("properties", {})
                # Every object has these, whether its CRD's schema lists them or not (Istio's
                # list only spec and status); the API server never prunes them.
                for name in ("apiVersion", "kind"):
                    props.setdefault(name, {"type": "string"})
                props["metadata"] = {"$ref": f"{DEFINITIONS_URI}#/$defs/{OBJECT_META}"}
                schema["required"] = sorted({*schema.get("required", ()), "apiVersion", "kind"})
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                index[key] = CrdSchema(schema, raw, path.name)
    return index


def _format(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(part) for part in error.absolute_path) or "(root)"
    return f"{where}: {error.message}"


@cache
def _validator(crd_dir: Path, key: tuple[str, str]) -> jsonschema.Draft202012Validator:
    registry = Registry().with_resource(
        DEFINITIONS_URI, Resource.from_contents(_kubernetes_definitions())
    )
    return jsonschema.Draft202012Validator(_crd_schemas(crd_dir)[key].schema, registry=registry)


def validate(obj: dict[str, Any], crd_dir: Path = CRD_DIR) -> Result:
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    crds = crd_schemas(crd_dir)
    if key in crds:
        crd = crds[key]
        validator = _validator(crd_dir.resolve(), key)
        errors = sorted(_format(e) for e in validator.iter_errors(obj))
        rules = cel.evaluate(crd.raw, obj) if not errors else cel.CelReport()
        errors += rules.errors
        status = "invalid" if errors else "ok"
        return Result(obj, status, crd.source, errors, rules.evaluated, rules.unevaluated)
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return Result(obj, "no-schema")
    except kubernetes_validate.ValidationError as exc:
        return Result(obj, "invalid", "kubernetes-validate", [str(exc)])
    return Result(obj, "ok", f"kubernetes-validate {KUBERNETES_VERSION}")


def validate_all(objs: Iterable[dict[str, Any]], crd_dir: Path = CRD_DIR) -> Iterator[Result]:
    for obj in objs:
        yield validate(obj, crd_dir)
