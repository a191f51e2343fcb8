"""`qwen-vl-describe IMAGES_DIR --url URL`: flags in, one summary line and an exit code out.

Exit codes: 0 every image is described (or was already); 1 some image failed in this run;
2 bad usage, or the run stopped because no image could succeed (wrong model, refused
credentials, a flag the server refuses); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from predictor.describe.files import (
    DEFAULT_INCLUDE,
    find_images,
    remove_stale_temp_files,
    shared_sidecars,
)
from predictor.describe.outputs import (
    OUTPUT_MODES,
    ManifestError,
    Outputs,
    csv_columns,
    write_csv,
)
from predictor.describe.protocols import PROTOCOLS, ClientConfig, Structure, make_client
from predictor.describe.retry import RetryPolicy
from predictor.describe.runner import EXIT_INTERRUPTED, Runner

logger = logging.getLogger("predictor.describe")
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_MANIFEST = "captions.jsonl"
# Flag -> OIP v2 request parameter, and its type. Only the flags given are sent.
GENERATION_FLAGS: dict[str, type] = {
    "max_new_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repetition_penalty": float,
    "seed": int,
    "min_pixels": int,
    "max_pixels": int,
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip():
        raise argparse.ArgumentTypeError(f"must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-vl-describe",
        description="Describe every image in a folder with a running qwen-vl-predictor.",
        epilog="Re-running the same command resumes: images with outputs are skipped.",
    )
    parser.add_argument("images_dir", metavar="IMAGES_DIR", type=Path)
    where = parser.add_argument_group("server")
    where.add_argument(
        "--url",
        required=True,
        help="v2: http(s) base URL (http://127.0.0.1:8080); grpc: host:port, grpcs://host:port",
    )
    where.add_argument("--protocol", choices=sorted(PROTOCOLS), default="v2")
    where.add_argument("--model", default="qwen-vl", help="model name in the routes")
    where.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="extra HTTP header / gRPC metadata, repeatable ('Authorization: Bearer ...')",
    )
    where.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds per request")
    where.add_argument(
        "--concurrency",
        type=_positive_int,
        default=8,
        help="requests in flight, one image each; the server batches them (default 8)",
    )
    where.add_argument(
        "--retries",
        type=_non_negative_int,
        default=5,
        help="retries per image on 429/503/connection errors/UNAVAILABLE (default 5)",
    )
    where.add_argument(
        "--retry-backoff",
        type=_positive_float,
        default=1.0,
        metavar="SECONDS",
        help="first retry delay; doubles each retry, up to 60s, with jitter (default 1)",
    )
    what = parser.add_argument_group("images")
    what.add_argument("--recursive", action="store_true", help="include subfolders")
    what.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="file name pattern, repeatable, case-insensitive "
        f"(default: {' '.join(DEFAULT_INCLUDE)})",
    )
    ask = parser.add_argument_group("generation (server defaults when not given)")
    prompt = ask.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="the same prompt for every image")
    prompt.add_argument("--prompt-file", type=Path, help="read the prompt from a file")
    for name, kind in GENERATION_FLAGS.items():
        metavar = "N" if kind is int else "X"
        ask.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar=metavar)
    shape = parser.add_argument_group("structured captions (guided decoding on the server)")
    structure = shape.add_mutually_exclusive_group()
    structure.add_argument(
        "--json-schema",
        type=Path,
        metavar="FILE",
        help="every caption is a JSON object matching this JSON Schema; the JSONL record "
        'carries it parsed ("json") and --csv gets a column per top-level property',
    )
    structure.add_argument(
        "--choices",
        metavar="A,B,C",
        help="every caption is exactly one of these comma-separated labels",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument(
        "--output",
        choices=OUTPUT_MODES,
        help="sidecar: photo.txt beside photo.jpg; jsonl: one manifest; both "
        "(default: sidecar, or jsonl when --jsonl is given)",
    )
    out.add_argument(
        "--jsonl",
        type=Path,
        help=f"manifest path (default: IMAGES_DIR/{DEFAULT_MANIFEST})",
    )
    out.add_argument(
        "--csv",
        type=Path,
        metavar="PATH",
        help="also write a CSV table of the manifest at the end of each run (image, a column "
        "per --json-schema property or the text, finish_reason, error); alone it means "
        "--output jsonl",
    )
    out.add_argument(
        "--overwrite", action="store_true", help="describe images that have outputs again"
    )
    out.add_argument(
        "--retry-failed",
        action="store_true",
        help="send again images the server refused in an earlier run (recorded in the JSONL)",
    )
    out.add_argument(
        "--quiet", action="store_true", help="no progress bar or retry notes: for logs"
    )
    return parser


def _structure(args: argparse.Namespace) -> Structure | None:
    """`--json-schema` / `--choices` (ValueError naming the flag when unusable)."""
    if args.json_schema is not None:
        try:
            schema = json.loads(args.json_schema.read_text(encoding="utf-8"))
        except OSError as error:
            raise ValueError(f"--json-schema: {error}") from None
        except ValueError as error:
            raise ValueError(f"--json-schema: {args.json_schema} is not JSON ({error})") from None
        if not isinstance(schema, dict):
            raise ValueError(f"--json-schema: {args.json_schema} must hold a JSON object")
        return Structure(schema=schema)
    if args.choices is not None:
        choices = tuple(c.strip() for c in args.choices.split(",") if c.strip())
        if not choices:
            raise ValueError("--choices: give at least one label (a,b,c)")
        return Structure(choices=choices)
    return None


def _client_config(args: argparse.Namespace) -> ClientConfig:
    prompt = args.prompt
    if args.prompt_file is not None:
        prompt = args.prompt_file.read_text(encoding="utf-8").strip()
    parameters = {
        name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None
    }
    return ClientConfig(
        url=args.url,
        model=args.model,
        prompt=prompt,
        parameters=parameters,
        structure=_structure(args),
        headers=tuple(args.header),
        timeout_s=args.timeout,
        concurrency=args.concurrency,
    )


def _configure_logging(quiet: bool) -> None:
    # Our logger only: httpx logs every request at INFO, which would drown the progress bar.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, describe the folder, print the summary; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.images_dir.is_dir():
        parser.error(f"{args.images_dir} is not a folder")
    mode = args.output or ("jsonl" if args.jsonl or args.csv else "sidecar")
    if mode == "sidecar" and args.jsonl:
        parser.error("--jsonl needs --output jsonl or both")
    if mode == "sidecar" and args.csv:
        parser.error("--csv needs the manifest: --output jsonl or both")
    manifest = args.jsonl or args.images_dir / DEFAULT_MANIFEST
    try:
        config = _client_config(args)
    except OSError as error:
        parser.error(f"--prompt-file: {error}")
    except ValueError as error:
        parser.error(str(error))
    _configure_logging(args.quiet)

    images = find_images(
        args.images_dir,
        include=args.include or DEFAULT_INCLUDE,
        recursive=args.recursive,
        exclude=[manifest],
    )
    structure = config.structure
    structured = structure is not None and structure.schema is not None
    outputs = Outputs(mode, manifest if mode != "sidecar" else None, structured=structured)
    try:
        plan = outputs.plan(images, overwrite=args.overwrite, retry_failed=args.retry_failed)
    except ManifestError as error:
        parser.error(str(error))
    prefailed = {}
    if outputs.sidecars:
        remove_stale_temp_files(images)
        todo = {image.key for image in plan.todo}
        prefailed = {k: v for k, v in shared_sidecars(images).items() if k in todo}
    try:
        client = make_client(args.protocol, config)
    except ValueError as error:
        outputs.close()
        parser.error(str(error))
    logger.info(
        "%d images in %s: %d to describe, %d skipped; %s %s, concurrency %d",
        len(images),
        args.images_dir,
        len(plan.todo),
        plan.skipped,
        args.protocol,
        client.target,
        args.concurrency,
    )
    policy = RetryPolicy(attempts=args.retries + 1, base_s=args.retry_backoff)
    runner = Runner(client, outputs, policy, args.concurrency, progress=not args.quiet)
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            counts = runner.run(plan, prefailed)
    finally:
        client.close()
        outputs.close()
        if args.csv is not None:
            columns = csv_columns(structure.schema if structure is not None else None)
            write_csv(args.csv, manifest, columns)
    if counts.fatal:
        logger.error("stopped: %s", counts.fatal)
    print(counts.summary(), file=sys.stderr, flush=True)
    if counts.interrupted:
        return EXIT_INTERRUPTED
    if counts.fatal:
        return EXIT_USAGE
    return EXIT_FAILED if counts.failed else 0


def main() -> None:
    """Console script entry point (`qwen-vl-describe`)."""
    sys.exit(run())
