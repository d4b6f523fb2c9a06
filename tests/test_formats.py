"""Readers → canonical records: every format by a hand-written row and its exact record, file types, role tags,
history, margins, skip mode, error messages (file:line and field), and fuzzing (only DataError may escape)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from posttrain.data.errors import DataError
from posttrain.data.formats import FORMATS, ReadResult, Where, detect_file, read_records, records_from_rows
from posttrain.data.records import KINDS, Conversation, Preference, Prompt, Text, Unpaired

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def read_one(tmp_path: Path, row: dict[str, Any], **kwargs: Any) -> tuple[Any, ReadResult]:
    result = read_records(write_jsonl(tmp_path / "d.jsonl", [row]), **kwargs)
    assert result.rows_read == 1 and len(result.records) == 1 and not result.invalid
    return result.records[0], result


def meta(tmp_path: Path, line: int = 1, **extra: Any) -> dict[str, Any]:
    return {**extra, "source": str(tmp_path / "d.jsonl"), "line": line}


U = {"role": "user", "content": "What is 2+2?"}
A = {"role": "assistant", "content": "4"}


# ------------------------------------------------------------------------------------------ one row per format


def test_openai_messages_keep_tools_and_tool_calls(tmp_path: Path) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            U,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
                ],
            },
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
            {"role": "assistant", "content": "4", "weight": 1},
        ],
        "tools": tools,
        "task": "arith",
    }
    record, result = read_one(tmp_path, row)
    assert (result.format, result.kind) == ("openai", "conversation")
    assert record == Conversation(
        messages=[
            {"role": "system", "content": "Be brief."},
            U,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}, "id": "c1"}
                ],
            },
            {"role": "tool", "content": "4", "tool_call_id": "c1"},
            {"role": "assistant", "content": "4", "train": True},
        ],
        tools=tools,
        meta=meta(tmp_path, task="arith"),
    )


def test_llamafactory_v1_content_parts(tmp_path: Path) -> None:
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Weather?"}], "loss_weight": 0.0},
            {
                "role": "assistant",
                "content": [
                    {"type": "reasoning", "value": "Need the tool."},
                    {"type": "tool_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
                ],
            },
            {"role": "tool", "content": [{"type": "text", "value": "rain"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "It rains."}], "loss_weight": 1.0},
        ],
        "tools": '[{"name": "weather"}]',
    }
    record, _ = read_one(tmp_path, row)
    assert record.messages == [
        {"role": "user", "content": "Weather?", "train": False},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "Need the tool.",
            "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "It rains.", "train": True},
    ]
    assert record.tools == '[{"name": "weather"}]'


def test_sharegpt_default_tags_system_function_call_observation(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "human", "value": "Weather in Oslo?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Oslo"}}'},
            {"from": "observation", "value": "rain"},
            {"from": "gpt", "value": "It rains."},
        ],
        "system": "You are helpful.",
        "tools": '[{"name": "weather"}]',
    }
    record, result = read_one(tmp_path, row)
    assert (result.format, result.kind) == ("sharegpt", "conversation")
    assert record == Conversation(
        messages=[
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}],
            },
            {"role": "tool", "content": "rain"},
            {"role": "assistant", "content": "It rains."},
        ],
        tools='[{"name": "weather"}]',
        meta=meta(tmp_path),
    )


def test_sharegpt_leading_system_turn_overrides_system_column(tmp_path: Path) -> None:
    row = {
        "conversations": [
            {"from": "system", "value": "turn"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "yo"},
        ],
        "system": "column",
    }
    record, _ = read_one(tmp_path, row)
    assert [m["content"] for m in record.messages] == ["turn", "hi", "yo"]


def test_sharegpt_role_tags_are_configurable(tmp_path: Path) -> None:
    tags = {
        "role_tag": "speaker",
        "content_tag": "text",
        "user_tag": "U",
        "assistant_tag": "A",
        "system_tag": "S",
        "observation_tag": "OBS",
        "function_tag": "CALL",
    }
    row = {
        "dialog": [
            {"speaker": "S", "text": "sys"},
            {"speaker": "U", "text": "hi"},
            {"speaker": "CALL", "text": '[{"name": "f", "arguments": {}}]'},
            {"speaker": "OBS", "text": "ok"},
            {"speaker": "A", "text": "done"},
        ]
    }
    record, result = read_one(tmp_path, row, format="sharegpt", columns={"messages": "dialog"}, tags=tags)
    assert record.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
        },
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "done"},
    ]
    # Auto-detection follows the tags too: a "messages" list spelled with role/content tags is ShareGPT then.
    lf_tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    record, result = read_one(tmp_path, {"messages": [U, A]}, tags=lf_tags)
    assert result.format == "sharegpt" and record.messages == [U, A]
    with pytest.raises(
        DataError,
        match=r"d.jsonl:1: field 'dialog\[1\].speaker': unknown role 'human'; expected one of U, A, OBS, CALL, S \(set tags",
    ):
        read_records(
            write_jsonl(
                tmp_path / "d.jsonl", [{"dialog": [{"speaker": "U", "text": "x"}, {"speaker": "human", "text": "y"}]}]
            ),
            format="sharegpt",
            columns={"messages": "dialog"},
            tags=tags,
        )


def test_dolly_context_is_the_input_and_category_stays_in_meta(tmp_path: Path) -> None:
    """databricks-dolly-15k rows (instruction, context, response, category) are their own format: the context
    follows the instruction in the user turn (alpaca's input, LLaMA-Factory's mapping), an empty context is left
    out, and category is kept in the record's meta for balance reports."""
    rows = [
        {
            "instruction": "When did Virgin Australia start operating?",
            "context": "Virgin Australia commenced services on 31 August 2000.",
            "response": "On 31 August 2000.",
            "category": "closed_qa",
        },
        {
            "instruction": "Name three primary colours.",
            "context": "",
            "response": "Red, yellow and blue.",
            "category": "open_qa",
        },
    ]
    result = read_records(write_jsonl(tmp_path / "d.jsonl", rows))
    assert (result.format, result.kind, result.rows_read) == ("dolly", "conversation", 2)
    assert result.records[0] == Conversation(
        messages=[
            {
                "role": "user",
                "content": "When did Virgin Australia start operating?\nVirgin Australia commenced services on 31 August 2000.",
            },
            {"role": "assistant", "content": "On 31 August 2000."},
        ],
        meta=meta(tmp_path, category="closed_qa"),
    )
    assert result.records[1].messages == [
        {"role": "user", "content": "Name three primary colours."},
        {"role": "assistant", "content": "Red, yellow and blue."},
    ]
    assert result.records[1].meta["category"] == "open_qa"
    assert detect_file(tmp_path / "d.jsonl") == ("dolly", "conversation")
    # The same rows as RL prompts: the instruction and context, without the response.
    prompt = read_records(tmp_path / "d.jsonl", kind="prompt").records[0]
    assert prompt == Prompt(messages=[result.records[0].messages[0]], meta=meta(tmp_path, category="closed_qa"))


