"""Load a Qwen-VL checkpoint the same way whether it is a real one or the tiny test model.

Why the checks up front: a model server that dies deep inside transformers with a stack trace
is hard to operate. Missing checkpoints, unsupported architectures, 4/8-bit without
bitsandbytes are reported as one `StartupError` line before anything loads.
Safetensors only and `trust_remote_code=False`: a checkpoint cannot run code on the server.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from predictor.engine.packed_linear import pack_text_decoder, packable
from predictor.engine.patch_embedding import use_matmul_patch_embeddings
from predictor.errors import StartupError
from predictor.settings import Settings

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
# The vision tower stays in the model's dtype when the language model is quantized, unless
# --quantize_vision: it runs once per image rather than once per token, and vLLM and TGI keep
# it too. (The output layer too: transformers' default, and tied to the input embedding.)
UNQUANTIZED_MODULES = ["model.visual", "lm_head"]
# bitsandbytes' CPU 4-bit layout (its AVX512-BF16 kernel) packs output rows in blocks of 32
# and reads each row in blocks of the quantization's block size: a layer narrower than that
# cannot be packed, and fails on its first product.
CPU_4BIT_ROW_BLOCK = 32
BNB_4BIT_BLOCKSIZE = 64
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a local directory, or a hub id and revision."""

    path_or_id: str
    revision: str | None = None


def resolve_source(settings: Settings) -> ModelSource:
    if settings.model_id:
        return ModelSource(settings.model_id, settings.model_revision)
    path = Path(settings.model_dir)
    if not (path / "config.json").is_file():
        raise StartupError(
            f"no checkpoint at --model_dir {path}: config.json not found "
            "(set storageUri on the InferenceService, or pass --model_id)"
        )
    if not any(path.glob("*.safetensors")):
        raise StartupError(f"no *.safetensors weights in {path}; only safetensors are loaded")
    return ModelSource(str(path))


def resolve_device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        raise StartupError("--device cuda was asked for, but no CUDA device is visible")
    return torch.device("cpu")


def cpu_threads(requested: int) -> int:
    """Torch threads on the CPU: as asked, or every usable core but one.

    Why leave one: the engine's generate saturates every torch thread, and the event loop,
    gRPC threads and image decoding then wait for a core; on small machines that turns a
    quick 503 or health check into a slow one, and small batches run slower on more threads.
    """
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - 1)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AMX-BF16 or AVX512-BF16), where
    bfloat16 runs several times faster than float32; elsewhere it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in flags.splitlines():
        if line.startswith("flags"):
            found = set(line.split(":", 1)[1].split())
            return bool(found & {"amx_bf16", "avx512_bf16"})
    return False


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that has it (float16 on one that does not, such as a T4 or a
    V100) and on a CPU with native bfloat16 matmuls; float32 on any other CPU."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def quantization_config(
    mode: str,
    device: torch.device,
    dtype: torch.dtype,
    keep: list[str] | None = None,
) -> Any | None:
    """A bitsandbytes config for 4/8-bit, or None; refuses where it cannot work. `keep`: the
    modules left in `dtype` (default `UNQUANTIZED_MODULES`)."""
    keep = UNQUANTIZED_MODULES if keep is None else keep
    if mode == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise StartupError(
            f"--quantization {mode} needs bitsandbytes: pip install 'qwen-vl-predictor[quant]'"
        )
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
            llm_int8_skip_modules=keep,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)


def unquantized_modules(source: ModelSource, mode: str, quantize_vision: bool) -> list[str]:
    """The modules a quantized load leaves in the model's dtype: the output layer, and the
    vision tower unless `quantize_vision`, and then, in 4 bits, the vision layers
    bitsandbytes' CPU layout cannot pack (found on the meta device: no weights are read)."""
    if not quantize_vision:
        return list(UNQUANTIZED_MODULES)
    keep = [name for name in UNQUANTIZED_MODULES if name != "model.visual"]
    if mode != "4bit":
        return keep
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source.path_or_id, revision=source.revision)
    with torch.device("meta"):
        skeleton = AutoModelForImageTextToText.from_config(config)
    for name, module in skeleton.named_modules():
        if name.startswith("model.visual.") and isinstance(module, torch.nn.Linear):
            narrow = module.out_features % CPU_4BIT_ROW_BLOCK or (
                module.in_features % BNB_4BIT_BLOCKSIZE
            )
            if narrow:
                keep.append(name)
    return keep


