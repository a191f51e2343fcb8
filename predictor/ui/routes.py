"""Serve the playground's files: `GET /ui` (the page) and `GET /ui/{asset}`.

Only the files listed in `ASSETS` are served, read once from the package at start-up; a path
from the URL never reaches the file system. The page gets the server's request defaults and
limits as a JSON block (`page_config`), so its controls start at the server's values and
refuse what the API would refuse. A strict Content-Security-Policy allows only the page's own
scripts and styles and connections back to this origin: a caption can never run as code.
"""

from __future__ import annotations

import hashlib
import html
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response

from predictor.params import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, RequestLimits
from predictor.settings import Settings

PAGE = "index.html"
ASSETS = {  # file in predictor/ui/static: its content type
    "app.js": "text/javascript; charset=utf-8",
    "zip.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CONFIG_MARK = "{{CONFIG_JSON}}"
MODEL_MARK = "{{MODEL}}"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidate every time (a 304 when unchanged), so an upgraded server serves its own page.
    "Cache-Control": "no-cache",
}


def page_config(model_name: str, settings: Settings, limits: RequestLimits) -> dict[str, Any]:
    """What the page needs to know that no public route says: defaults and limits.

    The sampling defaults are the resolved ones a silent request gets (`--generation_config`:
    the checkpoint's, or greedy), since the page sends every field it shows: showing plain
    greedy values would make the page's requests differ from an API client's.
    """
    sampling = limits.sampling_defaults
    return {
        "model": model_name,
        "default_prompt": settings.default_prompt,
        "defaults": {
            "max_tokens": limits.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k,
            "min_pixels": limits.default_budget.min_pixels,
            "max_pixels": limits.default_budget.max_pixels,
        },
        "limits": {
            "max_tokens": limits.max_new_tokens_limit,
            "temperature": MAX_TEMPERATURE,
            "top_k": MAX_TOP_K,
            "seed": str(MAX_SEED),  # beyond JavaScript's exact integers: a string
            "max_pixels": limits.max_pixels_limit,
            "max_image_bytes": settings.max_image_bytes,
        },
    }


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def of(cls, body: bytes, content_type: str) -> StaticFile:
        return cls(body, content_type, f'"{hashlib.sha256(body).hexdigest()[:16]}"')

    def response(self, request: Request) -> Response:
        headers = {**SECURITY_HEADERS, "ETag": self.etag}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.content_type, headers=headers)


def _read(name: str) -> bytes:
    return resources.files("predictor.ui").joinpath("static", name).read_bytes()


def render_page(config: dict[str, Any]) -> bytes:
    """index.html with `config` in its JSON block (escaped so no value can close the tag)."""
    data = orjson.dumps(config).decode()
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = _read(PAGE).decode("utf-8")
    if CONFIG_MARK not in template:
        raise RuntimeError(f"{PAGE} has no {CONFIG_MARK} placeholder")
    # The model name first: a prompt in the config may contain the other mark.
    page = template.replace(MODEL_MARK, html.escape(config["model"]))
    return page.replace(CONFIG_MARK, data).encode("utf-8")


def register_ui_routes(app: FastAPI, config: dict[str, Any]) -> None:
    """`GET /ui` and its assets, from the files in the installed package."""
    page = StaticFile.of(render_page(config), "text/html; charset=utf-8")
    assets = {name: StaticFile.of(_read(name), kind) for name, kind in ASSETS.items()}

    async def ui_page(request: Request) -> Response:
        return page.response(request)

    async def ui_asset(name: str, request: Request) -> Response:
        asset = assets.get(name)
        if asset is None:
            return Response("not found", status_code=404, media_type="text/plain")
        return asset.response(request)

    app.add_api_route("/ui", ui_page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/ui/{name}", ui_asset, methods=["GET"], include_in_schema=False)
