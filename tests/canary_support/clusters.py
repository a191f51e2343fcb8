"""Stand-in clusters seeded with the objects our own overlays render (staging: Knative mode,
prod: two pools behind one HTTPRoute), so the tool is tested on the real manifests' shapes."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import pytest

from tests.canary_support.stand_in_api import StandInApi
from tests.k8s import kubectl

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("InferenceService", "HTTPRoute")
STAGING_NS = "qwen-vl-staging"
PROD_NS = "qwen-vl-prod"
DEV_NS = "qwen-vl-dev"
# Knative revisions of staging's InferenceService: 00002 is the canary, as after a new image tag.
REVISIONS = ["qwen-vl-predictor-00001", "qwen-vl-predictor-00002"]


@functools.cache
def _rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    try:
        objs = kubectl.render(ROOT / "kustomize" / "overlays" / overlay)
    except kubectl.KubectlUnavailable as exc:
        pytest.skip(f"kubectl (for rendering the overlays) unavailable: {exc}")
    return tuple(o for o in objs if o["kind"] in KINDS)


def objects(overlay: str) -> list[dict[str, Any]]:
    """The overlay's InferenceServices and HTTPRoutes (fresh copies)."""
    return copy.deepcopy(list(_rendered(overlay)))


def staging() -> StandInApi:
    """Knative mode with a canary in flight: revision 00002 at the overlay's 10%."""
    api = StandInApi(STAGING_NS, objects("staging"))
    api.start_knative("qwen-vl", REVISIONS)
    return api


def prod() -> StandInApi:
    """Pool mode: stable and canary InferenceServices Ready, the route at the overlay's 90/10."""
    api = StandInApi(PROD_NS, objects("prod"))
    for plural, name in list(api.objects):
        if plural == "inferenceservices":
            api.mark_ready(name)
    return api


def dev() -> StandInApi:
    """Standard mode and no route: nothing the tool can step."""
    return StandInApi(DEV_NS, objects("dev"))
