"""Loss masks for ``data.last_turn_only`` and per-message ``train: false`` on the toy tokenizer, which every
checkout has (the real-tokenizer suite, ``test_loss_masks.py``, needs peer-data); and the guard that makes CI
fail, not skip, when peer-data is missing.

The toy template renders ``<|bos|>`` and then, per message, ``<|ROLE|>\\n CONTENT <|end|>\\n``; the toy tokenizer
keeps each special marker, word, digit, punctuation mark, space (``Ġ``) and newline (``Ċ``) as one token. So the
dialogue below is the 53 tokens of ``TOKENS``, and an assistant reply is trained on its content tokens and its
``<|end|>``: reply 1 is positions 29-30 (``5 <|end|>``), reply 2 positions 46-51 (``c Ġ b Ġ a <|end|>``). A
position p is trained when ``targets[p - 1] == input_ids[p]`` (the targets are shifted by one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO
from test_chat_data import DIALOGUE  # the same two-exchange dialogue the toy-tokenizer chat tests render
from transformers import AutoTokenizer

from posttrain.config import DataConfig
from posttrain.data.dataset import load_sequences
from posttrain.data.tokenize import tokenize_conversation
from posttrain.losses import IGNORE_INDEX

TOKENS = [
    "<|bos|>",
    "<|system|>",
    "Ċ",
    "Answer",
    "Ġ",
    "with",
    "Ġ",
    "the",
    "Ġ",
    "result",
    "Ġ",
    "only",
    ".",
    "<|end|>",
    "Ċ",
    "<|user|>",
    "Ċ",
    "Add",
    "Ġ",
    "2",
    "Ġ",
    "and",
    "Ġ",
    "3",
    ".",
    "<|end|>",
    "Ċ",
    "<|assistant|>",
    "Ċ",
    "5",
    "<|end|>",
    "Ċ",  # reply 1: positions 29, 30
    "<|user|>",
    "Ċ",
    "Reverse",
    ":",
    "Ġ",
    "a",
    "Ġ",
    "b",
    "Ġ",
    "c",
    "<|end|>",
    "Ċ",
    "<|assistant|>",
    "Ċ",
    "c",
    "Ġ",
    "b",
    "Ġ",
    "a",
    "<|end|>",
    "Ċ",  # reply 2: positions 46-51
]
REPLY_1 = [29, 30]
REPLY_2 = [46, 47, 48, 49, 50, 51]


@pytest.fixture(scope="module")
def tokenizer(toy):
    return AutoTokenizer.from_pretrained(toy.model)


def expected_targets(input_ids: list[int], trained_positions: list[int]) -> list[int]:
    """targets[t] = input_ids[t + 1] where position t + 1 is trained, else IGNORE_INDEX."""
    trained = set(trained_positions)
    return [input_ids[t + 1] if t + 1 in trained else IGNORE_INDEX for t in range(len(input_ids))]


def with_train_false(*assistant_turns: int) -> list[dict]:
    """DIALOGUE with ``train: false`` on the given assistant turns (0: the first reply, 1: the second)."""
    messages = [dict(m) for m in DIALOGUE]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for turn in assistant_turns:
        messages[assistant[turn]]["train"] = False
    return messages


def test_the_toy_rendering_is_the_hand_derived_one(tokenizer) -> None:
    sequence = tokenize_conversation(tokenizer, DIALOGUE, max_length=512)
    assert tokenizer.convert_ids_to_tokens(sequence.input_ids) == TOKENS
    assert sequence.targets == expected_targets(sequence.input_ids, REPLY_1 + REPLY_2)


@pytest.mark.parametrize(
    "messages, last_turn_only, trained",
    [
        (DIALOGUE, True, REPLY_2),
        (with_train_false(0), False, REPLY_2),
        (with_train_false(1), False, REPLY_1),
        (with_train_false(0), True, REPLY_2),
    ],
    ids=["last_turn_only", "first_reply_train_false", "second_reply_train_false", "train_false_and_last_turn_only"],
)
def test_exact_loss_mask(tokenizer, messages, last_turn_only, trained) -> None:
    sequence = tokenize_conversation(tokenizer, messages, max_length=512, last_turn_only=last_turn_only)
    assert tokenizer.convert_ids_to_tokens(sequence.input_ids) == TOKENS  # the mask changes, never the text
    assert sequence.targets == expected_targets(sequence.input_ids, trained)
    assert sequence.num_targets == len(trained)


@pytest.mark.parametrize("last_turn_only", [False, True])
def test_the_data_layer_passes_both_settings_through(tokenizer, toy, tmp_path, last_turn_only) -> None:
    """From a JSONL file (``train: false`` on the second reply of one row) through ``data.last_turn_only``."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": DIALOGUE}) + "\n" + json.dumps({"messages": with_train_false(1)}) + "\n")
    config = DataConfig(train=str(data), max_length=512, last_turn_only=last_turn_only)
    whole, second_off = load_sequences(config, tokenizer, "sft", seed=0).train
    assert whole.targets == expected_targets(whole.input_ids, REPLY_2 if last_turn_only else REPLY_1 + REPLY_2)
    # last_turn_only keeps the last *trained* reply: with the second one off, that is the first.
    assert second_off.targets == expected_targets(second_off.input_ids, REPLY_1)


