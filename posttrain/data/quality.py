"""What is in a dataset before training on it: ``posttrain data inspect``.

:func:`inspect_dataset` reads a file, folder or registry name with ``on_invalid="skip"`` and returns one report
(a JSON-ready dict); :func:`format_report` prints it as a table. The report holds:

- the detected format and record kind, rows read, records, and every invalid row (``file:line: problem``);
- length percentiles (p50/p90/p99/max, nearest rank) of the rendered sample and of its trained part, and the
  share over ``max_length``. With a tokenizer these are what SFT training computes: the chat template from
  :func:`~posttrain.data.templates.resolve_template`, :func:`~posttrain.data.tokenize.tokenize_conversation`,
  trained tokens = the targets its loss mask keeps (preferences and KTO: the answer after the prompt). Without
  one they are an offline approximation for any language (:func:`approx_tokens`): contents only, no template;
- exact and near duplicates of the prompt+response text: MinHash LSH (datasketch) over character 5-gram shingles
  of the case-folded, whitespace-collapsed text, each candidate confirmed by the Jaccard similarity of the two
  shingle sets (>= 0.8). A row counts as a duplicate when an earlier row is one, so the rate is what dedup would remove;
- role and turn statistics, chosen/rejected statistics for preferences, and the balance of ``task``,
  ``label``, ``category`` fields and KTO labels.

Every pass is linear in the rows (the LSH finds candidates without comparing all pairs).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.data.errors import DataError
from posttrain.data.formats import FILE_READERS, ReadResult
from posttrain.data.records import Conversation, Kind, Message, Preference, Prompt, Record, Text, Unpaired
from posttrain.data.registry import read_dataset, resolve_dataset
from posttrain.data.templates import resolve_template
from posttrain.data.tokenize import render, tokenize_conversation

NEAR_DUP_THRESHOLD = 0.8
SHINGLE_SIZE = 5  # characters: works for languages without spaces, where word shingles would be whole sentences
NUM_PERM = 128
MINHASH_SEED = 1
PERCENTILES = (50, 90, 99)
MAX_SHOWN = 20  # invalid rows listed in the report (all are counted)
MAX_EXAMPLES = 5  # duplicate pairs and unrenderable rows listed
MAX_VALUES = 50  # distinct values of a balance field listed
BALANCE_FIELDS = ("task", "label", "category")
APPROX_UNIT = "approx. tokens (no --tokenizer)"
APPROX_METHOD = "words + CJK/Thai characters + punctuation marks of the message contents, no chat template"

# Scripts written without spaces between words: a regex cannot find their words, and BPE tokenizers give
# roughly one token per character (CJK ideographs, kana, Hangul syllables) or per one-two characters (Thai, Lao,
# Khmer, Myanmar), so each character counts as one token.
_UNSPACED = (
    "\u0e00-\u0eff\u1000-\u109f\u1100-\u11ff\u1780-\u17ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u31ff"
    "\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0003134f"
)
_APPROX_TOKEN = re.compile(f"[{_UNSPACED}]|[^\\W{_UNSPACED}]+|[^\\w\\s]")


def approx_tokens(text: str) -> int:
    """An offline token estimate for any language: words (runs of letters/digits), plus one per CJK (or other
    unspaced-script) character, plus one per punctuation mark or symbol. ``"你好，世界 hello!"`` → 8."""
    return len(_APPROX_TOKEN.findall(text))


def percentiles(values: Sequence[int]) -> dict[str, int] | None:
    """p50/p90/p99 by nearest rank (the ceil(p/100·n)-th smallest value, an observed length) and max."""
    if not values:
        return None
    ordered = sorted(values)
    stats = {f"p{p}": ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1] for p in PERCENTILES}
    stats["max"] = ordered[-1]
    return stats


def _share(count: int, total: int) -> dict[str, float | int]:
    return {"count": count, "rate": count / total if total else 0.0}


def _place(record: Record) -> str:
    """``file:line`` of a record (for JSON lists, CSV and Parquet the line is the 1-based row)."""
    return f"{record.meta.get('source', '?')}:{record.meta.get('line', '?')}"


# ------------------------------------------------------------------------------------------------ lengths


def _message_text(message: Message) -> str:
    """What a message says: its content, its reasoning and its tool calls."""
    parts = [message.get("reasoning_content") or "", message.get("content") or ""]
    if message.get("tool_calls"):
        parts.append(json.dumps(message["tool_calls"], ensure_ascii=False))
    return "\n".join(part for part in parts if part)


def _tools_text(tools: Any) -> str:
    return "" if not tools else tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)


def _trained(message: Message) -> bool:
    return message["role"] == "assistant" and message.get("train", True) is not False


class ApproxCounter:
    """Lengths without a tokenizer: :func:`approx_tokens` of the contents (tool schemas count in the sample)."""

    unit = APPROX_UNIT
    method = APPROX_METHOD
    template: str | None = None

    def conversation(self, messages: list[Message], tools: Any) -> tuple[int, int]:
        counts = [approx_tokens(_message_text(m)) for m in messages]
        sample = sum(counts) + approx_tokens(_tools_text(tools))
        return sample, sum(count for count, m in zip(counts, messages) if _trained(m))

    def continuation(self, prompt: list[Message], completion: list[Message], tools: Any) -> tuple[int, int]:
        head = sum(approx_tokens(_message_text(m)) for m in prompt) + approx_tokens(_tools_text(tools))
        trained = sum(approx_tokens(_message_text(m)) for m in completion)
        return head + trained, trained

    def prompt(self, messages: list[Message], tools: Any) -> int:
        return self.conversation(messages, tools)[0]

    def text(self, text: str) -> int:
        return approx_tokens(text)


class TokenizerCounter:
    """Token lengths exactly as SFT training computes them: :func:`~posttrain.data.tokenize.tokenize_conversation`
    with the chat template training would use (trained tokens: the targets its loss mask keeps)."""

    unit = "tokens"

    def __init__(self, tokenizer: Any, source: str, template_override: str | None = None) -> None:

        self.tokenizer = tokenizer
        self.template, template_source = resolve_template(tokenizer, template_override)
        tokenizer.chat_template = template_source  # tokenize.* renders with apply_chat_template, as training does
        self.method = f"tokenizer {source}, chat template {self.template!r}"

    def conversation(self, messages: list[Message], tools: Any) -> tuple[int, int]:

        sequence = tokenize_conversation(self.tokenizer, messages, max_length=sys.maxsize, tools=tools)
        return len(sequence.input_ids), sequence.num_targets

    def continuation(self, prompt: list[Message], completion: list[Message], tools: Any) -> tuple[int, int]:
        # Preference and KTO losses score the answer only: the prompt's own assistant turns are context.
        context = [{**m, "train": False} if m["role"] == "assistant" else m for m in prompt]
        return self.conversation(context + completion, tools)

    def prompt(self, messages: list[Message], tools: Any) -> int:

        text = render(self.tokenizer, messages, add_generation_prompt=True, tools=tools)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text(self, text: str) -> int:
        # As tokenize_text: BOS + document + EOS (split into max_length chunks there, not truncated).
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) + (self.tokenizer.bos_token_id is not None) + (self.tokenizer.eos_token_id is not None)


LengthCounter = ApproxCounter | TokenizerCounter
"""How lengths are counted: offline approximation or a real tokenizer."""


def _measure(record: Record, counter: LengthCounter) -> dict[str, int]:
    """Lengths of one record by distribution name; names ending in ``sample`` are checked against max_length."""
    if isinstance(record, Conversation):
        sample, trained = counter.conversation(record.messages, record.tools)
        return {"sample": sample, "trained": trained}
    if isinstance(record, Preference):
        tools = record.meta.get("tools")
        chosen_sample, chosen = counter.continuation(record.prompt, record.chosen, tools)
        rejected_sample, rejected = counter.continuation(record.prompt, record.rejected, tools)
        return {
            "chosen_sample": chosen_sample,
            "rejected_sample": rejected_sample,
            "chosen": chosen,
            "rejected": rejected,
        }
    if isinstance(record, Unpaired):
        sample, trained = counter.continuation(record.prompt, record.completion, record.meta.get("tools"))
        return {"sample": sample, "trained": trained}
    if isinstance(record, Prompt):
        return {"sample": counter.prompt(record.messages, None)}  # RL: the response is generated, not read
    assert isinstance(record, Text)
    length = counter.text(record.text)
    return {"sample": length, "trained": length}


def length_stats(records: Sequence[Record], counter: LengthCounter, max_length: int) -> dict[str, Any]:
    """Percentiles of every length distribution, the share over ``max_length``, and the rows the template
    could not render (they are left out of the percentiles)."""
    lengths: dict[str, list[int]] = {}
    over = 0
    unrenderable: list[str] = []
    for record in records:
        try:
            measured = _measure(record, counter)
        # A template fails on a row in many ways (raise_exception for an unknown role, a missing key, a type
        # error in a tool schema); one such row must not abort the report, so it is listed instead.
        except Exception as error:  # noqa: BLE001
            first_line = (str(error).splitlines() or [""])[0][:200]
            unrenderable.append(f"{_place(record)}: {type(error).__name__}: {first_line}")
            continue
        for name, value in measured.items():
            lengths.setdefault(name, []).append(value)
        over += any(value > max_length for name, value in measured.items() if name.endswith("sample"))
    measured_count = len(records) - len(unrenderable)
    return {
        "unit": counter.unit,
        "method": counter.method,
        "template": counter.template,
        "max_length": max_length,
        "percentiles": {name: percentiles(values) for name, values in lengths.items()},
        "over_max_length": _share(over, measured_count),
        "unrenderable": {"count": len(unrenderable), "shown": unrenderable[:MAX_EXAMPLES]},
    }


# --------------------------------------------------------------------------------------------- duplicates


def dedup_text(record: Record) -> str:
    """The prompt+response text compared for duplicates: every message (system, tools and rejected included,
    so rows differing there are not duplicates), one per line."""
    if isinstance(record, Text):
        return record.text
    if isinstance(record, Conversation):
        messages = record.messages
    elif isinstance(record, Preference):
        messages = record.prompt + record.chosen + record.rejected
    elif isinstance(record, Unpaired):
        messages = record.prompt + record.completion
    else:
        messages = record.messages
    return "\n".join(_message_text(m) for m in messages)


def shingle_hashes(text: str) -> np.ndarray:
    """The distinct 32-bit hashes of the character 5-grams of ``text``, case-folded, whitespace runs collapsed
    to one space (a text shorter than 5 characters is one shingle). Vectorised: hashing shingles one Python
    string at a time dominated the run time on 100k rows."""
    normal = " ".join(text.casefold().split())
    codes = np.zeros(max(len(normal), SHINGLE_SIZE), dtype=np.uint64)
    codes[: len(normal)] = np.frombuffer(normal.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    count = len(codes) - SHINGLE_SIZE + 1
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(SHINGLE_SIZE):  # polynomial hash of each window, modulo 2**64 (numpy wraps)
        hashes = hashes * np.uint64(1_000_003) + codes[offset : offset + count]
    # Fibonacci hashing: the top 32 bits of a multiplicative mix, the width MinHash expects.
    return np.unique((hashes * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32))


def duplicate_stats(
    texts: Sequence[str], places: Sequence[str], threshold: float = NEAR_DUP_THRESHOLD
) -> dict[str, Any]:
    """Exact duplicates (identical text) and near duplicates (Jaccard >= ``threshold`` of character 5-gram
    shingles, exact ones included): a row counts when an earlier row is its duplicate.

    MinHash LSH proposes candidates among the rows kept so far (linear in the rows); each candidate is confirmed
    by the Jaccard similarity of the two sets of shingle hashes (exact up to 32-bit hash collisions), so the
    report has no MinHash false positives.
    """
    from datasketch import LeanMinHash, MinHash, MinHashLSH

    first_seen: dict[bytes, int] = {}
    exact: list[dict[str, Any]] = []
    near: list[dict[str, Any]] = []
    near_count = 0
    lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
    # One MinHash reused (building one costs more than hashing a row); its inputs are already 32-bit hashes.
    minhash = MinHash(num_perm=NUM_PERM, seed=MINHASH_SEED, hashfunc=int)
    kept_shingles = lru_cache(maxsize=4096)(lambda index: shingle_hashes(texts[index]))

    for index, text in enumerate(texts):
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        original = first_seen.setdefault(digest, index)
        if original != index:
            exact.append({"row": places[index], "duplicate_of": places[original]})
            near_count += 1
            continue
        shingles = shingle_hashes(text)
        minhash.clear()
        minhash.update_batch(shingles.tolist())
        signature = LeanMinHash(minhash)
        best: tuple[float, int] | None = None
        for candidate in lsh.query(signature):
            other = kept_shingles(candidate)
            common = len(np.intersect1d(shingles, other, assume_unique=True))
            jaccard = common / (len(shingles) + len(other) - common)
            if jaccard >= threshold and (best is None or (jaccard, -candidate) > (best[0], -best[1])):
                best = (jaccard, candidate)
        if best is None:
            lsh.insert(index, signature)
            continue
        near_count += 1
        near.append({"row": places[index], "similar_to": places[best[1]], "jaccard": round(best[0], 3)})
    total = len(texts)
    return {
        "text": "prompt + response (all message contents)",
        "exact": {**_share(len(exact), total), "examples": exact[:MAX_EXAMPLES]},
        "near": {
            **_share(near_count, total),
            "threshold": threshold,
            "shingles": f"character {SHINGLE_SIZE}-grams",
            "method": f"MinHash LSH ({NUM_PERM} permutations), confirmed by exact Jaccard; exact duplicates included",
            "examples": near[:MAX_EXAMPLES],
        },
    }


# ------------------------------------------------------------------------------------------------ turns


def _dialogue(record: Record) -> tuple[list[Message], Any] | None:
    """The messages a record is trained or prompted with (a preference: prompt + chosen), and its tools."""
    if isinstance(record, Conversation):
        return record.messages, record.tools
    if isinstance(record, Preference):
        return record.prompt + record.chosen, record.meta.get("tools")
    if isinstance(record, Unpaired):
        return record.prompt + record.completion, record.meta.get("tools")
    if isinstance(record, Prompt):
        return record.messages, None
    return None


def turn_stats(records: Sequence[Record]) -> dict[str, Any] | None:
    """User turns per record, roles, system prompts, multi-turn and tool use; None for text records."""
    dialogues = [d for d in map(_dialogue, records) if d is not None]
    if not dialogues:
        return None
    turns: Counter[int] = Counter()
    roles: Counter[str] = Counter()
    with_system = multi_turn = with_tool_schemas = with_tool_turns = tool_calls = untrained = 0
    for messages, tools in dialogues:
        users = sum(m["role"] == "user" for m in messages)
        turns[users] += 1
        roles.update(m["role"] for m in messages)
        with_system += bool(messages) and messages[0]["role"] == "system"
        multi_turn += users > 1
        with_tool_schemas += bool(tools)
        calls = sum(len(m.get("tool_calls") or []) for m in messages)
        tool_calls += calls
        with_tool_turns += calls > 0 or any(m["role"] == "tool" for m in messages)
        untrained += sum(m["role"] == "assistant" and m.get("train") is False for m in messages)
    total = len(dialogues)
    return {
        "records": total,
        "user_turns": {str(n): turns[n] for n in sorted(turns)},
        "messages_by_role": dict(roles.most_common()),
        "with_system": _share(with_system, total),
        "multi_turn": _share(multi_turn, total),
        "with_tool_schemas": _share(with_tool_schemas, total),
        "with_tool_turns": _share(with_tool_turns, total),
        "tool_calls": tool_calls,
        "tool_results": roles["tool"],
        "untrained_assistant_turns": untrained,
    }


def preference_stats(records: Sequence[Record]) -> dict[str, Any] | None:
    """Pairs whose chosen and rejected answers are identical (no preference signal), and margins present."""
    pairs = [r for r in records if isinstance(r, Preference)]
    if not pairs:
        return None

    def said(messages: list[Message]) -> list[tuple[str, str]]:
        return [(m["role"], _message_text(m)) for m in messages]

    identical = [_place(p) for p in pairs if said(p.chosen) == said(p.rejected)]
    return {
        "pairs": len(pairs),
        "chosen_equals_rejected": {**_share(len(identical), len(pairs)), "examples": identical[:MAX_EXAMPLES]},
        "with_margin": _share(sum(p.margin is not None for p in pairs), len(pairs)),
    }


# ----------------------------------------------------------------------------------------------- balance


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _distribution(values: Iterable[Any], total: int) -> dict[str, Any]:
    counts = Counter(_value(v) for v in values)
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return {
        "records_with_field": sum(counts.values()),
        "distinct": len(counts),
        "values": {value: _share(count, total) for value, count in top[:MAX_VALUES]},
        "other": sum(count for _value_, count in top[MAX_VALUES:]),
    }


def balance_stats(records: Sequence[Record]) -> dict[str, Any]:
    """Per-value counts of the ``task``/``label``/``category`` fields (from each record's meta) and of KTO
    labels (``desirable``/``undesirable``); only fields some record has."""
    total = len(records)
    balance: dict[str, Any] = {}
    for name in BALANCE_FIELDS:
        values = [r.meta[name] for r in records if r.meta.get(name) is not None]
        if values:
            balance[name] = _distribution(values, total)
    labels = ["desirable" if r.label else "undesirable" for r in records if isinstance(r, Unpaired)]
    if labels:
        balance["kto_label"] = _distribution(labels, total)
    return balance


# ------------------------------------------------------------------------------------------------ report


def _invalid(errors: Sequence[DataError]) -> dict[str, Any]:
    shown = [
        {
            "path": str(e.path) if e.path is not None else None,
            "line": e.line,
            "field": e.field,
            "problem": e.problem,
            "message": str(e),
        }
        for e in errors[:MAX_SHOWN]
    ]
    return {"count": len(errors), "shown": shown}


def inspect_records(
    result: ReadResult, counter: LengthCounter | None = None, max_length: int = 1024
) -> dict[str, Any]:
    """The report for records already read (see the module docstring); ``counter`` defaults to the offline
    approximation."""
    records = result.records
    return {
        "source": result.source,
        "format": result.format,
        "kind": result.kind,
        "rows_read": result.rows_read,
        "records": len(records),
        "invalid": _invalid(result.invalid),
        "lengths": length_stats(records, counter or ApproxCounter(), max_length),
        "duplicates": duplicate_stats([dedup_text(r) for r in records], [_place(r) for r in records]),
        "turns": turn_stats(records),
        "preference": preference_stats(records),
        "balance": balance_stats(records),
    }


def load_tokenizer_counter(directory: str | Path, template: str | None = None) -> TokenizerCounter:
    """A :class:`TokenizerCounter` for a local tokenizer folder (offline: never downloads)."""
    from transformers import AutoTokenizer

    path = Path(directory)
    if not path.is_dir():
        raise FileNotFoundError(f"--tokenizer {directory}: no such folder (give a local model or tokenizer directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"--tokenizer {directory}: cannot load a tokenizer there ({str(error).splitlines()[0][:200]})"
        ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise FileNotFoundError(
            f"--tokenizer {directory}: needs a fast tokenizer (tokenizer.json) for character offsets"
        )
    return TokenizerCounter(tokenizer, str(directory), template)


def inspect_dataset(
    source: str | Path,
    registry: str | Path | None = None,
    kind: Kind | None = None,
    tokenizer: str | Path | None = None,
    max_length: int = 1024,
    search_dirs: Sequence[str | Path] | None = None,
) -> dict[str, Any]:
    """Resolve ``source`` (a file, a folder, ``hf:org/name`` or a registry name; names are looked up in
    ``registry``, else a dataset_info.json in the working directory or ./data), read it keeping every valid
    row, and report on it (see the module docstring).

    Raises:
        DataError: the source cannot be found or read at all (not found, no usable rows).
        FileNotFoundError: ``tokenizer`` is not a loadable local tokenizer folder.
    """

    path = Path(source)
    if path.suffix.lower() in FILE_READERS and not path.exists():
        # A data file's name is never a registry name: say what is wrong rather than "unknown dataset".
        raise DataError(path, None, None, "file not found")
    if max_length < 1:
        raise DataError(None, None, "max_length", f"expected a positive number of tokens, got {max_length}")
    dirs = search_dirs if search_dirs is not None else [Path.cwd(), Path.cwd() / "data"]
    counter = load_tokenizer_counter(tokenizer) if tokenizer is not None else None
    result = read_dataset(resolve_dataset(source, registry, dirs), kind=kind, on_invalid="skip")
    return inspect_records(result, counter, max_length)


# ---------------------------------------------------------------------------------------------- printing


def _percent(share: dict[str, Any]) -> str:
    return f"{share['count']} ({100 * share['rate']:.1f}%)"


def _short(place: str) -> str:
    """``file:line`` with the file's name only (the full paths are in the JSON report)."""
    path, _, line = place.rpartition(":")
    return f"{Path(path).name}:{line}" if path else place


def _table(rows: list[tuple[str, str]], indent: str = "  ") -> list[str]:
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{indent}{label:<{width}}  {value}" for label, value in rows]


LENGTH_LABELS = {
    "sample": "rendered sample",
    "trained": "trained part",
    "chosen_sample": "prompt + chosen",
    "rejected_sample": "prompt + rejected",
    "chosen": "chosen (trained)",
    "rejected": "rejected (trained)",
}


def _lengths_lines(lengths: dict[str, Any]) -> list[str]:
    unit = lengths["unit"] if lengths["unit"] != "tokens" else f"tokens ({lengths['method']})"
    lines = [f"lengths in {unit}"]
    if lengths["unit"] != "tokens":
        lines.append(f"  ({lengths['method']})")
    names = [name for name, stats in lengths["percentiles"].items() if stats is not None]
    if not names:
        lines.append("  (no record could be measured)")
    label_width = max([len(LENGTH_LABELS.get(n, n)) for n in names] + [0])
    header = "".join(f"{key:>8}" for key in ("p50", "p90", "p99", "max"))
    if names:
        lines.append(f"  {'':<{label_width}}{header}")
    for name in names:
        stats = lengths["percentiles"][name]
        lines.append(
            f"  {LENGTH_LABELS.get(name, name):<{label_width}}"
            + "".join(f"{stats[key]:>8}" for key in ("p50", "p90", "p99", "max"))
        )
    lines.append(f"  over --max-length {lengths['max_length']}: {_percent(lengths['over_max_length'])}")
    unrenderable = lengths["unrenderable"]
    if unrenderable["count"]:
        lines.append(f"  not renderable with the template (left out): {unrenderable['count']}")
        lines += [f"    {line}" for line in unrenderable["shown"]]
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The report as a human-readable table."""
    lines = [f"dataset {report['source']}"]
    lines += _table(
        [
            ("format", report["format"]),
            ("record kind", report["kind"]),
            ("rows read", str(report["rows_read"])),
            ("records", str(report["records"])),
            ("invalid rows", str(report["invalid"]["count"])),
        ]
    )
    invalid = report["invalid"]
    for row in invalid["shown"]:
        lines.append(f"    {row['message']}")
    if invalid["count"] > len(invalid["shown"]):
        lines.append(f"    ... and {invalid['count'] - len(invalid['shown'])} more")

    lines += ["", *_lengths_lines(report["lengths"])]

    duplicates = report["duplicates"]
    near = duplicates["near"]
    lines += ["", f"duplicates of the {duplicates['text']}"]
    lines += _table(
        [
            ("exact", _percent(duplicates["exact"])),
            (f"near (Jaccard >= {near['threshold']}, {near['shingles']})", _percent(near)),
        ]
    )
    for example in duplicates["exact"]["examples"]:
        lines.append(f"    exact: {_short(example['row'])} = {_short(example['duplicate_of'])}")
    for example in near["examples"]:
        lines.append(
            f"    near:  {_short(example['row'])} ~ {_short(example['similar_to'])} (Jaccard {example['jaccard']})"
        )

    turns = report["turns"]
    if turns is not None:
        histogram = ", ".join(f"{n}: {count}" for n, count in turns["user_turns"].items())
        roles = ", ".join(f"{role} {count}" for role, count in turns["messages_by_role"].items())
        lines += ["", "turns"]
        lines += _table(
            [
                ("user turns per record", histogram),
                ("messages by role", roles),
                ("with a system prompt", _percent(turns["with_system"])),
                ("multi-turn", _percent(turns["multi_turn"])),
                ("with tool schemas", _percent(turns["with_tool_schemas"])),
                (
                    "with tool turns",
                    f"{_percent(turns['with_tool_turns'])}; {turns['tool_calls']} calls, {turns['tool_results']} results",
                ),
                ("untrained assistant turns", str(turns["untrained_assistant_turns"])),
            ]
        )

    preference = report["preference"]
    if preference is not None:
        lines += ["", "preference pairs"]
        lines += _table(
            [
                ("chosen == rejected", _percent(preference["chosen_equals_rejected"])),
                ("with a margin", _percent(preference["with_margin"])),
            ]
        )
        for place in preference["chosen_equals_rejected"]["examples"]:
            lines.append(f"    {_short(place)}")

    if report["balance"]:
        lines += ["", "balance"]
        for name, distribution in report["balance"].items():
            shown = list(distribution["values"].items())[:10]
            values = ", ".join(f"{value} {_percent(share)}" for value, share in shown)
            more = distribution["distinct"] - len(shown)
            lines.append(
                f"  {name} ({distribution['distinct']} values): {values}" + (f", ... {more} more" if more > 0 else "")
            )
    return "\n".join(lines)
