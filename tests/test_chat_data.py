"""Chat rendering and loss masks on the toy tokenizer; reader errors name file, line and field."""

from __future__ import annotations

import json

import pytest
from helpers import sft_config
from transformers import AutoTokenizer

from posttrain.cli import main
from posttrain.data.errors import DataError
from posttrain.data.reader import read_conversations
from posttrain.data.tokenize import tokenize_conversation
from posttrain.losses import IGNORE_INDEX
from posttrain.recipes import sft

DIALOGUE = [
    {"role": "system", "content": "Answer with the result only."},
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse: a b c"},
    {"role": "assistant", "content": "c b a"},
]


def _trained_text(tokenizer, sequence) -> list[str]:
    """Decode each maximal run of trained target tokens."""
    runs, current = [], []
    for target in sequence.targets:
        if target == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
                current = []
        else:
            current.append(target)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_every_assistant_turn_and_its_end_token_are_trained_nothing_else(toy) -> None:
    tokenizer = AutoTokenizer.from_pretrained(toy.model)
    sequence = tokenize_conversation(tokenizer, DIALOGUE, max_length=512)
    assert _trained_text(tokenizer, sequence) == ["5<|end|>", "c b a<|end|>"]
    assert len(sequence.targets) == len(sequence.input_ids) and sequence.targets[-1] == IGNORE_INDEX


def test_train_on_prompt_trains_every_next_token(toy) -> None:
    tokenizer = AutoTokenizer.from_pretrained(toy.model)
    sequence = tokenize_conversation(tokenizer, DIALOGUE, max_length=512, train_on_prompt=True)
    assert sequence.targets[:-1] == sequence.input_ids[1:]


def test_truncation_is_flagged(toy) -> None:
    tokenizer = AutoTokenizer.from_pretrained(toy.model)
    sequence = tokenize_conversation(tokenizer, DIALOGUE, max_length=10)
    assert sequence.truncated and len(sequence.input_ids) == 10


@pytest.mark.parametrize(
    "line, field, problem",
    [
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}',
            "messages[1].role",
            "unknown role 'robot'",
        ),
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
            "messages[1].content",
            "empty assistant turn",
        ),
        ('{"messages": "hello"}', "messages", "expected a non-empty list"),
        ('{"prompt": "x"}', "messages", "missing"),
        ("[1, 2]", None, "expected a JSON object"),
        ("{not json", None, "not valid JSON"),
    ],
)
def test_bad_rows_name_file_line_field(tmp_path, line, field, problem) -> None:
    good = json.dumps({"messages": DIALOGUE})
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataError) as error:
        read_conversations(path)
    assert error.value.line == 2 and error.value.field == field and problem in str(error.value)
    assert str(error.value).startswith(f"{path}:2: ")


def test_non_utf8_bytes(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"messages": []}\n\xff\xfe\n')
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'messages'"):
        read_conversations(path)
    path.write_bytes(json.dumps({"messages": DIALOGUE}).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8"):
        read_conversations(path)


def test_cli_bad_data_exits_2_without_traceback(toy, micro_model, tmp_path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": DIALOGUE}) + "\n" + '{"messages": [{"role": "user", "content": 3}]}\n')
    code = main(
        [
            "train",
            "configs/sft_lora.yaml",
            f"model.path={micro_model}",
            f"data.train={bad}",
            f"output_dir={tmp_path / 'o'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{bad}:2: field 'messages[0].content': expected a string" in err


def test_a_template_that_never_emits_eos_is_refused(toy, micro_model, tmp_path) -> None:
    template = tmp_path / "no_eos.jinja"
    template.write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    config = sft_config(micro_model, toy.sft, tmp_path / "o", data__template=str(template))
    with pytest.raises(DataError, match="never learn to stop"):
        sft.run(config)