def test_alpaca_with_system_input_and_history(tmp_path: Path) -> None:
    row = {
        "instruction": "Add these.",
        "input": "2 and 2",
        "output": "4",
        "system": "You are a calculator.",
        "history": [["What is 1+1?", "2"], ["And 1+2?", "3"]],
        "id": 7,
    }
    record, result = read_one(tmp_path, row)
    assert (result.format, result.kind) == ("alpaca", "conversation")
    assert record == Conversation(
        messages=[
            {"role": "system", "content": "You are a calculator."},
            {"role": "user", "content": "What is 1+1?"},
            {"role": "assistant", "content": "2"},
            {"role": "user", "content": "And 1+2?"},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "Add these.\n2 and 2"},
            {"role": "assistant", "content": "4"},
        ],
        meta=meta(tmp_path, id=7),
    )
    record, _ = read_one(tmp_path, {"instruction": "Hi", "input": "", "output": "Hello"})
    assert record.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_alpaca_ranking_rows_become_preferences(tmp_path: Path) -> None:
    record, result = read_one(tmp_path, {"instruction": "Q", "input": "", "output": ["good", "bad"], "margin": 2})
    assert (result.format, result.kind) == ("alpaca", "preference")
    assert record == Preference(
        prompt=[{"role": "user", "content": "Q"}],
        chosen=[{"role": "assistant", "content": "good"}],
        rejected=[{"role": "assistant", "content": "bad"}],
        margin=2.0,
        meta=meta(tmp_path),
    )
    record, _ = read_one(tmp_path, {"instruction": "Q", "chosen": "good", "rejected": "bad"})
    assert (record.chosen, record.rejected, record.margin) == (
        [{"role": "assistant", "content": "good"}],
        [{"role": "assistant", "content": "bad"}],
        None,
    )


