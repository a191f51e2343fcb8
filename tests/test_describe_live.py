"""`python -m predictor.describe` against the real predictor on the tiny model, REST and gRPC.

One folder of 33 images (six formats, sizes from 24 px to 2400 px, a subfolder two levels deep,
one truncated JPEG, one text file named .png) is described with concurrency 8; every output is
checked; a second run must skip everything. Then the run is broken on purpose: the client is
interrupted (SIGINT) or killed (SIGKILL), and the server is killed mid-run and restarted; a
re-run must complete the set with one manifest line per image and no half-written file.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests import images
from tests.live_server import LiveServer, start_server

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BAD = {"broken.jpg", "sub/notes.png"}
SUMMARY = re.compile(r"done (\d+), skipped (\d+), failed (\d+) in [\d.]+s: ([\d.]+) images/s")


def build_folder(root: Path) -> set[str]:
    """33 files to describe (31 images, 2 bad), plus files the client must leave alone."""
    files: dict[str, bytes] = {f"format_{k}.{k}": v for k, v in images.every_format().items()}
    for i, (width, height) in enumerate([(24, 24), (64, 48), (200, 150), (333, 77), (640, 480)]):
        color = (40 * i, 255 - 40 * i, 90)
        files[f"jpeg_{i}.jpg"] = images.jpeg((width, height), color)
        files[f"upper_{i}.JPG"] = images.jpeg((height, width), color)
        files[f"png_{i}.png"] = images.encode(images.solid((width, height), (*color, 200)), "PNG")
    files["exif_rotated.jpeg"] = images.exif_rotated_jpeg()
    files["large.jpg"] = images.encode(
        Image.linear_gradient("L").resize((2400, 1600)).convert("RGB"), "JPEG", quality=90
    )
    files["panorama.png"] = images.encode(images.gradient((900, 40)), "PNG")
    files["broken.jpg"] = images.truncated_jpeg()
    files["sub/notes.png"] = b"shopping list: eggs, milk\n"  # not an image, despite its name
    for i, fmt in enumerate(["WEBP", "PNG", "BMP", "GIF"]):
        files[f"sub/nested_{i}.{fmt.lower()}"] = images.encode(images.gradient((80, 60)), fmt)
    files["sub/deeper/last.webp"] = images.encode(images.solid((120, 90)), "WEBP")
    files["sub/deeper/tiny.tif"] = images.encode(images.solid((8, 8)), "TIFF")
    files["sub/deeper/tall.jpeg"] = images.jpeg((60, 500), (10, 10, 10))
    ignored = {
        "README.md": b"# my dataset\n",
        ".hidden.jpg": images.jpeg(),
        ".thumbnails/t.jpg": images.jpeg(),
    }
    for name, data in {**files, **ignored}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    assert len(files) == 33
    return set(files)


class Servers:
    """The module's predictor, which a test may kill and replace (on new ports)."""

    def __init__(self, model_dir: Path, log_dir: Path, stack: contextlib.ExitStack):
        self.model_dir, self.log_dir, self.stack = model_dir, log_dir, stack
        self.started = 0
        self.current = self.start()

    def start(self) -> LiveServer:
        self.started += 1
        log = self.log_dir / f"server-{self.started}.log"
        self.current = self.stack.enter_context(start_server(self.model_dir, log))
        return self.current

    def url(self, protocol: str) -> str:
        return self.current.grpc_target if protocol == "grpc" else self.current.url


