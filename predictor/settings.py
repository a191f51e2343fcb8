"""Every setting of the predictor, documented in one place.

Each flag can also come from an environment variable named `QWEN_VL_` + the flag in upper case
(`--max_new_tokens_limit` ← `QWEN_VL_MAX_NEW_TOKENS_LIMIT`); a flag on the command line wins.
That lets a Kubernetes manifest set limits with `env:` without rewriting the container args.
KServe's own flags (`--http_port`, `--grpc_port`, `--model_name`, ...) come from its parser,
which this one extends, as KServe recommends for custom model servers.

Nothing here runs at import: `build_parser()` and `Settings.from_args()` are called by `main()`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "QWEN_VL_"
DEFAULT_MODEL_NAME = "qwen-vl"
DEFAULT_PROMPT = "Describe this image."
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cuda", "cpu")
QUANTIZATIONS = ("none", "4bit", "8bit")
GENERATION_CONFIGS = ("auto", "none")
MIB = 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """What the predictor needs from the command line, after validation."""

    model_name: str = DEFAULT_MODEL_NAME
    model_dir: str = "/mnt/models"
    model_id: str | None = None
    model_revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    quantization: str = "none"
    quantize_vision: bool = False
    attn_implementation: str | None = None
    default_prompt: str = DEFAULT_PROMPT
    generation_config: str = "auto"
    max_new_tokens: int = 128
    max_new_tokens_limit: int = 1024
    # 1280 x 28 x 28, the budget Qwen's model cards suggest: ~1000 visual tokens per image.
    max_pixels_limit: int = 1_003_520
    max_images_per_request: int = 16
    max_image_bytes: int = 20 * MIB
    max_decoded_pixels: int = 50_000_000
    # Guided decoding (predictor.inputs.guides): a guide's size, and its compile time.
    max_guide_bytes: int = 64 * 1024
    guide_compile_timeout_s: float = 2.0
    warmup: bool = True
    compile: bool = True
    compile_cache_dir: str = "/var/cache/qwen-vl"
    max_model_len: int = 4096
    engine_process: bool = True
    cpu_threads: int = 0
    # Processed images kept by content (predictor.inputs.input_cache), per front process.
    input_cache_mb: int = 256
    vision_cache_mb: int = 256
    served_model_aliases: tuple[str, ...] = ()
    allow_remote_images: bool = False
    remote_image_hosts: tuple[str, ...] = ()
    remote_image_timeout_s: float = 10.0
    remote_image_allow_networks: tuple[str, ...] = ()
    remote_image_max_redirects: int = 0
    enable_model_repository: bool = False
    http_max_header_bytes: int = 64 * 1024
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 60.0
    max_batch_size: int = 16
    batch_wait_ms: float = 0.0
    # Admissions into a running batch (predictor.engine.scheduler): text-generation-inference's
    # rule and names. Values measured with hack/bench.py; 0 admits every waiting row at once.
    waiting_served_ratio: float = 0.0
    max_waiting_tokens: int = 0
    max_queue_size: int = 64
    request_timeout_s: float = 300.0
    # Sized for the manifests: terminationGracePeriodSeconds 120 s, minus the 15 s preStop
    # sleep, minus time to stop the servers and the engine process.
    drain_timeout_s: float = 90.0
    enable_ui: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        """Pick this class's fields out of a parsed namespace and check they agree."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that would let a request through that the limits meant to stop."""
        positive = (
            "max_new_tokens",
            "max_new_tokens_limit",
            "max_pixels_limit",
            "max_images_per_request",
            "max_image_bytes",
            "max_decoded_pixels",
            "max_batch_size",
            "max_queue_size",
            "max_model_len",
            "max_guide_bytes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("--max_new_tokens must not exceed --max_new_tokens_limit")
        if self.quantize_vision and self.quantization == "none":
            raise ValueError("--quantize_vision needs --quantization 4bit or 8bit")
        if self.cpu_threads < 0:
            raise ValueError("--cpu_threads must be 0 (automatic) or more")
        if self.input_cache_mb < 0:
            raise ValueError("--input_cache_mb must be 0 (off) or more")
        if self.vision_cache_mb < 0:
            raise ValueError("--vision_cache_mb must be 0 (off) or more")
        if self.batch_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ValueError("--batch_wait_ms must be >= 0 and --request_timeout_s > 0")
        if self.waiting_served_ratio < 0 or self.max_waiting_tokens < 0:
            raise ValueError("--waiting_served_ratio and --max_waiting_tokens must be >= 0")
        if self.guide_compile_timeout_s <= 0:
            raise ValueError("--guide_compile_timeout_s must be positive")
        if self.drain_timeout_s < 0:
            raise ValueError("--drain_timeout_s must be >= 0")
        if self.remote_image_timeout_s <= 0:
            raise ValueError("--remote_image_timeout_s must be positive")
        if self.remote_image_max_redirects < 0:
            raise ValueError("--remote_image_max_redirects must be 0 (not followed) or more")
        for network in self.remote_image_allow_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(
                    f"--remote_image_allow_networks: {network!r} is not an address or CIDR network"
                ) from None
        if self.http_max_header_bytes < 1024:
            raise ValueError("--http_max_header_bytes must be at least 1024")
        if self.http_header_timeout_s <= 0 or self.http_body_timeout_s <= 0:
            raise ValueError("--http_header_timeout_s and --http_body_timeout_s must be positive")
        if not self.model_name:
            raise ValueError("--model_name must not be empty")


def _env(name: str, default: Any, convert: Callable[[str], Any] = str) -> Any:
    """The default of a flag: its QWEN_VL_ environment variable if set, else `default`."""
    raw = os.environ.get(ENV_PREFIX + name.upper())
    return default if raw is None else convert(raw)


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _optional(text: str) -> str | None:
    return text or None


def build_parser(parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
    """The predictor's argument parser, extending `parents` (KServe's parser in `main()`)."""
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="qwen-vl-predictor",
        description="Describe images with a Qwen vision-language model behind KServe.",
        parents=list(parents),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # KServe's parser names the model "model"; ours is a product with its own default name.
    parser.set_defaults(model_name=_env("model_name", d.model_name))

    source = parser.add_argument_group("model source")
    source.add_argument(
        "--model_dir",
        default=_env("model_dir", d.model_dir),
        help="checkpoint directory; KServe's storage initializer puts storageUri here",
    )
    source.add_argument(
        "--model_id",
        default=_env("model_id", d.model_id, _optional),
        type=_optional,
        help="hub id to download instead of --model_dir (needs network access)",
    )
    source.add_argument(
        "--model_revision",
        default=_env("model_revision", d.model_revision, _optional),
        type=_optional,
        help="branch, tag or commit of --model_id",
    )

    runtime = parser.add_argument_group("runtime")
    runtime.add_argument(
        "--dtype",
        choices=DTYPES,
        default=_env("dtype", d.dtype),
        help="weights dtype; auto: bfloat16 on a GPU that has it (else float16) and on a CPU "
        "with native bfloat16 matmuls (AMX, AVX512-BF16), else float32",
    )
    runtime.add_argument(
        "--device",
        choices=DEVICES,
        default=_env("device", d.device),
        help="auto picks CUDA when a device is visible, else the CPU",
    )
    runtime.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=_env("quantization", d.quantization),
        help="load weights in 4 or 8 bits with bitsandbytes, on a GPU or a CPU",
    )
    runtime.add_argument(
        "--quantize_vision",
        type=_bool,
        default=_env("quantize_vision", d.quantize_vision, _bool),
        help="with --quantization, the vision tower's linear layers too (false, as vLLM and "
        "TGI: it stays in --dtype, about 0.8 GB for Qwen3-VL-2B, 0.2 GB in 4 bits; "
        "true trades some image understanding for that memory)",
    )
    runtime.add_argument(
        "--attn_implementation",
        default=_env("attn_implementation", d.attn_implementation, _optional),
        type=_optional,
        help="transformers attention backend (sdpa, eager, flash_attention_2); unset: sdpa",
    )
    runtime.add_argument(
        "--warmup",
        type=_bool,
        default=_env("warmup", d.warmup, _bool),
        help="run one generation before reporting ready",
    )

    runtime.add_argument(
        "--compile",
        type=_bool,
        default=_env("compile", d.compile, _bool),
        help="compile the decoding step with torch.compile at warm-up, before ready (CUDA "
        "graphs on a GPU); false: the same step, eager",
    )
    runtime.add_argument(
        "--compile_cache_dir",
        default=_env("compile_cache_dir", d.compile_cache_dir),
        help="where compiled graphs are kept across restarts (the image keeps this "
        "directory); an unwritable one only means compiling again",
    )
    runtime.add_argument(
        "--max_model_len",
        type=int,
        default=_env("max_model_len", d.max_model_len, int),
        help="tokens one row may hold, prompt (image tokens included) and output: each batch "
        "slot's KV cache is this long, allocated at start-up; a request that cannot fit is "
        "refused with 400",
    )

    runtime.add_argument(
        "--engine_process",
        type=_bool,
        default=_env("engine_process", d.engine_process, _bool),
        help="run the model and its decode loop in a process of their own, apart from the "
        "HTTP/gRPC front (see predictor.engine.core)",
    )
    runtime.add_argument(
        "--cpu_threads",
        type=int,
        default=_env("cpu_threads", d.cpu_threads, int),
        help="torch threads when running on the CPU; 0: all cores but one, which is left to "
        "the HTTP and gRPC servers and image decoding",
    )
    runtime.add_argument(
        "--input_cache_mb",
        type=int,
        default=_env("input_cache_mb", d.input_cache_mb, int),
        help="MiB of processed images each front process keeps, keyed by the image's bytes "
        "and pixel budget: an image sent again skips decoding and the processor; 0: off",
    )
    runtime.add_argument(
        "--vision_cache_mb",
        type=int,
        default=_env("vision_cache_mb", d.vision_cache_mb, int),
        help="MiB of vision encoder outputs the engine keeps on its device, keyed by the "
        "image's pixels: an image sent again is not encoded again; 0: off",
    )

    engine = parser.add_argument_group("batching engine")
    engine.add_argument(
        "--max_batch_size",
        type=int,
        default=_env("max_batch_size", d.max_batch_size, int),
        help="most images (rows) decoding at once",
    )
    engine.add_argument(
        "--batch_wait_ms",
        type=float,
        default=_env("batch_wait_ms", d.batch_wait_ms, float),
        help="how long an idle engine's first request waits for others before its prefill",
    )
    engine.add_argument(
        "--waiting_served_ratio",
        type=float,
        default=_env("waiting_served_ratio", d.waiting_served_ratio, float),
        help="a running batch takes in waiting rows once they number this fraction of its "
        "running rows (or fill its free slots), so one prefill serves several rows",
    )
    engine.add_argument(
        "--max_waiting_tokens",
        type=int,
        default=_env("max_waiting_tokens", d.max_waiting_tokens, int),
        help="decoding steps a waiting row may be held back for that before it is taken in "
        "anyway (0: at the next step)",
    )
    engine.add_argument(
        "--max_queue_size",
        type=int,
        default=_env("max_queue_size", d.max_queue_size, int),
        help="requests waiting beyond this are refused at once with 503 / UNAVAILABLE",
    )
    engine.add_argument(
        "--request_timeout_s",
        type=float,
        default=_env("request_timeout_s", d.request_timeout_s, float),
        help="a request's total time limit (504 / DEADLINE_EXCEEDED past it)",
    )
    engine.add_argument(
        "--drain_timeout_s",
        type=float,
        default=_env("drain_timeout_s", d.drain_timeout_s, float),
        help="on SIGTERM/SIGINT, how long requests already accepted may run on before they "
        "end with 503 (see predictor.server.drain); fits the manifests' "
        "terminationGracePeriodSeconds of 120 s after their 15 s preStop sleep",
    )

    openai = parser.add_argument_group("OpenAI chat completions")
    openai.add_argument(
        "--served_model_aliases",
        type=_names,
        default=_env("served_model_aliases", d.served_model_aliases, _names),
        help="comma-separated extra names the `model` field may use besides --model_name",
    )
    openai.add_argument(
        "--allow_remote_images",
        type=_bool,
        default=_env("allow_remote_images", d.allow_remote_images, _bool),
        help="fetch http(s) image URLs (otherwise only data: URLs are accepted)",
    )
    openai.add_argument(
        "--remote_image_hosts",
        type=_names,
        default=_env("remote_image_hosts", d.remote_image_hosts, _names),
        help="comma-separated hosts remote images may come from (a leading dot admits "
        "subdomains); empty: any host",
    )
    openai.add_argument(
        "--remote_image_timeout_s",
        type=float,
        default=_env("remote_image_timeout_s", d.remote_image_timeout_s, float),
        help="total time limit for fetching one remote image: resolving, connecting, every "
        "redirect and the whole body",
    )
    openai.add_argument(
        "--remote_image_allow_networks",
        type=_names,
        default=_env("remote_image_allow_networks", d.remote_image_allow_networks, _names),
        help="comma-separated addresses or CIDR networks remote images may come from although "
        "they are loopback, private, link-local or otherwise not public (an in-cluster image "
        "store, say); empty: only public addresses",
    )
    openai.add_argument(
        "--remote_image_max_redirects",
        type=int,
        default=_env("remote_image_max_redirects", d.remote_image_max_redirects, int),
        help="redirects followed when fetching a remote image, each hop checked like the "
        "first URL; 0: a redirect is refused",
    )

    security = parser.add_argument_group("security and client limits")
    security.add_argument(
        "--enable_model_repository",
        type=_bool,
        default=_env("enable_model_repository", d.enable_model_repository, _bool),
        help="allow the model repository endpoints (REST /v2/repository/..., gRPC "
        "RepositoryModelLoad/Unload); off: 403 / PERMISSION_DENIED, so that nobody who "
        "reaches the port can unload the model",
    )
    security.add_argument(
        "--http_max_header_bytes",
        type=int,
        default=_env("http_max_header_bytes", d.http_max_header_bytes, int),
        help="total size of a REST request's line and headers; larger: 431",
    )
    security.add_argument(
        "--http_header_timeout_s",
        type=float,
        default=_env("http_header_timeout_s", d.http_header_timeout_s, float),
        help="time a REST client has to send a request's line and headers, from the "
        "connection or the request's first byte; later: 408 and the connection closed (also "
        "the gRPC server's handshake timeout)",
    )
    security.add_argument(
        "--http_body_timeout_s",
        type=float,
        default=_env("http_body_timeout_s", d.http_body_timeout_s, float),
        help="time a REST client has to send a request's whole body once its headers are in; "
        "later: 408 and the connection closed",
    )

    ui = parser.add_argument_group("web playground")
    ui.add_argument(
        "--enable_ui",
        type=_bool,
        default=_env("enable_ui", d.enable_ui, _bool),
        help="serve the playground page at GET /ui (it calls the OpenAI routes, which stay "
        "on either way)",
    )

    requests = parser.add_argument_group("request defaults and limits")
    requests.add_argument(
        "--default_prompt",
        default=_env("default_prompt", d.default_prompt),
        help="prompt used for images sent without a `prompt` input",
    )
    requests.add_argument(
        "--generation_config",
        choices=GENERATION_CONFIGS,
        default=_env("generation_config", d.generation_config),
        help="sampling defaults for requests that set none: auto (the checkpoint's "
        "generation_config.json, as vLLM) or none (greedy); a request's own values always win",
    )
    for name, help_text in (
        ("max_new_tokens", "tokens generated per image when a request does not say"),
        ("max_new_tokens_limit", "largest max_new_tokens a request may ask for"),
        ("max_pixels_limit", "largest max_pixels (model input pixels per image) a request may ask"),
        ("max_images_per_request", "images in one request"),
        ("max_image_bytes", "encoded bytes of one image"),
        ("max_decoded_pixels", "width x height of an image before resizing (decompression bombs)"),
        ("max_guide_bytes", "bytes of a guide (JSON schema, regex, grammar or choice list)"),
    ):
        requests.add_argument(
            f"--{name}", type=int, default=_env(name, getattr(d, name), int), help=help_text
        )
    requests.add_argument(
        "--guide_compile_timeout_s",
        type=float,
        default=_env("guide_compile_timeout_s", d.guide_compile_timeout_s, float),
        help="time a guide may take to compile (off the decode loop); longer: 400, and the "
        "same guide is refused at once afterwards",
    )
    return parser
