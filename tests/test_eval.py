"""Evaluation: each metric against a computation written out in the test (micro model, real forwards), and
``posttrain eval`` end to end on the micro model and a slice of the toy eval file."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import save_micro_model

from posttrain.cli import main
from posttrain.data.errors import DataError
from posttrain.eval import EvalError, evaluate_model, load_prompts
from posttrain.eval.kl import answer_kls, check_same_vocabulary, kl_to_reference
from posttrain.eval.multiple_choice import (
    cloze_prompt,
    evaluate_multiple_choice,
    letter_prompt,
    read_multiple_choice,
)
from posttrain.eval.perplexity import heldout_loss
from posttrain.eval.reward_model import score_file
from posttrain.eval.verifiable import verifiable_metrics
from posttrain.eval.win_rate import compare_answers, win_rate
from posttrain.rollout.hf import Response, render_prompt_ids


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def micro(micro_model: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(micro_model).eval(), AutoTokenizer.from_pretrained(micro_model)


@pytest.fixture(scope="module")
def other_micro_model(toy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second micro model with the same tokenizer and other weights."""
    return save_micro_model(toy.model, tmp_path_factory.mktemp("micro2") / "model", seed=1)


@pytest.fixture(scope="module")
def few_prompts(toy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 10 rows of the toy eval file."""
    lines = Path(toy.eval).read_text(encoding="utf-8").splitlines()[:10]
    path = tmp_path_factory.mktemp("prompts") / "eval10.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reward_dir(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained reward model (micro Llama + a random scalar head)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(micro_model, num_labels=1)
    torch.nn.init.normal_(model.score.weight, std=1.0)
    path = tmp_path_factory.mktemp("rm") / "model"
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(micro_model).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------- loss, perplexity


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_heldout_loss_is_the_token_mean_nll_of_the_assistant_tokens(micro, tmp_path) -> None:
    """Hand computation: the toy template renders ``<|bos|><|user|>\\nQ<|end|>\\n<|assistant|>\\nA<|end|>\\n``;
    the trained tokens are each assistant's ``A<|end|>``. Each segment is tokenised alone (the concatenation is
    checked to be the tokenisation of the whole), and the loss is sum of cross-entropy over those positions of
    both rows divided by their count."""
    model, tokenizer = micro
    rows = [
        {"messages": [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]},
        {
            "messages": [
                {"role": "user", "content": "Reverse: a b c"},
                {"role": "assistant", "content": "c b a"},
                {"role": "user", "content": "Sort: 3 1 2"},
                {"role": "assistant", "content": "1 2 3"},
            ]
        },
    ]
    total, count = 0.0, 0
    for row in rows:
        segments: list[tuple[str, bool]] = [("<|bos|>", False)]
        for message in row["messages"]:
            if message["role"] == "user":
                segments.append((f"<|user|>\n{message['content']}<|end|>\n<|assistant|>\n", False))
            else:
                segments += [(f"{message['content']}<|end|>", True), ("\n", False)]
        ids: list[int] = []
        trained: list[bool] = []
        for text, is_trained in segments:
            piece = _ids(tokenizer, text)
            ids += piece
            trained += [is_trained] * len(piece)
        full = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert ids == _ids(tokenizer, full), "the segments must tokenise as the whole conversation does"
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        positions = [t for t in range(1, len(ids)) if trained[t]]
        total += F.cross_entropy(
            logits[[t - 1 for t in positions]], torch.tensor([ids[t] for t in positions]), reduction="sum"
        ).item()
        count += len(positions)

    result = heldout_loss(model, tokenizer, _write_jsonl(tmp_path / "heldout.jsonl", rows))
    assert result["tokens"] == count and result["sequences"] == 2
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)


def test_heldout_loss_on_text_scores_every_token(micro, tmp_path) -> None:
    """Text rows: BOS + text + EOS, every next token scored."""
    model, tokenizer = micro
    texts = ["3 plus 4 equals 7.", "The reverse of a b c is c b a."]
    total, count = 0.0, 0
    for text in texts:
        ids = [tokenizer.bos_token_id, *_ids(tokenizer, text), tokenizer.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        total += F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    result = heldout_loss(model, tokenizer, _write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts]))
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


# ------------------------------------------------------------------------------------------ verifiable metrics


def test_verifiable_metrics_on_planted_answers() -> None:
    rows = load_prompts(
        [
            {"messages": [{"role": "user", "content": "Add 49 and 97."}], "reference": "146", "task": "add"},
            # No task field: the toy task is read from the prompt; 2 of 4 positions right → gold reward 0.5.
            {"messages": [{"role": "user", "content": "Reverse: b i q p"}], "reference": "p q i b", "task": None},
            # Not a toy prompt: gold reward is exact match (case-sensitive) as 0/1.
            {"messages": [{"role": "user", "content": "Capital of France?"}], "reference": "Paris", "task": None},
            # No reference: counted in length and EOS rate, not in exact match or gold reward.
            {"messages": [{"role": "user", "content": "Say hi."}], "reference": None, "task": None},
        ]
    )
    answers = [
        Response("146", [11, 12, 5], True),
        Response("p q b i", [1, 2, 3, 4, 5, 6, 7, 8], False),
        Response("paris", [9, 5], True),
        Response("hi", [10, 5], True),
    ]
    metrics = verifiable_metrics(rows, answers)
    assert metrics["exact_match"] == pytest.approx(1 / 3)
    assert metrics["gold_reward"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert metrics["length"] == pytest.approx((3 + 8 + 2 + 2) / 4)
    assert metrics["eos_rate"] == pytest.approx(3 / 4)
    assert metrics["answers"] == ["146", "p q b i", "paris", "hi"]
    assert metrics["answer_tokens"] == [3, 8, 2, 2] and metrics["finished"] == [True, False, True, True]
    assert metrics["samples"][1] == {"prompt": "Reverse: b i q p", "reference": "p q i b", "answer": "p q b i"}


# ------------------------------------------------------------------------------------------------------------ KL


def test_kl_is_zero_against_itself_positive_against_another_and_exact_per_position(micro, few_prompts) -> None:
    from posttrain.eval.common import generate_answers

    model, tokenizer = micro
    rows = load_prompts(few_prompts)[:4]
    answers = generate_answers(model, tokenizer, rows, max_new_tokens=5)
    messages = [row.messages for row in rows]
    assert kl_to_reference(model, model, tokenizer, messages, answers) == 0.0

    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in perturbed.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    prompt_ids = [render_prompt_ids(tokenizer, m) for m in messages]
    kls = answer_kls(model, perturbed, prompt_ids, [a.token_ids for a in answers], batch_size=4)
    assert all(kl > 0 for kl in kls)
    assert kl_to_reference(model, perturbed, tokenizer, messages, answers) == pytest.approx(sum(kls) / len(kls))

    # Brute force for prompt 1 (batched above with prompts of other lengths): one unpadded forward per answer
    # position, KL = sum_v p_v (log p_v - log q_v) in float64.
    ids = prompt_ids[1] + answers[1].token_ids
    expected = 0.0
    with torch.no_grad():
        for t in range(len(prompt_ids[1]), len(ids)):
            prefix = torch.tensor([ids[:t]])
            logp = F.log_softmax(model(prefix).logits[0, -1].double(), -1)
            logq = F.log_softmax(perturbed(prefix).logits[0, -1].double(), -1)
            expected += float((logp.exp() * (logp - logq)).sum())
    assert kls[1] == pytest.approx(expected, rel=1e-4)


def test_kl_refuses_models_with_different_vocabularies(micro) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model, _tokenizer = micro
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=17, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(EvalError, match="share a tokenizer"):
        check_same_vocabulary(model, other)


# ------------------------------------------------------------------------------------------------------ win-rate


def test_win_rate_counts_ties_as_half() -> None:
    assert win_rate([1.0, 0.5, 0.2, 0.9], [0.0, 0.5, 0.7, 0.1]) == {
        "win_rate": (2 + 0.5) / 4,
        "wins": 2,
        "ties": 1,
        "losses": 1,
    }


def test_win_rate_with_the_gold_reward_on_planted_answers() -> None:
    raw = [
        {"messages": [{"role": "user", "content": "Add 2 and 3."}], "reference": "5", "task": "add"},
        {"messages": [{"role": "user", "content": "Uppercase: dog cat"}], "reference": "DOG CAT", "task": "upper"},
        {"messages": [{"role": "user", "content": "Sort: 3 1 2"}], "reference": "1 2 3", "task": "sort"},
        {"messages": [{"role": "user", "content": "Capital of France?"}], "reference": "Paris", "task": None},
    ]
    rows = load_prompts(raw)
    answers_a = ["5", "DOG cat", "1 2 3", "Lyon"]  # win (exact vs miss), loss (half vs exact), tie, tie (both 0)
    answers_b = ["9", "DOG CAT", "1 2 3", "Rome"]
    result = compare_answers(rows, answers_a, answers_b, judge="gold")
    assert (result["wins"], result["ties"], result["losses"]) == (1, 2, 1)
    assert result["win_rate"] == pytest.approx((1 + 0.5 * 2) / 4)
    with pytest.raises(EvalError, match="reference"):
        compare_answers(load_prompts([{**raw[0], "reference": None}]), ["5"], ["9"], judge="gold")


# ------------------------------------------------------------------------------------------------ multiple choice


QUESTIONS = [
    ("Add 2 and 3.", ["5", "6", "7", "23"]),
    ("Reverse: a b c", ["c b a", "a b c", "b a c"]),
    ("Count the words: dog cat", ["1", "2", "3", "4"]),
]


def _continuation_logp(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = [tokenizer.bos_token_id, *_ids(tokenizer, context)]
    whole = [tokenizer.bos_token_id, *_ids(tokenizer, context + continuation)]
    assert whole[: len(context_ids)] == context_ids
    with torch.no_grad():
        logps = F.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return sum(float(logps[t - 1, whole[t]]) for t in range(len(context_ids), len(whole)))


def test_multiple_choice_picks_the_most_likely_letter_and_choice(micro, tmp_path) -> None:
    """The expected choices come from direct forwards: the letter continuation " A" after the MMLU prompt, and
    the per-byte log-likelihood of " {choice}" after the cloze prompt. Answers are then planted so that two of
    three letter predictions are right, in the three answer forms (letter, index, text)."""
    from posttrain.eval.multiple_choice import Question

    model, tokenizer = micro
    expected, expected_norm = [], []
    for question, choices in QUESTIONS:
        q = Question(question, tuple(choices), 0)
        letters = [
            _continuation_logp(model, tokenizer, letter_prompt(q), f" {'ABCD'[i]}") for i in range(len(choices))
        ]
        normed = [
            _continuation_logp(model, tokenizer, cloze_prompt(q), f" {c}") / len(f" {c}".encode()) for c in choices
        ]
        expected.append(max(range(len(choices)), key=letters.__getitem__))
        expected_norm.append(max(range(len(choices)), key=normed.__getitem__))
    wrong = (expected[2] + 1) % len(QUESTIONS[2][1])
    rows = [
        {"question": QUESTIONS[0][0], "choices": QUESTIONS[0][1], "answer": "ABCD"[expected[0]]},
        {"question": QUESTIONS[1][0], "choices": QUESTIONS[1][1], "answer": expected[1]},
        {"question": QUESTIONS[2][0], "choices": QUESTIONS[2][1], "answer": QUESTIONS[2][1][wrong]},
    ]
    answers = [expected[0], expected[1], wrong]
    result = evaluate_multiple_choice(model, tokenizer, _write_jsonl(tmp_path / "mc.jsonl", rows), batch_size=5)
    assert result["predictions"] == expected and result["predictions_norm"] == expected_norm
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["accuracy_norm"] == pytest.approx(sum(p == a for p, a in zip(expected_norm, answers)) / 3)

    # C-Eval's columns in a CSV (question, A, B, C, D, answer as a letter): the same questions, same predictions.
    csv_lines = ["id,question,A,B,C,D,answer"]
    for index, ((question, choices), answer) in enumerate(zip(QUESTIONS, answers)):
        cells = (list(choices) + [""] * 4)[:4]  # a 3-choice question leaves column D empty
        csv_lines.append(",".join([str(index), f'"{question}"', *cells, "ABCD"[answer]]))
    ceval = tmp_path / "ceval.csv"
    ceval.write_text("\n".join(csv_lines) + "\n", encoding="utf-8")
    assert [q.choices for q in read_multiple_choice(ceval)] == [tuple(c) for _q, c in QUESTIONS]
    assert evaluate_multiple_choice(model, tokenizer, ceval)["predictions"] == expected


def test_multiple_choice_bad_rows_name_file_line_and_field(tmp_path) -> None:
    good = {"question": "Add 2 and 3.", "choices": ["5", "6"], "answer": 0}
    cases = [
        ({"question": "Q?", "choices": ["x", "y"], "answer": "C"}, "answer"),
        ({"question": "Q?", "choices": ["x", "y"], "answer": 2}, "answer"),
        ({"question": "Q?", "choices": "x y", "answer": 0}, "choices"),
        ({"question": "", "choices": ["x", "y"], "answer": 0}, "question"),
        ({"question": "Q?", "answer": 0}, "choices"),
    ]
    for row, field in cases:
        path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(DataError) as error:
            read_multiple_choice(path)
        assert str(error.value).startswith(f"{path}:2: field '{field}'"), str(error.value)


# ------------------------------------------------------------------------------------ evaluate_model, reward model


def test_evaluate_model_reports_every_metric_and_zero_kl_to_itself(micro_model, few_prompts, reward_dir) -> None:
    from posttrain.eval.reward_model import RewardScorer

    rows = [json.loads(line) for line in few_prompts.read_text().splitlines()][:6]
    result = evaluate_model(
        micro_model, rows, reward_model=reward_dir, reference=micro_model, max_new_tokens=4, batch_size=4
    )
    assert {
        "exact_match",
        "gold_reward",
        "length",
        "eos_rate",
        "samples",
        "answers",
        "rm_score",
        "kl_to_reference",
    } <= set(result)
    assert len(result["answers"]) == 6 and len(result["samples"]) == 5
    assert 0 < result["length"] <= 4 and 0 <= result["eos_rate"] <= 1
    assert result["kl_to_reference"] == 0.0
    # The reward-model score is the scorer's mean over (prompt + answer) conversations.
    scores = RewardScorer(reward_dir).score(
        [r["messages"] + [{"role": "assistant", "content": a}] for r, a in zip(rows, result["answers"])]
    )
    assert result["rm_score"] == pytest.approx(sum(scores) / len(scores), rel=1e-5)


# --------------------------------------------------------------------------------------------------------- the CLI


def test_cli_eval_prompts_prints_a_table_and_writes_json(
    micro_model, other_micro_model, few_prompts, tmp_path, capsys
) -> None:
    out = tmp_path / "eval.json"
    code = main(
        [
            "eval",
            str(micro_model),
            str(other_micro_model),
            "--data",
            str(few_prompts),
            "--max-new-tokens",
            "4",
            "--reference",
            str(micro_model),
            "--judge",
            "gold",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    header = next(line for line in printed.out.splitlines() if line.startswith("model"))
    for column in ("exact_match", "gold_reward", "length", "eos_rate", "kl_to_reference", "win_rate"):
        assert column in header
    assert str(other_micro_model) in printed.out
    report = json.loads(out.read_text())
    first, second = report["models"][str(micro_model)], report["models"][str(other_micro_model)]
    assert report["kind"] == "prompts" and report["baseline"] == str(micro_model)
    assert first["kl_to_reference"] == 0.0 and second["kl_to_reference"] > 0
    assert len(first["answers"]) == 10 and "win_rate" not in first
    assert second["wins"] + second["ties"] + second["losses"] == 10
    assert second["win_rate"] == pytest.approx((second["wins"] + 0.5 * second["ties"]) / 10)


def test_cli_eval_loss_and_multiple_choice(micro, micro_model, toy, tmp_path, capsys) -> None:
    sft = tmp_path / "sft8.jsonl"
    sft.write_text("\n".join(Path(toy.sft).read_text().splitlines()[:8]) + "\n")
    out = tmp_path / "loss.json"
    assert main(["eval", str(micro_model), "--data", str(sft), "--out", str(out)]) == 0
    assert "perplexity" in capsys.readouterr().out
    metrics = json.loads(out.read_text())["models"][str(micro_model)]
    assert metrics["loss"] == pytest.approx(heldout_loss(*micro, sft)["loss"], rel=1e-6)

    mc = _write_jsonl(tmp_path / "mc.jsonl", [{"question": q, "choices": c, "answer": 0} for q, c in QUESTIONS])
    out = tmp_path / "mc.json"
    assert main(["eval", str(micro_model), "--data", str(mc), "--out", str(out)]) == 0
    assert set(json.loads(out.read_text())["models"][str(micro_model)]) >= {"accuracy", "accuracy_norm", "questions"}


def test_cli_eval_reward_model_accuracy_agrees_with_score_file(micro_model, reward_dir, toy, tmp_path, capsys) -> None:
    prefs = tmp_path / "prefs10.jsonl"
    prefs.write_text("\n".join(Path(toy.prefs).read_text().splitlines()[:10]) + "\n")
    out = tmp_path / "rm.json"
    assert main(["eval", str(reward_dir), "--data", str(prefs), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["models"][str(reward_dir)]
    summary = score_file(reward_dir, prefs)
    assert metrics["accuracy"] == summary["accuracy"] and metrics["mean_gap"] == pytest.approx(summary["mean_gap"])

    capsys.readouterr()
    assert main(["eval", str(micro_model), "--data", str(prefs)]) == 2
    assert "not a reward model" in capsys.readouterr().err


def test_cli_eval_errors_are_messages(micro_model, few_prompts, tmp_path, capsys) -> None:
    assert main(["eval", str(micro_model), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["eval", str(micro_model), "--data", str(few_prompts), "--judge", "gold"]) == 2
    assert "two or more" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nowhere"), "--data", str(few_prompts)]) == 2
    assert "not a model" in capsys.readouterr().err