@pytest.fixture(scope="module")
def servers(tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with contextlib.ExitStack() as stack:
        yield Servers(tiny_qwen3_vl, tmp_path_factory.mktemp("describe-logs"), stack)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    root = tmp_path_factory.mktemp("pristine") / "images"
    return root, build_folder(root)


@pytest.fixture
def dataset(pristine: tuple[Path, set[str]], tmp_path: Path) -> tuple[Path, set[str]]:
    root, keys = pristine
    return shutil.copytree(root, tmp_path / "images"), keys


def command(folder: Path, url: str, protocol: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "predictor.describe",
        str(folder),
        "--url",
        url,
        "--protocol",
        protocol,
        "--recursive",
        "--output",
        "both",
        "--concurrency",
        "8",
        "--quiet",
        *extra,
    ]


def describe(folder: Path, url: str, protocol: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(folder, url, protocol, *extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def summary(stderr: str) -> tuple[int, int, int, float]:
    found = SUMMARY.findall(stderr)
    assert found, stderr
    done, skipped, failed, rate = found[-1]
    return int(done), int(skipped), int(failed), float(rate)


def manifest_lines(folder: Path, torn_ok: bool = False) -> list[dict]:
    """The manifest's records; with `torn_ok`, a last line cut short by a kill is left out."""
    manifest = folder / "captions.jsonl"
    if not manifest.exists():
        return []
    lines = manifest.read_bytes().decode("utf-8").split("\n")
    tail = lines.pop()
    assert torn_ok or not tail, f"the manifest ends inside a line: {tail!r}"
    return [json.loads(line) for line in lines]


def check_outputs(folder: Path, keys: set[str], complete: bool = True) -> dict[str, dict]:
    """Every output whole and consistent; with `complete`, every image accounted for.

    Incomplete means a run was cut short: the manifest may end in a torn line, and a sidecar
    may lack its line (killed between the two writes); both are for the re-run to mend.
    """
    lines = manifest_lines(folder, torn_ok=not complete)
    records = {r["image"]: r for r in lines}
    assert len(records) == len(lines), "an image has two manifest lines"
    assert set(records) <= keys
    if complete:
        assert set(records) == keys
    if complete:  # a kill can leave a hidden temp file; the next run removes it
        assert not list(folder.rglob("*describe-tmp*")), "a temp file was left behind"
    for key, record in records.items():
        sidecar = (folder / key).with_suffix(".txt")
        if key in BAD:
            assert record["error"].startswith("image[0]: "), record
            assert not sidecar.exists()
        else:
            assert isinstance(record["text"], str), record
            assert record["finish_reason"] in ("stop", "length"), record
            assert 1 <= record["generated_tokens"] <= 128
            assert sidecar.read_bytes().decode("utf-8") == record["text"]
    sidecars = {p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.txt")}
    recorded = {Path(k).with_suffix("").as_posix() for k, r in records.items() if "text" in r}
    assert recorded <= sidecars
    if complete:
        assert sidecars == recorded  # no sidecar without its manifest line
    return records


@pytest.mark.parametrize("protocol", ["v2", "grpc", "openai"])
def test_describes_a_folder_then_skips_it(
    servers: Servers, dataset: tuple[Path, set[str]], protocol: str
) -> None:
    folder, keys = dataset
    first = describe(folder, servers.url(protocol), protocol, "--max-new-tokens", "4")
    assert first.returncode == 1, first.stderr  # the two bad files
    assert summary(first.stderr)[:3] == (31, 0, 2)
    records = check_outputs(folder, keys)
    assert all(r["generated_tokens"] == 4 for k, r in records.items() if k not in BAD)
    assert "failed broken.jpg: image[0]: could not be decoded" in first.stderr
    assert "failed sub/notes.png: image[0]: is not an image" in first.stderr
    assert not (folder / "README.txt").exists() and not (folder / ".hidden.txt").exists()

    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.txt")}
    manifest = (folder / "captions.jsonl").read_bytes()
    again = describe(folder, servers.url(protocol), protocol, "--max-new-tokens", "4")
    assert again.returncode == 0, again.stderr
    assert summary(again.stderr)[:3] == (0, 33, 0)
    assert (folder / "captions.jsonl").read_bytes() == manifest
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.txt")} == before


def wait_for_lines(folder: Path, count: int, process: subprocess.Popen) -> None:
    manifest = folder / "captions.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and manifest.read_bytes().count(b"\n") >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the client ended or stalled before {count} lines: {process.poll()}")


def finish(folder: Path, keys: set[str], url: str, protocol: str) -> None:
    """Re-run until done: the set completes with exactly one record per image."""
    recorded = {r["image"] for r in manifest_lines(folder)}
    rerun = describe(folder, url, protocol, "--max-new-tokens", "4")
    done, skipped, failed, _ = summary(rerun.stderr)
    assert (done, skipped) == (len(keys - recorded - BAD), len(recorded)), rerun.stderr
    assert failed == len(BAD - recorded)
    assert rerun.returncode == (1 if failed else 0), rerun.stderr
    check_outputs(folder, keys)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_an_interrupted_client_resumes(
    servers: Servers, dataset: tuple[Path, set[str]], sig: signal.Signals
) -> None:
    folder, keys = dataset
    url = servers.url("v2")
    client = subprocess.Popen(
        command(folder, url, "v2", "--max-new-tokens", "64"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_lines(folder, 4, client)
    client.send_signal(sig)
    _, stderr = client.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert client.returncode == 130, stderr
        assert "interrupted" in stderr and "not started" in stderr
    else:
        assert client.returncode == -signal.SIGKILL
    check_outputs(folder, keys, complete=False)
    finish(folder, keys, url, "v2")


def test_server_killed_mid_run_then_restarted(
    servers: Servers, pristine: tuple[Path, set[str]], tmp_path: Path
) -> None:
    """Both protocols at once (one restart instead of two), each into its own folder."""
    source, keys = pristine
    folders = {p: shutil.copytree(source, tmp_path / p) for p in ("grpc", "v2")}
    clients = {}
    for protocol, folder in folders.items():  # gRPC first: its client starts slower
        clients[protocol] = subprocess.Popen(
            command(
                folder,
                servers.url(protocol),
                protocol,
                *("--max-new-tokens", "128", "--retries", "2", "--retry-backoff", "0.2"),
            ),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_for_lines(folder, 4, clients[protocol])
    servers.current.process.kill()  # no goodbye: in-flight requests lose their connection
    for protocol, client in clients.items():
        _, stderr = client.communicate(timeout=60)
        assert client.returncode == 1, stderr
        done, _, failed, _ = summary(stderr)
        assert done >= 3 and failed > 0 and done + failed == 33, (protocol, stderr)
        assert "gave up after 3 attempts" in stderr
        check_outputs(folders[protocol], keys, complete=False)

    servers.start()
    for protocol, folder in folders.items():
        finish(folder, keys, servers.url(protocol), protocol)


def test_images_per_second_at_concurrency_1_and_8(
    servers: Servers, dataset: tuple[Path, set[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A measurement, printed, not asserted: the tiny model on this machine's CPUs."""
    folder, _ = dataset
    rates = {}
    for concurrency in ("1", "8"):
        done = describe(
            folder,
            servers.url("v2"),
            "v2",
            "--max-new-tokens",
            "8",
            "--overwrite",
            "--concurrency",
            concurrency,
        )
        rates[concurrency] = summary(done.stderr)[3]
    with capsys.disabled():
        print(
            f"\n[describe] tiny model, 31 images, 8 tokens, v2: "
            f"{rates['1']:.1f} images/s at concurrency 1, {rates['8']:.1f} at 8"
        )
