"""Dataset files → canonical records, with the row format detected per file and reported.

Entry points:

- :func:`read_records` reads one file (``.jsonl``/``.ndjson``, ``.json`` — a top-level list, or JSON Lines
  under a ``.json`` name —, ``.csv``, ``.parquet``, ``.txt`` — one document per non-empty line, as
  LLaMA-Factory reads ``wiki_demo.txt``) and returns a :class:`ReadResult`: the records, the detected
  ``format`` and record ``kind``, ``rows_read`` and the ``invalid`` rows skipped.
- :func:`records_from_rows` does the same for rows already in memory (a hub dataset, a test).
- :func:`detect_file` reports a file's format and kind from its first row without reading the rest.

Formats (``format=`` overrides detection; the first row that is an object decides, in this order):

==================  ==========================================================================================
``sharegpt``        ``{"conversations": [{"from", "value"}], "system"?, "tools"?}``; role names from ``tags``
                    (LLaMA-Factory's role_tag, content_tag, user_tag, assistant_tag, observation_tag,
                    function_tag, system_tag). ``chosen``/``rejected`` (a message or a list) make a preference.
``openai``          ``{"messages": [{"role", "content", "tool_calls"?}], "tools"?}``; content may be a list
                    of parts (OpenAI ``text``, LLaMA-Factory v1 ``text``/``reasoning``/``tool_call``).
``alpaca``          ``{"instruction", "input"?, "output", "system"?, "history"?}``; ``history`` is a list of
                    ``[user, assistant]`` pairs before the instruction; ``output: [better, worse]`` or
                    ``chosen``/``rejected`` strings make a ranking (preference) row.
``dolly``           ``{"instruction", "context"?, "response", "category"?}`` (databricks-dolly-15k): the context,
                    when not empty, follows the instruction in the user turn (as alpaca's ``input``, LLaMA-Factory's
                    mapping of Dolly); ``category`` stays in the record's meta (``posttrain data inspect`` counts
                    it). Without a ``response`` a row is a prompt.
``flat``            ``{"role": "system", "content", "user", "assistant"}`` (one exchange with a system prompt).
``preference``      ``{"prompt"?, "chosen", "rejected"}``: strings or message lists (TRL standard and
                    conversational forms); without ``prompt`` the shared leading turns of chosen and rejected
                    are the prompt (TRL's implicit prompt; also ``chosen_messages``/``rejected_messages``).
``prompt_completion``  ``{"prompt", "completion"}``: strings or message lists.
``prompt``          ``{"prompt", "reference"?}`` (RL prompts).
``text``            ``{"text"}`` (pretraining documents).
==================  ==========================================================================================

Fields every format reads when the record kind needs them: ``tools``; ``reference`` or ``answer`` (Prompt);
``kto_tag``, or a boolean ``label`` (Unpaired, KTO); ``margin``, or ``score_chosen`` and ``score_rejected``
(Preference). ``columns`` renames any field: ``{"instruction": "question", "reference": "output"}``.

The record kind (``kind=``, else inferred from the first row and then required of every row): ``text`` rows →
Text; rows with chosen/rejected → Preference; rows with a KTO label → Unpaired; rows without a final
assistant answer → Prompt; otherwise Conversation. A conversation-shaped row also reads as a Prompt (the turns
before the final assistant turn) or, with a label, as Unpaired (that final turn is the completion).

Errors: every problem is a :class:`DataError` naming file, line (the JSONL/text line; for JSON lists, CSV and
Parquet the 1-based row, said so in the message) and field. ``on_invalid="skip"`` skips bad rows and lists them
in ``ReadResult.invalid``; problems with the whole file (not found, unreadable JSON list, no usable rows) are
always raised.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from posttrain.data.errors import DataError
from posttrain.data.records import (
    KINDS,
    Conversation,
    Kind,
    Message,
    Preference,
    Prompt,
    Record,
    Text,
    Unpaired,
)

OnInvalid = Literal["error", "skip"]

SHAREGPT_TAGS: dict[str, str] = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "observation_tag": "observation",
    "function_tag": "function_call",
    "system_tag": "system",
}
"""LLaMA-Factory's ShareGPT defaults; ``tags=`` overrides any of them."""


# ---------------------------------------------------------------------------------------------- where a row is


@dataclass(frozen=True)
class Where:
    """Where a row came from; ``note`` says what ``line`` counts when it is not a file line."""

    path: str | Path | None
    line: int | None
    note: str = ""
    text_cells: bool = False  # CSV: every cell is text, so list fields may arrive as JSON text

    def error(self, field: str | None, problem: str) -> DataError:
        """A DataError at this row."""
        return DataError(self.path, self.line, field, f"{problem} ({self.note})" if self.note else problem)


RowItem = tuple[Where, Any] | DataError
"""One row from a source: its place and value, or the DataError that made it unreadable (skippable)."""


def _show(value: Any) -> str:
    """A short, safe description of a value for a message (never repr a huge or nested value)."""
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if value is None or isinstance(value, bool):
        return repr(value)
    return f"a {type(value).__name__}"


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# ----------------------------------------------------------------------------------------------------- sources


