"""docs/deployment.md and the kustomize READMEs: the overlay table against the overlays,
transcripts that are what the commands print, and no unmarked shell block that needs a cluster
(their links are checked with every other page's, in tests/test_docs.py).

A shell block directly below a `<!-- needs: cluster -->` line needs a cluster; every other
```sh block must run on a laptop (the repository's .venv, `bash hack/serve-tiny.sh` on
localhost:8080/8081). Output is shown in ```text blocks, never in ```sh.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# docs/, and the READMEs of the kustomize components and overlays, which link into it.
DOCS = sorted([*(ROOT / "docs").glob("*.md"), *(ROOT / "kustomize").rglob("README.md")])
DEPLOYMENT = ROOT / "docs" / "deployment.md"
NEEDS_CLUSTER = "<!-- needs: cluster -->"
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Block:
    lang: str
    marker: str  # the line directly above the opening fence
    lines: list[str]


def blocks(text: str) -> list[Block]:
    found, lines = [], text.splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match and match.group(1):
            end = index + 1
            while not lines[end].startswith("```"):
                end += 1
            marker = lines[index - 1].strip() if index else ""
            found.append(Block(match.group(1), marker, lines[index + 1 : end]))
            index = end
        index += 1
    return found


def test_docs_exist() -> None:
    assert DEPLOYMENT in DOCS


def doc_id(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=doc_id)
def test_shell_blocks_that_need_a_cluster_are_marked(doc: Path) -> None:
    plain_kubectl = re.compile(r"(^|[\s;&|(])kubectl\s")
    canary_tool = re.compile(r"(qwen-vl-canary|hack/canary\.py|-m predictor\.canary)\s")
    unmarked = []
    for block in blocks(doc.read_text()):
        assert block.lang != "console", "use ```sh for commands, ```text for output"
        if block.lang != "sh" or block.marker == NEEDS_CLUSTER:
            continue
        for line in block.lines:
            command = line.split("#", 1)[0]
            if plain_kubectl.search(command) or (
                canary_tool.search(command + " ") and "--help" not in command
            ):
                unmarked.append(line)
            assert not line.startswith("$ "), f"output belongs in a ```text block: {line}"
    assert not unmarked, f"{doc_id(doc)}: needs a cluster, lacks {NEEDS_CLUSTER}: {unmarked}"


def test_overlay_table_lists_each_overlays_components_in_order() -> None:
    rows = re.findall(r"^\| \[`(\w+)`\]\([^)]*\) \|(.*)\|$", DEPLOYMENT.read_text(), re.MULTILINE)
    table = {overlay: cells.split("|")[-1].strip() for overlay, cells in rows}
    overlays = sorted(p.parent.name for p in (ROOT / "kustomize" / "overlays").glob("*/kust*"))
    assert sorted(table) == overlays
    for overlay in overlays:
        path = ROOT / "kustomize" / "overlays" / overlay / "kustomization.yaml"
        components = [c.rsplit("/", 1)[-1] for c in yaml.safe_load(path.read_text())["components"]]
        assert table[overlay] == (", ".join(components) or "none"), overlay


STAND_IN = ".venv/bin/python hack/canary_stand_in.py "


def transcripts() -> list[tuple[str, str]]:
    """(command, output shown) for every `$ .venv/bin/python hack/canary_stand_in.py` line."""
    found = []
    for block in blocks(DEPLOYMENT.read_text()):
        if block.lang != "text":
            continue
        command, output = None, []
        for line in [*block.lines, "$ "]:
            if line.startswith("$ "):
                if command is not None:
                    found.append((command, "\n".join(output) + "\n"))
                command = line[2:] if line.startswith(f"$ {STAND_IN}") else None
                output = []
            elif command is not None:
                output.append(line)
    return found


def test_the_stand_in_transcripts_are_shown() -> None:
    shown = [command for command, _ in transcripts()]
    assert shown == [
        f"{STAND_IN}{overlay} {action} --dry-run"
        for overlay in ("staging", "prod")
        for action in ("step --percent 25", "promote")
    ]


@pytest.mark.parametrize(
    ("command", "shown"), [pytest.param(c, s, id=c[len(STAND_IN) :]) for c, s in transcripts()]
)
def test_stand_in_transcript_is_what_the_command_prints(command: str, shown: str) -> None:
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/python"
    result = subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout
    assert result.stdout == shown
