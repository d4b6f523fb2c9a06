"""Minimal JSONL readers for chat (``messages``) and plain text (``text``) rows.

This is the foundation's reader; the data-layer issue replaces it with the full set of formats (Alpaca,
ShareGPT, preference rows, registries). Whatever replaces it keeps the contract: rows come out as canonical
records, and anything malformed raises :class:`DataError` naming file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from posttrain.data.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for every non-blank line; bad bytes or bad JSON raise DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found (expected a JSONL file, one JSON object a line)")
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(path, line_number, None, f"not UTF-8 ({error.reason} at byte {error.start})") from None
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(path, line_number, None, f"not valid JSON: {error.msg} (column {error.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, line_number, None, f"expected a JSON object, got {type(row).__name__}")
            yield line_number, row


def detect_format(path: str | Path) -> Literal["messages", "text"]:
    """The format of a file from its first row: ``messages`` (chat) or ``text`` (plain)."""
    for line_number, row in read_jsonl(path):
        if "messages" in row:
            return "messages"
        if "text" in row:
            return "text"
        raise DataError(path, line_number, None, f"cannot tell the format from keys {sorted(row)}; expected 'messages' or 'text'")
    raise DataError(path, None, None, "file has no rows")


def validate_messages(messages: Any, path: Path, line: int) -> list[dict[str, str]]:
    """Check a ``messages`` list: roles known, contents strings, at least one non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise DataError(path, line, "messages", "expected a non-empty list of {role, content} objects")
    checked = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(path, line, field, f"expected an object with role and content, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(path, line, f"{field}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(path, line, f"{field}.content", f"expected a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise DataError(path, line, f"{field}.content", "empty assistant turn (nothing to train on)")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise DataError(path, line, "messages", "no assistant turn (SFT trains on assistant turns)")
    return checked


def read_conversations(path: str | Path) -> list[list[dict[str, str]]]:
    """All conversations of a ``{"messages": [...]}`` JSONL file, validated."""
    path = Path(path)
    conversations = []
    for line, row in read_jsonl(path):
        if "messages" not in row:
            raise DataError(path, line, "messages", f"missing; row has keys {sorted(row)}")
        conversations.append(validate_messages(row["messages"], path, line))
    return conversations


def read_texts(path: str | Path) -> list[str]:
    """All documents of a ``{"text": ...}`` JSONL file."""
    path = Path(path)
    texts = []
    for line, row in read_jsonl(path):
        text = row.get("text")
        if not isinstance(text, str) or not text:
            raise DataError(path, line, "text", f"expected a non-empty string, got {type(text).__name__}")
        texts.append(text)
    return texts