def check_architecture(source: ModelSource) -> str:
    """The checkpoint's model_type, if it is a Qwen-VL family this server knows."""
    from transformers import PretrainedConfig

    # The raw config dict: instantiating a config of the wrong class can fail in obscure ways.
    config, _ = PretrainedConfig.get_config_dict(source.path_or_id, revision=source.revision)
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise StartupError(
            f"{source.path_or_id} is a {model_type!r} model; "
            f"this server serves {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    model_type: str
    device: torch.device
    dtype: torch.dtype


def load_model(settings: Settings, pack: bool = True) -> LoadedModel:
    """Processor and model, on the chosen device and dtype, in eval mode; bfloat16 on a CPU
    with the text decoder's layers packed for oneDNN (`predictor.engine.packed_linear`) unless
    `pack` is false (a plain transformers model, as a reference)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = resolve_source(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    model_type = check_architecture(source)
    keep = unquantized_modules(source, settings.quantization, settings.quantize_vision)
    quantization = quantization_config(settings.quantization, device, dtype, keep)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(settings.cpu_threads))
    logger.info(
        "loading %s (%s) on %s as %s, quantization %s%s",
        source.path_or_id,
        model_type,
        device,
        dtype,
        settings.quantization,
        f" (kept in {dtype}: {', '.join(keep)})" if quantization is not None else "",
    )
    common = {"revision": source.revision, "trust_remote_code": False}
    processor = AutoProcessor.from_pretrained(source.path_or_id, **common)
    options: dict[str, Any] = {"dtype": dtype, "use_safetensors": True, **common}
    if settings.attn_implementation:
        options["attn_implementation"] = settings.attn_implementation
    if quantization is not None:
        options["quantization_config"] = quantization
        if device.type == "cuda":  # on a CPU, where weights load by default
            options["device_map"] = {"": device.index or 0}
    # Weights that are quantized or packed at load replace what was read: a local checkpoint
    # (the InferenceService's storageUri) is then read without a mapping, whose pages would
    # stay resident beside the new copies; a hub id (--model_id) still loads through
    # transformers' own mapping of the downloaded files.
    packs = pack and quantization is None and packable(device, dtype)
    local = source.revision is None and Path(source.path_or_id).is_dir()
    unmapped = (quantization is not None or packs) and local
    if unmapped:
        large_allocations_from_mmap()
        model = _load_without_mapping(Path(source.path_or_id), options)
    else:
        model = AutoModelForImageTextToText.from_pretrained(source.path_or_id, **options)
    if quantization is None:
        model = model.to(device)
    model.eval()
    use_matmul_patch_embeddings(model)
    if packs:
        pack_text_decoder(model)
        if unmapped:
            # The read weights were mapped blocks, unmapped as each was packed; from here on
            # a step's logits and activations may come from the heap again.
            large_allocations_from_mmap(HEAP_UP_TO_BYTES)
    if unmapped:
        return_free_memory()
    return LoadedModel(model, processor, model_type, device, dtype)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a local checkpoint: those its index names when it is sharded,
    else its single `model.safetensors` (a stray file beside them is not loaded)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / name for name in names]
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(directory.glob("*.safetensors"))


# glibc's mallopt parameter numbers (malloc.h).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024
HEAP_UP_TO_BYTES = 64 * 1024 * 1024  # after a packed load: a 16-row step's logits stay on the heap


def _glibc() -> Any | None:
    """The C library, where it is glibc (whose malloc the functions below tune), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def large_allocations_from_mmap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations of `threshold` bytes or more from their own mappings, for good.

    Why: a quantized load allocates each bf16 weight (up to 25 MB for Qwen3-VL-2B's MLP),
    quantizes it and frees it, hundreds of times. glibc raises its mmap threshold to the size
    of each freed mapped block, so after the first few the weights come from the heap, and a
    heap with a small live block on top of a freed weight cannot shrink: Qwen3-VL-2B's 4-bit
    load ended 0.65 GB above its live memory (loading's peak 3.84 GB; 3.41 GB with this). A fixed
    threshold (setting it turns glibc's adjustment off) returns each freed block at once; 1 MiB
    rather than 4 MiB also keeps a prefill's activations off the heap (measured: 128 MB less at
    the decoding peak). The cost is a fresh mapping for each large tensor later (page faults
    for the logits and a prefill's activations), small beside a step that reads the weights.
    Equivalent to starting the process with MALLOC_MMAP_THRESHOLD_=1048576. Returns whether
    the setting took.
    """
    libc = _glibc()
    return bool(libc and libc.mallopt(_M_MMAP_THRESHOLD, threshold))


def return_free_memory() -> None:
    """Give the heap's free pages back to the system (`malloc_trim`), after loading has freed
    what it read: otherwise they count in the server's memory until reused."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _load_without_mapping(directory: Path, options: dict[str, Any]) -> Any:
    """A model from a local checkpoint whose tensors are read with `pread`, one at a time,
    instead of through a memory mapping of the whole file (for 4/8-bit weights, and for
    bfloat16 ones that are packed for oneDNN, which likewise replaces what was read).

    Why: transformers maps each safetensors file and keeps the mapping while any tensor is a
    view of it. Quantizing reads every weight through that mapping, and a mapping's pages stay
    in the process's resident set once touched, so the whole bf16 checkpoint (4.25 GB for
    Qwen3-VL-2B) counted in the server's memory during loading and after it, on top of the
    4-bit copies: the 4-bit server measured more than the bf16 one. Read this way, each bf16
    tensor lives only until it is quantized, and those that stay in the model's dtype (the
    vision tower, the output layer) are the process's own memory. The weights are the same
    bytes, converted by the same transformers code (`state_dict` is its public entry point).
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    model_class = AutoModelForImageTextToText._model_mapping[type(config)]
    handles = [
        safe_open(str(path), framework="pt", device="cpu", backend="pread")
        for path in checkpoint_files(directory)
    ]
    # Slices, not tensors: transformers reads each one when it converts it.
    state_dict = {
        key: handle.get_slice(key)
        for handle in handles
        for key in handle.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
    }
    options = {k: v for k, v in options.items() if k not in ("revision", "use_safetensors")}
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **options)
    del state_dict, handles
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def load_processor(settings: Settings) -> Any:
    """The checkpoint's processor alone: what the server process needs when the model lives
    in the engine process (`--engine_process`)."""
    from transformers import AutoProcessor

    source = resolve_source(settings)
    check_architecture(source)
    return AutoProcessor.from_pretrained(
        source.path_or_id, revision=source.revision, trust_remote_code=False
    )


def load_checkpoint_sampling(settings: Settings) -> dict[str, Any]:
    """The values the checkpoint's generation_config.json sets (`Generator.checkpoint_sampling`
    without loading the model): what `--generation_config auto` takes its defaults from."""
    from transformers import GenerationConfig

    source = resolve_source(settings)
    try:
        config = GenerationConfig.from_pretrained(source.path_or_id, revision=source.revision)
    except OSError:  # no generation_config.json: no checkpoint defaults
        return {}
    return config.to_diff_dict()


def vocab_size(model_config: Any) -> int:
    """The width of the model's logits: what a guided row's token bitmask covers."""
    return int(model_config.get_text_config().vocab_size)


def load_vocab_size(settings: Settings) -> int:
    """`vocab_size` without loading the model (the server process, with `--engine_process`)."""
    from transformers import AutoConfig

    source = resolve_source(settings)
    config = AutoConfig.from_pretrained(source.path_or_id, revision=source.revision)
    return vocab_size(config)
