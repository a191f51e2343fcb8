"""The playground at /ui in a real browser against the real server on the tiny model.

Debian's `chromium` (`.ci/run` installs it) driven by Playwright's Python client; no browser is
downloaded. Skipped, saying why, where /usr/bin/chromium is absent. Set `UI_SCREENSHOT=path.png`
to keep the screenshot of the finished run (the README's docs/ui.png comes from here).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import images
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # containers without user namespaces; the page is our own
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# A run long enough to stop by hand: the gradient picture makes the tiny model talk until
# max_tokens (it never says its end-of-turn token), about 10 s for 4 images on one CPU.
LONG_TOKENS = 3000
SHORT_TOKENS = 24
# Every image done or failed, and the run over (its last result can show a moment before).
ALL_FINISHED = """() => {
  const results = [...document.querySelectorAll('[data-testid=result]')];
  return results.length > 0 && results.every((r) => ['done', 'error'].includes(r.dataset.state))
    && document.getElementById('stop').disabled;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install chromium (CI's .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(
    browser: object, tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    log = tmp_path_factory.mktemp("ui") / "server.log"
    # Greedy unless the page says otherwise: the downloads are compared with describe's.
    args = ("--max_new_tokens_limit", str(LONG_TOKENS), "--generation_config", "none")
    with start_server(tiny_qwen3_vl, log, *args) as live:
        yield live


@pytest.fixture
def page(browser, server: LiveServer) -> Iterator[object]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.url}/ui")
    page.wait_for_function("document.getElementById('model-ready').dataset.ready !== 'unknown'")
    yield page
    context.close()
    assert errors == [], f"the page threw: {errors}"


def write_pictures(folder: Path) -> dict[str, bytes]:
    """Three pictures and a corrupt JPEG, written to `folder`."""
    files = {
        "red.jpg": images.jpeg((320, 240)),
        "gradient.png": images.encode(images.gradient((256, 192)), "PNG"),
        "blue.webp": images.encode(images.solid((200, 200), (30, 60, 200)), "WEBP"),
        "broken.jpg": images.truncated_jpeg(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def results(page) -> dict[str, dict[str, str]]:
    """Each result element's image, state, text and meta line."""
    return {
        row["image"]: row
        for row in page.evaluate(
            """() => [...document.querySelectorAll('[data-testid=result]')].map((r) => ({
                image: r.dataset.image, state: r.dataset.state,
                text: r.querySelector('[data-testid=result-text]').textContent,
                meta: r.querySelector('.meta').textContent }))"""
        )
    }


def chat_error(server: LiveServer, data: bytes) -> str:
    """The server's own message for one image, asked without the page."""
    url = f"data:image/jpeg;base64,{base64.b64encode(data).decode()}"
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Hi."}]
    body = {"model": "qwen-vl", "messages": [{"role": "user", "content": content}]}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    return response.json()["error"]["message"]


def gauge(server: LiveServer, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is not on /metrics")


def requests_counted(server: LiveServer, outcome: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "qwen_vl_requests_total" and sample.labels["outcome"] == outcome:
                return sample.value
    return 0.0


def describe_cli(server: LiveServer, folder: Path, prompt: str, max_tokens: int) -> list[dict]:
    """What `qwen-vl-describe --protocol openai` writes for the same folder."""
    manifest = folder.parent / f"{folder.name}-describe.jsonl"
    subprocess.run(
        [
            sys.executable, "-m", "predictor.describe", str(folder),
            "--url", server.url, "--protocol", "openai", "--output", "jsonl",
            "--jsonl", str(manifest), "--prompt", prompt,
            "--max-new-tokens", str(max_tokens), "--quiet",
        ],
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def test_describes_images_reports_the_corrupt_one_and_downloads_results(
    page, server: LiveServer, tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    files = write_pictures(folder)
    page.set_input_files("#file-input", [str(folder / name) for name in files])
    shown = results(page)
    assert list(shown) == list(files)
    assert {row["state"] for row in shown.values()} == {"queued"}
    thumbnails = page.eval_on_selector_all(".thumb", "(imgs) => imgs.map((i) => i.src)")
    assert len(thumbnails) == 4 and all(src.startswith("blob:") for src in thumbnails)

    page.select_option("#preset", "caption")
    prompt = page.input_value("#prompt")
    assert prompt.startswith("Write a short caption")
    page.fill("#max-tokens", str(SHORT_TOKENS))
    page.get_by_role("button", name="Describe", exact=True).click()
    page.wait_for_function(ALL_FINISHED, timeout=60_000)

    shown = results(page)
    for name in ("red.jpg", "gradient.png", "blue.webp"):
        assert shown[name]["state"] == "done", shown[name]
        assert shown[name]["text"].strip(), name
        assert "tokens" in shown[name]["meta"] and "finish: " in shown[name]["meta"]
    broken = shown["broken.jpg"]
    assert broken["state"] == "error"
    assert broken["text"] == chat_error(server, files["broken.jpg"])
    assert "could not be decoded" in broken["text"]
    announced = page.inner_text("#announcer")
    assert "red.jpg: done" in announced and "broken.jpg: error" in announced
    assert page.inner_text("#run-status").startswith("Finished: 3 done, 1 failed of 4")

    # JSONL: the lines qwen-vl-describe writes for the same folder, byte for byte.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSONL").click()
    assert download.value.suggested_filename == "captions.jsonl"
    lines = Path(download.value.path()).read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert lines == [json.dumps(record, ensure_ascii=False) for record in records]
    assert [r["image"] for r in records] == list(files)
    for record in records[:3]:
        assert record["text"] == shown[record["image"]]["text"]
    expected = {r["image"]: r for r in describe_cli(server, folder, prompt, SHORT_TOKENS)}
    assert {r["image"]: r for r in records} == expected
    assert records[3]["error"].startswith("image[0]: could not be decoded")

    # ZIP: one .txt caption per described image, CRC-32s a real unzip checks.
    with page.expect_download() as download:
        page.get_by_role("button", name="Download captions (ZIP)").click()
    with zipfile.ZipFile(download.value.path()) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["red.txt", "gradient.txt", "blue.txt"]
        for name in ("red.jpg", "gradient.png", "blue.webp"):
            caption = archive.read(Path(name).with_suffix(".txt").name).decode("utf-8")
            assert caption == shown[name]["text"]

    screenshot = tmp_path / "ui.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get("UI_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["UI_SCREENSHOT"])


def test_stop_cancels_the_requests_and_frees_the_engine(
    page, server: LiveServer, tmp_path: Path
) -> None:
    picture = images.encode(images.gradient((128, 96)), "PNG")
    paths = []
    for i in range(4):
        path = tmp_path / f"long_{i}.png"
        path.write_bytes(picture)
        paths.append(str(path))
    page.set_input_files("#file-input", paths)
    page.fill("#max-tokens", str(LONG_TOKENS))
    cancelled = requests_counted(server, "cancelled")
    page.get_by_role("button", name="Describe", exact=True).click()
    # Text streams in while the request runs.
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid=result][data-state=running]')]
            .some((r) => r.querySelector('[data-testid=result-text]').textContent.length > 20)""",
        timeout=30_000,
    )
    assert gauge(server, "qwen_vl_num_requests_running") >= 1

    page.get_by_role("button", name="Stop", exact=True).click()
    page.wait_for_function(
        """() => [...document.querySelectorAll('[data-testid=result]')]
            .every((r) => r.dataset.state === 'stopped')
            && document.getElementById('stop').disabled""",
        timeout=10_000,
    )
    assert page.inner_text("#run-status").startswith("Stopped")
    deadline = time.monotonic() + 10
    while gauge(server, "qwen_vl_num_requests_running") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gauge(server, "qwen_vl_num_requests_running") == 0
    assert gauge(server, "qwen_vl_num_requests_waiting") == 0
    assert requests_counted(server, "cancelled") == cancelled + 4
    # The slots are free: a short run now finishes at once.
    page.fill("#max-tokens", "4")
    page.get_by_role("button", name="Describe", exact=True).click()
    page.wait_for_function(ALL_FINISHED, timeout=30_000)
    assert {row["state"] for row in results(page).values()} == {"done"}


def test_shows_the_model_and_the_server_defaults_and_refuses_out_of_range_settings(
    page, server: LiveServer, tmp_path: Path
) -> None:
    assert page.inner_text("#model-name") == "qwen-vl"
    assert page.inner_text("#model-ready") == "ready"
    assert page.input_value("#max-tokens") == "128"  # --max_new_tokens
    assert page.get_attribute("#max-tokens", "max") == str(LONG_TOKENS)  # --max_new_tokens_limit
    assert page.input_value("#temperature") == "0"
    assert page.input_value("#concurrency") == "4"
    assert int(page.input_value("#max-pixels")) > int(page.input_value("#min-pixels")) > 0

    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))
    folder = tmp_path / "pictures"
    write_pictures(folder)
    page.set_input_files("#file-input", str(folder / "red.jpg"))
    for field, value in (("#max-tokens", "3001"), ("#top-p", "0"), ("#seed", "9" * 19)):
        page.click("#reset")
        page.fill(field, value)
        page.get_by_role("button", name="Describe", exact=True).click()
        assert page.evaluate(f"document.querySelector('{field}').matches(':invalid')"), field
    page.wait_for_timeout(300)
    assert not [url for url in sent if url.endswith("/chat/completions")]
    assert results(page)["red.jpg"]["state"] == "queued"


def test_every_control_is_labelled_and_a_run_works_from_the_keyboard(page, tmp_path: Path) -> None:
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button')]
            .filter((el) => !(el.labels?.length || el.getAttribute('aria-label')
                              || (el.tagName === 'BUTTON' && el.textContent.trim())))
            .map((el) => el.id)"""
    )
    assert unlabelled == []
    assert page.get_attribute("#announcer", "aria-live") == "polite"

    folder = tmp_path / "pictures"
    write_pictures(folder)
    visited = []
    for _ in range(40):
        page.keyboard.press("Tab")
        visited.append(page.evaluate("document.activeElement.id"))
        if visited[-1] == "pick-files":
            break
    assert visited[-1] == "pick-files", visited
    PlaywrightTimeout = pytest.importorskip("playwright.sync_api").TimeoutError
    chooser = None
    for _ in range(3):  # a loaded machine can drop the first key's user activation
        try:
            with page.expect_file_chooser(timeout=10_000) as opened:
                page.keyboard.press("Enter")
        except PlaywrightTimeout:
            assert page.evaluate("document.activeElement.id") == "pick-files"
            continue
        chooser = opened.value
        break
    assert chooser is not None, "Enter on the focused picker never opened a file chooser"
    chooser.set_files([str(folder / "red.jpg"), str(folder / "blue.webp")])
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "max-tokens":
            break
    page.keyboard.press("Control+A")
    page.keyboard.type("6")
    page.keyboard.press("Enter")  # submits the settings form: Describe
    page.wait_for_function(ALL_FINISHED, timeout=30_000)
    assert {row["state"] for row in results(page).values()} == {"done"}
    assert page.evaluate("document.activeElement.id") == "describe"


def test_a_folder_sends_its_images_only_and_the_page_fits_a_phone(page, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "trip" / ".cache").mkdir(parents=True)
    (folder / "cat.jpg").write_bytes(images.jpeg())
    (folder / "trip" / "beach.png").write_bytes(images.encode(images.gradient(), "PNG"))
    (folder / "trip" / ".cache" / "thumb.jpg").write_bytes(images.jpeg())
    (folder / ".hidden.jpg").write_bytes(images.jpeg())
    (folder / "notes.txt").write_text("not an image")
    page.set_input_files("#folder-input", str(folder))
    assert sorted(results(page)) == ["cat.jpg", "trip/beach.png"]  # describe's keys

    page.set_viewport_size({"width": 390, "height": 844})
    page.fill("#max-tokens", "4")
    page.get_by_role("button", name="Describe", exact=True).click()
    page.wait_for_function(ALL_FINISHED, timeout=30_000)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    with page.expect_download() as download:
        page.get_by_role("button", name="Download captions (ZIP)").click()
    with zipfile.ZipFile(download.value.path()) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["cat.txt", "trip/beach.txt"]


def test_dropped_files_join_and_shared_caption_names_stay_apart(page) -> None:
    """A drop (a synthetic one: headless Chromium cannot drag from a desktop) of `cat.jpg`
    and `cat.png`, which describe would both caption as `cat.txt`, and `cat.jpg` again."""
    jpeg = base64.b64encode(images.jpeg()).decode()
    png = base64.b64encode(images.encode(images.gradient(), "PNG")).decode()
    page.evaluate(
        """([jpeg, png]) => {
            const bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes(jpeg)], 'cat.jpg', {type: 'image/jpeg'}));
            transfer.items.add(new File([bytes(png)], 'cat.png', {type: 'image/png'}));
            transfer.items.add(new File([bytes(jpeg)], 'cat.jpg', {type: 'image/jpeg'}));
            const zone = document.getElementById('drop-zone');
            zone.dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
        }""",
        [jpeg, png],
    )
    page.wait_for_function("document.querySelectorAll('[data-testid=result]').length === 3")
    assert list(results(page)) == ["cat.jpg", "cat.png", "cat (2).jpg"]
    page.fill("#max-tokens", "4")
    page.get_by_role("button", name="Describe", exact=True).click()
    page.wait_for_function(ALL_FINISHED, timeout=30_000)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download captions (ZIP)").click()
    with zipfile.ZipFile(download.value.path()) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["cat.jpg.txt", "cat.png.txt", "cat (2).txt"]


def test_an_error_in_the_middle_of_a_stream_is_shown_with_the_servers_message(
    browser, tiny_qwen3_vl: Path, tmp_path: Path
) -> None:
    """The status line is sent before generation starts; a later failure (here the server's
    1 s deadline, ~300 tokens into a 3000-token run) arrives as an error event in the stream,
    and the page shows its message."""
    picture = tmp_path / "long.png"
    picture.write_bytes(images.encode(images.gradient((128, 96)), "PNG"))
    args = (
        "--max_new_tokens_limit", str(LONG_TOKENS), "--request_timeout_s", "1",
        "--generation_config", "none",
    )  # fmt: skip
    with start_server(tiny_qwen3_vl, tmp_path / "server.log", *args) as server:
        page = browser.new_page()
        try:
            page.goto(f"{server.url}/ui")
            page.set_input_files("#file-input", str(picture))
            page.fill("#max-tokens", str(LONG_TOKENS))
            page.get_by_role("button", name="Describe", exact=True).click()
            page.wait_for_function(ALL_FINISHED, timeout=30_000)
        finally:
            shown = results(page)["long.png"]
            page.close()
    assert shown["state"] == "error"
    assert shown["text"] == "request did not finish within 1 s", shown


def structured_table(page) -> tuple[list[str], list[list[str]]]:
    """The structured-results table: its header and its rows' cells."""
    return page.evaluate(
        """() => [
            [...document.querySelectorAll('#structured thead th')].map((th) => th.textContent),
            [...document.querySelectorAll('#structured tbody tr')].map((tr) =>
                [...tr.children].map((cell) => cell.textContent)),
        ]"""
    )


def test_a_schema_gives_a_table_of_its_properties_and_labels_one_label_each(
    page, tmp_path: Path
) -> None:
    folder = tmp_path / "pictures"
    write_pictures(folder)
    names = ["red.jpg", "gradient.png", "blue.webp"]
    page.set_input_files("#file-input", [str(folder / name) for name in names])
    assert not page.is_visible("#schema") and not page.is_visible("#structured")
    page.select_option("#structure", "schema")
    assert page.is_visible("#schema") and not page.is_visible("#labels")
    page.fill("#schema", "{not json")
    page.get_by_role("button", name="Describe", exact=True).click()
    assert page.evaluate("document.querySelector('#schema').matches(':invalid')")
    assert {row["state"] for row in results(page).values()} == {"queued"}

    schema = {
        "type": "object",
        "properties": {
            "caption": {"type": "string", "maxLength": 20},
            "count": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["caption", "count"],
    }
    page.fill("#schema", json.dumps(schema))
    page.fill("#max-tokens", "64")
    page.get_by_role("button", name="Describe", exact=True).click()
    page.wait_for_function(ALL_FINISHED, timeout=60_000)
    header, rows = structured_table(page)
    assert header == ["image", "caption", "count", "finish"]
    assert [row[0] for row in rows] == names
    shown = results(page)
    stopped = [row for row in rows if row[3] == "stop"]
    assert stopped  # the grammar ends most answers well within 64 tokens
    for image, caption, count, _ in stopped:
        assert json.loads(shown[image]["text"]) == {"caption": caption, "count": int(count)}
        assert len(caption) <= 20 and 0 <= int(count) <= 9
    with page.expect_download() as download:
        page.get_by_role("button", name="Download JSONL").click()
    records = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    for record in records:
        if record["finish_reason"] == "stop":
            assert record["json"] == json.loads(record["text"])

    page.select_option("#structure", "labels")
    page.fill("#labels", "indoor, outdoor , under water")
    page.get_by_role("button", name="Describe", exact=True).click()
    page.wait_for_function(ALL_FINISHED, timeout=60_000)
    header, rows = structured_table(page)
    assert header == ["image", "label", "finish"]
    assert {row[1] for row in rows} <= {"indoor", "outdoor", "under water"}
    assert {row[2] for row in rows} == {"stop"}