def test_missing_peer_data_fails_under_ci_and_skips_otherwise(tmp_path) -> None:
    """`.ci/run` sets POSTTRAIN_REQUIRE_PEER_DATA=1: a test that needs peer-data then fails when the folder is
    missing, whether it asks through ``helpers.need_peer_file`` or through its own ``skipif``; `make test`
    without the flag skips them."""
    selected = [
        "tests/test_loss_masks.py::test_last_turn_only_trains_the_last_reply",  # need_peer_file
        "tests/test_registry.py::test_every_local_dataset_is_covered",  # its own skipif mark
        "tests/test_templates.py::test_hfjs_e2e_cases_render_exactly",  # its own pytest.skip, not naming peer-data
    ]
    env = {**os.environ, "POSTTRAIN_PEER_DATA": str(tmp_path / "no-peer-data")}
    env.pop("POSTTRAIN_REQUIRE_PEER_DATA", None)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "phi-2-default or covered or e2e",
        *selected,
    ]
    skipped = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert skipped.returncode == 0 and "3 skipped" in skipped.stdout, skipped.stdout[-3000:]
    required = subprocess.run(
        command, cwd=REPO, env={**env, "POSTTRAIN_REQUIRE_PEER_DATA": "1"}, capture_output=True, text=True, timeout=300
    )
    assert required.returncode == 1, required.stdout[-3000:]
    # A skipif mark is evaluated in set-up, so that test reports an error; either way it is not a skip.
    not_passed = [line for line in required.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    for test in selected:
        assert any(test in line for line in not_passed), required.stdout[-3000:]
    assert "skipped" not in required.stdout and "POSTTRAIN_REQUIRE_PEER_DATA" in required.stdout


def test_a_file_missing_from_present_peer_data_still_skips_under_ci() -> None:
    """With the folder present, a skip for one file the snapshot lacks (the Dolly blob) stays a skip."""
    from helpers import PEER_DATA

    if (
        not (PEER_DATA / "dolly" / "SOURCES.md").is_file()
        or (PEER_DATA / "dolly" / "databricks-dolly-15k.jsonl").is_file()
    ):
        pytest.skip("needs peer-data with its Dolly blob missing, as the shared snapshot is")
    test = "tests/test_data_inspect.py::test_the_real_dolly_15k_file_reads_as_dolly_with_its_eight_categories"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test]
    result = subprocess.run(
        command,
        cwd=REPO,
        env={**os.environ, "POSTTRAIN_REQUIRE_PEER_DATA": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout[-3000:]