def test_alpaca_kto_tag_becomes_unpaired(tmp_path: Path) -> None:
    record, result = read_one(tmp_path, {"instruction": "Q", "output": "A", "kto_tag": False})
    assert (result.format, result.kind) == ("alpaca", "unpaired")
    assert record == Unpaired(
        prompt=[{"role": "user", "content": "Q"}],
        completion=[{"role": "assistant", "content": "A"}],
        label=False,
        meta=meta(tmp_path),
    )


def test_flat_system_user_assistant_row(tmp_path: Path) -> None:
    record, result = read_one(
        tmp_path, {"role": "system", "content": "Be kind.", "user": "Hi", "assistant": "Hello!", "task": "greet"}
    )
    assert result.format == "flat"
    assert record == Conversation(
        messages=[
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
        ],
        meta=meta(tmp_path, task="greet"),
    )


def test_prompt_completion_strings_and_conversational(tmp_path: Path) -> None:
    record, result = read_one(tmp_path, {"prompt": "2+2=", "completion": "4"})
    assert (result.format, result.kind) == ("prompt_completion", "conversation")
    assert record.messages == [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
    record, _ = read_one(tmp_path, {"prompt": [{"role": "system", "content": "s"}, U], "completion": [A]})
    assert record.messages == [{"role": "system", "content": "s"}, U, A]


def test_trl_unpaired_rows(tmp_path: Path) -> None:
    record, result = read_one(tmp_path, {"prompt": "2+2=", "completion": "5", "label": False})
    assert (result.format, result.kind) == ("prompt_completion", "unpaired")
    assert record == Unpaired(
        [{"role": "user", "content": "2+2="}], [{"role": "assistant", "content": "5"}], False, meta(tmp_path)
    )
    record, result = read_one(tmp_path, {"messages": [U, A], "label": True})
    assert (result.format, result.kind) == ("openai", "unpaired")
    assert (record.prompt, record.completion, record.label) == ([U], [A], True)
    # A label that is not a boolean is just a field: it stays in meta.
    record, result = read_one(tmp_path, {"messages": [U, A], "label": "math"})
    assert result.kind == "conversation" and record.meta["label"] == "math"


def test_preference_strings_conversational_and_implicit_prompt(tmp_path: Path) -> None:
    record, result = read_one(tmp_path, {"prompt": "2+2?", "chosen": "4", "rejected": "5", "task": "arith"})
    assert (result.format, result.kind) == ("preference", "preference")
    assert record == Preference(
        prompt=[{"role": "user", "content": "2+2?"}],
        chosen=[{"role": "assistant", "content": "4"}],
        rejected=[{"role": "assistant", "content": "5"}],
        margin=None,
        meta=meta(tmp_path, task="arith"),
    )
    record, _ = read_one(tmp_path, {"prompt": [U], "chosen": [A], "rejected": [{"role": "assistant", "content": "5"}]})
    assert (record.prompt, record.chosen, record.rejected) == ([U], [A], [{"role": "assistant", "content": "5"}])
    # TRL's implicit prompt: chosen and rejected are whole conversations sharing their first turns.
    system = {"role": "system", "content": "s"}
    record, _ = read_one(
        tmp_path, {"chosen": [system, U, A], "rejected": [system, U, {"role": "assistant", "content": "5"}]}
    )
    assert (record.prompt, record.chosen, record.rejected) == (
        [system, U],
        [A],
        [{"role": "assistant", "content": "5"}],
    )
    record, _ = read_one(
        tmp_path, {"chosen_messages": [U, A], "rejected_messages": [U, {"role": "assistant", "content": "5"}]}
    )
    assert record.prompt == [U]


def test_margin_from_margin_or_scores(tmp_path: Path) -> None:
    record, _ = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5})
    assert record.margin == 1.5
    record, _ = read_one(
        tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 8, "score_rejected": 5.5}
    )
    assert record.margin == 2.5
    with pytest.raises(DataError, match=r"field 'score_rejected': missing"):
        read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 8})
    with pytest.raises(DataError, match=r"field 'margin': expected a number, got str"):
        read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"})


