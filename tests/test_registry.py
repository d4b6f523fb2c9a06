"""LLaMA-Factory registries: every text dataset of peer-data's dataset_info.json loads into the right records
(row counts and first-record fields checked against the files), and synthetic registries cover columns, tags,
ranking, KTO, pretraining, folders, close-name suggestions and hub-only entries offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from posttrain.data.errors import DataError
from posttrain.data.formats import read_records
from posttrain.data.records import Conversation, Preference, Text, Unpaired
from posttrain.data.registry import DatasetSpec, load_registry, read_dataset, resolve_dataset

PEER_DATA = Path(os.environ.get("POSTTRAIN_PEER_DATA", Path(__file__).resolve().parents[2] / "shared" / "peer-data"))
LF_DATA = PEER_DATA / "llama-factory" / "data"
needs_peer_data = pytest.mark.skipif(
    not (LF_DATA / "dataset_info.json").is_file(), reason=f"no {LF_DATA}/dataset_info.json"
)

# The registry's local datasets and the record type each must give.
EXPECTED_KIND = {
    "identity": Conversation,
    "alpaca_en_demo": Conversation,
    "alpaca_zh_demo": Conversation,
    "glaive_toolcall_en_demo": Conversation,
    "glaive_toolcall_zh_demo": Conversation,
    "dpo_en_demo": Preference,
    "dpo_zh_demo": Preference,
    "kto_en_demo": Unpaired,
    "wiki_demo": Text,
    "c4_demo": Text,
}
# Explicit exceptions: multimodal datasets need their images/audio/video, which a text-only reader refuses.
MULTIMODAL = {"mllm_demo", "mllm_audio_demo", "mllm_video_demo", "mllm_video_audio_demo"}


def file_rows(path: Path) -> list[Any]:
    """The file's rows as the file itself has them (the test's own reading, independent of the code)."""
    if path.suffix == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


def local_entries() -> dict[str, dict[str, Any]]:
    entries = load_registry(LF_DATA / "dataset_info.json")
    return {name: e for name, e in entries.items() if "file_name" in e and (LF_DATA / e["file_name"]).exists()}


@needs_peer_data
def test_every_local_dataset_is_covered() -> None:
    """A dataset added to the registry must be added here, as a kind or as a listed exception."""
    assert set(local_entries()) == set(EXPECTED_KIND) | MULTIMODAL


@needs_peer_data
@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_peer_registry_dataset_loads(name: str) -> None:
    entry = local_entries()[name]
    rows = file_rows(LF_DATA / entry["file_name"])
    result = read_dataset(resolve_dataset(name, search_dirs=[LF_DATA]))
    assert (result.rows_read, len(result.records), result.invalid) == (len(rows), len(rows), [])
    assert all(type(record) is EXPECTED_KIND[name] for record in result.records)
    first, row = result.records[0], rows[0]
    assert first.meta["line"] == 1 and first.meta["source"] == str(LF_DATA / entry["file_name"])
    CHECK_FIRST[name.replace("_zh", "_en")](first, row, result.records, rows)


def check_alpaca(first: Conversation, row: dict[str, Any], records: list[Any], rows: list[Any]) -> None:
    assert first.messages == [
        {"role": "user", "content": row["instruction"]},
        {"role": "assistant", "content": row["output"]},
    ]
    # Every row: LLaMA-Factory's user turn is instruction and input joined by a newline, empty parts left out.
    expected = [
        [
            {"role": "user", "content": "\n".join(p for p in (r["instruction"], r["input"]) if p)},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in rows
    ]
    assert [r.messages for r in records] == expected


def check_glaive(first: Conversation, row: dict[str, Any], records: list[Any], rows: list[Any]) -> None:
    roles = {"human": "user", "gpt": "assistant", "function_call": "assistant", "observation": "tool"}
    assert first.tools == row["tools"]
    assert [m["role"] for m in first.messages] == [roles[turn["from"]] for turn in row["conversations"]]
    for message, turn in zip(first.messages, row["conversations"]):
        if turn["from"] == "function_call":
            call = json.loads(turn["value"])
            assert message["content"] == "" and message["tool_calls"] == [
                {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
            ]
        else:
            assert message["content"] == turn["value"]
    with_tools = sum(1 for r in records if any(m["role"] == "tool" for m in r.messages))
    assert with_tools == sum(1 for r in rows if any(t["from"] == "observation" for t in r["conversations"])) > 0


def check_dpo(first: Preference, row: dict[str, Any], records: list[Any], rows: list[Any]) -> None:
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    assert first.prompt == [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]
    assert first.chosen == [{"role": "assistant", "content": row["chosen"]["value"]}]
    assert first.rejected == [{"role": "assistant", "content": row["rejected"]["value"]}]
    assert first.margin is None


def check_kto(first: Unpaired, row: dict[str, Any], records: list[Any], rows: list[Any]) -> None:
    assert first.prompt == [{"role": m["role"], "content": m["content"]} for m in row["messages"][:-1]]
    assert first.completion == [{"role": "assistant", "content": row["messages"][-1]["content"]}]
    assert [r.label for r in records] == [r["label"] for r in rows]
    assert {r.label for r in records} == {True, False}


def check_text(first: Text, row: Any, records: list[Any], rows: list[Any]) -> None:
    assert [r.text for r in records] == [r if isinstance(r, str) else r["text"] for r in rows]


CHECK_FIRST = {
    "identity": check_alpaca,
    "alpaca_en_demo": check_alpaca,
    "glaive_toolcall_en_demo": check_glaive,
    "dpo_en_demo": check_dpo,
    "kto_en_demo": check_kto,
    "wiki_demo": check_text,
    "c4_demo": check_text,
}


@needs_peer_data
@pytest.mark.parametrize("name", sorted(MULTIMODAL))
def test_multimodal_peer_datasets_are_refused_clearly(name: str) -> None:
    with pytest.raises(DataError, match=rf"field '{name}.columns.(images|videos|audios)': multimodal dataset"):
        resolve_dataset(name, search_dirs=[LF_DATA])


@needs_peer_data
def test_peer_v1_files() -> None:
    """LLaMA-Factory v1 files (content parts, loss_weight, reasoning, tool calls), read by path."""
    sft = read_records(LF_DATA / "v1_sft_demo.jsonl")
    rows = file_rows(LF_DATA / "v1_sft_demo.jsonl")
    assert (sft.format, sft.kind, len(sft.records)) == ("openai", "conversation", len(rows))
    assert sft.records[0].messages == [
        {"role": m["role"], "content": m["content"][0]["value"], "train": m["loss_weight"] > 0}
        for m in rows[0]["messages"]
    ]

    dpo = read_records(LF_DATA / "v1_dpo_demo.jsonl")
    rows = file_rows(LF_DATA / "v1_dpo_demo.jsonl")
    assert (dpo.format, dpo.kind, len(dpo.records)) == ("preference", "preference", len(rows))
    chosen, rejected = rows[0]["chosen_messages"], rows[0]["rejected_messages"]
    assert [m["content"] for m in dpo.records[0].prompt] == [m["content"][0]["value"] for m in chosen[:-1]]
    assert dpo.records[0].chosen[0]["content"] == chosen[-1]["content"][0]["value"]
    assert dpo.records[0].rejected[0]["content"] == rejected[-1]["content"][0]["value"]

    tools = read_records(LF_DATA / "reason_tool_use_demo_50.jsonl")
    rows = file_rows(LF_DATA / "reason_tool_use_demo_50.jsonl")
    assert (tools.kind, len(tools.records)) == ("conversation", len(rows))
    assert tools.records[0].tools == rows[0]["tools"]
    calls = [
        (m, r)
        for record, row in zip(tools.records, rows)
        for m, r in zip(record.messages, row["messages"])
        if "tool_calls" in m
    ]
    assert (
        len(calls)
        == sum(1 for row in rows for m in row["messages"] if any(p["type"] == "tool_call" for p in m["content"]))
        > 0
    )
    message, raw = calls[0]
    raw_calls = [json.loads(p["value"]) for p in raw["content"] if p["type"] == "tool_call"]
    assert [c["function"]["name"] for c in message["tool_calls"]] == [c["name"] for c in raw_calls]
    assert message["reasoning_content"] == "".join(p["value"] for p in raw["content"] if p["type"] == "reasoning")
    assert any(m["role"] == "tool" for record in tools.records for m in record.messages)

    # Explicit exception: the multimodal v1 file holds image parts.
    with pytest.raises(
        DataError,
        match=r"v1_multimodal_demo.jsonl:1: field 'messages\[0\].content\[0\].type': content part type 'image_url' is not supported",
    ):
        read_records(LF_DATA / "v1_multimodal_demo.jsonl")


@needs_peer_data
def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(
        DataError,
        match=r"dataset_info.json: field 'dataset': unknown dataset 'alpaca_en_dmo'; close names: alpaca_en_demo, alpaca_en",
    ):
        resolve_dataset("alpaca_en_dmo", search_dirs=[LF_DATA])


@needs_peer_data
def test_peer_hub_only_entry_needs_network() -> None:
    spec = resolve_dataset("ultrachat_200k", registry=LF_DATA)
    assert (spec.hf_hub_url, spec.split, spec.format, spec.paths) == (
        "HuggingFaceH4/ultrachat_200k",
        "train_sft",
        "sharegpt",
        (),
    )
    with pytest.raises(DataError, match=r"ultrachat_200k: needs network: hf_hub_url=HuggingFaceH4/ultrachat_200k"):
        read_dataset(spec, offline=True)


# ------------------------------------------------------------------------------------------ synthetic registries


def make_registry(folder: Path, entries: dict[str, Any], files: dict[str, Any]) -> Path:
    for name, rows in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rows if isinstance(rows, str) else json.dumps(rows), encoding="utf-8")
    (folder / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    return folder


def test_alpaca_columns_and_history(tmp_path: Path) -> None:
    make_registry(
        tmp_path,
        {
            "qa": {
                "file_name": "qa.json",
                "columns": {
                    "prompt": "question",
                    "query": "context",
                    "response": "answer",
                    "system": "sys",
                    "history": "past",
                },
            }
        },
        {"qa.json": [{"question": "Q", "context": "C", "answer": "A", "sys": "S", "past": [["u", "a"]], "id": 1}]},
    )
    result = read_dataset(resolve_dataset("qa", registry=tmp_path))
    assert (result.format, result.kind) == ("alpaca", "conversation")
    assert result.records[0] == Conversation(
        messages=[
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "Q\nC"},
            {"role": "assistant", "content": "A"},
        ],
        meta={"id": 1, "source": str(tmp_path / "qa.json"), "line": 1},
    )


def test_sharegpt_tags_ranking_kto_and_pretraining(tmp_path: Path) -> None:
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    make_registry(
        tmp_path,
        {
            "chat": {
                "file_name": "chat.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "msgs"},
                "tags": tags,
            },
            "rank": {
                "file_name": "rank.json",
                "ranking": True,
                "columns": {"prompt": "q", "chosen": "good", "rejected": "bad"},
            },
            "kto": {
                "file_name": "kto.json",
                "formatting": "sharegpt",
                "columns": {"messages": "messages", "kto_tag": "ok"},
                "tags": tags,
            },
            "pt": {"file_name": "pt.jsonl", "columns": {"prompt": "body"}},
        },
        {
            "chat.jsonl": json.dumps(
                {"msgs": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            )
            + "\n",
            "rank.json": [{"q": "Q", "good": "g", "bad": "b"}],
            "kto.json": [
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "ok": False}
            ],
            "pt.jsonl": json.dumps({"body": "doc one"}) + "\n" + json.dumps({"body": "doc two"}) + "\n",
        },
    )
    chat = read_dataset(resolve_dataset("chat", registry=tmp_path / "dataset_info.json"))
    assert chat.records[0].messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    rank = read_dataset(resolve_dataset("rank", registry=tmp_path))
    assert (rank.kind, rank.records[0].prompt, rank.records[0].chosen, rank.records[0].rejected) == (
        "preference",
        [{"role": "user", "content": "Q"}],
        [{"role": "assistant", "content": "g"}],
        [{"role": "assistant", "content": "b"}],
    )
    kto = read_dataset(resolve_dataset("kto", registry=tmp_path))
    assert (kto.kind, kto.records[0].label, kto.records[0].completion) == (
        "unpaired",
        False,
        [{"role": "assistant", "content": "yo"}],
    )
    pt = read_dataset(resolve_dataset("pt", registry=tmp_path))
    assert (pt.format, pt.kind, [r.text for r in pt.records]) == ("text", "text", ["doc one", "doc two"])
    # The caller's kind wins over the registry's: the SFT data read as RL prompts.
    prompts = read_dataset(resolve_dataset("chat", registry=tmp_path), kind="prompt")
    assert prompts.records[0].messages == [{"role": "user", "content": "hi"}]


def test_folder_num_samples_and_search_dirs(tmp_path: Path) -> None:
    make_registry(
        tmp_path / "data",
        {"many": {"file_name": "parts", "num_samples": 3}},
        {
            "parts/a.jsonl": "\n".join(json.dumps({"instruction": f"q{i}", "output": "a"}) for i in range(2)),
            "parts/b.json": [{"instruction": "q2", "output": "a"}, {"instruction": "q3", "output": "a"}],
        },
    )
    spec = resolve_dataset("many", search_dirs=[tmp_path, tmp_path / "data"])
    assert spec.paths == (tmp_path / "data" / "parts" / "a.jsonl", tmp_path / "data" / "parts" / "b.json")
    result = read_dataset(spec)
    assert result.rows_read == 4 and [r.messages[0]["content"] for r in result.records] == ["q0", "q1", "q2"]
    # A path that exists is read directly, no registry needed.
    direct = resolve_dataset(tmp_path / "data" / "parts" / "b.json")
    assert direct == DatasetSpec(name="b.json", paths=(tmp_path / "data" / "parts" / "b.json",))


def test_registry_errors(tmp_path: Path) -> None:
    make_registry(
        tmp_path,
        {
            "hub": {"hf_hub_url": "org/set", "split": "validation", "subset": "en"},
            "ms": {"ms_hub_url": "org/set"},
            "gone": {"file_name": "gone.json"},
            "typo": {"file_name": "x.json", "colums": {}},
            "badcol": {"file_name": "x.json", "columns": {"answer": "a"}},
            "img": {"file_name": "x.json", "formatting": "sharegpt", "columns": {"messages": "m", "images": "images"}},
            "fmt": {"file_name": "x.json", "formatting": "markdown"},
        },
        {"x.json": [{"instruction": "q", "output": "a"}]},
    )
    hub = resolve_dataset("hub", registry=tmp_path)
    assert (hub.hf_hub_url, hub.split, hub.subset) == ("org/set", "validation", "en")
    with pytest.raises(DataError, match=r"^hub: needs network: hf_hub_url=org/set \(offline\)"):
        read_dataset(hub, offline=True)
    with pytest.raises(DataError, match=r"^hf:org/x: needs network: hf_hub_url=org/x"):
        read_dataset(resolve_dataset("hf:org/x"), offline=True)
    with pytest.raises(DataError, match=r"^ms: needs network: ms_hub_url=org/set \(only the Hugging Face hub"):
        read_dataset(resolve_dataset("ms", registry=tmp_path))
    with pytest.raises(DataError, match=r"gone.json: file not found \(dataset 'gone'"):
        resolve_dataset("gone", registry=tmp_path)
    with pytest.raises(DataError, match=r"field 'typo.colums': unknown key"):
        resolve_dataset("typo", registry=tmp_path)
    with pytest.raises(DataError, match=r"field 'badcol.columns.answer': unknown column for alpaca formatting"):
        resolve_dataset("badcol", registry=tmp_path)
    with pytest.raises(DataError, match=r"field 'img.columns.images': multimodal dataset"):
        resolve_dataset("img", registry=tmp_path)
    with pytest.raises(DataError, match=r"field 'fmt.formatting': expected one of alpaca, sharegpt, openai"):
        resolve_dataset("fmt", registry=tmp_path)
    with pytest.raises(DataError, match=r"unknown dataset 'hubb'; close names: hub"):
        resolve_dataset("hubb", registry=tmp_path)
    with pytest.raises(DataError, match=r"^nothing: not a file, and no dataset_info.json to look the name up in"):
        resolve_dataset("nothing", search_dirs=[tmp_path / "elsewhere"])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "dataset_info.json").write_text('{"a": ', encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset_info.json:1: not valid JSON"):
        resolve_dataset("a", registry=tmp_path / "broken")


@needs_peer_data
@pytest.mark.parametrize("name", sorted(EXPECTED_KIND))
def test_peer_registry_dataset_tokenises(name: str) -> None:
    """Every local text dataset tokenises with a real tokenizer (phi-2) and a real template that renders tools
    (Qwen2.5's): conversations train every assistant turn and its <|im_end|>; preference and KTO rows tokenise
    as prompt + answer conversations; documents become BOS/EOS-framed chunks."""
    from test_loss_masks import _tokenizer

    from posttrain.config import DataConfig
    from posttrain.data.dataset import tokenize_records
    from posttrain.data.formats import ReadResult
    from posttrain.data.tokenize import tokenize_text

    tokenizer = _tokenizer("phi-2", "qwen2.5-instruct")
    result = read_dataset(resolve_dataset(name, search_dirs=[LF_DATA]))
    config = DataConfig(train="unused", max_length=1_000_000)  # no truncation: every turn must be there
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if EXPECTED_KIND[name] is Text:
        chunks = [c for r in result.records for c in tokenize_text(tokenizer, r.text, config.max_length)]
        assert len(chunks) >= len(result.records) and all(c.num_targets == len(c.input_ids) - 1 for c in chunks)
        return
    records = result.records
    if EXPECTED_KIND[name] is Preference:
        records = [
            Conversation(r.prompt + answer, meta=r.meta) for r in result.records for answer in (r.chosen, r.rejected)
        ]
    elif EXPECTED_KIND[name] is Unpaired:
        records = [Conversation(r.prompt + r.completion, meta=r.meta) for r in result.records]
    sequences = tokenize_records(
        ReadResult(records, result.format, "conversation", [], len(records), result.source), tokenizer, config
    )
    assert len(sequences) == len(records)
    for record, sequence in zip(records, sequences):
        assistant_turns = sum(m["role"] == "assistant" for m in record.messages)
        assert sequence.targets.count(end_id) == assistant_turns, record.meta


@needs_peer_data
def test_sft_trains_from_a_registry_name(toy, micro_model, tmp_path) -> None:
    """`data.train: alpaca_en_demo` resolves through dataset_info.json and trains (the toy tokenizer spells
    English out in small pieces, so long rows are truncated: the preflight limit is raised on purpose)."""
    from helpers import sft_config

    from posttrain.recipes import sft

    config = sft_config(
        micro_model,
        "alpaca_en_demo",
        tmp_path / "run",
        data__registry=str(LF_DATA),
        data__max_length=512,
        data__max_truncated_share=1.0,
        train__max_steps=2,
    )
    summary = sft.run(config)
    assert summary["train_sequences"] == 999 and summary["steps"] == 2
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
