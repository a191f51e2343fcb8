"""Which files to describe, and the name each one's sidecar caption gets.

Why the filter is by name only: the server owns image decoding and says precisely what is
wrong with a file (truncated, not an image, too large), so the client sends every file that
looks like an image and records the server's verdict.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# The formats the predictor decodes (README, "The contract").
DEFAULT_INCLUDE = (
    "*.jpg",
    "*.jpeg",
    "*.png",
    "*.webp",
    "*.gif",
    "*.bmp",
    "*.tif",
    "*.tiff",
)
SIDECAR_SUFFIX = ".txt"
TEMP_SUFFIX = ".describe-tmp"  # half-written outputs; never matched by an image pattern


@dataclass(frozen=True)
class ImageFile:
    """One image: its path, and its key (the path relative to the folder, with `/`)."""

    path: Path
    key: str

    @property
    def sidecar(self) -> Path:
        """`photo.jpg` -> `photo.txt`: the caption convention of image-training datasets."""
        return self.path.with_suffix(SIDECAR_SUFFIX)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    lowered = name.lower()
    return any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in patterns)


def find_images(
    root: Path,
    include: Sequence[str] = DEFAULT_INCLUDE,
    recursive: bool = False,
    exclude: Sequence[Path] = (),
) -> list[ImageFile]:
    """Files under `root` whose names match `include` (case-insensitive), sorted by key.

    Hidden files and folders (a leading `.`, like macOS `._photo.jpg` resource forks) are
    skipped, and so are the paths in `exclude` (the JSONL manifest).
    """
    excluded = {p.resolve() for p in exclude}
    found: list[ImageFile] = []
    for folder, names in _walk(root, recursive):
        for name in names:
            if name.startswith(".") or not _matches(name, include):
                continue
            path = folder / name
            if not path.is_file() or path.resolve() in excluded:
                continue
            found.append(ImageFile(path, path.relative_to(root).as_posix()))
    return sorted(found, key=lambda image: image.key)


def _walk(root: Path, recursive: bool) -> Iterator[tuple[Path, list[str]]]:
    if not recursive:
        yield root, sorted(os.listdir(root))
        return
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(folder), sorted(names)


def remove_stale_temp_files(images: Sequence[ImageFile]) -> int:
    """Delete temp files a killed run left beside the sidecars; returns how many."""
    removed = 0
    for folder in {image.path.parent for image in images}:
        for path in folder.glob(f".*{SIDECAR_SUFFIX}.*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def shared_sidecars(images: Sequence[ImageFile]) -> dict[str, str]:
    """Images whose sidecar another image would also write (`a.jpg`, `a.png` -> `a.txt`).

    Returns key -> message; those images are failed rather than letting one caption
    silently replace the other.
    """
    by_sidecar: dict[Path, list[ImageFile]] = {}
    for image in images:
        by_sidecar.setdefault(image.sidecar, []).append(image)
    clashes: dict[str, str] = {}
    for sidecar, owners in by_sidecar.items():
        if len(owners) > 1:
            keys = ", ".join(owner.key for owner in owners)
            for owner in owners:
                clashes[owner.key] = f"sidecar {sidecar.name} would be shared by {keys}"
    return clashes
