"""The CEL rules of a CRD (`x-kubernetes-validations`), evaluated with cel-python the way the
API server evaluates them on create: against the object after schema defaults are applied, with
`self` bound to the value at the rule's place in the schema.

Transition rules (those that read `oldSelf`) only apply to updates and are skipped. Kubernetes'
URL library (`url`, `isURL` and the URL getters, which Istio's CRDs use) is provided here; a rule
that uses another Kubernetes CEL extension cel-python lacks (`quantity`, ...) cannot be decided
here: it is counted as unevaluated, never silently passed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

import celpy
from celpy import celtypes

_ENV = celpy.Environment()


class _URL(celtypes.StringType):
    """A value of Kubernetes' CEL `URL` type: an absolute URL."""


def _url(text: Any) -> _URL:
    parts = urlsplit(str(text))
    if not parts.scheme or not (parts.netloc or parts.path):
        raise ValueError(f"url: {text!r} is not an absolute URL")
    return _URL(str(text))


def _is_url(text: Any) -> celtypes.BoolType:
    try:
        _url(text)
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


# Kubernetes' URL library (k8s.io/apiserver/pkg/cel/library/urls.go), on urllib's parser.
_FUNCTIONS = {
    "url": _url,
    "isURL": _is_url,
    "getScheme": lambda u: celtypes.StringType(urlsplit(str(u)).scheme),
    "getHost": lambda u: celtypes.StringType(urlsplit(str(u)).netloc.rpartition("@")[2]),
    "getHostname": lambda u: celtypes.StringType(urlsplit(str(u)).hostname or ""),
    "getPort": lambda u: celtypes.StringType(str(urlsplit(str(u)).port or "")),
    "getEscapedPath": lambda u: celtypes.StringType(urlsplit(str(u)).path),
    "getQuery": lambda u: _query(u),
}


def _query(u: Any) -> celtypes.MapType:
    """`getQuery()`: each query parameter's values, in order (map(string, list(string)))."""
    values = parse_qs(urlsplit(str(u)).query, keep_blank_values=True)
    return celtypes.MapType(
        {
            celtypes.StringType(k): celtypes.ListType([celtypes.StringType(v) for v in vs])
            for k, vs in values.items()
        }
    )


@cache
def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule), functions=_FUNCTIONS)


@dataclass
class CelReport:
    errors: list[str] = field(default_factory=list)
    evaluated: int = 0
    unevaluated: list[str] = field(default_factory=list)


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """A copy of `value` with the schema's `default`s filled in, as the API server does."""
    value = copy.deepcopy(value)
    _default(schema, value)
    return value


def _default(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in schema.get("properties", {}):
                    _default(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(schema["items"], item)


def evaluate(schema: dict[str, Any], obj: dict[str, Any]) -> CelReport:
    """Every applicable rule of `schema` (a CRD openAPIV3Schema) against `obj`."""
    report = CelReport()
    _walk(schema, apply_defaults(schema, obj), "", report)
    return report


def _walk(schema: dict[str, Any], value: Any, path: str, report: CelReport) -> None:
    for rule in schema.get("x-kubernetes-validations", ()):
        text = rule["rule"]
        if "oldSelf" in text:
            continue
        try:
            result = _program(text).evaluate({"self": celpy.json_to_cel(value)})
        except Exception as exc:  # cel-python raises its own and Python errors alike
            report.unevaluated.append(f"{path or '(root)'}: {text} ({type(exc).__name__})")
            continue
        if isinstance(result, celpy.CELEvalError):
            report.unevaluated.append(f"{path or '(root)'}: {text} ({result})")
            continue
        report.evaluated += 1
        if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and result):
            report.errors.append(f"{path or '(root)'}: {rule.get('message') or text}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name, sub in props.items():
            if name in value:
                _walk(sub, value[name], f"{path}.{name}" if path else name, report)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in props:
                    _walk(extra, item, f"{path}.{name}" if path else name, report)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _walk(schema["items"], item, f"{path}[{index}]", report)
