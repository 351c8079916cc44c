"""Chat messages as records carry them: a dict with `role` and `content`, or a `(role, content)`
pair; content is a string or a list of `{"type": "text", "text": ...}` parts."""

from __future__ import annotations

from collections.abc import Mapping


def message_role(message) -> str:
    """The role of a message given as a dict or as a `(role, content)` pair."""
    return message["role"] if isinstance(message, Mapping) else message[0]


def message_text(message) -> str:
    """A message's text: its content string, or its text parts joined."""
    content = message["content"] if isinstance(message, Mapping) else message[1]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)
