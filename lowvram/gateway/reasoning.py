"""A reasoning model's thinking under both names clients read.

vLLM 0.26 sends it as `reasoning` (message and stream delta); llama.cpp's server as
`reasoning_content`, DeepSeek's name, which most clients read (LibreChat, Open WebUI,
dify, LangChain's DeepSeek integration). The gateway adds whichever is missing, so a
client gets both from either engine. Only answers that mention reasoning are parsed:
`MARK` is searched for first, in bytes.
"""

from __future__ import annotations

from typing import Any

MARK = b'"reasoning'
"""Both field names start with it."""
_NAMES = ("reasoning", "reasoning_content")


def mirror_reasoning(answer: dict[str, Any]) -> bool:
    """Give every choice's message or delta both fields; return whether any was added."""
    added = False
    choices = answer.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        for part in (choice.get("message"), choice.get("delta")):
            if not isinstance(part, dict):
                continue
            for name, other in (_NAMES, _NAMES[::-1]):
                if part.get(name) is not None and part.get(other) is None:
                    part[other] = part[name]
                    added = True
    return added
