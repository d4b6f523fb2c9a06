"""Convenience reader kept for callers that want plain message lists: every chat format that
:func:`~posttrain.data.formats.read_records` detects, validated, malformed rows raising :class:`DataError`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.data.formats import read_records
from posttrain.data.records import Conversation

__all__ = ["read_conversations"]


def read_conversations(path: str | Path) -> list[list[dict[str, Any]]]:
    """The message lists of every conversation in a file, validated."""
    records = read_records(path, kind="conversation").records
    return [record.messages for record in records if isinstance(record, Conversation)]
