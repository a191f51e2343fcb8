"""Captions on disk: what is done already, and writing more so that no file is ever half written.

Why this care: captioning a dataset takes hours, and runs get interrupted (Ctrl-C, a killed
pod, a full disk). A re-run must trust what it finds. Sidecars are written to a temp file and
renamed over the target (`os.replace` is atomic on POSIX), so a `.txt` is either absent or
complete. The JSONL manifest is appended one whole line per write, flushed and fsynced; a crash
can tear only the last line, which the next run drops.

JSONL records: `{"image": KEY, "text": ..., "finish_reason": ..., "generated_tokens": N}` or,
for an image the server refused, `{"image": KEY, "error": "image[0]: ..."}`. KEY is the path
relative to the images folder. There is at most one record per image. With `--json-schema`
a caption's record also carries `"json"`: the object its text parses to (absent when the text
was cut at the token limit and does not parse).

CSV (`--csv`): a table written from the manifest at the end of each run (so it holds every
image the manifest does, this run's and earlier ones'), replaced whole: a column `image`, then
one per top-level property of the `--json-schema` (or `text`), then `finish_reason` and
`error`. Strings go in as they are, other values as JSON.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from predictor.describe.files import TEMP_SUFFIX, ImageFile
from predictor.describe.protocols import Caption

logger = logging.getLogger(__name__)

OUTPUT_MODES = ("sidecar", "jsonl", "both")


class ManifestError(Exception):
    """The JSONL manifest is damaged somewhere other than its last line: a person must look."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` never holds part of it."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@dataclass
