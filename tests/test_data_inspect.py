"""``posttrain data inspect``: every number of the report checked on small hand-made files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers import need_peer_file

from posttrain.cli import main
from posttrain.data.quality import approx_tokens, inspect_dataset, percentiles

PEER_DATA = Path(os.environ.get("POSTTRAIN_PEER_DATA", Path(__file__).resolve().parents[2] / "shared" / "peer-data"))
ALPACA_ZH = PEER_DATA / "llama-factory" / "data" / "alpaca_zh_demo.json"


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text(
        "".join((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows),
        encoding="utf-8",
    )
    return path


def alpaca(instruction: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "output": output}


@pytest.fixture(scope="module")
def toy_kit(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from posttrain.toy import build_toy

    return build_toy(
        tmp_path_factory.mktemp("toy"), size="tiny", seed=0, sft=50, prefs=10, prompts=10, eval=10, pretrain=10
    )


def test_approx_tokens_count_words_cjk_characters_and_punctuation() -> None:
    # 你 好 ， 世 界 + hello + world + ! = 8; Latin words are one each, whatever their length.
    assert approx_tokens("你好，世界 hello world!") == 8
    assert approx_tokens("Hello, world. x2") == 5  # Hello , world . x2
    assert approx_tokens("  ") == 0


def test_percentiles_are_nearest_rank() -> None:
    # n = 10: p50 is the 5th smallest, p90 the 9th, p99 the ceil(9.9) = 10th.
    assert percentiles(list(range(10, 0, -1))) == {"p50": 5, "p90": 9, "p99": 10, "max": 10}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}
    assert percentiles([]) is None


def test_exact_duplicate_rate(tmp_path: Path) -> None:
    a, b, c = alpaca("Name a colour.", "Blue."), alpaca("Name a fruit.", "Apple."), alpaca("Name a city.", "Paris.")
    path = write_jsonl(tmp_path / "dups.jsonl", [a, b, a, c, a, b])  # lines 3, 5, 6 repeat an earlier line

    exact = inspect_dataset(path)["duplicates"]["exact"]

    assert exact["count"] == 3 and exact["rate"] == 0.5
    assert exact["examples"][0] == {"row": f"{path}:3", "duplicate_of": f"{path}:1"}
    assert [e["row"] for e in exact["examples"]] == [f"{path}:3", f"{path}:5", f"{path}:6"]


def test_near_duplicates_catch_a_one_character_edit_and_not_unrelated_rows(tmp_path: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence."
    edited = text.replace("farmer", "farmor")
    unrelated = [
        "Photosynthesis converts light energy into chemical energy stored in glucose molecules inside plants.",
        "The stock market closed higher today after the central bank held interest rates steady again.",
        "To bake bread, mix flour, water, yeast and salt, then knead the dough and let it rise twice.",
    ]
    rows = [alpaca("Write a sentence.", text), alpaca("Write a sentence.", edited)] + [
        alpaca("Write a sentence.", u) for u in unrelated
    ]
    path = write_jsonl(tmp_path / "near.jsonl", rows)

    duplicates = inspect_dataset(path)["duplicates"]

    assert duplicates["exact"]["count"] == 0
    near = duplicates["near"]
    assert near["threshold"] == 0.8 and near["shingles"] == "character 5-grams"
    assert near["count"] == 1 and near["rate"] == pytest.approx(0.2)
    (example,) = near["examples"]
    assert example["row"] == f"{path}:2" and example["similar_to"] == f"{path}:1"
    assert 0.8 <= example["jaccard"] < 1.0


def test_near_duplicate_count_includes_exact_duplicates(tmp_path: Path) -> None:
    row = alpaca(
        "Summarise the plot of a long novel in one line.", "A detective solves a murder on a snowbound train."
    )
    path = write_jsonl(tmp_path / "same.jsonl", [row, row, alpaca("Add 2 and 2.", "4")])

    duplicates = inspect_dataset(path)["duplicates"]

    assert duplicates["exact"]["count"] == 1 and duplicates["near"]["count"] == 1


def test_token_percentiles_with_the_toy_tokenizer(toy_kit: Any, tmp_path: Path) -> None:
    """The toy template renders "<|bos|><|user|>\\n{q}<|end|>\\n<|assistant|>\\n{a}<|end|>\\n": 9 tokens besides
    the contents (<|bos|> <|user|> \\n <|end|> \\n <|assistant|> \\n <|end|> \\n). With q = "Add 70 and 61."
    (10 tokens) and a = k sevens (digits are single tokens), a row is 19 + k tokens and trains k + 1 (the digits
    and <|end|>; the newline after it belongs to no turn).
    k = 1..10 → samples 20..29: p50 (5th) 24, p90 (9th) 28, p99 (10th) 29, max 29; trained 2..11: 6, 10, 11, 11.
    At --max-length 26 the rows with k = 8, 9, 10 are over: 3 of 10."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy_kit.model)
    question = "Add 70 and 61."

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # The hand count's premises: the question's and the answers' token counts, and the rendered layout.
    assert tokens(question) == 10 and tokens("7" * 10) == 10
    assert tokens(f"<|bos|><|user|>\n{question}<|end|>\n<|assistant|>\n777<|end|>\n") == 10 + 3 + 9
    rows = [
        {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "7" * k}]}
        for k in range(10, 0, -1)
    ]
    path = write_jsonl(tmp_path / "lengths.jsonl", rows)

    lengths = inspect_dataset(path, tokenizer=toy_kit.model, max_length=26)["lengths"]

    assert lengths["unit"] == "tokens" and lengths["template"] == "tokenizer"
    assert lengths["percentiles"]["sample"] == {"p50": 24, "p90": 28, "p99": 29, "max": 29}
    assert lengths["percentiles"]["trained"] == {"p50": 6, "p90": 10, "p99": 11, "max": 11}
    assert lengths["over_max_length"] == {"count": 3, "rate": 0.3}
    assert lengths["unrenderable"]["count"] == 0


