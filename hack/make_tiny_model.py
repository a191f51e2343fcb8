#!/usr/bin/env python3
"""Build a tiny random-weight Qwen-VL checkpoint directory for tests and demos.

Why: the real checkpoints are gigabytes and need a model hub. This writes a directory with the
same files a real `Qwen/Qwen3-VL-2B-Instruct` download has (config.json, safetensors weights,
tokenizer files with the Qwen special tokens and chat template, processor configs), so the
predictor loads it through exactly the code path a real checkpoint takes. Weights come from a
fixed seed, so the same command always writes the same model.

Usage: python hack/make_tiny_model.py OUT_DIR [--family qwen3-vl|qwen2.5-vl|qwen2-vl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SEED = 1234
# Random weights give near-uniform logits, where float noise (padding, batch size) can flip a
# greedy choice. Scaling the output layer widens the gaps between logits (about 0.3 between the
# top two) while sampling still varies (the top token has about 20% probability).
LOGIT_SCALE = 30.0
# Qwen2-VL and Qwen2.5-VL normalise with CLIP's statistics; Qwen3-VL uses 0.5.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FAMILIES = ("qwen3-vl", "qwen2.5-vl", "qwen2-vl")

# Qwen's special tokens, in the order their real ids run (151643 onwards); the tiny vocabulary
# gives them small ids instead and the config names whichever ids the tokenizer assigned.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The Qwen-VL chat template, reduced to what image description needs: system, user and assistant
# turns whose content is a string or a list of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
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


def train_tokenizer(out_dir: Path) -> dict[str, int]:
    """Train a byte-level BPE tokenizer on a small corpus; return the special token ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.strip().splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS} | {
        "vocab_size": tokenizer.get_vocab_size()
    }


def text_config(ids: dict[str, int], family: str) -> dict:
    """A four-head, two-layer decoder; mrope sections sum to half the head dimension (16)."""
    config = {
        "vocab_size": ids["vocab_size"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    if family == "qwen3-vl":
        config["head_dim"] = 16
        config["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        }
    else:
        config["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": [2, 3, 3],
        }
    return config


def build_config(ids: dict[str, int], family: str):
    """The transformers config object of the family, sized to run in milliseconds on a CPU."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    token_ids = {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }
    text = text_config(ids, family)
    if family == "qwen3-vl":
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "out_hidden_size": 64,
            "num_position_embeddings": 256,
            "deepstack_visual_indexes": [1],
        }
        return Qwen3VLConfig(text_config=text, vision_config=vision, **token_ids)
    if family == "qwen2.5-vl":
        vision = {
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 14,
            "out_hidden_size": 64,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
    }
    return Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)


def build_processor(out_dir: Path, family: str):
    """Image and video processors as the real checkpoints configure them, at a smaller budget."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessor

    patch = 16 if family == "qwen3-vl" else 14
    factor = patch * 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": 256 * factor * factor},
        image_mean=[0.5, 0.5, 0.5] if family == "qwen3-vl" else CLIP_MEAN,
        image_std=[0.5, 0.5, 0.5] if family == "qwen3-vl" else CLIP_STD,
    )
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if family == "qwen3-vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(patch_size=patch)
        processor_cls = Qwen3VLProcessor
    else:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=patch)
        if family == "qwen2.5-vl":
            from transformers import Qwen2_5_VLProcessor as processor_cls
        else:
            from transformers import Qwen2VLProcessor as processor_cls
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video,
        chat_template=CHAT_TEMPLATE,
    )


def make_tiny_model(out_dir: Path, family: str = "qwen3-vl") -> Path:
    """Write the checkpoint into out_dir (created if missing) and return it."""
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = train_tokenizer(out_dir)
    config = build_config(ids, family)
    torch.manual_seed(SEED)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    if model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("tiny model must not tie embeddings (lm_head is scaled alone)")
    with torch.no_grad():
        model.lm_head.weight.mul_(LOGIT_SCALE)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor(out_dir, family).save_pretrained(out_dir)
    (out_dir / "TINY_MODEL.json").write_text(
        json.dumps({"family": family, "seed": SEED, "random_weights": True}, indent=2)
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--family", choices=FAMILIES, default="qwen3-vl")
    args = parser.parse_args()
    path = make_tiny_model(args.out_dir, args.family)
    print(f"wrote tiny {args.family} checkpoint to {path}")


if __name__ == "__main__":
    main()