def test_sharegpt_ranking_rows(tmp_path: Path) -> None:
    row = {
        "conversations": [{"from": "human", "value": "Q"}],
        "chosen": {"from": "gpt", "value": "good"},
        "rejected": {"from": "gpt", "value": "bad"},
    }
    record, result = read_one(tmp_path, row)
    assert (result.format, result.kind) == ("sharegpt", "preference")
    assert (record.prompt, record.chosen, record.rejected) == (
        [{"role": "user", "content": "Q"}],
        [{"role": "assistant", "content": "good"}],
        [{"role": "assistant", "content": "bad"}],
    )


def test_prompts_for_rl(tmp_path: Path) -> None:
    record, result = read_one(tmp_path, {"messages": [U], "reference": "4", "task": "arith"})
    assert (result.format, result.kind) == ("openai", "prompt")
    assert record == Prompt(messages=[U], reference="4", meta=meta(tmp_path, task="arith"))
    record, result = read_one(tmp_path, {"prompt": "2+2?", "answer": 4})
    assert (result.format, result.kind) == ("prompt", "prompt")
    assert (record.messages, record.reference) == ([{"role": "user", "content": "2+2?"}], "4")
    # Any conversation reads as a prompt: the turns before the final answer; the answer can be the reference.
    record, _ = read_one(
        tmp_path, {"instruction": "2+2?", "output": "4"}, kind="prompt", columns={"reference": "output"}
    )
    assert (record.messages, record.reference) == ([{"role": "user", "content": "2+2?"}], "4")


def test_text_jsonl_and_txt(tmp_path: Path) -> None:
    record, result = read_one(tmp_path, {"text": "A document.", "url": "u"})
    assert (result.format, result.kind) == ("text", "text")
    assert record == Text("A document.", meta(tmp_path, url="u"))
    path = tmp_path / "wiki.txt"
    path.write_text("First doc.\n\n   \nSecond doc.\r\n", encoding="utf-8")
    result = read_records(path)
    assert [(r.text, r.meta["line"]) for r in result.records] == [("First doc.", 1), ("Second doc.", 4)]
    assert (result.format, result.kind, result.rows_read) == ("text", "text", 2)


def test_columns_rename_fields(tmp_path: Path) -> None:
    record, result = read_one(
        tmp_path, {"question": "Q", "answer": "A"}, columns={"instruction": "question", "output": "answer"}
    )
    assert result.format == "alpaca" and record.messages == [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    with pytest.raises(DataError, match=r"field 'columns.instrution': unknown field \(did you mean 'instruction'\?\)"):
        read_one(tmp_path, {"question": "Q"}, columns={"instrution": "question"})


def test_format_override_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'instruction': missing; row has keys \['messages'\]"):
        read_one(tmp_path, {"messages": [U, A]}, format="alpaca")
    with pytest.raises(DataError, match=r"unknown format 'shargpt' \(did you mean 'sharegpt'\?\)"):
        read_one(tmp_path, {"messages": [U, A]}, format="shargpt")


def test_detect_file_reads_only_the_first_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "output": "A"}, {"broken": True}])
    assert detect_file(path) == ("alpaca", "conversation")


# ------------------------------------------------------------------------------------------------- file types