def test_preference_and_prompt_lengths_with_the_toy_tokenizer(toy_kit: Any, tmp_path: Path) -> None:
    """Toy template, q = "Add 70 and 61." (10 tokens): a user turn is <|user|> \\n q <|end|> \\n = 14 tokens,
    an assistant turn <|assistant|> \\n a <|end|> \\n = 4 + len(a), and the render starts with <|bos|>.
    Prompt [user, assistant "7", user]: 1 + 14 + 5 + 14 = 34. Chosen "131": 34 + 7 = 41 tokens, trained 3 + 1
    (the prompt's own assistant turn is context, not trained). Rejected "13": 40 tokens, trained 3.
    An RL prompt [user q] renders with the generation header <|assistant|> \\n: 1 + 14 + 2 = 17."""
    question = "Add 70 and 61."
    prompt = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": question},
    ]
    pair = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "131"}],
        "rejected": [{"role": "assistant", "content": "13"}],
    }
    pairs = write_jsonl(tmp_path / "pair.jsonl", [pair])
    prompts = write_jsonl(
        tmp_path / "prompt.jsonl", [{"messages": [{"role": "user", "content": question}], "reference": "131"}]
    )

    pair_lengths = inspect_dataset(pairs, tokenizer=toy_kit.model, max_length=40)["lengths"]
    prompt_lengths = inspect_dataset(prompts, tokenizer=toy_kit.model)["lengths"]

    assert {name: stats["max"] for name, stats in pair_lengths["percentiles"].items()} == {
        "chosen_sample": 41,
        "rejected_sample": 40,
        "chosen": 4,
        "rejected": 3,
    }
    assert pair_lengths["over_max_length"]["count"] == 1  # the chosen side is over 40
    assert prompt_lengths["percentiles"] == {"sample": {"p50": 17, "p90": 17, "p99": 17, "max": 17}}


def test_approximate_lengths_without_a_tokenizer(tmp_path: Path) -> None:
    rows = [alpaca("把它翻译成英文。", "Good morning, everyone!"), alpaca("Say hi.", "Hi!")]
    # Row 1: 把它翻译成英文。 = 8 (7 characters + 。); answer: Good morning , everyone ! = 5 → sample 13, trained 5.
    # Row 2: Say hi . = 3; Hi ! = 2 → sample 5, trained 2.
    path = write_jsonl(tmp_path / "zh.jsonl", rows)

    lengths = inspect_dataset(path, max_length=10)["lengths"]

    assert lengths["unit"] == "approx. tokens (no --tokenizer)"
    assert lengths["percentiles"]["sample"] == {"p50": 5, "p90": 13, "p99": 13, "max": 13}
    assert lengths["percentiles"]["trained"] == {"p50": 2, "p90": 5, "p99": 5, "max": 5}
    assert lengths["over_max_length"] == {"count": 1, "rate": 0.5}


def test_invalid_rows_are_listed_with_file_and_line(tmp_path: Path) -> None:
    good = alpaca("Name a colour.", "Blue.")
    rows: list[Any] = [good, "{not json", good, [1, 2]] + ['{"instruction": "x", "output": 5}'] * 25
    path = write_jsonl(tmp_path / "bad.jsonl", rows)

    report = inspect_dataset(path)

    assert report["rows_read"] == 29 and report["records"] == 2
    invalid = report["invalid"]
    assert invalid["count"] == 27 and len(invalid["shown"]) == 20
    assert [(row["path"], row["line"]) for row in invalid["shown"][:3]] == [
        (str(path), 2),
        (str(path), 4),
        (str(path), 5),
    ]
    assert invalid["shown"][0]["message"].startswith(f"{path}:2: not valid JSON")
    assert "expected a JSON object" in invalid["shown"][1]["message"]
    assert invalid["shown"][2]["field"] == "output"


