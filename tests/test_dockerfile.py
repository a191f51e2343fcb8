"""The Dockerfile, checked without Docker (none runs here): pinned base images, both variants
resolve, a non-root final stage, the entrypoint and default flags accepted by the predictor's own
parser, the paths and ports the manifests rely on, and a build context that holds what it copies.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SERVING_RUNTIME = ROOT / "manifests" / "servingruntime" / "servingruntime.yaml"


@dataclass
class Instruction:
    keyword: str
    value: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.value for i in self.instructions if i.keyword == keyword]


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages of a Dockerfile (continuations joined, comments out)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, value = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", value.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(match[1], match[2], []))
        elif not stages and keyword == "ARG":
            arg_name, _, default = value.partition("=")
            global_args[arg_name] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, value.strip()))
    return global_args, stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in stage.all("ENV"):
        for match in re.finditer(r'(\w+)=("[^"]*"|\S*)', value):
            env[match[1]] = match[2].strip('"')
    return env


def resolve(image: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args[m[1]], image)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse(DOCKERFILE.read_text())


def stage_chain(stages: list[Stage], image: str, args: dict[str, str]) -> list[Stage]:
    """The stages a FROM reference builds on, nearest first (ends at an external image)."""
    by_name = {s.name: s for s in stages if s.name}
    chain = []
    ref = resolve(image, args)
    while ref in by_name:
        chain.append(by_name[ref])
        ref = resolve(by_name[ref].image, args)
    return chain


def test_base_images_are_pinned_by_tag(dockerfile) -> None:
    args, stages = dockerfile
    names = {s.name for s in stages if s.name}
    external = []
    for variant in ("cuda", "cpu"):
        for stage in stages:
            image = resolve(stage.image, {**args, "VARIANT": variant})
            if image not in names:
                external.append(image)
    assert external, "no external base image"
    for image in external:
        repo, _, tag = image.rpartition(":")
        assert repo and "/" not in tag and tag not in ("", "latest"), image


@pytest.mark.parametrize("variant", ["cuda", "cpu"])
def test_each_variant_resolves_to_its_base(dockerfile, variant: str) -> None:
    args, stages = dockerfile
    assert args["VARIANT"] == "cuda", "the default build is the GPU image"
    final = stages[-1]
    chain = stage_chain(stages, final.image, {**args, "VARIANT": variant})
    assert [s.name for s in chain] == ["base", f"base-{variant}"]
    base_image = resolve(chain[-1].image, args)
    env = env_of(chain[-1])
    if variant == "cuda":
        assert base_image.startswith("nvidia/cuda:") and "runtime" in base_image
        assert "/whl/cu" in env["TORCH_INDEX_URL"], "the CUDA build of PyTorch"
        assert env["PACKAGE_EXTRAS"] == "quant", "bitsandbytes for --quantization"
    else:
        assert env["TORCH_INDEX_URL"].endswith("/whl/cpu")
        assert env["PACKAGE_EXTRAS"] == ""


def test_builder_installs_the_package_with_the_variant_extras(dockerfile) -> None:
    _, stages = dockerfile
    builder = next(s for s in stages if s.name == "builder")
    runs = " ".join(builder.all("RUN"))
    assert "$TORCH_INDEX_URL" in runs
    assert '".${PACKAGE_EXTRAS:+[$PACKAGE_EXTRAS]}"' in runs
    assert any("/opt/venv" in c for c in stages[-1].all("COPY")), "final stage copies the venv"


def test_pinned_torch_satisfies_the_package_requirements(dockerfile) -> None:
    _, stages = dockerfile
    builder = next(s for s in stages if s.name == "builder")
    pins = dict(v.split("=", 1) for v in builder.all("ARG") if "=" in v)
    # The installed package's metadata is pyproject.toml's dependency list (pip install -e).
    deps = [Requirement(d) for d in metadata.requires("qwen-vl-predictor") or ()]
    requirements = {d.name: d for d in deps if d.marker is None}
    assert requirements["torch"].specifier.contains(pins["TORCH_VERSION"])
    assert requirements["torchvision"].specifier.contains(pins["TORCHVISION_VERSION"])


def test_final_stage_runs_as_non_root_uid_1000(dockerfile) -> None:
    _, stages = dockerfile
    final = stages[-1]
    user = final.all("USER")[-1]
    assert re.fullmatch(r"\d+:\d+", user), "numeric, so runAsNonRoot can be verified"
    assert user == "1000:1000"
    setup = " ".join(final.all("RUN"))
    assert "useradd --uid 1000 --gid 1000" in setup
    assert "mkdir -p /mnt/models /var/cache/qwen-vl" in setup
    for path in ("/mnt/models", "/var/cache/qwen-vl"):
        assert re.search(rf"chown 1000:1000 [^&]*{re.escape(path)}", setup), path


def test_cache_dirs_match_the_serving_runtime(dockerfile) -> None:
    _, stages = dockerfile
    image_env = env_of(stages[-1])
    runtime = yaml.safe_load(SERVING_RUNTIME.read_text())["spec"]
    container = runtime["containers"][0]
    runtime_env = {e["name"]: e["value"] for e in container["env"]}
    for name in ("HF_HOME", "XDG_CACHE_HOME"):
        assert image_env[name] == runtime_env[name]
        mounted = [m["mountPath"] for m in container["volumeMounts"]]
        assert any(image_env[name].startswith(m) for m in mounted), f"{name} is not writable"


def test_entrypoint_and_default_flags_are_the_predictors(dockerfile) -> None:
    from kserve import model_server

    from predictor.settings import Settings, build_parser

    _, stages = dockerfile
    final = stages[-1]
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["python", "-m", "predictor"]
    cmd = json.loads(final.all("CMD")[-1])
    parser = build_parser(parents=[model_server.parser])
    args = parser.parse_args(cmd)
    settings = Settings.from_args(args)
    assert settings.model_dir == "/mnt/models"
    assert {args.http_port, args.grpc_port} == {8080, 8081}


def test_exposed_ports_match_the_serving_runtime(dockerfile) -> None:
    _, stages = dockerfile
    exposed = {int(p) for v in stages[-1].all("EXPOSE") for p in v.split()}
    runtime = yaml.safe_load(SERVING_RUNTIME.read_text())["spec"]
    ports = {p["containerPort"] for p in runtime["containers"][0]["ports"]}
    assert exposed == ports == {8080, 8081}


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        pattern = pattern.removeprefix("**/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes) or any(
            fnmatch.fnmatchcase(part, pattern) for part in parts
        ):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_dockerfile_copies(dockerfile) -> None:
    _, stages = dockerfile
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        source
        for stage in stages
        for value in stage.all("COPY")
        if not value.startswith("--from")
        for source in value.split()[:-1]
    ]
    assert copied
    for source in copied:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _ignored(relative, patterns), f"{relative} is excluded by .dockerignore"
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", ".cache/x"):
        assert _ignored(unwanted, patterns), f"{unwanted} would be sent to the builder"