class LoadedManifest:
    """A manifest as read: its records by image, and whether the file needs rewriting."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    needs_rewrite: bool = False  # a torn last line, duplicates, or no final newline


def load_manifest(path: Path) -> LoadedManifest:
    """Read a JSONL manifest, dropping a torn last line.

    A bad line anywhere else is not a crash's doing (appends only ever tear the end), so it
    raises `ManifestError` rather than throwing records away.
    """
    loaded = LoadedManifest()
    if not path.exists():
        return loaded
    lines = path.read_bytes().split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, as every complete write does
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _record(line)
        if record is None:
            raise ManifestError(f"{path} line {number} is not a caption record; fix or remove it")
        _add(loaded, record)
    if tail.strip():
        loaded.needs_rewrite = True
        record = _record(tail)
        if record is None:
            logger.warning("%s: dropping a torn last line (an interrupted write)", path)
        else:
            _add(loaded, record)
    return loaded


def _record(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("image"), str):
        return None
    if not isinstance(record.get("text"), str) and not isinstance(record.get("error"), str):
        return None
    return record


def _add(loaded: LoadedManifest, record: dict[str, Any]) -> None:
    if record["image"] in loaded.records:
        loaded.needs_rewrite = True  # the later record wins; the rewrite keeps only it
    loaded.records[record["image"]] = record


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


@dataclass(frozen=True)
class Plan:
    """The images this run sends, and those it skips because their outputs exist."""

    todo: list[ImageFile]
    skipped: int
    skipped_rejected: int  # of `skipped`: refused by the server in an earlier run


class Outputs:
    """Where captions go (`mode`: sidecar, jsonl or both), and what is there already.

    Thread-safe: workers record results concurrently; appends to the manifest take a lock.
    """

    def __init__(self, mode: str, manifest_path: Path | None, structured: bool = False):
        if mode not in OUTPUT_MODES:
            raise ValueError(f"output mode must be one of {OUTPUT_MODES}, got {mode!r}")
        if mode != "sidecar" and manifest_path is None:
            raise ValueError(f"output mode {mode} needs a manifest path")
        self.mode = mode
        self.structured = structured  # captions are JSON (--json-schema): records carry it
        self.sidecars = mode in ("sidecar", "both")
        self.manifest_path = manifest_path if mode != "sidecar" else None
        self._lock = threading.Lock()
        self._manifest: Any = None  # the open append handle, once `plan` has run

    def plan(
        self, images: Sequence[ImageFile], overwrite: bool = False, retry_failed: bool = False
    ) -> Plan:
        """Decide what to send, and leave the manifest holding nothing for those images.

        Dropping the old records of the images about to be sent (rather than appending a
        second one) is what keeps the manifest free of duplicates across runs.
        """
        loaded = load_manifest(self.manifest_path) if self.manifest_path is not None else None
        records = loaded.records if loaded is not None else {}
        todo: list[ImageFile] = []
        skipped = skipped_rejected = 0
        for image in images:
            record = records.get(image.key)
            if overwrite or not self._done(image, record, retry_failed):
                todo.append(image)
                continue
            skipped += 1
            if record is not None and "error" in record:
                skipped_rejected += 1
        if loaded is not None and self.manifest_path is not None:
            for temp in self.manifest_path.parent.glob(
                f".{self.manifest_path.name}.*{TEMP_SUFFIX}"
            ):
                temp.unlink(missing_ok=True)  # a rewrite that a kill interrupted
            stale = {image.key for image in todo} & records.keys()
            if stale or loaded.needs_rewrite:
                kept = (r for key, r in records.items() if key not in stale)
                self._rewrite(kept)
            self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
            self._manifest = self.manifest_path.open("ab")
        return Plan(todo, skipped, skipped_rejected)

    def _done(self, image: ImageFile, record: dict[str, Any] | None, retry_failed: bool) -> bool:
        if record is not None and "error" in record:
            return not retry_failed
        if self.mode == "sidecar":
            return image.sidecar.exists()
        if self.mode == "jsonl":
            return record is not None
        return record is not None and image.sidecar.exists()

    def _rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        assert self.manifest_path is not None
        atomic_write(self.manifest_path, b"".join(_line(r) for r in records))

    def record_caption(self, image: ImageFile, caption: Caption) -> None:
        """Write the caption: sidecar first, then the manifest line.

        In that order, a crash between the two leaves a sidecar without a record; the image is
        then not done in `both` mode and is described again, which rewrites the sidecar.
        """
        if self.sidecars:
            atomic_write(image.sidecar, caption.text.encode("utf-8"))
        record: dict[str, Any] = {
            "image": image.key,
            "text": caption.text,
            "finish_reason": caption.finish_reason,
            "generated_tokens": caption.generated_tokens,
        }
        if self.structured:
            # Cut at the token limit, the text does not parse: it says what there is.
            with contextlib.suppress(ValueError):
                record["json"] = json.loads(caption.text)
        self._append(record)

    def record_rejection(self, image: ImageFile, message: str) -> None:
        """Remember that the server refused the image (manifest modes only)."""
        self._append({"image": image.key, "error": message})

    def _append(self, record: dict[str, Any]) -> None:
        if self._manifest is None:
            return
        line = _line(record)
        with self._lock:
            self._manifest.write(line)  # one write of one whole line
            self._manifest.flush()
            os.fsync(self._manifest.fileno())

    def close(self) -> None:
        with self._lock:
            if self._manifest is not None:
                self._manifest.close()
                self._manifest = None


def csv_columns(schema: dict[str, Any] | None) -> list[str]:
    """The CSV's value columns: the schema's top-level properties, else the text."""
    properties = (schema or {}).get("properties")
    if isinstance(properties, dict) and properties:
        return list(properties)
    return ["json"] if schema is not None else ["text"]


def write_csv(path: Path, manifest: Path, columns: Sequence[str]) -> int:
    """Write the CSV table of `manifest`'s records (see the module docstring), replacing
    `path` whole; returns the rows written."""
    records = sorted(load_manifest(manifest).records.values(), key=lambda r: r["image"])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", *columns, "finish_reason", "error"])
    for record in records:
        data = record.get("json")
        values = []
        for column in columns:
            if column == "text":
                value = record.get("text", "")
            elif column == "json":
                value = data if data is not None else ""
            else:
                value = data.get(column, "") if isinstance(data, dict) else ""
            values.append(
                value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            )
        writer.writerow(
            [record["image"], *values, record.get("finish_reason", ""), record.get("error", "")]
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buffer.getvalue().encode("utf-8"))
    return len(records)
