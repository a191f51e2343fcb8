#!/usr/bin/env python3
"""Build a tiny random-weight Qwen-VL checkpoint directory, in the real checkpoints' file formats.

Why: the real checkpoints are gigabytes and need a model hub, but the server must behave with
them as their model cards say. This writes, for each family, the files its published
checkpoint has, with the real contents wherever they do not set a size:

- `config.json`: the real file's keys and values (legacy flat Qwen2.x layouts with
  `rope_scaling`, tied embeddings where the real model ties them); only layer sizes, layer
  counts and the index lists that point into them are shrunk;
- `generation_config.json`: the real file, sampling defaults included;
- `chat_template.json`: the real template;
- `preprocessor_config.json` (and Qwen3-VL's `video_preprocessor_config.json`): the real files;
- `tokenizer.json`, `vocab.json`, `merges.txt`, `tokenizer_config.json`: a byte-level BPE
  tokenizer with Qwen's pre-tokenizer, its special tokens at their real ids (151643 onwards)
  and the real `tokenizer_config.json` fields. Its ordinary vocabulary is a few hundred merges
  trained on a small corpus; ids up to 151642 that it does not need are unused fillers, so
  every id the real tokenizer has exists and the embedding has the real vocabulary size.

Sources (the files of the public Hugging Face repositories, main branch):
`Qwen/Qwen3-VL-2B-Instruct`, `Qwen/Qwen2.5-VL-3B-Instruct` and `Qwen/Qwen2-VL-2B-Instruct`,
each file named beside its copy below. The three are the families' small models (the 2B/3B
models tie their input and output embeddings; the 7B/8B ones do not).

The weights come from a fixed seed, so the same command always writes the same model. The
predictor loads the directory through exactly the code path a real checkpoint takes.

Usage: python hack/make_tiny_model.py OUT_DIR [--family qwen3-vl|qwen2.5-vl|qwen2-vl]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

SEED = 1234
# Random weights give near-uniform logits, where float noise (padding, batch size) can flip a
# greedy choice, and tied embeddings make a random model repeat its last input token (its own
# embedding scores highest). The final norm's weight gets random signs times LOGIT_SCALE, which
# widens the gaps between logits (about 0.3 between the top two) and cancels the self-score;
# the layers' residual writes are scaled by WRITE_SCALE so that the context, not the last
# token alone, decides the next one. Sampling still varies.
LOGIT_SCALE = 10.0
WRITE_SCALE = 3.0
FAMILIES = ("qwen3-vl", "qwen2.5-vl", "qwen2-vl")
FIRST_SPECIAL_ID = 151_643  # the real tokenizers' first added token, <|endoftext|>

# --- tokenizer ------------------------------------------------------------------------------
# tokenizer_config.json `added_tokens_decoder`, in id order from 151643: (content, special).
_QWEN2_VL_ADDED = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
]
_QWEN2_5_ADDED = [
    *_QWEN2_VL_ADDED,
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
]
ADDED_TOKENS = {
    "qwen2-vl": _QWEN2_VL_ADDED,  # Qwen2-VL-2B-Instruct: 151643-151656
    "qwen2.5-vl": _QWEN2_5_ADDED,  # Qwen2.5-VL-3B-Instruct: 151643-151664
    "qwen3-vl": [  # Qwen3-VL-2B-Instruct: 151643-151668
        *_QWEN2_5_ADDED,
        ("<tool_response>", False),
        ("</tool_response>", False),
        ("<think>", False),
        ("</think>", False),
    ],
}
SPECIAL_TOKENS = [content for content, _ in _QWEN2_VL_ADDED]  # the ids every family shares
# tokenizer_config.json of each repository, without `added_tokens_decoder` (built from the
# lists above) and `chat_template` (Qwen2-VL repeats chat_template.json's there).
TOKENIZER_CONFIG: dict[str, dict[str, Any]] = {
    family: {
        "add_prefix_space": False,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    for family, max_length in (("qwen2-vl", 32768), ("qwen2.5-vl", 131072), ("qwen3-vl", 262144))
}
TOKENIZER_CONFIG["qwen2-vl"]["padding_side"] = "left"
# Qwen2's pre-tokenizer (tokenizer.json `pre_tokenizer`: this split, then byte-level).
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = """
A photo of a red car parked on a quiet street next to a tall building.
The image shows a small dog sitting on green grass under a blue sky.
Two people are walking along a sandy beach at sunset, the sea is calm.
A bowl of fresh fruit with apples, bananas and oranges on a wooden table.
The picture contains a city skyline at night with bright lights and reflections.
A black and white cat sleeps on a soft blue blanket near a window.
Describe this image. What is in the picture? There is a mountain with snow.
The chart shows numbers, colors, shapes, text and a white background.
"""

# --- chat templates (chat_template.json) ---------------------------------------------------
# Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct ship this one: every message is rendered
# in order, with a default system prompt when the first message is not a system one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen3-VL-2B-Instruct's (kept verbatim in its own file, chat_template.json's string): no
# default system prompt; a system message is rendered only when it is the first message (the
# message loop has no branch for a later one), and only its text parts.
QWEN3_VL_CHAT_TEMPLATE = (Path(__file__).parent / "chat_templates" / "qwen3-vl.jinja").read_text()
CHAT_TEMPLATES = {
    "qwen3-vl": QWEN3_VL_CHAT_TEMPLATE,
    "qwen2.5-vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen2-vl": QWEN2_VL_CHAT_TEMPLATE,
}
CHAT_TEMPLATE = CHAT_TEMPLATES["qwen3-vl"]  # the default family's

# --- config.json ----------------------------------------------------------------------------
# Qwen/Qwen3-VL-2B-Instruct config.json. The shrunk sizes are applied by `tiny_config`.
QWEN3_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3VLForConditionalGeneration"],
    "image_token_id": 151655,
    "model_type": "qwen3_vl",
    "text_config": {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "dtype": "bfloat16",
        "eos_token_id": 151645,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "initializer_range": 0.02,
        "intermediate_size": 6144,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "mrope_interleaved": True,
            "mrope_section": [24, 20, 20],
            "rope_type": "default",
        },
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": 151936,
    },
    "tie_word_embeddings": True,
    "transformers_version": "4.57.0.dev0",
    "video_token_id": 151656,
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17],
        "depth": 24,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "model_type": "qwen3_vl",
        "num_heads": 16,
        "num_position_embeddings": 2304,
        "out_hidden_size": 2048,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}
# Qwen/Qwen2.5-VL-3B-Instruct config.json: the flat Qwen2 layout, legacy `rope_scaling`.
QWEN2_5_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 128000,
    "max_window_layers": 70,
    "model_type": "qwen2_5_vl",
    "num_attention_heads": 16,
    "num_hidden_layers": 36,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 2048,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}
# Qwen/Qwen2-VL-2B-Instruct config.json: the flat Qwen2 layout, legacy `rope_scaling`.
QWEN2_VL_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 1536,
    "initializer_range": 0.02,
    "intermediate_size": 8960,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2_vl",
    "num_attention_heads": 12,
    "num_hidden_layers": 28,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.41.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "embed_dim": 1280,
        "mlp_ratio": 4,
        "num_heads": 16,
        "in_chans": 3,
        "hidden_size": 1536,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 151936,
}
REAL_CONFIGS = {
    "qwen3-vl": QWEN3_VL_CONFIG,
    "qwen2.5-vl": QWEN2_5_VL_CONFIG,
    "qwen2-vl": QWEN2_VL_CONFIG,
}
# The shrunk sizes: a two-layer, four-head decoder (head dim 16, so the mrope sections sum to
# 8, split in the real proportions) and a two-block vision encoder, run in milliseconds on a
# CPU. Index lists keep their meaning: Qwen3-VL's deepstack taps the middle block, Qwen2.5-VL's
# last block is its full-attention one.
TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
TINY = {
    "qwen3-vl": {
        "text": {**TINY_TEXT, "head_dim": 16, "mrope_section": [4, 2, 2]},
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1],
        },
    },
    "qwen2.5-vl": {
        "text": {**TINY_TEXT, "max_window_layers": 2, "mrope_section": [2, 3, 3]},
        "vision": {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
        },
    },
    "qwen2-vl": {
        "text": {**TINY_TEXT, "max_window_layers": 2, "mrope_section": [2, 3, 3]},
        "vision": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "hidden_size": 64},
    },
}

# --- generation_config.json -----------------------------------------------------------------
GENERATION_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-vl": {  # Qwen/Qwen3-VL-2B-Instruct generation_config.json
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.0,
        "temperature": 0.7,
        "transformers_version": "4.56.0",
    },
    "qwen2.5-vl": {  # Qwen/Qwen2.5-VL-3B-Instruct generation_config.json
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05,
        "temperature": 0.1,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.41.2",
    },
    "qwen2-vl": {  # Qwen/Qwen2-VL-2B-Instruct generation_config.json
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "do_sample": True,
        "eos_token_id": [151645, 151643],
        "repetition_penalty": 1.05,
        "temperature": 0.01,
        "top_p": 0.001,
        "top_k": 1,
        "transformers_version": "4.41.2",
    },
}

# --- preprocessor_config.json / video_preprocessor_config.json ------------------------------
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PREPROCESSOR_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-vl": {  # Qwen/Qwen3-VL-2B-Instruct preprocessor_config.json
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
        "image_processor_type": "Qwen2VLImageProcessorFast",
    },
    "qwen2.5-vl": {  # Qwen/Qwen2.5-VL-3B-Instruct preprocessor_config.json
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    },
    "qwen2-vl": {  # Qwen/Qwen2-VL-2B-Instruct preprocessor_config.json
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    },
}
# Only Qwen3-VL's repository has a video processor file; the Qwen2.x processors build theirs
# from preprocessor_config.json.
VIDEO_PREPROCESSOR_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen3-vl": {  # Qwen/Qwen3-VL-2B-Instruct video_preprocessor_config.json
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor",
    },
}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def train_tokenizer(out_dir: Path, family: str = "qwen3-vl") -> dict[str, int]:
    """Write the tokenizer files; return the special token ids (the real ones) and the size
    of the vocabulary the ids run through."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    def pipeline(tokenizer: Any) -> Any:
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tokenizer.decoder = decoders.ByteLevel()
        return tokenizer

    trained = pipeline(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trained.train_from_iterator(CORPUS.strip().splitlines() * 4, trainer=trainer)
    state = json.loads(trained.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    # Fillers up to the first special id: byte-level strings no merge produces.
    for index in range(len(vocab), FIRST_SPECIAL_ID):
        vocab[f"Ġ{index:06d}q"] = index
    tokenizer = pipeline(Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False)))
    for content, special in ADDED_TOKENS[family]:
        token = AddedToken(content, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tokenizer.model.save(str(out_dir))  # vocab.json and merges.txt, as the real repos ship
    ids = {content: tokenizer.token_to_id(content) for content, _ in ADDED_TOKENS[family]}
    expected = {c: FIRST_SPECIAL_ID + i for i, (c, _) in enumerate(ADDED_TOKENS[family])}
    if ids != expected:
        raise RuntimeError(f"special tokens landed at the wrong ids: {ids}")
    added = {
        str(FIRST_SPECIAL_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS[family])
    }
    config = {**TOKENIZER_CONFIG[family], "added_tokens_decoder": added}
    if family == "qwen2-vl":
        config["chat_template"] = CHAT_TEMPLATES[family]
    _write_json(out_dir / "tokenizer_config.json", dict(sorted(config.items())))
    text = REAL_CONFIGS[family].get("text_config", REAL_CONFIGS[family])
    return ids | {"vocab_size": int(text["vocab_size"])}


# With --depth real, these keep the real checkpoint's values: its number of layers and blocks
# and the index lists that point into them.
REAL_DEPTH_KEYS = (
    "num_hidden_layers",
    "max_window_layers",
    "depth",
    "deepstack_visual_indexes",
    "fullatt_block_indexes",
)
DEPTHS = ("tiny", "real")


def tiny_config(family: str, depth: str = "tiny") -> dict[str, Any]:
    """The real config.json of the family with the sizes of `TINY`; with `depth` "real", the
    real number of layers and vision blocks at the tiny widths (a model whose arithmetic is
    negligible, so what a decoding step costs is the framework's time per layer)."""
    config = copy.deepcopy(REAL_CONFIGS[family])
    real = copy.deepcopy(config)
    sizes = TINY[family]
    text = config.get("text_config", config)
    section = sizes["text"]["mrope_section"]
    text.update({k: v for k, v in sizes["text"].items() if k != "mrope_section"})
    text["rope_scaling"]["mrope_section"] = section
    config["vision_config"].update(sizes["vision"])
    if depth == "real":
        real_text = real.get("text_config", real)
        for target, source in ((text, real_text), (config["vision_config"], real["vision_config"])):
            target.update({k: source[k] for k in REAL_DEPTH_KEYS if k in source})
    # The vision encoder's output width is the decoder's (`hidden_size` in Qwen2-VL's layout).
    key = "hidden_size" if family == "qwen2-vl" else "out_hidden_size"
    config["vision_config"][key] = text["hidden_size"]
    return config


def write_processor_files(out_dir: Path, family: str) -> None:
    """chat_template.json, preprocessor_config.json and video_preprocessor_config.json."""
    _write_json(out_dir / "chat_template.json", {"chat_template": CHAT_TEMPLATES[family]})
    _write_json(out_dir / "preprocessor_config.json", PREPROCESSOR_CONFIGS[family])
    if family in VIDEO_PREPROCESSOR_CONFIGS:
        _write_json(out_dir / "video_preprocessor_config.json", VIDEO_PREPROCESSOR_CONFIGS[family])


def build_processor(out_dir: Path, family: str) -> Any:
    """Write the processor files of `family` into out_dir (beside its tokenizer) and load the
    processor from them, as the server does."""
    from transformers import AutoProcessor

    write_processor_files(out_dir, family)
    return AutoProcessor.from_pretrained(out_dir)


def make_tiny_model(out_dir: Path, family: str = "qwen3-vl", depth: str = "tiny") -> Path:
    """Write the checkpoint into out_dir (created if missing) and return it."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("chat_template.jinja", "processor_config.json", "special_tokens_map.json"):
        (out_dir / stale).unlink(missing_ok=True)
    train_tokenizer(out_dir, family)
    config_json = tiny_config(family, depth)
    _write_json(out_dir / "config.json", config_json)
    config = AutoConfig.from_pretrained(out_dir)
    torch.manual_seed(SEED)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    tied = model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != bool(config_json["tie_word_embeddings"]):
        raise RuntimeError(f"{family}: embeddings tied={tied}, the real config says otherwise")
    with torch.no_grad():
        language_model = model.model.language_model
        for layer in language_model.layers:
            layer.self_attn.o_proj.weight.mul_(WRITE_SCALE)
            layer.mlp.down_proj.weight.mul_(WRITE_SCALE)
        norm = language_model.norm.weight
        norm.copy_(torch.randn(norm.shape).sign() * LOGIT_SCALE)
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    # save_pretrained rewrites both configs in its own layout: put the real-format files back.
    _write_json(out_dir / "config.json", config_json)
    _write_json(out_dir / "generation_config.json", GENERATION_CONFIGS[family])
    write_processor_files(out_dir, family)
    _write_json(
        out_dir / "TINY_MODEL.json",
        {"family": family, "depth": depth, "seed": SEED, "random_weights": True},
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3-vl")
    parser.add_argument(
        "--depth",
        choices=DEPTHS,
        default="tiny",
        help="tiny: 2 layers; real: the real model's layers and vision blocks, tiny widths",
    )
    args = parser.parse_args()
    path = make_tiny_model(args.out_dir, args.family, args.depth)
    print(f"wrote tiny {args.family} checkpoint ({args.depth} depth) to {path}")


if __name__ == "__main__":
    main()
