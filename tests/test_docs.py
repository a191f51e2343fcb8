"""The documentation cannot drift: its size and links, the flag tables, and every command in it.

Every ```sh and ```python block of README.md and docs/*.md runs here, in that order, against a
live server on the tiny Qwen3-VL checkpoint, as a user would paste it. The documented ports
(8080, 8081) and tiny-model path become the test server's; the commands run in a scratch folder
that holds a copy of `examples/` and links to the rest of the repository, so what they write
lands there. A block that cannot run on a laptop says why on the line above its fence, with one
of `NEEDS` (`<!-- needs: cluster -->`); output shown to the reader goes in ```text or ```json
blocks, which are not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.live_server import LiveServer, start_server

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages whose links must resolve: the documentation and every kustomize component's README.
LINKED_PAGES = [*PAGES, *sorted((ROOT / "kustomize").rglob("README.md"))]
MAX_README_LINES = 300
MIN_DOC_PAGES = 4
# Why a block may not run here. Each is something a laptop with this repository lacks, or a
# command that would start what this test already runs.
NEEDS = {
    "cluster": "a Kubernetes cluster",
    "gpu": "a CUDA device",
    "checkpoint": "a real downloaded Qwen-VL checkpoint",
    "fresh-machine": "a terminal of its own: installs, starts the server or runs the whole suite",
    "docker": "a Docker daemon",
}
RUN_LANGUAGES = {"sh": "bash", "bash": "bash", "python": "python"}
FENCE = re.compile(r"^(`{3,})([\w+-]*)\s*$")
NEEDS_MARK = re.compile(r"^<!--\s*needs:\s*([\w-]+)\s*-->$")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
BLOCK_TIMEOUT_S = 600


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    needs: str | None
    text: str

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, language = opening.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            body.append(lines[j])
            j += 1
        before = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        mark = NEEDS_MARK.match(before)
        yield Block(page, i + 1, language, mark.group(1) if mark else None, "\n".join(body))
        i = j + 1


ALL_BLOCKS = [b for page in PAGES for b in blocks(page)]
RUNNABLE = [b for b in ALL_BLOCKS if b.language in RUN_LANGUAGES and b.needs is None]


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    outside_code = []
    in_code = False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            outside_code.append(github_anchor(line.lstrip("#")))
    return set(outside_code)


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= MAX_README_LINES
    assert len(PAGES) - 1 >= MIN_DOC_PAGES


def prose(text: str) -> str:
    """The text outside fenced blocks (links inside code are not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", LINKED_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for match in LINK.finditer(prose(page.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, fragment = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.is_file():
            broken.append(f"{target}: no such file")
        elif fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            broken.append(f"{target}: no heading #{fragment}")
    assert broken == []


def test_block_markers_name_a_known_reason() -> None:
    unknown = [f"{b.name}: {b.needs}" for b in ALL_BLOCKS if b.needs and b.needs not in NEEDS]
    assert unknown == []
    # Most of what the documentation shows runs here; the markers are the exception.
    assert len(RUNNABLE) >= 12


def test_configuration_doc_is_current() -> None:
    """docs/configuration.md's tables are what hack/flags_doc.py makes from the parser."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "flags_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("QWEN_VL_")},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_flag_of_help_is_documented() -> None:
    """Every flag `python -m predictor --help` prints appears in a table under docs/."""
    result = subprocess.run(
        [sys.executable, "-m", "predictor", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    )
    flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", result.stdout)) - {"--help"}
    assert len(flags) > 50
    documented = "\n".join(p.read_text() for p in PAGES[1:])
    missing = sorted(f for f in flags if f"| `{f}` |" not in documented)
    assert missing == []


# ---- the commands -------------------------------------------------------------------------

DOCUMENTED_HTTP = ("localhost:8080", "127.0.0.1:8080")
DOCUMENTED_GRPC = ("localhost:8081", "127.0.0.1:8081")
DOCUMENTED_TINY_MODEL = "/tmp/qwen-vl-tiny"


@pytest.fixture(scope="module")
def docs_server(
    tiny_qwen3_vl: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One server for every block; short answers so that load generators finish quickly."""
    log = tmp_path_factory.mktemp("docs-server") / "server.log"
    with start_server(tiny_qwen3_vl, log, "--max_new_tokens", "16") as server:
        yield server


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the commands run: a copy of examples/, links to everything else."""
    folder = tmp_path_factory.mktemp("docs-commands")
    for entry in ROOT.iterdir():
        if entry.name in (".git", "examples"):
            continue
        (folder / entry.name).symlink_to(entry)
    shutil.copytree(ROOT / "examples", folder / "examples")
    return folder


def as_run_here(text: str, server: LiveServer, model_dir: Path) -> str:
    http, grpc = server.url.split("://", 1)[1], server.grpc_target
    for documented in DOCUMENTED_HTTP:
        text = text.replace(documented, http)
    for documented in DOCUMENTED_GRPC:
        text = text.replace(documented, grpc)
    return text.replace(DOCUMENTED_TINY_MODEL, str(model_dir))


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.name)
def test_documented_command_runs(
    block: Block, docs_server: LiveServer, tiny_qwen3_vl: Path, scratch: Path
) -> None:
    script = as_run_here(block.text, docs_server, tiny_qwen3_vl)
    if RUN_LANGUAGES[block.language] == "bash":
        command = ["bash", "-euo", "pipefail", "-c", script]
    else:
        command = [str(ROOT / ".venv" / "bin" / "python"), "-c", script]
        if not Path(command[0]).exists():
            command[0] = sys.executable
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_VL_")}
    env["KUBECONFIG"] = "/dev/null"  # nothing in the docs' laptop commands reaches a cluster
    result = subprocess.run(
        command, cwd=scratch, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, env=env
    )
    assert result.returncode == 0, f"{block.name}\n{script}\n{result.stdout}\n{result.stderr}"
