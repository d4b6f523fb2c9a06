"""Tests for the toy kit (posttrain.toy) and its verifiable tasks (posttrain.tasks).

Every later stage trains and tests on this kit, so these tests pin what they rely on: the model and tokenizer
load with Auto* classes, the chat template's prompt is a prefix of the conversation, EOS is end of turn, the
build is deterministic, evaluation is held out, and the gold reward is exact at 1.0 and monotone below it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.tasks import DEFAULT_TASKS, TASK_NAMES, TASKS, corrupt, exact_match, gold_reward, task_of
from posttrain.toy import DEFAULT_COUNTS, SPECIAL_TOKENS, ToyPaths, build_toy

DATA_FILES = ("sft", "prefs", "prompts", "eval", "pretrain")


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two tiny builds with seed 0 and one with seed 1. (How long a build takes is measured by
    `benchmarks/demo_seeds.py --budgets`, not asserted here.)"""
    root = tmp_path_factory.mktemp("toy")
    return {
        "a": build_toy(root / "a", size="tiny", seed=0),
        "b": build_toy(root / "b", size="tiny", seed=0),
        "c": build_toy(root / "c", size="tiny", seed=1),
    }


@pytest.fixture(scope="module")
def toy(builds: dict[str, object]) -> ToyPaths:
    return builds["a"]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def tokenizer(toy: ToyPaths):
    return AutoTokenizer.from_pretrained(toy.model)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---- model and tokenizer ---------------------------------------------------------------------------------------


def test_model_loads_with_tiny_architecture(toy: ToyPaths, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy.model)
    config = model.config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.intermediate_size % 64 == 0
    assert config.max_position_embeddings == 1024
    assert config.tie_word_embeddings
    assert config.vocab_size == len(tokenizer)


def test_forward_gives_logits_over_vocab(toy: ToyPaths, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy.model).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False)
    input_ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_special_tokens_and_eos(toy: ToyPaths, tokenizer) -> None:
    model = AutoModelForCausalLM.from_pretrained(toy.model)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|bos|>", "<|end|>", "<|pad|>")
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    assert tokenizer.eos_token_id == end_id
    assert model.generation_config.eos_token_id == end_id
    assert model.config.eos_token_id == end_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.padding_side == "right" and tokenizer.model_max_length == 1024
    # Each special token is one token, also in running text.
    assert tokenizer("x<|user|>y<|end|>")["input_ids"][1] == tokenizer.convert_tokens_to_ids("<|user|>")


def test_unicode_round_trips(tokenizer) -> None:
    for text in ("héllo 世界 42", "naïve café — ✓ 🙂\n\ttabs", "Add 23 and 58."):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_digits_are_single_tokens(tokenizer) -> None:
    for digit in "0123456789":
        assert len(tokenizer(digit)["input_ids"]) == 1
    tokens = tokenizer.tokenize("12345 and 908")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == list("12345908")


def test_words_are_the_same_token_in_prompt_and_answer(tokenizer) -> None:
    """Spaces are their own token, so "door" after "Repeat: " and "door" at the start of the answer (after a
    newline) are one and the same token; copy/reverse/upper then need no per-word lookup table."""
    prompt_tokens = tokenizer.tokenize("Repeat: door cat")
    answer_tokens = tokenizer.tokenize("<|assistant|>\ndoor cat")
    assert prompt_tokens[-3:] == answer_tokens[-3:] == ["door", "Ġ", "cat"]


