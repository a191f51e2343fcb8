"""What plain transformers generates: the reference the engine's decode path must match."""

from __future__ import annotations

import torch

from predictor.engine.generation import Generator
from predictor.rows import Row


def reference_greedy(generator: Generator, row: Row) -> str:
    """Plain transformers' greedy text for the row (see `reference_greedy_completion`)."""
    return reference_greedy_completion(generator, row)[0]


def reference_greedy_completion(generator: Generator, row: Row) -> tuple[str, int]:
    """Plain transformers, the way its model cards show: chat template, processor, generate.
    Its greedy text and how many tokens it generated (a stop token counts, as in ours)."""
    processor, model = generator.processor, generator.model
    messages = list(row.messages)
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=list(row.images), return_tensors="pt")
    with torch.inference_mode():
        # Every value said: generate would fill the rest from the checkpoint's
        # generation_config.json (Qwen2.5-VL's repetition_penalty 1.05).
        output = model.generate(
            **inputs,
            max_new_tokens=row.sampling.max_new_tokens,
            do_sample=False,
            repetition_penalty=row.sampling.repetition_penalty,
        )
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    stops = generator.stop_token_ids
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    text = processor.tokenizer.decode(new[:cut], skip_special_tokens=True)
    return text, len(new) if cut is None else cut + 1
