"""Checkpoints with the real Qwen3-VL 2B/8B shapes and random weights, for GPU benchmarks.

Why: speed and memory depend on the shapes, not on the weights, and no model hub is needed.
The layer sizes below are those of the published `Qwen/Qwen3-VL-2B-Instruct` and
`Qwen/Qwen3-VL-8B-Instruct` config.json files. The tokenizer is the tiny test model's (the
image token ids in the config point into it); generated ids it does not know decode to nothing,
which does not matter for tokens/s. The checkpoint is written to disk and loaded through
`predictor.engine.loading.load_model`, the same path (and the same 4-bit quantization) as
production.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-vl-2b": {
        "text": {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "num_hidden_layers": 28,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 128,
        },
        "vision": {
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
            "out_hidden_size": 2048,
            "deepstack_visual_indexes": [5, 11, 17],
        },
        "tie_word_embeddings": True,
    },
    "qwen3-vl-8b": {
        "text": {
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
        },
        "vision": {
            "depth": 27,
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_heads": 16,
            "out_hidden_size": 4096,
            "deepstack_visual_indexes": [8, 16, 24],
        },
        "tie_word_embeddings": False,
    },
}
VOCAB_SIZE = 151_936


def shaped_config(shape: str, token_ids: dict[str, int]):
    """The transformers config of `shape`, with image token ids from the tiny tokenizer."""
    from transformers import Qwen3VLConfig

    spec = SHAPES[shape]
    text = {
        **spec["text"],
        "vocab_size": VOCAB_SIZE,
        "max_position_embeddings": 262_144,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
    }
    vision = {**spec["vision"], "patch_size": 16, "num_position_embeddings": 2304}
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token_ids["<|image_pad|>"],
        video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"],
        vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=spec["tie_word_embeddings"],
    )


def write_shaped_checkpoint(shape: str, out_dir: Path) -> Path:
    """Random bf16 weights of `shape` (initialised on the GPU), tokenizer and processor."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from hack.make_tiny_model import build_processor, train_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = train_tokenizer(out_dir)
    config = shaped_config(shape, ids)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    processor = build_processor(out_dir, "qwen3-vl")
    # Qwen3-VL's own image budget (its preprocessor_config.json).
    processor.image_processor.size = {"shortest_edge": 65_536, "longest_edge": 16_777_216}
    processor.save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out_dir


def parameter_count(shape: str) -> int:
    """Parameters of `shape`, counted on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForImageTextToText

    token_ids = {
        "<|endoftext|>": 151_643,
        "<|im_end|>": 151_645,
        "<|vision_start|>": 151_652,
        "<|vision_end|>": 151_653,
        "<|image_pad|>": 151_655,
        "<|video_pad|>": 151_656,
    }
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(shaped_config(shape, token_ids))
    return sum(p.numel() for p in model.parameters())
