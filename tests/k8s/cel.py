"""The CEL rules of a CRD (`x-kubernetes-validations`), evaluated with cel-python the way the
API server evaluates them on create: against the object after schema defaults are applied, with
`self` bound to the value at the rule's place in the schema.

Transition rules (those that read `oldSelf`) only apply to updates and are skipped. A rule that
uses a Kubernetes CEL extension cel-python lacks (`isURL`, `quantity`, ...) cannot be decided
here: it is counted as unevaluated, never silently passed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import celpy

_ENV = celpy.Environment()


@cache
def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


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
