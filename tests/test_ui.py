"""The playground's routes and packaging, without a model: a FastAPI app with only `/ui`.

The page itself is driven in a real browser by tests/test_ui_browser.py.
"""

from __future__ import annotations

import dataclasses
import json
import re
from fnmatch import fnmatch
from importlib import resources
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from predictor.params import MAX_SEED, PixelBudget, RequestLimits, SamplingDefaults
from predictor.settings import Settings, build_parser
from predictor.ui.routes import ASSETS, PAGE, page_config, register_ui_routes

ROOT = Path(__file__).resolve().parent.parent
LIMITS = RequestLimits(
    max_new_tokens=64,
    max_new_tokens_limit=512,
    default_budget=PixelBudget(min_pixels=3136, max_pixels=200_704),
    max_pixels_limit=1_003_520,
    max_images_per_request=4,
)


def client_for(settings: Settings) -> TestClient:
    app = FastAPI()
    register_ui_routes(app, page_config(settings.model_name, settings, LIMITS))
    return TestClient(app)


@pytest.fixture(scope="module")
def client() -> TestClient:
    return client_for(Settings(default_prompt="Say what </script><b>you</b> see & more. {{MODEL}}"))


def embedded_config(html: str) -> dict:
    match = re.search(r'<script type="application/json" id="server-config">(.*?)</script>', html)
    assert match, "no config block in the page"
    return json.loads(match.group(1))


def test_page_carries_the_server_defaults_and_limits(client: TestClient) -> None:
    response = client.get("/ui")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    config = embedded_config(response.text)
    assert config["model"] == "qwen-vl"
    assert config["defaults"] == {
        "max_tokens": 64,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_pixels": 3136,
        "max_pixels": 200_704,
    }
    assert config["limits"]["max_tokens"] == 512
    assert config["limits"]["max_pixels"] == 1_003_520
    assert config["limits"]["seed"] == str(MAX_SEED)
    assert config["limits"]["max_image_bytes"] == Settings().max_image_bytes


def test_page_shows_the_sampling_defaults_a_silent_request_gets() -> None:
    """With the checkpoint's defaults (Qwen3-VL's generation_config.json), the page starts at
    them, not at greedy values: its requests then sample as an API client's would."""
    qwen3 = SamplingDefaults.from_generation_config(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    )
    limits = dataclasses.replace(LIMITS, sampling_defaults=qwen3)
    config = page_config("qwen-vl", Settings(), limits)
    assert config["defaults"]["temperature"] == 0.7
    assert config["defaults"]["top_p"] == 0.8
    assert config["defaults"]["top_k"] == 20


def test_a_prompt_cannot_close_the_config_block(client: TestClient) -> None:
    html = client.get("/ui").text
    # One closing tag for the config block: the prompt's "</script>" arrives escaped...
    assert html.count("</script>") == 3  # the config block and the two script tags
    # ... and still reads back as the server's prompt.
    prompt = "Say what </script><b>you</b> see & more. {{MODEL}}"
    assert embedded_config(html)["default_prompt"] == prompt


def test_page_and_assets_forbid_foreign_scripts_and_connections(client: TestClient) -> None:
    for path in ("/ui", *(f"/ui/{name}" for name in ASSETS)):
        response = client.get(path)
        assert response.status_code == 200, path
        policy = response.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "connect-src 'self'" in policy
        assert "default-src 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")


def test_page_loads_nothing_from_elsewhere(client: TestClient) -> None:
    """Air-gapped clusters: every URL in the page is relative to the server itself."""
    texts = [client.get("/ui").text, *(client.get(f"/ui/{name}").text for name in ASSETS)]
    for text in texts:
        assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", text)
        assert not re.search(r"@import|url\(\s*['\"]?(?:https?:)?//", text)
        assert not re.search(r"fetch\(\s*['\"`](?:https?:)?/", text)


def test_unknown_assets_are_not_found_and_paths_never_reach_files(client: TestClient) -> None:
    for path in ("/ui/nope.js", "/ui/index.html", "/ui/..%2Froutes.py", "/ui/%2e%2e/routes.py"):
        assert client.get(path).status_code == 404, path


def test_unchanged_files_are_revalidated_with_etags(client: TestClient) -> None:
    first = client.get("/ui/app.js")
    assert first.headers["cache-control"] == "no-cache"
    again = client.get("/ui/app.js", headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


def test_trailing_slash_redirects_to_the_page(client: TestClient) -> None:
    response = client.get("/ui/", follow_redirects=False)
    assert response.status_code in (307, 308)
    assert response.headers["location"].endswith("/ui")


def test_every_static_file_is_package_data() -> None:
    """A file missing from pyproject's package-data would be absent from a wheel install."""
    static = resources.files("predictor.ui").joinpath("static")
    files = sorted(entry.name for entry in static.iterdir() if entry.is_file())
    assert set(files) == {PAGE, *ASSETS}
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["predictor.ui"]
    for name in files:
        assert any(fnmatch(f"static/{name}", pattern) for pattern in patterns), name


def test_enable_ui_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_args(build_parser().parse_args([])).enable_ui is True
    off = build_parser().parse_args(["--enable_ui", "false"])
    assert Settings.from_args(off).enable_ui is False
    monkeypatch.setenv("QWEN_VL_ENABLE_UI", "false")
    assert Settings.from_args(build_parser().parse_args([])).enable_ui is False
    assert Settings.from_args(build_parser().parse_args(["--enable_ui", "true"])).enable_ui


@pytest.mark.slow
def test_enable_ui_false_removes_the_page_but_not_the_api(
    tiny_qwen3_vl: Path, tmp_path: Path
) -> None:
    from tests.live_server import start_server

    with start_server(tiny_qwen3_vl, tmp_path / "server.log", "--enable_ui", "false") as server:
        assert httpx.get(f"{server.url}/ui", timeout=10).status_code == 404
        assert httpx.get(f"{server.url}/ui/app.js", timeout=10).status_code == 404
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 200