def test_human_report_lists_invalid_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [alpaca("Hi.", "Hello.")] + ["{oops"] * 22)

    assert main(["data", "inspect", str(path)]) == 0

    out = capsys.readouterr().out
    assert "invalid rows  22" in out
    assert f"{path}:2: not valid JSON" in out and f"{path}:21: not valid JSON" in out
    assert f"{path}:22:" not in out and "... and 2 more" in out
    assert "approx. tokens (no --tokenizer)" in out


def test_task_balance_on_the_toy_sft_file(toy_kit: Any) -> None:
    # The toy kit draws tasks round-robin over its 6 tasks: 50 rows → add, reverse 9 each; the other four 8.
    balance = inspect_dataset(toy_kit.sft)["balance"]

    task = balance["task"]
    assert task["distinct"] == 6 and task["records_with_field"] == 50
    counts = {name: share["count"] for name, share in task["values"].items()}
    assert counts == {"add": 9, "reverse": 9, "copy": 8, "count": 8, "sort": 8, "upper": 8}
    assert task["values"]["add"]["rate"] == pytest.approx(0.18)
    assert "label" not in balance


def dolly(instruction: str, context: str, response: str, category: str) -> dict[str, str]:
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def test_dolly_categories_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        dolly(
            "When did Virgin Australia start operating?",
            "Virgin Australia commenced services on 31 August 2000.",
            "On 31 August 2000.",
            "closed_qa",
        ),
        dolly("Name three primary colours.", "", "Red, yellow and blue.", "open_qa"),
        dolly("Which is a fish: tope or rope?", "", "Tope.", "classification"),
        dolly("Give me ideas for a picnic.", "", "Sandwiches, fruit, lemonade.", "open_qa"),
    ]
    path = write_jsonl(tmp_path / "dolly.jsonl", rows)
    report = inspect_dataset(path)
    assert (report["format"], report["kind"], report["records"]) == ("dolly", "conversation", 4)
    counts = {name: share["count"] for name, share in report["balance"]["category"]["values"].items()}
    assert counts == {"open_qa": 2, "closed_qa": 1, "classification": 1}

    assert main(["data", "inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "format        dolly" in out
    assert "category (3 values): open_qa 2 (50.0%), classification 1 (25.0%), closed_qa 1 (25.0%)" in out


def test_the_real_dolly_15k_file_reads_as_dolly_with_its_eight_categories() -> None:
    """The real databricks-dolly-15k.jsonl when peer-data has it. peer-data/dolly/SOURCES.md records that its blob
    was missing from the snapshot (only the dataset card was saved), so with peer-data present and the file
    absent this skips and says why; without peer-data it follows the usual rule (skip, or fail under CI)."""
    need_peer_file(PEER_DATA / "dolly" / "SOURCES.md")
    path = PEER_DATA / "dolly" / "databricks-dolly-15k.jsonl"
    if not path.is_file():
        pytest.skip(f"{path}: not in peer-data (dolly/SOURCES.md: the snapshot lacks its blob)")
    report = inspect_dataset(path)
    assert (report["format"], report["kind"]) == ("dolly", "conversation")
    assert report["invalid"]["count"] == 0 and report["records"] == report["rows_read"] > 15_000
    assert set(report["balance"]["category"]["values"]) == {
        "brainstorming",
        "classification",
        "closed_qa",
        "creative_writing",
        "general_qa",
        "information_extraction",
        "open_qa",
        "summarization",
    }


def test_turn_and_tool_statistics(tmp_path: Path) -> None:
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "1"},
                {"role": "assistant", "content": "2"},
                {"role": "user", "content": "3"},
                {"role": "assistant", "content": "4"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "add 1"},
                {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "content": "1"},
                {"role": "assistant", "content": "It is 1."},
            ],
            "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}],
        },
        {
            "messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye"}],
            "label": "greeting",
        },
    ]
    path = write_jsonl(tmp_path / "turns.jsonl", rows)

    report = inspect_dataset(path)
    turns = report["turns"]

    assert turns["user_turns"] == {"1": 3, "2": 1}
    assert turns["messages_by_role"] == {"assistant": 6, "user": 5, "system": 1, "tool": 1}
    assert turns["with_system"] == {"count": 1, "rate": 0.25}
    assert turns["multi_turn"] == {"count": 1, "rate": 0.25}
    assert turns["with_tool_schemas"]["count"] == 1 and turns["with_tool_turns"]["count"] == 1
    assert turns["tool_calls"] == 1 and turns["tool_results"] == 1
    assert report["balance"]["label"]["values"] == {"greeting": {"count": 1, "rate": 0.25}}


