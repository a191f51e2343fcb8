"""Refuse chat messages the checkpoint's chat template would drop or reorder.

Why: a chat template is code shipped with the checkpoint, and it decides which messages reach
the model. Qwen3-VL's renders a system message only when it is the first message, so a second
system message ("Answer in French.") would vanish from the prompt with no error, and the client
would take the answer as one that followed it. Qwen2-VL's and Qwen2.5-VL's render every message
in order. Rather than hard-code what each template does, `TemplateCheck` asks the template
itself: it renders the conversation with a unique marker as each message's text and finds the
markers in the prompt. A message whose marker is missing, or comes before an earlier message's,
is refused with a 400 naming `messages[i]`.

What a template does with a message depends only on the conversation's shape (the roles, and
which messages hold a string or which kinds of parts), not on its text, so one probe render
per shape is kept.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from predictor.errors import InvalidRequest

Render = Callable[[list[dict[str, Any]]], str]
SHAPE_CACHE_SIZE = 1024  # conversation shapes whose verdict is kept


def _marker(index: int) -> str:
    return f"\u27e6message {index}\u27e7"


def _shape(messages: Sequence[dict[str, Any]]) -> tuple:
    return tuple((m["role"], _parts(m["content"])) for m in messages)


def _parts(content: str | Sequence[dict[str, Any]]) -> tuple[str, ...] | None:
    return None if isinstance(content, str) else tuple(part["type"] for part in content)


def _probe(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with each message's text replaced by its marker (images kept)."""
    probe = []
    for index, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            probed: str | list[dict[str, Any]] = _marker(index)
        else:
            probed = [part for part in content if part["type"] != "text"]
            probed.append({"type": "text", "text": _marker(index)})
        probe.append({**message, "content": probed})
    return probe


class TemplateCheck:
    """Checks conversations against one checkpoint's chat template (thread-safe)."""

    def __init__(self, render: Render):
        self.render = render
        self._verdicts: OrderedDict[tuple, tuple[int, str] | None] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, messages: Sequence[dict[str, Any]]) -> None:
        """Raise `InvalidRequest` naming the first message the template would lose."""
        shape = _shape(messages)
        with self._lock:
            known = shape in self._verdicts
            verdict = self._verdicts.get(shape)
        if not known:
            verdict = self._verdict(messages)
            with self._lock:
                self._verdicts[shape] = verdict
                while len(self._verdicts) > SHAPE_CACHE_SIZE:
                    self._verdicts.popitem(last=False)
        if verdict is not None:
            index, reason = verdict
            raise InvalidRequest(f"messages[{index}]", reason)

    def _verdict(self, messages: Sequence[dict[str, Any]]) -> tuple[int, str] | None:
        prompt = self.render(_probe(messages))
        last = -1
        for index, message in enumerate(messages):
            position = prompt.find(_marker(index))
            role = message["role"]
            if position < 0:
                hint = (
                    " (it keeps a system message only as the first message)"
                    if role == "system" and index > 0
                    else ""
                )
                return index, (
                    f"this {role} message would be silently dropped by the model's chat "
                    f"template{hint}; send it where the template keeps it"
                )
            if position < last:
                return index, (
                    f"this {role} message would be moved before an earlier message by the "
                    "model's chat template"
                )
            last = position
        return None
