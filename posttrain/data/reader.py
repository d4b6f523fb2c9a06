"""The SFT recipe's reader API, kept stable on top of :mod:`posttrain.data.formats`.

``read_conversations`` and ``read_texts`` now accept every format :func:`~posttrain.data.formats.read_records`
detects (Alpaca, ShareGPT, OpenAI messages, prompt/completion, ``.txt`` ...); anything malformed raises
:class:`DataError` naming file, line and field.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from posttrain.data.errors import DataError
from posttrain.data.formats import OPENAI, Where, check_turns, detect_file, jsonl_rows, parse_messages, read_records
from posttrain.data.records import ROLES, Conversation, Text

__all__ = ["ROLES", "detect_format", "read_conversations", "read_jsonl", "read_texts", "validate_messages"]


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for every non-blank line; bad bytes or bad JSON raise DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found (expected a JSONL file, one JSON object a line)")
    for item in jsonl_rows(path):
        if isinstance(item, DataError):
            raise item
        where, row = item
        if not isinstance(row, dict):
            raise where.error(None, f"expected a JSON object, got {type(row).__name__}")
        yield where.line or 0, row


def detect_format(path: str | Path) -> Literal["messages", "text"]:
    """``messages`` (the file holds conversations, in any chat format) or ``text`` (documents)."""
    file_format, kind = detect_file(path)
    if kind not in ("conversation", "text"):
        raise DataError(path, None, None, f"this {file_format} file holds {kind} records; expected conversations or text")
    return "text" if kind == "text" else "messages"


def validate_messages(messages: Any, path: str | Path, line: int) -> list[dict[str, Any]]:
    """Check an OpenAI ``messages`` list: roles known, contents strings, at least one non-empty assistant turn."""
    where = Where(path, line)
    return check_turns(parse_messages(messages, "messages", where, OPENAI), "dialogue", "messages", where)


def read_conversations(path: str | Path) -> list[list[dict[str, Any]]]:
    """The message lists of every conversation in a file, validated."""
    records = read_records(path, kind="conversation").records
    return [record.messages for record in records if isinstance(record, Conversation)]


def read_texts(path: str | Path) -> list[str]:
    """Every document of a file (``{"text"}`` rows, or a ``.txt`` file's non-empty lines)."""
    return [record.text for record in read_records(path, kind="text").records if isinstance(record, Text)]