def test_preference_statistics(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
        {"prompt": "2 + 2?", "chosen": "4", "rejected": "4"},  # no preference signal
        {"prompt": "Colour of the sky?", "chosen": "Blue.", "rejected": "Green and red.", "margin": 2},
        {"prompt": "Largest ocean?", "chosen": "The Pacific.", "rejected": "The Arctic, by far."},
    ]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)

    report = inspect_dataset(path)

    assert report["kind"] == "preference"
    preference = report["preference"]
    assert preference["chosen_equals_rejected"]["count"] == 1 and preference["chosen_equals_rejected"]["rate"] == 0.25
    assert preference["chosen_equals_rejected"]["examples"] == [f"{path}:2"]
    assert preference["with_margin"]["count"] == 1
    # Approximate chosen lengths: Paris . = 2; 4 = 1; Blue . = 2; The Pacific . = 3 → p50 (2nd of 1,2,2,3) = 2.
    assert report["lengths"]["percentiles"]["chosen"] == {"p50": 2, "p90": 3, "p99": 3, "max": 3}
    # Rejected: Lyon , I think . = 5; 4 = 1; Green and red . = 4; The Arctic , by far . = 6.
    assert report["lengths"]["percentiles"]["rejected"] == {"p50": 4, "p90": 6, "p99": 6, "max": 6}


def test_kto_labels_are_balanced(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "label": i < 3}
        for i in range(4)
    ]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)

    report = inspect_dataset(path)

    assert report["kind"] == "unpaired"
    assert report["balance"]["kto_label"]["values"] == {
        "desirable": {"count": 3, "rate": 0.75},
        "undesirable": {"count": 1, "rate": 0.25},
    }


def test_json_output_parses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca("Hi.", "Hello."), alpaca("Hi.", "Hello.")])

    assert main(["data", "inspect", str(path), "--json", "--max-length", "2"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert set(report) == {
        "source",
        "format",
        "kind",
        "rows_read",
        "records",
        "invalid",
        "lengths",
        "duplicates",
        "turns",
        "preference",
        "balance",
    }
    assert (report["format"], report["kind"], report["rows_read"], report["records"]) == (
        "alpaca",
        "conversation",
        2,
        2,
    )
    assert report["lengths"]["max_length"] == 2 and report["lengths"]["over_max_length"]["count"] == 2
    assert report["duplicates"]["exact"]["count"] == 1


def test_a_registry_name_is_inspected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_jsonl(tmp_path / "mine.jsonl", [alpaca("Hi.", "Hello.")])
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.jsonl"}}))

    assert main(["data", "inspect", "mine", "--registry", str(tmp_path), "--json"]) == 0

    assert json.loads(capsys.readouterr().out)["records"] == 1


def test_missing_file_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.jsonl"

    assert main(["data", "inspect", str(missing)]) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"error: data error: {missing}: file not found"


def test_missing_tokenizer_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [alpaca("Hi.", "Hello.")])

    assert main(["data", "inspect", str(path), "--tokenizer", str(tmp_path / "nope")]) == 2

    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--tokenizer" in err and "Traceback" not in err


@pytest.mark.skipif(not ALPACA_ZH.is_file(), reason=f"peer data not found at {PEER_DATA} (set POSTTRAIN_PEER_DATA)")
def test_alpaca_zh_demo_report(capsys: pytest.CaptureFixture[str]) -> None:
    rows = json.loads(ALPACA_ZH.read_text(encoding="utf-8"))

    assert main(["data", "inspect", str(ALPACA_ZH)]) == 0
    out = capsys.readouterr().out
    report = inspect_dataset(ALPACA_ZH)

    assert (report["format"], report["kind"]) == ("alpaca", "conversation")
    assert report["rows_read"] == len(rows) == report["records"] and report["invalid"]["count"] == 0
    assert f"rows read     {len(rows)}" in out and "approx. tokens (no --tokenizer)" in out
    # The first instruction is Chinese characters and full-width punctuation only: one token each.
    first = rows[0]["instruction"]
    assert approx_tokens(first) == len(first)
    # A whitespace split would see a handful of "words" per Chinese answer; CJK characters make them long.
    assert report["lengths"]["percentiles"]["trained"]["p50"] > 50
    # The demo file repeats some rows verbatim (LLaMA-Factory's sample has duplicates).
    texts = [json.dumps([r["instruction"], r["input"], r["output"]], ensure_ascii=False) for r in rows]
    assert report["duplicates"]["exact"]["count"] == len(texts) - len(set(texts))