ROWS = [
    {"instruction": "Add.", "input": "1 1", "output": "2", "history": [["hi", "hello"]]},
    {"instruction": "Sub.", "input": "", "output": "0", "history": []},
]
EXPECTED = [
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add.\n1 1"},
        {"role": "assistant", "content": "2"},
    ],
    [{"role": "user", "content": "Sub."}, {"role": "assistant", "content": "0"}],
]


def test_json_list_jsonl_csv_parquet_give_the_same_records(tmp_path: Path) -> None:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps(ROWS), encoding="utf-8")
    write_jsonl(tmp_path / "d.jsonl", ROWS)
    with (tmp_path / "d.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(ROWS[0]))
        writer.writeheader()
        writer.writerows({**row, "history": json.dumps(row["history"])} for row in ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    for name in ("d.json", "d.jsonl", "d.csv", "d.parquet"):
        result = read_records(tmp_path / name)
        assert (result.format, result.kind, result.rows_read) == ("alpaca", "conversation", 2), name
        assert [r.messages for r in result.records] == EXPECTED, name
        assert [r.meta for r in result.records] == [{"source": str(tmp_path / name), "line": n} for n in (1, 2)], name


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.json", ROWS)
    assert [r.messages for r in read_records(path).records] == EXPECTED


def test_csv_labels_and_margins_are_parsed_from_text(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label\nhi,yo,true\nhi,meh,False\n", encoding="utf-8")
    assert [r.label for r in read_records(path).records] == [True, False]
    path.write_text("prompt,chosen,rejected,margin\np,a,b,0.5\n", encoding="utf-8")
    assert read_records(path).records[0].margin == 0.5


# ----------------------------------------------------------------------------------------------- bad input

GOOD = {"messages": [U, A]}


@pytest.mark.parametrize(
    "row, field, problem",
    [
        (
            {"messages": [U, {"role": "robot", "content": "x"}]},
            "messages[1].role",
            "unknown role 'robot'; expected one of system, developer, user, assistant, tool, function",
        ),
        ({"messages": [U, {"role": "assistant", "content": "  "}]}, "messages[1].content", "empty assistant turn"),
        (
            {"messages": [U, {"role": "assistant", "content": 3}]},
            "messages[1].content",
            "expected a string or a list of content parts, got int",
        ),
        ({"messages": "hello"}, "messages", "expected a non-empty list of {role, content} objects, got str"),
        ({"messages": [U]}, "messages", "no assistant turn"),
        ({"prompt": "x"}, "messages", "missing; row has keys ['prompt']"),
        (
            {"messages": [U, {"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}, A]},
            "messages[1].content",
            "a user turn cannot call tools",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": "", "tool_calls": [{"name": ""}]}]},
            "messages[1].tool_calls[0].name",
            "expected the tool's name",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": [{"type": "image_url", "value": "x.jpg"}]}]},
            "messages[1].content[0].type",
            "content part type 'image_url' is not supported",
        ),
        (
            {"messages": [U, {"role": "assistant", "content": "ok", "train": "yes"}]},
            "messages[1].train",
            "expected true or false, got str",
        ),
        ({"messages": [U, {"role": "assistant", "content": "\ud800"}]}, "messages[1].content", "lone surrogate"),
        (
            {"chosen": "a", "rejected": "b", "prompt": "p"},
            "messages",
            "missing; row has keys ['chosen', 'prompt', 'rejected']",
        ),
        ([1, 2], None, "expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, row: Any, field: str | None, problem: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, row])
    with pytest.raises(DataError) as error:
        read_records(path)
    assert (error.value.line, error.value.field) == (2, field)
    assert problem in str(error.value)
    assert str(error.value).startswith(f"{path}:2: ")


@pytest.mark.parametrize(
    "row, field, problem",
    [
        ({"instruction": "Q", "output": ""}, "output", "empty assistant turn"),
        (
            {"instruction": "Q", "output": 4},
            "output",
            "expected a string (or [better, worse] for a ranking row), got int",
        ),
        (
            {"instruction": "Q", "output": ["a", "b", "c"]},
            "output",
            "a ranking row lists [better, worse]; got 3 outputs",
        ),
        (
            {"instruction": "Q", "output": "A", "history": [["u"]]},
            "history[0]",
            "expected a [user, assistant] pair, got 1 items",
        ),
        ({"instruction": "Q", "output": "A", "history": [["u", ""]]}, "history[0][1]", "empty assistant turn"),
        ({"instruction": 5, "output": "A"}, "instruction", "expected a string, got int"),
        ({"instruction": "Q"}, "output", "no assistant turn"),
    ],
)
def test_json_list_errors_say_which_row(tmp_path: Path, row: dict[str, Any], field: str, problem: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "Q", "output": "A"}] * 2 + [row]), encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_records(path)
    assert (error.value.line, error.value.field) == (3, field)
    assert str(error.value).startswith(f"{path}:3: field {field!r}: ")
    assert problem in str(error.value) and str(error.value).endswith("(row 3 of the JSON list)")


def test_sharegpt_errors_use_the_tag_names(tmp_path: Path) -> None:
    row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "bot", "value": "A"}]}
    with pytest.raises(
        DataError,
        match=r"d.jsonl:1: field 'conversations\[1\].from': unknown role 'bot'; expected one of human, gpt, observation, function_call, system \(set tags",
    ):
        read_one(tmp_path, row)
    row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": "not json"}]}
    with pytest.raises(DataError, match=r"field 'conversations\[1\].value': tool call is not valid JSON"):
        read_one(tmp_path, row)


def test_non_utf8_and_not_json(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 \(invalid start byte at byte 0\)"):
        read_records(path)
    path.write_bytes(json.dumps(GOOD).encode() + b"\n{not json\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON: Expecting property name"):
        read_records(path)
    listing = tmp_path / "d.json"
    listing.write_bytes(b'[{"text": "a"},\n {"text": "\xff"}]')
    with pytest.raises(DataError, match=r"d.json:2: not UTF-8 .*the JSON file cannot be read"):
        read_records(listing)
    listing.write_text('[{"text": "a"},\n {"text": ]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d.json:2: not valid JSON: Expecting value"):
        read_records(listing)
    listing.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(DataError, match=r"expected a top-level JSON list of rows"):
        read_records(listing)


def test_whole_file_problems(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing.jsonl: file not found"):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"unsupported file type '.xml'"):
        read_records(tmp_path / "d.xml")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"e.jsonl: no rows \(the file is empty\)"):
        read_records(tmp_path / "e.jsonl")
    with pytest.raises(
        DataError,
        match=r"d.jsonl:1: cannot tell the format from keys \['foo'\]; expected one of: conversations \(sharegpt\)",
    ):
        read_one(tmp_path, {"foo": 1})
    (tmp_path / "d.csv").write_text("instruction,output\nQ,A,extra\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"d.csv:1: row has 3 cells, the header has 2 \(data row 1 of the CSV, after the header\)"
    ):
        read_records(tmp_path / "d.csv")
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"d.parquet: not a readable Parquet file"):
        read_records(tmp_path / "d.parquet")


def test_kind_must_fit_the_rows(tmp_path: Path) -> None:
    with pytest.raises(
        DataError,
        match=r"d.jsonl:1: field 'prompt': this row is a preference pair, which cannot be read as a conversation record",
    ):
        read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"}, kind="conversation")
    with pytest.raises(
        DataError,
        match=r"d.jsonl:1: field 'text': this row is a text document, which cannot be read as a prompt record",
    ):
        read_one(tmp_path, {"text": "doc"}, kind="prompt")
    record, _ = read_one(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b"}, kind="prompt")
    assert record.messages == [{"role": "user", "content": "p"}]


def test_rows_must_keep_the_first_rows_kind(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"messages": [U]}])
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'messages': no assistant turn"):
        read_records(path)
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'label': missing"):
        read_records(path, kind="unpaired")


def test_skip_mode_counts_and_reports(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps(GOOD),
        "{bad",
        json.dumps({"messages": [U, {"role": "robot", "content": "x"}]}),
        "",
        json.dumps(GOOD),
        "[]",
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\n")
    result = read_records(path, on_invalid="skip")
    assert (len(result.records), result.rows_read, len(result.invalid)) == (2, 6, 4)
    assert [r.meta["line"] for r in result.records] == [1, 5]
    assert [(e.line, e.field) for e in result.invalid] == [(2, None), (3, "messages[1].role"), (6, None), (7, None)]
    assert result.summary().startswith(
        f"{path}: format openai, 6 rows → 2 conversation records, 4 skipped (first: {path}:2: not valid JSON"
    )
    # Detection waits for the first good row; a file with no good row is an error even when skipping.
    path.write_text("{bad\n" + json.dumps({"instruction": "Q", "output": "A"}) + "\n")
    assert read_records(path, on_invalid="skip").format == "alpaca"
    path.write_text("{bad\n[1]\n")
    with pytest.raises(
        DataError, match=r"no usable rows: all 2 rows are invalid; the first: .*d.jsonl:1: not valid JSON"
    ):
        read_records(path, on_invalid="skip")


def test_meta_keeps_fields_named_like_ours(tmp_path: Path) -> None:
    record, _ = read_one(tmp_path, {"text": "doc", "source": "web", "line": 9})
    assert record.meta == {"field:source": "web", "field:line": 9, "source": str(tmp_path / "d.jsonl"), "line": 1}


def test_records_from_rows_in_memory() -> None:
    rows = [(Where("mem", 1, "row 1 of mem"), {"text": "a"}), (Where("mem", 2, "row 2 of mem"), {"text": 3})]
    with pytest.raises(DataError, match=r"^mem:2: field 'text': expected a string, got int \(row 2 of mem\)$"):
        records_from_rows(rows, "mem")
    assert len(records_from_rows(rows, "mem", on_invalid="skip").records) == 1


# -------------------------------------------------------------------------------------------------- fuzzing

KNOWN_KEYS = sorted(
    {key for spec in FORMATS.values() for keys in spec.fields.values() for key in keys}
    | {
        "tools",
        "label",
        "kto_tag",
        "reference",
        "answer",
        "margin",
        "score_chosen",
        "score_rejected",
        "from",
        "value",
        "role",
        "content",
    }
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "assistant", "system", "tool", "robot"]) | scalars,
        "content": json_values,
        "from": st.sampled_from(["human", "gpt", "function_call", "observation"]) | scalars,
        "value": json_values,
        "tool_calls": json_values,
        "loss_weight": scalars,
        "train": scalars,
    },
)
field_values = json_values | st.lists(message, max_size=3) | st.lists(st.lists(scalars, max_size=3), max_size=2)
rows = st.dictionaries(st.sampled_from(KNOWN_KEYS), field_values, max_size=6)


VALID_ROWS: list[dict[str, Any]] = [
    {
        "messages": [
            {"role": "system", "content": "s"},
            U,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "r"},
            A,
        ],
        "tools": [],
    },
    {
        "messages": [
            U,
            {
                "role": "assistant",
                "content": [{"type": "reasoning", "value": "r"}, {"type": "text", "value": "4"}],
                "loss_weight": 1.0,
            },
        ],
        "label": True,
    },
    {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": '{"name": "f", "arguments": {}}'},
            {"from": "observation", "value": "o"},
            {"from": "gpt", "value": "a"},
        ],
        "system": "s",
        "tools": "[]",
    },
    {
        "conversations": [{"from": "human", "value": "q"}],
        "chosen": {"from": "gpt", "value": "a"},
        "rejected": {"from": "gpt", "value": "b"},
    },
    {"instruction": "q", "input": "i", "output": "a", "system": "s", "history": [["u", "a"]]},
    {"instruction": "q", "output": ["a", "b"], "margin": 1},
    {"instruction": "q", "output": "a", "kto_tag": False},
    {"role": "system", "content": "s", "user": "u", "assistant": "a"},
    {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 2, "score_rejected": 1},
    {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "5"}]},
    {"prompt": [U], "completion": [A], "label": False},
    {"prompt": "p", "reference": "r"},
    {"messages": [U], "answer": 4},
    {"text": "doc"},
]