def test_chat_template_prefix_and_turn_ends(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer with the result only."},
        {"role": "user", "content": "Add 23 and 58."},
        {"role": "assistant", "content": "81"},
        {"role": "user", "content": "Reverse: c a t"},
        {"role": "assistant", "content": "t a c"},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    assert full.startswith(prompt) and len(full) > len(prompt)
    assert full[len(prompt) :] == "t a c<|end|>\n"
    assert full.startswith("<|bos|>")
    for message in messages:
        assert f"<|{message['role']}|>\n{message['content']}<|end|>" in full
    assert full.count("<|end|>") == len(messages)
    # Token-level prefix too: SFT masks and RL rollouts split prompt from response on token ids.
    full_ids = tokenizer(full)["input_ids"]
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    # The template writes <|bos|>; the tokenizer must not add a second one.
    assert full_ids.count(tokenizer.bos_token_id) == 1 and full_ids[0] == tokenizer.bos_token_id
    assert tokenizer("Add 1 and 2.")["input_ids"][0] != tokenizer.bos_token_id


def test_chat_template_rejects_unknown_role(tokenizer) -> None:
    with pytest.raises(Exception, match="role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


# ---- build -----------------------------------------------------------------------------------------------------


def test_same_seed_is_deterministic(builds: dict[str, object]) -> None:
    a, b = builds["a"], builds["b"]
    for name in DATA_FILES:
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes(), name
    for name in ("tokenizer.json", "config.json", "generation_config.json"):
        assert (a.model / name).read_bytes() == (b.model / name).read_bytes(), name
    weights_a = AutoModelForCausalLM.from_pretrained(a.model).state_dict()
    weights_b = AutoModelForCausalLM.from_pretrained(b.model).state_dict()
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


def test_different_seed_changes_data(builds: dict[str, object]) -> None:
    a, c = builds["a"], builds["c"]
    for name in DATA_FILES:
        assert getattr(a, name).read_bytes() != getattr(c, name).read_bytes(), name


def test_unknown_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tiny.*small"):
        build_toy(tmp_path, size="huge")
    assert not (tmp_path / "data").exists()  # nothing written before the check


def test_unknown_count_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sft"):
        build_toy(tmp_path, sfft=10)


def test_row_counts_are_parameters(tmp_path: Path) -> None:
    paths = build_toy(tmp_path, sft=12, prefs=7, prompts=5, eval=6, pretrain=4)
    assert [len(read_jsonl(getattr(paths, n))) for n in DATA_FILES] == [12, 7, 5, 6, 4]


# ---- data ------------------------------------------------------------------------------------------------------


def user_prompts(row: dict) -> list[str]:
    messages = row.get("messages", []) + row.get("prompt", [])
    return [m["content"] for m in messages if m["role"] == "user"]


def test_rows_have_expected_shape(toy: ToyPaths) -> None:
    sft = read_jsonl(toy.sft)
    assert len(sft) == DEFAULT_COUNTS["sft"]
    for row in sft:
        assert set(row) == {"messages", "task"}
        roles = [m["role"] for m in row["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles in (["user", "assistant"], ["user", "assistant"] * 2)
        assert all(set(m) == {"role", "content"} and m["content"] for m in row["messages"])
        # The row's task is its last exchange, and its answer is correct.
        assert task_of(row["messages"][-2]["content"]) == row["task"]
    with_system = sum(r["messages"][0]["role"] == "system" for r in sft) / len(sft)
    two_turn = sum(sum(m["role"] == "user" for m in r["messages"]) == 2 for r in sft) / len(sft)
    assert 0.10 < with_system < 0.20 and 0.06 < two_turn < 0.14

    prefs = read_jsonl(toy.prefs)
    assert len(prefs) == DEFAULT_COUNTS["prefs"]
    for row in prefs:
        assert set(row) == {"prompt", "chosen", "rejected", "task"}
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert [m["role"] for m in row["chosen"]] == [m["role"] for m in row["rejected"]] == ["assistant"]
        assert task_of(row["prompt"][0]["content"]) == row["task"]
        assert not exact_match(row["chosen"][0]["content"], row["rejected"][0]["content"])

    for name in ("prompts", "eval"):
        rows = read_jsonl(getattr(toy, name))
        assert len(rows) == DEFAULT_COUNTS[name]
        for row in rows:
            assert set(row) == {"messages", "reference", "task"}
            assert [m["role"] for m in row["messages"]] == ["user"]
            assert task_of(row["messages"][0]["content"]) == row["task"]
        assert set(r["task"] for r in rows) == set(DEFAULT_TASKS)

    pretrain = read_jsonl(toy.pretrain)
    assert len(pretrain) == DEFAULT_COUNTS["pretrain"]
    assert all(set(row) == {"text"} and row["text"].strip() for row in pretrain)


def test_references_are_correct(toy: ToyPaths) -> None:
    """The chosen/reference answers score 1.0 against a recomputation from the prompt (catches a swapped
    reference), checked on add and sort where the answer is easy to recompute here."""
    rows = read_jsonl(toy.prompts) + read_jsonl(toy.eval)
    for row in rows:
        prompt = row["messages"][0]["content"]
        if row["task"] == "add":
            a, b = (int(x) for x in prompt.removeprefix("Add ").removesuffix(".").split(" and "))
            assert row["reference"] == str(a + b)
        elif row["task"] == "sort":
            digits = sorted(int(x) for x in prompt.removeprefix("Sort: ").split())
            assert row["reference"] == " ".join(map(str, digits))
    for row in read_jsonl(toy.prefs):
        assert gold_reward(row["task"], row["chosen"][0]["content"], row["chosen"][0]["content"]) == 1.0


def test_eval_prompts_are_held_out(toy: ToyPaths) -> None:
    eval_prompts = [row["messages"][0]["content"] for row in read_jsonl(toy.eval)]
    assert len(set(eval_prompts)) == len(eval_prompts)
    train_prompts: set[str] = set()
    for name in ("sft", "prefs", "prompts"):
        for row in read_jsonl(getattr(toy, name)):
            train_prompts.update(user_prompts(row))
    for row in read_jsonl(toy.pretrain):
        if " Answer: " in row["text"]:
            train_prompts.add(row["text"].split(" Answer: ")[0])
    assert len(train_prompts) > 1000
    assert not set(eval_prompts) & train_prompts


# ---- tasks and gold reward -------------------------------------------------------------------------------------


def test_generated_prompts_identify_their_task() -> None:
    rng = random.Random(0)
    for name, task in TASKS.items():
        for _ in range(50):
            prompt, reference = task.generate(rng)
            assert task_of(prompt) == name
            assert gold_reward(name, reference, reference) == 1.0
    with pytest.raises(ValueError, match="no toy task"):
        task_of("Tell me a story.")


def test_exact_match_normalises_whitespace_only() -> None:
    assert exact_match("  t a\tc \n", "t a c")
    assert not exact_match("T A C", "t a c")
    assert not exact_match("tac", "t a c")


# (task, reference, responses from most to least correct); the rewards must strictly decrease.
MONOTONE_CASES = [
    ("add", "81", ["81", "80", "83", "90", "70", "40"]),
    ("count", "5", ["5", "4", "7", "1"]),
    ("reverse", "t a c", ["t a c", "t a x", "t x x", "x x x"]),
    ("sort", "1 3 4 7 9", ["1 3 4 7 9", "1 3 4 9 7", "1 3 7 4 0", "9 7 4 3 1"]),
    ("copy", "red fox sky", ["red fox sky", "red fox sea", "red owl sea", "owl owl sea"]),
    ("upper", "RED FOX", ["RED FOX", "RED fox", "red fox"]),
]


@pytest.mark.parametrize("task, reference, responses", MONOTONE_CASES, ids=[c[0] for c in MONOTONE_CASES])
def test_gold_reward_is_monotone(task: str, reference: str, responses: list[str]) -> None:
    rewards = [gold_reward(task, r, reference) for r in responses]
    assert rewards[0] == 1.0
    assert all(0.0 <= r < 1.0 for r in rewards[1:])
    assert rewards == sorted(rewards, reverse=True) and len(set(rewards)) == len(rewards), rewards


@pytest.mark.parametrize("task", TASK_NAMES)
def test_gold_reward_does_not_pay_for_length(task: str) -> None:
    _, reference = TASKS[task].generate(random.Random(3))
    assert gold_reward(task, "", reference) == 0.0
    assert gold_reward(task, "   \n", reference) == 0.0
    assert gold_reward(task, "qwerty zxcv !!", reference) == 0.0
    for padded in (
        reference + " " + reference,
        reference + " x" * 20,
        " ".join([reference] * 10),
        reference + "." * 30,
    ):
        assert gold_reward(task, padded, reference) < 1.0


def test_gold_reward_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="add"):
        gold_reward("multiply", "6", "6")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_corrupt_is_never_the_reference(task: str) -> None:
    rng = random.Random(7)
    for _ in range(500):
        _, reference = TASKS[task].generate(rng)
        wrong = corrupt(task, reference, rng)
        assert wrong.strip() and not exact_match(wrong, reference)
        assert gold_reward(task, wrong, reference) < 1.0