def _json_value(raw: bytes, where: Where, first: bool) -> Any:
    """Decode one JSON text; bad bytes, bad JSON and pathological nesting become DataError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise where.error(None, f"not UTF-8 ({error.reason} at byte {error.start})") from None
    if first:
        text = text.lstrip("\ufeff")  # a byte-order mark some editors write
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise where.error(None, f"not valid JSON: {error.msg} (column {error.colno})") from None
    except (ValueError, RecursionError) as error:  # integers past Python's digit limit, absurd nesting
        raise where.error(None, f"not valid JSON: {str(error)[:120]}") from None


def jsonl_rows(path: Path) -> Iterator[RowItem]:
    """Rows of a JSON Lines file, numbered by line; blank lines are not rows."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = Where(path, line_number)
            try:
                value = _json_value(raw, where, first=line_number == 1)
            except DataError as error:
                yield error
                continue
            yield where, value


def _utf8_text(path: Path, kind: str) -> str:
    """The file as text (UTF-8, a byte-order mark dropped); not UTF-8: a DataError at the line of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise DataError(
            path, line, None, f"not UTF-8 ({error.reason} at byte {error.start}); the {kind} file cannot be read"
        ) from None


def _json_rows(path: Path) -> Iterator[RowItem]:
    """Rows of a ``.json`` file: a top-level list (rows numbered from 1), one object, or JSON Lines."""
    text = _utf8_text(path, "JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            yield from jsonl_rows(path)
            return
        raise DataError(path, error.lineno, None, f"not valid JSON: {error.msg} (column {error.colno})") from None
    except (ValueError, RecursionError) as error:
        raise DataError(path, None, None, f"not valid JSON: {str(error)[:120]}") from None
    if isinstance(value, dict):
        yield Where(path, 1), value
        return
    if not isinstance(value, list):
        raise DataError(
            path, None, None, f"expected a top-level JSON list of rows (or one object per line), got {_type(value)}"
        )
    for index, row in enumerate(value, start=1):
        yield Where(path, index, f"row {index} of the JSON list"), row


def _txt_rows(path: Path) -> Iterator[RowItem]:
    """One document per non-empty line (LLaMA-Factory's reading of ``wiki_demo.txt``)."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = Where(path, line_number)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield where.error(None, f"not UTF-8 ({error.reason} at byte {error.start})")
                continue
            text = text.rstrip("\r\n")
            if line_number == 1:
                text = text.lstrip("\ufeff")
            if text.strip():
                yield where, {"text": text}


def _csv_rows(path: Path) -> Iterator[RowItem]:
    """Rows of a CSV file with a header, numbered from 1 after it; empty cells are missing values."""
    text = _utf8_text(path, "CSV")
    reader = csv.reader(io.StringIO(text, newline=""))
    limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # documents longer than the 128 KiB default are normal
    try:
        table = list(reader)
    except csv.Error as error:
        raise DataError(path, reader.line_num, None, f"not valid CSV: {error} (file line {reader.line_num})") from None
    finally:
        csv.field_size_limit(limit)
    if not table:
        return
    header = table[0]
    if len(set(header)) != len(header):
        duplicates = sorted({name for name in header if header.count(name) > 1})
        raise DataError(path, None, None, f"CSV header repeats column names {duplicates}")
    for index, cells in enumerate(table[1:], start=1):
        where = Where(path, index, f"data row {index} of the CSV, after the header", text_cells=True)
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(header):
            yield where.error(None, f"row has {len(cells)} cells, the header has {len(header)}")
            continue
        yield where, {name: (cell if cell != "" else None) for name, cell in zip(header, cells)}


def _parquet_rows(path: Path) -> Iterator[RowItem]:
    """Rows of a Parquet table, numbered from 1."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError(path, None, None, "reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        rows = parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises many types (ArrowInvalid, OSError, ...) for a damaged file
        raise DataError(
            path, None, None, f"not a readable Parquet file ({type(error).__name__}: {str(error)[:120]})"
        ) from None
    for index, row in enumerate(rows, start=1):
        yield Where(path, index, f"row {index} of the Parquet table"), row


FILE_READERS: dict[str, Callable[[Path], Iterator[RowItem]]] = {
    ".jsonl": jsonl_rows,
    ".ndjson": jsonl_rows,
    ".json": _json_rows,
    ".txt": _txt_rows,
    ".csv": _csv_rows,
    ".parquet": _parquet_rows,
}


def file_rows(path: str | Path) -> Iterator[RowItem]:
    """The rows of a data file, by its suffix; a missing or unsupported file raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found" if not path.exists() else "not a file")
    reader = FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(
            path, None, None, f"unsupported file type {path.suffix!r}; expected one of {', '.join(FILE_READERS)}"
        )
    return reader(path)


# ---------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Dialect:
    """How a source spells messages: which keys hold role and content, and what each role name means."""

    role_key: str
    content_key: str
    roles: Mapping[str, str]  # source role name → canonical role: the one place roles are mapped
    call_roles: frozenset[str] = frozenset()  # roles whose content is a tool call (ShareGPT function_call)
    hint: str = ""


OPENAI = Dialect(
    "role",
    "content",
    # "developer" is OpenAI's newer name for system; "function" its legacy name for a tool result.
    {
        "system": "system",
        "developer": "system",
        "user": "user",
        "assistant": "assistant",
        "tool": "tool",
        "function": "tool",
    },
)


def sharegpt_dialect(tags: Mapping[str, Any] | None, source: str | Path | None = None) -> Dialect:
    """The ShareGPT dialect for LLaMA-Factory ``tags`` (missing tags take the defaults)."""
    tags = dict(tags or {})
    unknown = sorted(set(tags) - set(SHAREGPT_TAGS))
    if unknown:
        raise DataError(
            source, None, "tags", f"unknown tag {unknown[0]!r}; expected some of {', '.join(SHAREGPT_TAGS)}"
        )
    merged = {**SHAREGPT_TAGS, **tags}
    bad = [name for name, value in merged.items() if not isinstance(value, str) or not value]
    if bad:
        raise DataError(source, None, f"tags.{bad[0]}", f"expected a non-empty string, got {_show(merged[bad[0]])}")
    canonical = {
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": "assistant",
        "system_tag": "system",
    }
    roles: dict[str, str] = {}
    for tag, role in canonical.items():
        if merged[tag] in roles:
            raise DataError(source, None, f"tags.{tag}", f"{merged[tag]!r} is already the name of another role")
        roles[merged[tag]] = role
    return Dialect(
        merged["role_tag"],
        merged["content_tag"],
        roles,
        frozenset({merged["function_tag"]}),
        " (set tags to map other role names)",
    )


def _text(value: Any, field: str, where: Where) -> str:
    """A string that can be written as UTF-8 (JSON escapes can smuggle in lone surrogates)."""
    if not isinstance(value, str):
        raise where.error(field, f"expected a string, got {_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise where.error(field, "string holds a lone surrogate (an invalid \\u escape)") from None
    return value


def _number(value: Any, field: str, where: Where) -> float:
    """A finite number (CSV cells: its text)."""
    if isinstance(value, str) and where.text_cells:
        try:
            value = float(value)
        except ValueError:
            raise where.error(field, f"expected a number, got {_show(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(field, f"expected a number, got {_type(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise where.error(field, "expected a finite number")
    return number


def _json_text(value: str, field: str, where: Where, what: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise where.error(field, f"{what} is not valid JSON: {_show(value)}") from None


def _tool_call(value: Any, field: str, where: Where) -> dict[str, Any]:
    """One call in the canonical form ``{"type": "function", "function": {"name", "arguments": dict}}``."""
    if not isinstance(value, dict):
        raise where.error(field, f"expected a tool call object, got {_type(value)}")
    call_id = value.get("id")
    inner = value["function"] if isinstance(value.get("function"), dict) else value  # OpenAI nests it
    name, arguments = inner.get("name"), inner.get("arguments")
    if not isinstance(name, str) or not name:
        raise where.error(f"{field}.name", f"expected the tool's name, got {_show(name)}")
    _text(name, f"{field}.name", where)
    if isinstance(arguments, str):  # OpenAI sends arguments as JSON text; templates render a dict
        arguments = _json_text(arguments, f"{field}.arguments", where, "arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise where.error(f"{field}.arguments", f"expected an object of arguments, got {_type(arguments)}")
    call: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call_id, str):
        call["id"] = call_id
    return call


def _tool_calls(value: Any, field: str, where: Where) -> list[dict[str, Any]]:
    """A list of calls from a list, one object, or their JSON text (ShareGPT function_call turns)."""
    if isinstance(value, str):
        value = _json_text(value, field, where, "tool call")
    if isinstance(value, dict):
        return [_tool_call(value, field, where)]
    if not isinstance(value, list):
        raise where.error(field, f"expected tool calls (an object or a list), got {_type(value)}")
    return [_tool_call(item, f"{field}[{index}]", where) for index, item in enumerate(value)]


UNSUPPORTED_PARTS = "text-only data layer: images, audio and video need a multimodal reader"


def _content(value: Any, field: str, where: Where) -> tuple[str, str | None, list[dict[str, Any]]]:
    """Text, reasoning and tool calls of a message's content: a string, null (OpenAI tool calls) or parts."""
    if value is None:
        return "", None, []
    if isinstance(value, str):
        return _text(value, field, where), None, []
    if not isinstance(value, list):
        raise where.error(field, f"expected a string or a list of content parts, got {_type(value)}")
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, part in enumerate(value):
        part_field = f"{field}[{index}]"
        if not isinstance(part, dict):
            raise where.error(part_field, f"expected a content part object, got {_type(part)}")
        kind = part.get("type")
        # OpenAI parts keep their text under "text", LLaMA-Factory v1 parts under "value".
        payload_key = "text" if "text" in part else "value"
        payload = part.get(payload_key)
        if kind == "text":
            texts.append(_text(payload, f"{part_field}.{payload_key}", where))
        elif kind in ("reasoning", "thinking"):
            reasoning.append(_text(payload, f"{part_field}.{payload_key}", where))
        elif kind == "tool_call":
            calls.extend(_tool_calls(payload, f"{part_field}.{payload_key}", where))
        else:
            raise where.error(
                f"{part_field}.type", f"content part type {_show(kind)} is not supported ({UNSUPPORTED_PARTS})"
            )
    return "".join(texts), ("".join(reasoning) if reasoning else None), calls


def _train_flag(raw: dict[str, Any], field: str, where: Where) -> bool | None:
    """``train`` (bool), OpenAI ``weight`` (0/1) or LLaMA-Factory ``loss_weight``; None when absent."""
    for key in ("train", "weight", "loss_weight"):
        value = raw.get(key)
        if value is None:
            continue
        if key == "train":
            if not isinstance(value, bool):
                raise where.error(f"{field}.train", f"expected true or false, got {_type(value)}")
            return value
        return _number(value, f"{field}.{key}", where) > 0
    return None


def _finish(message: Message, content_field: str, where: Where) -> Message:
    """The checks every message gets, however it was spelled."""
    if message.get("tool_calls") and message["role"] != "assistant":
        raise where.error(content_field, f"a {message['role']} turn cannot call tools; only assistant turns do")
    if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
        raise where.error(content_field, "empty assistant turn (nothing to train on)")
    return message


def text_message(role: str, value: Any, field: str, where: Where) -> Message:
    """A message from a bare string field (Alpaca ``output``, a string ``prompt`` or ``chosen``)."""
    return _finish({"role": role, "content": _text(value, field, where)}, field, where)


def parse_message(raw: Any, field: str, where: Where, dialect: Dialect = OPENAI) -> Message:
    """One message object in ``dialect`` → a canonical message (see :mod:`posttrain.data.records`)."""
    if not isinstance(raw, dict):
        raise where.error(
            field, f"expected an object with {dialect.role_key} and {dialect.content_key}, got {_type(raw)}"
        )
    role_name = raw.get(dialect.role_key)
    role = dialect.roles.get(role_name) if isinstance(role_name, str) else None
    if role is None:
        problem = "missing" if role_name is None else f"unknown role {_show(role_name)}"
        raise where.error(
            f"{field}.{dialect.role_key}", f"{problem}; expected one of {', '.join(dialect.roles)}{dialect.hint}"
        )
    content_field = f"{field}.{dialect.content_key}"
    if dialect.content_key not in raw and "tool_calls" not in raw:
        raise where.error(content_field, "missing")
    message: Message = {"role": role}
    if role_name in dialect.call_roles:
        message["content"] = ""
        message["tool_calls"] = _tool_calls(raw.get(dialect.content_key), content_field, where)
        if not message["tool_calls"]:
            raise where.error(content_field, "a function-call turn with no call")
    else:
        text, reasoning, calls = _content(raw.get(dialect.content_key), content_field, where)
        message["content"] = text
        if raw.get("tool_calls") is not None:
            calls = calls + _tool_calls(raw["tool_calls"], f"{field}.tool_calls", where)
        if raw.get("reasoning_content") is not None:
            reasoning = (reasoning or "") + _text(raw["reasoning_content"], f"{field}.reasoning_content", where)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = calls
    train = _train_flag(raw, field, where)
    if train is not None:
        message["train"] = train
    for key in ("name", "tool_call_id"):
        if isinstance(raw.get(key), str) and role == "tool":
            message[key] = _text(raw[key], f"{field}.{key}", where)
    return _finish(message, content_field, where)


def parse_messages(value: Any, field: str, where: Where, dialect: Dialect = OPENAI) -> list[Message]:
    """A non-empty list of message objects in ``dialect`` → canonical messages."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _type(value)
        raise where.error(
            field, f"expected a non-empty list of {{{dialect.role_key}, {dialect.content_key}}} objects, got {got}"
        )
    return [parse_message(item, f"{field}[{index}]", where, dialect) for index, item in enumerate(value)]


TurnsRule = Literal["dialogue", "prompt", "answer"]


def check_turns(messages: list[Message], rule: TurnsRule, field: str, where: Where) -> list[Message]:
    """The one check on a whole message list: a dialogue has an assistant turn, a prompt has a turn, an answer
    (completion, chosen, rejected) ends with an assistant turn."""
    if rule == "dialogue" and not any(m["role"] == "assistant" for m in messages):
        raise where.error(field, "no assistant turn (SFT trains on assistant turns)")
    if rule == "prompt" and not messages:
        raise where.error(field, "empty prompt (no turn before the answer)")
    if rule == "answer" and (not messages or messages[-1]["role"] != "assistant"):
        raise where.error(field, "expected the answer to end with an assistant turn")
    return messages


# -------------------------------------------------------------------------------------------------------- rows


class _Row:
    """A row seen through the format's field names (``columns`` renames them); remembers what was read."""

    def __init__(self, data: dict[str, Any], where: Where, keys: Mapping[str, tuple[str, ...]]) -> None:
        self.data, self.where, self.keys = data, where, keys
        self.used: set[str] = set()

    def key(self, name: str) -> str | None:
        """The row's key for field ``name``, if the row has it."""
        return next((key for key in self.keys.get(name, (name,)) if key in self.data), None)

    def field(self, name: str) -> str:
        """The key to name in a message: the row's, or the expected one."""
        return self.key(name) or self.keys.get(name, (name,))[0]

    def peek(self, name: str) -> Any:
        """The value of field ``name`` as :meth:`structured` would see it, without consuming it."""
        key = self.key(name)
        return None if key is None else self._decoded(self.data[key])

    def _decoded(self, value: Any) -> Any:
        # CSV cells are text, so a list field (messages, history) arrives as its JSON.
        if self.where.text_cells and isinstance(value, str) and value.lstrip()[:1] in ("[", "{"):
            try:
                return json.loads(value)
            except (ValueError, RecursionError):
                return value
        return value

    def get(self, name: str) -> Any:
        """The value of field ``name`` (None when absent), marked as consumed (kept out of ``meta``)."""
        key = self.key(name)
        if key is None:
            return None
        self.used.add(key)
        return self.data[key]

    def structured(self, name: str) -> Any:
        """Like :meth:`get`, but a CSV cell holding a JSON list or object is decoded."""
        return self._decoded(self.get(name))

    def text(self, name: str, required: bool) -> str | None:
        """A string field; absent (or null) is None unless ``required``."""
        value = self.get(name)
        if value is None:
            if required:
                raise self.missing(name)
            return None
        return _text(value, self.field(name), self.where)

    def error(self, name: str, problem: str) -> DataError:
        return self.where.error(self.field(name), problem)

    def missing(self, name: str) -> DataError:
        keys = sorted(str(key) for key in self.data)
        shown = keys if len(keys) <= 12 else keys[:12] + ["..."]
        return self.error(name, f"missing; row has keys {shown}")

    def meta(self) -> dict[str, Any]:
        """Unconsumed fields, then ``source`` and ``line`` (a row field of that name becomes ``field:NAME``)."""
        meta = {}
        for key, value in self.data.items():
            if key not in self.used:
                meta[f"field:{key}" if key in ("source", "line") else key] = value
        meta["source"] = str(self.where.path)
        meta["line"] = self.where.line
        return meta


@dataclass
class _Parsed:
    """What a format parser found: the dialogue (or a pair's shared prompt), a pair, or a document."""

    messages: list[Message]
    field: str  # the row field blamed for problems with the whole dialogue
    split: int | None = None  # where the answer starts; None: at a final assistant turn
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    text: str | None = None


@dataclass(frozen=True)
class _Options:
    dialect: Dialect  # ShareGPT's, from tags
    keys: Mapping[str, Mapping[str, tuple[str, ...]]]  # format → field → keys to look for
    explicit: frozenset[str]  # fields the caller named in columns


def _turns(row: _Row, name: str, role: str, dialect: Dialect, required: bool = True) -> list[Message] | None:
    """A string (one ``role`` message), one message object, or a message list."""
    value = row.structured(name)
    field = row.field(name)
    if value is None:
        if required:
            raise row.missing(name)
        return None
    if isinstance(value, str):
        return [text_message(role, value, field, row.where)]
    if isinstance(value, dict):
        return [parse_message(value, field, row.where, dialect)]
    return parse_messages(value, field, row.where, dialect)


def _system(row: _Row) -> list[Message]:
    system = row.text("system", required=False)
    return [{"role": "system", "content": system}] if system else []


def _dialogue(row: _Row, dialect: Dialect) -> list[Message]:
    value = row.structured("messages")
    if value is None:
        raise row.missing("messages")
    return parse_messages(value, row.field("messages"), row.where, dialect)


def _parse_sharegpt(row: _Row, options: _Options) -> _Parsed:
    messages = _dialogue(row, options.dialect)
    system = _system(row)
    if messages[0]["role"] == "system":  # LLaMA-Factory: a leading system turn overrides the system column
        system = []
    chosen = _turns(row, "chosen", "assistant", options.dialect, required=row.key("rejected") is not None)
    rejected = _turns(row, "rejected", "assistant", options.dialect, required=chosen is not None)
    return _Parsed(system + messages, row.field("messages"), chosen=chosen, rejected=rejected)


def _parse_openai(row: _Row, options: _Options) -> _Parsed:
    return _Parsed(_dialogue(row, OPENAI), row.field("messages"))


def _history(row: _Row) -> list[Message]:
    value = row.structured("history")
    field = row.field("history")
    if value is None or value == "":
        return []
    if not isinstance(value, list):
        raise row.error("history", f"expected a list of [user, assistant] pairs, got {_type(value)}")
    turns: list[Message] = []
    for index, pair in enumerate(value):
        if not isinstance(pair, list) or len(pair) != 2:
            raise row.where.error(
                f"{field}[{index}]",
                f"expected a [user, assistant] pair, got {_show(pair) if not isinstance(pair, list) else f'{len(pair)} items'}",
            )
        turns.append(text_message("user", pair[0], f"{field}[{index}][0]", row.where))
        turns.append(text_message("assistant", pair[1], f"{field}[{index}][1]", row.where))
    return turns


def _parse_alpaca(row: _Row, options: _Options) -> _Parsed:
    instruction = row.text("instruction", required=True)
    query = row.text("input", required=False)
    prompt = _system(row) + _history(row)
    # LLaMA-Factory joins instruction and input with a newline, leaving out an empty one.
    prompt.append({"role": "user", "content": "\n".join(part for part in (instruction, query) if part)})
    field = row.field("output")
    if row.key("chosen") is not None or row.key("rejected") is not None:
        if row.key("chosen") is None or row.key("rejected") is None:
            raise row.missing("rejected" if row.key("rejected") is None else "chosen")
        chosen = [text_message("assistant", row.get("chosen"), row.field("chosen"), row.where)]
        rejected = [text_message("assistant", row.get("rejected"), row.field("rejected"), row.where)]
        return _Parsed(prompt, field, chosen=chosen, rejected=rejected)
    output = row.structured("output")
    if output is None:
        return _Parsed(prompt, field, split=len(prompt))
    if isinstance(output, list):  # a ranking row: [better, worse]
        if len(output) != 2:
            raise row.error("output", f"a ranking row lists [better, worse]; got {len(output)} outputs")
        better = text_message("assistant", output[0], f"{field}[0]", row.where)
        worse = text_message("assistant", output[1], f"{field}[1]", row.where)
        return _Parsed(prompt, field, chosen=[better], rejected=[worse])
    if not isinstance(output, str):
        raise row.error("output", f"expected a string (or [better, worse] for a ranking row), got {_type(output)}")
    return _Parsed(prompt + [text_message("assistant", output, field, row.where)], field, split=len(prompt))


def _parse_dolly(row: _Row, options: _Options) -> _Parsed:
    instruction = row.text("instruction", required=True)
    context = row.text("context", required=False)
    prompt: list[Message] = [{"role": "user", "content": "\n".join(part for part in (instruction, context) if part)}]
    response = row.text("response", required=False)
    if response is None:
        return _Parsed(prompt, row.field("instruction"), split=len(prompt))
    return _Parsed(
        prompt + [text_message("assistant", response, row.field("response"), row.where)],
        row.field("response"),
        split=len(prompt),
    )


def _parse_flat(row: _Row, options: _Options) -> _Parsed:
    role = row.get("role")
    if role != "system":
        raise row.error(
            "role", f"expected 'system' (this format is {{role: system, content, user, assistant}}), got {_show(role)}"
        )
    system = row.text("content", required=False)
    user = text_message("user", row.text("user", required=True), row.field("user"), row.where)
    if row.key("assistant") is None:
        raise row.missing("assistant")
    assistant = text_message("assistant", row.get("assistant"), row.field("assistant"), row.where)
    prompt = ([{"role": "system", "content": system}] if system else []) + [user]
    return _Parsed(prompt + [assistant], row.field("assistant"), split=len(prompt))


def _common_prefix(chosen: list[Message], rejected: list[Message]) -> int:
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    return shared


def _parse_preference(row: _Row, options: _Options) -> _Parsed:
    prompt = _turns(row, "prompt", "user", OPENAI, required=False)
    chosen = _turns(row, "chosen", "assistant", OPENAI)
    rejected = _turns(row, "rejected", "assistant", OPENAI)
    assert chosen is not None and rejected is not None
    if prompt is None:  # TRL's implicit prompt: the turns chosen and rejected share
        shared = _common_prefix(chosen, rejected)
        if shared == 0:
            raise row.missing("prompt")
        if shared == len(chosen) or shared == len(rejected):
            raise row.error("chosen", "chosen and rejected do not diverge after their shared turns")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    return _Parsed(prompt, row.field("prompt"), chosen=chosen, rejected=rejected)


def _parse_prompt_completion(row: _Row, options: _Options) -> _Parsed:
    prompt = _turns(row, "prompt", "user", OPENAI)
    completion = _turns(row, "completion", "assistant", OPENAI)
    assert prompt is not None and completion is not None
    return _Parsed(prompt + completion, row.field("completion"), split=len(prompt))


def _parse_prompt(row: _Row, options: _Options) -> _Parsed:
    prompt = _turns(row, "prompt", "user", OPENAI)
    assert prompt is not None
    return _Parsed(prompt, row.field("prompt"), split=len(prompt))


def _parse_text(row: _Row, options: _Options) -> _Parsed:
    text = row.text("text", required=True)
    assert text is not None
    if not text.strip():
        raise row.error("text", "empty document")
    return _Parsed([], row.field("text"), text=text)


def _first_item(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else None


def _looks_sharegpt(row: _Row, options: _Options) -> bool:
    key = row.key("messages")
    if key is None:
        return False
    first = _first_item(row.peek("messages"))
    if isinstance(first, dict):
        return options.dialect.role_key in first
    return key == "conversations"


@dataclass(frozen=True)
class _Format:
    fields: Mapping[str, tuple[str, ...]]  # field → the keys looked for by default, first found wins
    detect: Callable[[_Row, _Options], bool]
    parse: Callable[[_Row, _Options], _Parsed]
    signature: str  # the keys that identify it, for the error when no format fits a row


def _has(*names: str) -> Callable[[_Row, _Options], bool]:
    return lambda row, options: all(row.key(name) is not None for name in names)


FORMATS: dict[str, _Format] = {
    "sharegpt": _Format(
        {
            "messages": ("conversations", "messages"),
            "system": ("system",),
            "chosen": ("chosen",),
            "rejected": ("rejected",),
        },
        _looks_sharegpt,
        _parse_sharegpt,
        "conversations (sharegpt)",
    ),
    "openai": _Format(
        {"messages": ("messages", "conversations")}, _has("messages"), _parse_openai, "messages (openai)"
    ),
    # Before alpaca: a Dolly row also has an instruction, but its answer is `response` and its input `context`.
    "dolly": _Format(
        {name: (name,) for name in ("instruction", "context", "response")},
        _has("instruction", "response"),
        _parse_dolly,
        "instruction/context/response (dolly)",
    ),
    "alpaca": _Format(
        {name: (name,) for name in ("instruction", "input", "output", "system", "history", "chosen", "rejected")},
        _has("instruction"),
        _parse_alpaca,
        "instruction/input/output (alpaca)",
    ),
    "flat": _Format(
        {name: (name,) for name in ("role", "content", "user", "assistant")},
        _has("role", "user", "assistant"),
        _parse_flat,
        "role/content/user/assistant (flat)",
    ),
    "preference": _Format(
        {
            "prompt": ("prompt",),
            "chosen": ("chosen", "chosen_messages"),
            "rejected": ("rejected", "rejected_messages"),
        },
        _has("chosen", "rejected"),
        _parse_preference,
        "prompt?/chosen/rejected (preference)",
    ),
    "prompt_completion": _Format(
        {"prompt": ("prompt",), "completion": ("completion",)},
        _has("prompt", "completion"),
        _parse_prompt_completion,
        "prompt/completion",
    ),
    "prompt": _Format({"prompt": ("prompt",)}, _has("prompt"), _parse_prompt, "prompt with reference (prompt)"),
    "text": _Format({"text": ("text",)}, _has("text"), _parse_text, "text"),
}
"""Formats in detection order: the first whose ``detect`` accepts the file's first row reads the file. Adding one
is an entry here (and a row of the module docstring's table); ``data.format`` takes its name from this table."""

COMMON_FIELDS: dict[str, tuple[str, ...]] = {
    "tools": ("tools",),
    "label": ("label", "kto_tag"),
    "reference": ("reference", "answer"),
    "margin": ("margin",),
    "score_chosen": ("score_chosen",),
    "score_rejected": ("score_rejected",),
}

FORMAT_SIGNATURES = ", ".join(spec.signature for spec in FORMATS.values())


# ------------------------------------------------------------------------------------------------ record kinds


def _split(parsed: _Parsed) -> tuple[list[Message], list[Message]]:
    """Prompt turns and answer turns of a dialogue (the answer: a final assistant turn, or the completion)."""
    split = parsed.split
    if split is None:
        has_answer = bool(parsed.messages) and parsed.messages[-1]["role"] == "assistant"
        split = len(parsed.messages) - 1 if has_answer else len(parsed.messages)
    return parsed.messages[:split], parsed.messages[split:]


def _as_bool(value: Any, where: Where) -> bool | None:
    """A boolean, or a CSV cell spelling one; None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and where.text_cells:
        return {"true": True, "1": True, "false": False, "0": False}.get(value.strip().lower())
    return None


def _label(row: _Row) -> bool:
    value = row.get("label")
    if value is None:
        raise row.missing("label")
    label = _as_bool(value, row.where)
    if label is None:
        raise row.error("label", f"expected true (desirable) or false (undesirable), got {_show(value)}")
    return label


def _has_label(row: _Row, options: _Options) -> bool:
    """A KTO label: ``kto_tag``, a column the caller named, or a boolean ``label``."""
    key = row.key("label")
    if key is None:
        return False
    return key == "kto_tag" or "label" in options.explicit or _as_bool(row.data[key], row.where) is not None


def _margin(row: _Row) -> float | None:
    margin = row.get("margin")
    if margin is not None:
        return _number(margin, row.field("margin"), row.where)
    chosen, rejected = row.get("score_chosen"), row.get("score_rejected")
    if chosen is None and rejected is None:
        return None
    if chosen is None or rejected is None:
        raise row.missing("score_rejected" if rejected is None else "score_chosen")
    return _number(chosen, row.field("score_chosen"), row.where) - _number(
        rejected, row.field("score_rejected"), row.where
    )


def _reference(row: _Row) -> str | None:
    value = row.get("reference")
    if value is None or isinstance(value, str):
        return None if value is None else _text(value, row.field("reference"), row.where)
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # numeric answers (GSM8K-style)
        _number(value, row.field("reference"), row.where)
        try:
            return str(value)
        except ValueError:  # past Python's int-to-str digit limit
            raise row.error("reference", "number too long") from None
    raise row.error("reference", f"expected a string, got {_type(value)}")


def _tools(row: _Row) -> list[Any] | str | None:
    value = row.get("tools")
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, str):
        return _text(value, row.field("tools"), row.where)
    raise row.error("tools", f"expected a list of tool schemas or their JSON text, got {_type(value)}")


def _natural_kind(parsed: _Parsed) -> str:
    return "text" if parsed.text is not None else "pair" if parsed.chosen is not None else "dialogue"


def _need(parsed: _Parsed, row: _Row, kind: Kind, allowed: tuple[str, ...]) -> None:
    found = _natural_kind(parsed)
    if found not in allowed:
        what = {
            "text": "a text document",
            "pair": "a preference pair",
            "dialogue": "a dialogue without chosen/rejected",
        }[found]
        raise row.where.error(parsed.field, f"this row is {what}, which cannot be read as a {kind} record")


def _conversation(parsed: _Parsed, row: _Row) -> Conversation:
    _need(parsed, row, "conversation", ("dialogue",))
    return Conversation(check_turns(parsed.messages, "dialogue", parsed.field, row.where), _tools(row))


def _prompt(parsed: _Parsed, row: _Row) -> Prompt:
    _need(parsed, row, "prompt", ("dialogue", "pair"))
    prompt, _answer = _split(parsed) if parsed.chosen is None else (parsed.messages, [])
    return Prompt(check_turns(prompt, "prompt", parsed.field, row.where), _reference(row))


def _unpaired(parsed: _Parsed, row: _Row) -> Unpaired:
    _need(parsed, row, "unpaired", ("dialogue",))
    prompt, completion = _split(parsed)
    check_turns(prompt, "prompt", parsed.field, row.where)
    check_turns(completion, "answer", parsed.field, row.where)
    return Unpaired(prompt, completion, _label(row))


def _preference(parsed: _Parsed, row: _Row) -> Preference:
    _need(parsed, row, "preference", ("pair",))
    assert parsed.chosen is not None and parsed.rejected is not None
    check_turns(parsed.messages, "prompt", parsed.field, row.where)
    check_turns(parsed.chosen, "answer", row.field("chosen"), row.where)
    check_turns(parsed.rejected, "answer", row.field("rejected"), row.where)
    return Preference(parsed.messages, parsed.chosen, parsed.rejected, _margin(row))


def _text_record(parsed: _Parsed, row: _Row) -> Text:
    _need(parsed, row, "text", ("text",))
    assert parsed.text is not None
    return Text(parsed.text)


BUILDERS: dict[Kind, Callable[[_Parsed, _Row], Record]] = {
    "conversation": _conversation,
    "prompt": _prompt,
    "unpaired": _unpaired,
    "preference": _preference,
    "text": _text_record,
}


def _infer_kind(parsed: _Parsed, row: _Row, options: _Options) -> Kind:
    natural = _natural_kind(parsed)
    if natural == "text":
        return "text"
    if natural == "pair":
        return "preference"
    if _has_label(row, options):
        return "unpaired"
    return "conversation" if _split(parsed)[1] else "prompt"


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class ReadResult:
    """What :func:`read_records` found: records of one ``kind``, the ``format`` detected (or given), the
    ``invalid`` rows skipped (``on_invalid="skip"``) and how many rows the source had."""

    records: list[Record]
    format: str
    kind: Kind
    invalid: list[DataError]
    rows_read: int
    source: str

    def summary(self) -> str:
        """One line for the log: ``data.json: format alpaca, 999 rows → 999 conversation records, 0 skipped``."""
        line = f"{self.source}: format {self.format}, {self.rows_read} rows → {len(self.records)} {self.kind} records, {len(self.invalid)} skipped"
        return line + (f" (first: {self.invalid[0]})" if self.invalid else "")


def _close(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""


def _options(source: str | Path | None, kind: Any, format: Any, columns: Any, tags: Any, on_invalid: Any) -> _Options:
    """Check the caller's arguments (a typo is a DataError with the close names) and resolve field keys."""
    if format != "auto" and format not in FORMATS:
        raise DataError(
            source,
            None,
            "format",
            f"unknown format {format!r}{_close(str(format), FORMATS)}; expected auto or one of {', '.join(FORMATS)}",
        )
    if kind is not None and kind not in KINDS:
        raise DataError(source, None, "kind", f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if on_invalid not in ("error", "skip"):
        raise DataError(source, None, "on_invalid", f"expected 'error' or 'skip', got {on_invalid!r}")
    columns = dict(columns or {})
    known = set(COMMON_FIELDS).union(*(spec.fields for spec in FORMATS.values()))
    for name, key in columns.items():
        if name not in known:
            raise DataError(
                source,
                None,
                f"columns.{name}",
                f"unknown field{_close(str(name), known)}; fields: {', '.join(sorted(known))}",
            )
        if not isinstance(key, str) or not key:
            raise DataError(source, None, f"columns.{name}", f"expected the row's key (a string), got {_show(key)}")
    keys = {
        name: {
            field: ((columns[field],) if field in columns else defaults)
            for field, defaults in {**spec.fields, **COMMON_FIELDS}.items()
        }
        for name, spec in FORMATS.items()
    }
    return _Options(sharegpt_dialect(tags, source), keys, frozenset(columns))


def _detect(data: dict[str, Any], where: Where, options: _Options) -> str:
    for name, spec in FORMATS.items():
        if spec.detect(_Row(data, where, options.keys[name]), options):
            return name
    keys = sorted(str(key) for key in data)
    raise where.error(
        None,
        f"cannot tell the format from keys {keys[:12]}; expected one of: {FORMAT_SIGNATURES} (or pass format= and columns=)",
    )


def records_from_rows(
    rows: Iterable[RowItem],
    source: str | Path | None,
    kind: Kind | None = None,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    on_invalid: OnInvalid = "error",
    limit: int | None = None,
) -> ReadResult:
    """Convert rows (``(Where, value)`` pairs, or DataErrors for unreadable rows) to canonical records.

    The first row that is an object fixes the format (unless ``format`` is given) and, with ``kind=None``, the
    record kind; every later row must fit both. ``limit`` stops after that many records.
    """
    options = _options(source, kind, format, columns, tags, on_invalid)
    format_name: str | None = None if format == "auto" else format
    file_kind: Kind | None = kind
    records: list[Record] = []
    invalid: list[DataError] = []
    rows_read = 0
    for item in rows:
        rows_read += 1
        try:
            if isinstance(item, DataError):
                raise item
            where, data = item
            if not isinstance(data, dict):
                raise where.error(None, f"expected a JSON object, got {_type(data)}")
            name = format_name or _detect(data, where, options)
            row = _Row(data, where, options.keys[name])
            parsed = FORMATS[name].parse(row, options)
            record_kind = file_kind or _infer_kind(parsed, row, options)
            record = BUILDERS[record_kind](parsed, row)
            record.meta = row.meta()
        except DataError as error:
            if on_invalid == "error":
                raise
            invalid.append(error)
            continue
        format_name, file_kind = name, record_kind
        records.append(record)
        if limit is not None and len(records) >= limit:
            break
    if rows_read == 0:
        raise DataError(source, None, None, "no rows (the file is empty)")
    if not records:
        raise DataError(
            source, None, None, f"no usable rows: all {rows_read} rows are invalid; the first: {invalid[0]}"
        )
    assert format_name is not None and file_kind is not None
    return ReadResult(records, format_name, file_kind, invalid, rows_read, str(source))


def read_records(
    path: str | Path,
    kind: Kind | None = None,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
    on_invalid: OnInvalid = "error",
) -> ReadResult:
    """Read a data file into canonical records (see the module docstring for formats, kinds and errors).

    ``kind``: conversation | preference | prompt | text | unpaired, or None to infer it from the first row.
    ``format``: ``auto`` or a name in :data:`FORMATS`. ``columns``: field → the file's key. ``tags``: ShareGPT
    role tags. ``on_invalid``: ``error`` raises at the first bad row, ``skip`` collects them in ``invalid``.
    """
    return records_from_rows(file_rows(path), path, kind, format, columns, tags, on_invalid)


def detect_file(
    path: str | Path,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, Kind]:
    """The format and record kind of a file, from its first row (the rest is not read)."""
    result = records_from_rows(file_rows(path), path, None, format, columns, tags, "error", limit=1)
    return result.format, result.kind