def mutate(value: Any, data: st.DataObject) -> Any:
    """Replace one place deep inside a valid row by a random value, or drop a key."""
    if isinstance(value, dict) and value and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.integers(0, 4)) == 0:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: mutate(value[key], data)}
    if isinstance(value, list) and value and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(value) - 1))
        return value[:index] + [mutate(value[index], data)] + value[index + 1 :]
    return data.draw(field_values)


def only_data_errors(call: Any) -> None:
    try:
        call()
    except DataError:
        pass


@FUZZ
@given(data=st.data(), kind=st.sampled_from([None, *KINDS]), format=st.sampled_from(["auto", *FORMATS]))
def test_fuzz_valid_rows_with_one_thing_wrong(data: st.DataObject, kind: Any, format: str) -> None:
    base = data.draw(st.sampled_from(VALID_ROWS))
    items = [(Where("fuzz", 1), base), (Where("fuzz", 2), mutate(base, data))]
    only_data_errors(lambda: records_from_rows(items, "fuzz", kind=kind, format=format, on_invalid="skip"))
    only_data_errors(lambda: records_from_rows(items[1:], "fuzz", kind=kind, format=format))


def test_valid_rows_of_the_fuzzer_are_valid() -> None:
    """The fuzzer's seeds must read cleanly, or the mutations explore nothing."""
    for row in VALID_ROWS:
        assert records_from_rows([(Where("seed", 1), row)], "seed").records


