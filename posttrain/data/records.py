"""Canonical records: the one shape each stage consumes, whatever file format the rows came from.

A message is a plain dict (chat templates take dicts): ``{"role": "system"|"user"|"assistant"|"tool",
"content": str}`` plus, only when the source says so:

- ``train: bool`` — whether an assistant turn is trained (from ``train``, OpenAI ``weight`` or LLaMA-Factory
  ``loss_weight``); absent means the stage's default (every assistant turn is trained).
- ``tool_calls: [{"type": "function", "function": {"name": str, "arguments": dict}, "id"?: str}]`` on
  assistant turns (OpenAI ``tool_calls``, ShareGPT ``function_call`` turns, LLaMA-Factory ``tool_call`` parts);
  ``arguments`` is always a dict, the form HF chat templates render.
- ``reasoning_content: str`` on assistant turns (the key HF chat templates for reasoning models read).
- ``name`` / ``tool_call_id`` on tool turns.

``meta`` holds the row's fields no reader consumed (``task``, ``id``, a non-boolean ``label`` ...) plus
``source`` (the file) and ``line`` (JSONL line, or 1-based row of a JSON list / CSV / Parquet table). A row field
that is itself called ``source`` or ``line`` is kept as ``field:source`` / ``field:line``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]
Kind = Literal["conversation", "preference", "prompt", "text", "unpaired"]
KINDS: tuple[Kind, ...] = ("conversation", "preference", "prompt", "text", "unpaired")


@dataclass
class Conversation:
    """A dialogue for SFT: at least one assistant turn; ``tools`` as the source gave them (list or JSON text)."""

    messages: list[Message]
    tools: list[Any] | str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Preference:
    """A preference pair: the shared ``prompt`` turns, then the ``chosen`` and ``rejected`` continuations.

    ``margin`` is the graded-preference strength (Llama 2 reward model: how much better chosen is), from a
    ``margin`` field or ``score_chosen - score_rejected``.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prompt:
    """A prompt for RL or sampling; ``reference`` is the ground truth a rule-based reward compares with."""

    messages: list[Message]
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Text:
    """One pretraining document."""

    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Unpaired:
    """One KTO example: a completion of ``prompt`` labelled desirable (True) or undesirable (False)."""

    prompt: list[Message]
    completion: list[Message]
    label: bool
    meta: dict[str, Any] = field(default_factory=dict)


Record = Conversation | Preference | Prompt | Text | Unpaired

RECORD_TYPES: dict[Kind, type] = {
    "conversation": Conversation,
    "preference": Preference,
    "prompt": Prompt,
    "text": Text,
    "unpaired": Unpaired,
}
