"""Structured captions in the captioning client, without a model: `--json-schema` and
`--choices` on each protocol's wire, the parsed object in the JSONL manifest, and the CSV
table (against the scripted loopback server of `tests/test_describe.py`)."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path
from typing import Any

import pytest

from predictor.describe import cli
from predictor.describe.protocols import (
    ClientConfig,
    OpenAIClient,
    Structure,
    V2GrpcClient,
    V2RestClient,
)
from predictor.protocol import read_parameters
from tests import images
from tests.test_describe import Scripted, image_file, scripted  # noqa: F401 (a fixture)

SCHEMA = {
    "type": "object",
    "properties": {"caption": {"type": "string"}, "tags": {"type": "array"}, "count": {}},
    "required": ["caption"],
}


def test_each_protocol_sends_the_guide_in_its_own_fields() -> None:
    schema, labels = Structure(schema=SCHEMA), Structure(choices=("cat", 'say "hi"'))
    rest = V2RestClient(ClientConfig(url="http://127.0.0.1:9", structure=schema))
    parameters = rest.build_body(b"x")["parameters"]
    assert parameters["guided_decoding_guide_type"] == "json_schema"
    assert json.loads(parameters["guided_decoding_guide"]) == SCHEMA
    rest.close()
    grpc = V2GrpcClient(ClientConfig(url="127.0.0.1:1", parameters={"seed": 3}, structure=labels))
    sent = read_parameters(grpc.build_request(b"x").parameters)
    grpc.close()
    assert sent == {
        "seed": 3,
        "guided_decoding_guide_type": "ebnf_grammar",
        "guided_decoding_guide": 'root ::= "cat" | "say \\"hi\\""',
    }
    chat = OpenAIClient(ClientConfig(url="http://127.0.0.1:9", structure=schema))
    body = chat.build_body(images.jpeg())
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    chat.close()
    chat = OpenAIClient(ClientConfig(url="http://127.0.0.1:9", structure=labels))
    assert chat.build_body(images.jpeg())["structured_outputs"] == {"choice": ["cat", 'say "hi"']}
    chat.close()


def json_caption(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    """An answer under the schema: a JSON caption, cut short (length) for PNGs."""
    data = base64.b64decode(body["inputs"][0]["data"][0])
    assert body["parameters"]["guided_decoding_guide_type"] == "json_schema"
    if data.startswith(b"\x89PNG"):
        text, finish = '{"caption": "a long descr', "length"
    else:
        text, finish = json.dumps({"caption": 'a, "b"', "tags": ["x", 1], "count": 3}), "stop"
    outputs = [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]},
        {"name": "finish_reason", "datatype": "BYTES", "shape": [1], "data": [finish]},
        {"name": "generated_tokens", "datatype": "INT32", "shape": [1], "data": [9]},
    ]
    return 200, {}, {"outputs": outputs}


def test_json_captions_go_parsed_to_the_manifest_and_a_column_each_to_the_csv(
    scripted: Scripted,  # noqa: F811
    tmp_path: Path,
) -> None:
    scripted.default = json_caption
    root = tmp_path / "images"
    image_file(root, "a.jpg", images.jpeg())
    image_file(root, "b.png", images.encode(images.solid(), "PNG"))
    schema = tmp_path / "caption.schema.json"
    schema.write_text(json.dumps(SCHEMA))
    table = tmp_path / "captions.csv"
    argv = [str(root), "--url", scripted.url, "--json-schema", str(schema), "--quiet"]
    assert cli.run([*argv, "--csv", str(table)]) == 0  # --csv alone: the JSONL manifest
    records = {
        r["image"]: r for r in map(json.loads, (root / "captions.jsonl").read_text().splitlines())
    }
    assert records["a.jpg"]["json"] == {"caption": 'a, "b"', "tags": ["x", 1], "count": 3}
    assert "json" not in records["b.png"] and records["b.png"]["finish_reason"] == "length"
    with table.open(newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [
        ["image", "caption", "tags", "count", "finish_reason", "error"],
        ["a.jpg", 'a, "b"', '["x", 1]', "3", "stop", ""],
        ["b.png", "", "", "", "length", ""],
    ]
    # A resumed run sends nothing and the table still holds every image.
    sent = len(scripted.requests)
    assert cli.run([*argv, "--csv", str(table)]) == 0
    assert len(scripted.requests) == sent
    assert len(table.read_text().splitlines()) == 3


def test_choices_label_a_folder(scripted: Scripted, tmp_path: Path) -> None:  # noqa: F811
    def label(body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
        assert body["parameters"]["guided_decoding_guide"] == 'root ::= "indoor" | "outdoor"'
        outputs = [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["outdoor"]}]
        return 200, {}, {"outputs": outputs}

    scripted.default = label
    root = tmp_path / "images"
    image_file(root, "a.jpg", images.jpeg())
    table = tmp_path / "labels.csv"
    argv = [str(root), "--url", scripted.url, "--choices", "indoor, outdoor", "--quiet"]
    assert cli.run([*argv, "--output", "both", "--csv", str(table)]) == 0
    assert (root / "a.txt").read_text() == "outdoor"
    assert table.read_text().splitlines()[1] == "a.jpg,outdoor,,"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--choices", " , "], "--choices: give at least one label"),
        (["--json-schema", "missing.json"], "--json-schema: [Errno 2]"),
        (["--json-schema", "{bad}"], "is not JSON"),
        (["--json-schema", "[1]"], "must hold a JSON object"),
        (["--choices", "a", "--json-schema", "x"], "not allowed with argument"),
        (["--csv", "t.csv", "--output", "sidecar"], "--csv needs the manifest"),
    ],
)
def test_structured_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    for name, text in (("{bad}", "{bad"), ("[1]", "[1]")):
        (tmp_path / name).write_text(text)
    extra = [str(tmp_path / e) if e in ("{bad}", "[1]", "missing.json") else e for e in extra]
    with pytest.raises(SystemExit) as exit_:
        cli.run([str(tmp_path), "--url", "http://127.0.0.1:9", *extra])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
