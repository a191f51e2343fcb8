"""Messages a checkpoint's chat template would drop or reorder are refused, per family.

Each family's real template is loaded the way the server loads it (`AutoProcessor` on a
directory with the checkpoint's tokenizer and processor files, written by
hack/make_tiny_model.py; no weights needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hack.make_tiny_model import FAMILIES, build_processor, train_tokenizer
from predictor.errors import InvalidRequest
from predictor.inputs.chat_template import TemplateCheck

IMAGE_TURN = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
FRENCH = {"role": "system", "content": "Answer in French."}


@pytest.fixture(scope="module")
def renderers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rendered = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(family)
        train_tokenizer(out, family)
        processor = build_processor(Path(out), family)
        rendered[family] = lambda messages, p=processor: p.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    return rendered


def test_qwen3_vl_template_drops_a_later_system_message(renderers) -> None:
    """Why the check exists: the real template loses the message without an error."""
    assert "Answer in French." not in renderers["qwen3-vl"]([IMAGE_TURN, FRENCH])
    assert "Answer in French." in renderers["qwen3-vl"]([FRENCH, IMAGE_TURN])


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([IMAGE_TURN, FRENCH], "messages[1]"),
        ([FRENCH, IMAGE_TURN, {"role": "assistant", "content": "Oui."}, FRENCH], "messages[3]"),
        ([FRENCH, FRENCH, IMAGE_TURN], "messages[1]"),
    ],
)
def test_qwen3_vl_refuses_what_its_template_drops(renderers, messages, field) -> None:
    with pytest.raises(InvalidRequest) as error:
        TemplateCheck(renderers["qwen3-vl"]).check(messages)
    assert error.value.field == field
    assert "dropped" in str(error.value) and "first message" in str(error.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_conversations_every_template_keeps_pass(renderers, family: str) -> None:
    check = TemplateCheck(renderers[family])
    check.check([IMAGE_TURN])
    check.check([FRENCH, IMAGE_TURN, {"role": "assistant", "content": ""}, IMAGE_TURN])
    brief = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    check.check([brief, IMAGE_TURN])


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl"])
def test_qwen2_templates_keep_a_later_system_message(renderers, family: str) -> None:
    TemplateCheck(renderers[family]).check([IMAGE_TURN, FRENCH])
    assert "Answer in French." in renderers[family]([IMAGE_TURN, FRENCH])


def test_a_reordering_template_is_refused() -> None:
    """A template that puts every system message first moves a later one: refused too."""

    def system_first(messages: list[dict[str, Any]]) -> str:
        ordered = sorted(messages, key=lambda m: m["role"] != "system")
        return "".join(_text(m["content"]) for m in ordered)

    with pytest.raises(InvalidRequest) as error:
        TemplateCheck(system_first).check([IMAGE_TURN, FRENCH])
    assert error.value.field == "messages[1]" and "moved" in str(error.value)


def test_the_verdict_is_rendered_once_per_conversation_shape() -> None:
    calls = []

    def render(messages: list[dict[str, Any]]) -> str:
        calls.append(len(messages))
        return "".join(_text(m["content"]) for m in messages)

    check = TemplateCheck(render)
    check.check([IMAGE_TURN, {"role": "assistant", "content": "one"}])
    check.check([IMAGE_TURN, {"role": "assistant", "content": "another text"}])
    assert calls == [2]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content)