@FUZZ
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".parquet"]))
def test_fuzz_random_bytes(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"d{suffix}"
        path.write_bytes(data)
        only_data_errors(lambda: read_records(path, on_invalid="skip"))
        only_data_errors(lambda: read_records(path))


@FUZZ
@given(values=st.lists(json_values, min_size=1, max_size=4), as_list=st.booleans())
def test_fuzz_random_json_values(values: list[Any], as_list: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / ("d.json" if as_list else "d.jsonl")
        text = json.dumps(values) if as_list else "".join(json.dumps(v) + "\n" for v in values)
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        only_data_errors(lambda: read_records(path, on_invalid="skip"))


@FUZZ
@given(
    batch=st.lists(rows, min_size=1, max_size=3),
    kind=st.sampled_from([None, *KINDS]),
    format=st.sampled_from(["auto", *FORMATS]),
)
def test_fuzz_known_keys_with_wrong_types(batch: list[dict[str, Any]], kind: Any, format: str) -> None:
    items = [(Where("fuzz", n), row) for n, row in enumerate(batch, start=1)]
    only_data_errors(lambda: records_from_rows(items, "fuzz", kind=kind, format=format, on_invalid="skip"))
    only_data_errors(lambda: records_from_rows(items, "fuzz", kind=kind, format=format))


@FUZZ
@given(
    batch=st.lists(
        st.dictionaries(
            st.sampled_from(KNOWN_KEYS),
            st.text(max_size=12)
            | st.sampled_from(['[["a", "b"]]', '[{"from": "human", "value": "x"}]', "true", "1.5", "{"]),
            max_size=5,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_csv_cells(batch: list[dict[str, str]]) -> None:
    import csv

    header = sorted({key for row in batch for key in row}) or ["text"]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.csv"
        with path.open("w", newline="", encoding="utf-8", errors="surrogatepass") as handle:
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(batch)
        only_data_errors(lambda: read_records(path, on_invalid="skip"))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                key: st.text(max_size=6)
                for key in ("instruction", "output", "text", "prompt", "chosen", "rejected", "messages")
            },
        ),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_parquet_tables(batch: list[dict[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "d.parquet"
        pq.write_table(pa.Table.from_pylist(batch), path)
        only_data_errors(lambda: read_records(path, on_invalid="skip"))


def test_csv_message_lists_are_json_cells(tmp_path: Path) -> None:
    import csv

    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["messages", "system"])
        writer.writerow([json.dumps([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]), "s"])
    result = read_records(path)
    assert result.format == "sharegpt"
    assert result.records[0].messages == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
