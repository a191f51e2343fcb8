"""The captioning client without a model: files, outputs and resume, retries, protocols, CLI.

Network behaviour is tested against real sockets: a small `http.server` on loopback that
answers what each test scripts (503 with Retry-After, 400, a caption), and a gRPC channel to
a port nobody listens on.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from predictor.describe import cli
from predictor.describe.errors import (
    Cancelled,
    Fatal,
    ImageRejected,
    RequestFailed,
    Retryable,
)
from predictor.describe.files import (
    ImageFile,
    find_images,
    remove_stale_temp_files,
    shared_sidecars,
)
from predictor.describe.outputs import ManifestError, Outputs, atomic_write, load_manifest
from predictor.describe.protocols import (
    Caption,
    ClientConfig,
    V2GrpcClient,
    V2RestClient,
    classify_grpc,
    classify_http,
)
from predictor.describe.retry import RetryPolicy, call_with_retries, parse_retry_after
from tests import images
from tests.live_server import free_port

CAPTION = Caption("a red square", "stop", 5)


def image_file(root: Path, key: str, data: bytes = b"x") -> ImageFile:
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return ImageFile(path, key)


# --- files ---------------------------------------------------------------------------------


def test_find_images_by_pattern_skipping_hidden_and_the_manifest(tmp_path: Path) -> None:
    for name in ["b.JPG", "a.png", "c.webp", "notes.txt", ".hidden.jpg", "sub/d.tiff"]:
        image_file(tmp_path, name)
    image_file(tmp_path, ".cache/e.jpg")
    image_file(tmp_path, "sub/deeper/f.gif")
    image_file(tmp_path, "weird.jpg.jsonl")
    keys = [i.key for i in find_images(tmp_path)]
    assert keys == ["a.png", "b.JPG", "c.webp"]
    keys = [i.key for i in find_images(tmp_path, recursive=True)]
    assert keys == ["a.png", "b.JPG", "c.webp", "sub/d.tiff", "sub/deeper/f.gif"]
    only = find_images(tmp_path, include=["*.jsonl", "*.png"], exclude=[tmp_path / "a.png"])
    assert [i.key for i in only] == ["weird.jpg.jsonl"]


def test_shared_sidecars_are_reported_for_every_owner(tmp_path: Path) -> None:
    found = [image_file(tmp_path, k) for k in ("a.jpg", "a.png", "b.jpg")]
    clashes = shared_sidecars(found)
    assert set(clashes) == {"a.jpg", "a.png"}
    assert clashes["a.jpg"] == "sidecar a.txt would be shared by a.jpg, a.png"


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path: Path) -> None:
    photo = image_file(tmp_path, "photo.jpg")
    stale = tmp_path / ".photo.txt.k2j3.describe-tmp"
    stale.write_text("half a cap")
    keep = [tmp_path / ".photo.txt", tmp_path / "photo.txt", tmp_path / "x.describe-tmp"]
    for path in keep:
        path.write_text("mine")
    assert remove_stale_temp_files([photo]) == 1
    assert not stale.exists() and all(p.exists() for p in keep)


# --- outputs -------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_and_cleans_up_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a.txt"
    atomic_write(target, b"first")
    atomic_write(target, "second é".encode())
    assert target.read_text(encoding="utf-8") == "second é"

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write(target, b"third")
    assert target.read_text(encoding="utf-8") == "second é"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def record(key: str, text: str = "words") -> str:
    return json.dumps({"image": key, "text": text, "finish_reason": "stop", "generated_tokens": 3})


def test_torn_last_line_is_dropped_and_the_file_rewritten(tmp_path: Path) -> None:
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(record("a.jpg") + "\n" + record("b.jpg") + "\n" + '{"image": "c.jpg", "te')
    found = [image_file(tmp_path, k) for k in ("a.jpg", "b.jpg", "c.jpg")]
    (tmp_path / ".captions.jsonl.x1y2.describe-tmp").write_text("a rewrite cut short")
    outputs = Outputs("jsonl", manifest)
    plan = outputs.plan(found)
    outputs.close()
    assert [i.key for i in plan.todo] == ["c.jpg"] and plan.skipped == 2
    assert not list(tmp_path.glob("*.describe-tmp"))
    assert manifest.read_text() == record("a.jpg") + "\n" + record("b.jpg") + "\n"


def test_complete_last_line_without_newline_is_kept(tmp_path: Path) -> None:
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(record("a.jpg"))
    outputs = Outputs("jsonl", manifest)
    plan = outputs.plan([image_file(tmp_path, "a.jpg")])
    outputs.close()
    assert plan.todo == [] and manifest.read_text() == record("a.jpg") + "\n"


def test_damage_before_the_last_line_stops_the_run(tmp_path: Path) -> None:
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(record("a.jpg") + "\nnot json\n" + record("b.jpg") + "\n")
    with pytest.raises(ManifestError, match="line 2"):
        load_manifest(manifest)


def test_duplicates_collapse_to_the_last_record(tmp_path: Path) -> None:
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text(record("a.jpg", "old") + "\n" + record("a.jpg", "new") + "\n")
    outputs = Outputs("jsonl", manifest)
    outputs.plan([image_file(tmp_path, "a.jpg")])
    outputs.close()
    assert manifest.read_text() == record("a.jpg", "new") + "\n"


def test_what_counts_as_done_in_each_mode(tmp_path: Path) -> None:
    found = [image_file(tmp_path, k) for k in ("both.jpg", "side.jpg", "line.jpg", "bad.jpg")]
    (tmp_path / "both.txt").write_text("x")
    (tmp_path / "side.txt").write_text("x")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        record("both.jpg")
        + "\n"
        + record("line.jpg")
        + "\n"
        + json.dumps({"image": "bad.jpg", "error": "image[0]: not an image"})
        + "\n"
    )

    def todo(mode: str, **flags: bool) -> list[str]:
        outputs = Outputs(mode, manifest)
        plan = outputs.plan(found, **flags)
        outputs.close()
        return sorted(i.key for i in plan.todo)

    assert todo("sidecar") == ["bad.jpg", "line.jpg"]  # bad.jpg has no sidecar, no manifest
    assert todo("jsonl") == ["side.jpg"]
    assert todo("both") == ["line.jpg", "side.jpg"]
    # Each plan above dropped the records of what it would send: the manifest shrank.
    assert [json.loads(line)["image"] for line in manifest.read_text().splitlines()] == [
        "both.jpg",
        "bad.jpg",
    ]
    assert todo("both", retry_failed=True) == ["bad.jpg", "line.jpg", "side.jpg"]
    assert manifest.read_text() == record("both.jpg") + "\n"


def test_overwrite_leaves_one_record_per_image(tmp_path: Path) -> None:
    found = [image_file(tmp_path, k) for k in ("a.jpg", "b.jpg")]
    manifest = tmp_path / "m.jsonl"
    for _ in range(2):
        outputs = Outputs("both", manifest)
        plan = outputs.plan(found, overwrite=True)
        assert len(plan.todo) == 2
        for image in plan.todo:
            outputs.record_caption(image, CAPTION)
        outputs.close()
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert lines == [
        {"image": k, "text": "a red square", "finish_reason": "stop", "generated_tokens": 5}
        for k in ("a.jpg", "b.jpg")
    ]
    assert (tmp_path / "a.txt").read_text() == "a red square"


def test_concurrent_appends_stay_whole_lines(tmp_path: Path) -> None:
    found = [image_file(tmp_path, f"{i:03}.jpg") for i in range(200)]
    outputs = Outputs("both", tmp_path / "m.jsonl")
    outputs.plan(found)
    long = Caption("word " * 2000, "length", 2000)  # lines longer than a write buffer

    def write(part: list[ImageFile]) -> None:
        for image in part:
            outputs.record_caption(image, long)

    threads = [threading.Thread(target=write, args=(found[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outputs.close()
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["image"] for line in lines) == [i.key for i in found]
    assert all((tmp_path / f"{i:03}.txt").read_text() == long.text for i in range(200))


# --- retry ---------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_honours_retry_after() -> None:
    policy = RetryPolicy(attempts=10, base_s=1.0, cap_s=8.0)
    rng = random.Random(0)
    for retry, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (7, 8)]:
        delays = [policy.delay(retry, None, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
    assert 3.0 <= policy.delay(1, 3.0, rng) <= 3.25
    assert 8.0 <= policy.delay(1, 3600.0, rng) <= 8.25  # a proxy's hour is capped


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now) == 0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def flaky(failures: list[Exception], result: str = "ok") -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return result

    return call, calls


FAST = RetryPolicy(attempts=3, base_s=0.01)


def test_retryable_errors_are_retried_until_success() -> None:
    call, calls = flaky([Retryable("busy"), Retryable("busy")])
    assert call_with_retries(call, FAST, threading.Event(), "a.jpg") == "ok"
    assert len(calls) == 3


def test_retries_give_up_with_the_last_message() -> None:
    call, calls = flaky([Retryable("busy")] * 5)
    with pytest.raises(RequestFailed, match="gave up after 3 attempts: busy"):
        call_with_retries(call, FAST, threading.Event(), "a.jpg")
    assert len(calls) == 3


@pytest.mark.parametrize(
    "error", [ImageRejected("image[0]: bad"), Fatal("404"), RequestFailed("x")]
)
def test_other_errors_are_not_retried(error: Exception) -> None:
    call, calls = flaky([error])
    with pytest.raises(type(error)):
        call_with_retries(call, FAST, threading.Event(), "a.jpg")
    assert len(calls) == 1


def test_stop_cancels_a_long_backoff_at_once() -> None:
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    call, _ = flaky([Retryable("busy", retry_after=30)])
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        call_with_retries(call, RetryPolicy(attempts=3, cap_s=60), stop, "a.jpg")
    assert time.perf_counter() - started < 5


# --- protocols: error classification ------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (400, "image[0]: is not an image", ImageRejected),
        (400, "max_new_tokens: must be between 1 and 1024, got 0", Fatal),
        (400, "request body: is 30000000 bytes, more than the limit of 28000000", ImageRejected),
        (400, "prompt[0]: is 20000 characters, more than 16384", Fatal),
        (404, "Model with name x does not exist.", Fatal),
        (401, "", Fatal),
        (429, "slow down", Retryable),
        (503, "", Retryable),
        (502, "bad gateway", Retryable),
        (500, "boom", RequestFailed),
        (413, "too large", RequestFailed),
    ],
)
def test_classify_http(status: int, message: str, kind: type) -> None:
    error = classify_http(status, message, 2.0)
    assert type(error) is kind
    if kind is ImageRejected:
        assert error.message == message  # the server's own words are what gets recorded
    if kind is Retryable:
        assert error.retry_after == 2.0


@pytest.mark.parametrize(
    ("code", "details", "kind"),
    [
        ("INVALID_ARGUMENT", "image[0]: truncated", ImageRejected),
        ("INVALID_ARGUMENT", "temperature: must be in [0.0, 2.0], got 9.5", Fatal),
        ("UNAVAILABLE", "connection refused", Retryable),
        ("RESOURCE_EXHAUSTED", "queue full", Retryable),
        ("NOT_FOUND", "no model", Fatal),
        ("UNAUTHENTICATED", "", Fatal),
        ("INTERNAL", "boom", RequestFailed),
    ],
)
def test_classify_grpc(code: str, details: str, kind: type) -> None:
    assert type(classify_grpc(code, details)) is kind


# --- protocols: real sockets ----------------------------------------------------------------


@dataclass
class Scripted:
    """A loopback HTTP server answering each POST with the next scripted reply."""

    replies: list[tuple[int, dict[str, str], dict[str, Any]]]
    default: Callable[[dict[str, Any]], tuple[int, dict[str, str], dict[str, Any]]] | None = None
    requests: list[tuple[float, dict[str, str], dict[str, Any]]] = field(default_factory=list)
    url: str = ""


def caption_reply(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A predictor-shaped answer: 400 for images that are not JPEG/PNG, else a caption."""
    data = base64.b64decode(body["inputs"][0]["data"][0])
    if not data.startswith((b"\xff\xd8", b"\x89PNG")):
        return 400, {}, {"error": "image[0]: is not an image in a supported format"}
    outputs = [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": [f"{len(data)} bytes"]},
        {"name": "finish_reason", "datatype": "BYTES", "shape": [1], "data": ["stop"]},
        {"name": "generated_tokens", "datatype": "INT32", "shape": [1], "data": [2]},
    ]
    return 200, {}, {"outputs": outputs}


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    script = Scripted(replies=[])
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            with lock:
                script.requests.append((time.perf_counter(), dict(self.headers), body))
                if script.replies:
                    status, headers, payload = script.replies.pop(0)
                else:
                    assert script.default is not None
                    status, headers, payload = script.default(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {**headers, "content-type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield script
    server.shutdown()
    server.server_close()


def test_503_with_retry_after_is_waited_out_then_succeeds(scripted: Scripted) -> None:
    scripted.replies = [(503, {"Retry-After": "1"}, {"error": "model not ready"})]
    scripted.default = caption_reply
    client = V2RestClient(ClientConfig(url=scripted.url))
    caption = call_with_retries(
        lambda: client.describe(images.jpeg()), RetryPolicy(base_s=0.05), threading.Event(), "x"
    )
    client.close()
    assert caption.text == f"{len(images.jpeg())} bytes"
    first, second = (when for when, _, _ in scripted.requests)
    assert 1.0 <= second - first < 2.0


def test_a_refused_image_is_not_retried(scripted: Scripted) -> None:
    scripted.default = caption_reply
    client = V2RestClient(ClientConfig(url=scripted.url))
    with pytest.raises(ImageRejected) as error:
        call_with_retries(lambda: client.describe(b"text"), FAST, threading.Event(), "x")
    client.close()
    assert error.value.message == "image[0]: is not an image in a supported format"
    assert len(scripted.requests) == 1


def test_request_carries_the_file_unchanged_with_prompt_parameters_headers(
    scripted: Scripted,
) -> None:
    scripted.default = caption_reply
    big = images.encode(Image.linear_gradient("L").resize((3200, 2400)), "PNG")
    config = ClientConfig(
        url=scripted.url + "/",
        model="m",
        prompt="Caption it.",
        parameters={"max_new_tokens": 9, "temperature": 0.5},
        headers=(("Authorization", "Bearer t"),),
    )
    client = V2RestClient(config)
    assert client.infer_url == f"{scripted.url}/v2/models/m/infer"
    client.describe(big)
    client.close()
    _, headers, body = scripted.requests[0]
    assert headers["Authorization"] == "Bearer t"
    assert base64.b64decode(body["inputs"][0]["data"][0]) == big  # no client-side resizing
    assert body["inputs"][1] == {
        "name": "prompt",
        "datatype": "BYTES",
        "shape": [1],
        "data": ["Caption it."],
    }
    assert body["parameters"] == {"max_new_tokens": 9, "temperature": 0.5}


def test_connection_refused_is_retryable_on_both_protocols() -> None:
    port = free_port()
    rest = V2RestClient(ClientConfig(url=f"127.0.0.1:{port}"))
    grpc_client = V2GrpcClient(ClientConfig(url=f"127.0.0.1:{port}", timeout_s=10))
    for client in (rest, grpc_client):
        with pytest.raises(Retryable) as error:
            client.describe(images.jpeg())
        client.close()
    assert "UNAVAILABLE" in error.value.message


def test_grpc_request_is_what_the_server_parses() -> None:
    from predictor.protocol import read_parameters

    config = ClientConfig(
        url="127.0.0.1:1",
        model="m",
        prompt="Hi",
        parameters={"max_new_tokens": 7, "temperature": 0.25, "seed": 3},
    )
    client = V2GrpcClient(config)
    request = client.build_request(b"\x89PNG...")
    client.close()
    assert request.model_name == "m"
    assert [(t.name, list(t.shape)) for t in request.inputs] == [("image", [1]), ("prompt", [1])]
    assert list(request.inputs[0].contents.bytes_contents) == [b"\x89PNG..."]
    # The server's own parameter reader sees the double KServe's proto has no field for.
    assert read_parameters(request.parameters) == {
        "max_new_tokens": 7,
        "temperature": 0.25,
        "seed": 3,
    }


@pytest.mark.parametrize("url", ["http://host:8081", "https://host"])
def test_grpc_refuses_an_http_url(url: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        V2GrpcClient(ClientConfig(url=url))


# --- the CLI end to end against the scripted server ------------------------------------------


def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    image_file(root, "a.jpg", images.jpeg())
    image_file(root, "b.png", images.encode(images.solid(), "PNG"))
    image_file(root, "c.jpg", b"not an image")
    image_file(root, "sub/d.jpg", images.jpeg(color=(0, 0, 255)))
    return root


def test_cli_describes_records_refusals_and_resumes(
    scripted: Scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.default = caption_reply
    root = folder(tmp_path)
    argv = [str(root), "--url", scripted.url, "--recursive", "--output", "both", "--quiet"]
    assert cli.run(argv) == 1
    err = capsys.readouterr().err
    assert "failed c.jpg: image[0]: is not an image in a supported format" in err
    assert "done 3, skipped 0, failed 1" in err
    lines = [json.loads(x) for x in (root / "captions.jsonl").read_text().splitlines()]
    by_key = {r["image"]: r for r in lines}
    assert sorted(by_key) == ["a.jpg", "b.png", "c.jpg", "sub/d.jpg"] and len(lines) == 4
    assert by_key["c.jpg"] == {"image": "c.jpg", "error": by_key["c.jpg"]["error"]}
    for key in ("a.jpg", "b.png", "sub/d.jpg"):
        sidecar = (root / key).with_suffix(".txt")
        assert sidecar.read_text() == by_key[key]["text"]
    assert not (root / "c.txt").exists()
    sent = len(scripted.requests)

    assert cli.run(argv) == 0
    assert "done 0, skipped 4, failed 0" in capsys.readouterr().err
    assert len(scripted.requests) == sent

    assert cli.run([*argv, "--retry-failed"]) == 1
    assert len(scripted.requests) == sent + 1
    assert len((root / "captions.jsonl").read_text().splitlines()) == 4


def test_cli_stops_at_the_first_answer_no_image_can_pass(
    scripted: Scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "many"
    for i in range(40):
        image_file(root, f"{i:02}.jpg", images.jpeg())
    scripted.default = lambda body: (404, {}, {"error": "Model with name x does not exist."})
    argv = [str(root), "--url", scripted.url, "--concurrency", "2", "--quiet"]
    assert cli.run(argv) == 2
    err = capsys.readouterr().err
    assert "stopped: HTTP 404: Model with name x does not exist." in err
    assert len(scripted.requests) <= 4  # those already in flight, not all forty
    assert not list(root.glob("*.txt"))


def test_cli_fails_images_whose_sidecars_would_clash(
    scripted: Scripted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scripted.default = caption_reply
    root = tmp_path / "clash"
    image_file(root, "a.jpg", images.jpeg())
    image_file(root, "a.png", images.encode(images.solid(), "PNG"))
    image_file(root, "b.jpg", images.jpeg())
    assert cli.run([str(root), "--url", scripted.url, "--quiet"]) == 1
    assert "failed a.jpg: sidecar a.txt would be shared by a.jpg, a.png" in capsys.readouterr().err
    assert sorted(p.name for p in root.glob("*.txt")) == ["b.txt"]
    assert cli.run([str(root), "--url", scripted.url, "--output", "jsonl", "--quiet"]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jsonl", "x.jsonl", "--output", "sidecar"], "--jsonl needs --output jsonl or both"),
        (["--protocol", "soap"], "invalid choice"),
        (["--protocol", "openai", "--top-k", "5"], "--top-k: not available with --protocol openai"),
        (["--concurrency", "0"], "must be at least 1"),
        (["--header", "no colon"], "Name: value"),
        (["--protocol", "grpc"], "host:port"),
    ],
)
def test_cli_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.run([str(tmp_path), "--url", "http://127.0.0.1:9", *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.run([str(tmp_path / "nope"), "--url", "http://127.0.0.1:9"])
    assert "is not a folder" in capsys.readouterr().err
