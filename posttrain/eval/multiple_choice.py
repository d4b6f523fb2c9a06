"""Multiple-choice benchmarks (MMLU, C-Eval, ...) from a local JSONL / JSON / CSV / Parquet file, scored by
log-likelihood.

Rows: ``{"question", "choices": [...], "answer"}`` (MMLU's layout; ``choices`` may be JSON text in a CSV) or
C-Eval's columns ``question, A, B, C, D, answer``. ``answer`` is the choice's index (0-based int), its letter
("A".."Z") or its text; in a CSV, where every cell is text, a letter is read first, then a choice's text, then
digits as the index.

Two accuracies, as lm-evaluation-harness reports them:

- ``accuracy``: the MMLU prompt ``"{question}\\nA. {choice}\\nB. ...\\nAnswer:"``, and the choice whose letter
  continuation (``" A"``, ``" B"``, ...) has the highest log-probability (Hendrycks et al.'s original
  evaluation; the letters are compared on equal terms since each is one short continuation).
- ``accuracy_norm``: the cloze prompt ``"{question}\\nAnswer:"``, and the choice whose text continuation
  (``" {choice}"``) has the highest log-probability per UTF-8 byte of that continuation (the harness's
  ``acc_norm``: without the normalisation, short choices win).

Prompts are plain text with BOS (no chat template), as base models are evaluated. A continuation's tokens
are those of ``context + continuation`` after the context's tokens when the context's tokenisation is a
prefix of the whole (the harness's rule), else the continuation tokenised alone.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from posttrain.data.errors import DataError
from posttrain.data.formats import file_rows
from posttrain.eval.common import device_of
from posttrain.models.modes import eval_mode

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; ``answer`` is the right choice's index; ``where`` is ``file:line``."""

    question: str
    choices: tuple[str, ...]
    answer: int
    where: str = ""


def looks_like_multiple_choice(row: Any) -> bool:
    """Whether a raw row has the fields of a multiple-choice question (either layout)."""
    return (
        isinstance(row, dict)
        and "question" in row
        and "answer" in row
        and ("choices" in row or ("A" in row and "B" in row))
    )


def _choices(row: dict[str, Any], where: Any) -> tuple[str, ...]:
    if "choices" in row:
        value = row["choices"]
        if isinstance(value, str) and where.text_cells:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise where.error("choices", "expected a JSON list of choice texts in this CSV cell") from None
        if not isinstance(value, list):
            raise where.error("choices", f"expected a list of choice texts, got {type(value).__name__}")
        if len(value) < 2:
            raise where.error("choices", f"expected at least 2 choices, got {len(value)}")
        if len(value) > len(LETTERS):
            raise where.error(
                "choices", f"{len(value)} choices; at most {len(LETTERS)} (one letter each) are supported"
            )
        field_names = [f"choices[{i}]" for i in range(len(value))]
    else:
        # C-Eval's columns A, B, C, D; an empty cell (None) ends the choices, for files mixing 4 and 5 choices.
        count = next((i for i, letter in enumerate(LETTERS) if row.get(letter) is None), len(LETTERS))
        if count < 2:
            raise where.error(LETTERS[count], "expected at least 2 choices in columns A, B, ...; this one is empty")
        value = [row[letter] for letter in LETTERS[:count]]
        field_names = list(LETTERS[:count])
    for name, choice in zip(field_names, value):
        if isinstance(choice, (int, float)) and not isinstance(choice, bool):
            continue  # a numeric choice ("42") is read as its text
        if not isinstance(choice, str) or not choice.strip():
            raise where.error(name, f"expected a non-empty choice text, got {choice!r}")
    return tuple(str(c) for c in value)


def _answer(value: Any, choices: tuple[str, ...], where: Any) -> int:
    expected = (
        f"expected the index (0..{len(choices) - 1}), letter (A..{LETTERS[len(choices) - 1]}) or text of a choice"
    )
    if isinstance(value, bool) or value is None:
        raise where.error("answer", f"{expected}, got {value!r}")
    if isinstance(value, int):
        if 0 <= value < len(choices):
            return value
        raise where.error("answer", f"{expected}, got index {value} (there are {len(choices)} choices)")
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text in LETTERS[: len(choices)]:
            return LETTERS.index(text)
        if text in choices:
            return choices.index(text)
        if where.text_cells and text.isdigit() and int(text) < len(choices):
            return int(text)
    raise where.error("answer", f"{expected}, got {value!r}")


def read_multiple_choice(path: str | Path) -> list[Question]:
    """Every row of ``path`` as a :class:`Question`; a bad row raises DataError naming file, line and field."""

    questions: list[Question] = []
    for item in file_rows(path):
        if isinstance(item, DataError):
            raise item
        where, row = item
        if not isinstance(row, dict):
            raise where.error(None, f"expected an object with question, choices and answer, got {type(row).__name__}")
        if not looks_like_multiple_choice(row):
            missing = [name for name in ("question", "answer") if name not in row] + (
                [] if "choices" in row or "A" in row else ["choices (or columns A, B, ...)"]
            )
            raise where.error(
                missing[0].split(" ")[0],
                f"missing {', '.join(missing)}; a multiple-choice row has question, choices and answer",
            )
        question = row["question"]
        if not isinstance(question, str) or not question.strip():
            raise where.error("question", f"expected a non-empty string, got {question!r}")
        choices = _choices(row, where)
        questions.append(
            Question(question, choices, _answer(row["answer"], choices, where), f"{where.path}:{where.line}")
        )
    if not questions:
        raise DataError(path, None, None, "no rows (the file is empty)")
    return questions


def letter_prompt(question: Question) -> str:
    """The MMLU prompt: the question, its lettered choices, then ``Answer:``."""
    lines = [question.question.strip(), *(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices))]
    return "\n".join(lines) + "\nAnswer:"


def cloze_prompt(question: Question) -> str:
    """The cloze prompt for ``accuracy_norm``: the question, then ``Answer:``."""
    return f"{question.question.strip()}\nAnswer:"


def encode_continuation(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` (BOS first when the tokenizer has one) and of ``continuation`` after it."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        continuation_ids = whole[len(context_ids) :]
    else:
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return bos + context_ids, continuation_ids


@torch.no_grad()
def continuation_logprobs(
    model: Any, requests: Sequence[tuple[list[int], list[int]]], batch_size: int = 16
) -> list[float]:
    """Summed log-probability of each ``(context_ids, continuation_ids)`` continuation given its context."""
    device = device_of(model)
    results: list[float] = []
    with eval_mode(model):
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            width = max(len(c) + len(x) for c, x in chunk)
            input_ids = torch.zeros((len(chunk), width), dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            targets = torch.full((len(chunk), width), -1, dtype=torch.long)
            for row, (context, continuation) in enumerate(chunk):
                ids = list(context) + list(continuation)
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
                # Position t predicts token t + 1: the continuation's tokens are predicted from len(context) - 1 on.
                targets[row, len(context) - 1 : len(ids) - 1] = torch.tensor(continuation)
            targets = targets.to(device)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            scored = targets >= 0
            logps = F.log_softmax(logits[scored].float(), dim=-1).gather(-1, targets[scored].unsqueeze(-1)).squeeze(-1)
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
            rows = torch.arange(len(chunk), device=device).unsqueeze(-1).expand_as(scored)[scored]
            results += sums.index_add_(0, rows, logps.double()).tolist()
    return results


def evaluate_multiple_choice(
    model: Any, tokenizer: Any, questions: str | Path | Sequence[Question], batch_size: int = 16
) -> dict[str, Any]:
    """``accuracy`` (letter log-probs after the MMLU prompt) and ``accuracy_norm`` (per-byte log-likelihood of
    each choice's text after a cloze prompt) on a file or list of :class:`Question` s; with the number of
    ``questions`` and each question's ``predictions`` (letter) and ``predictions_norm`` (choice text) index."""
    if isinstance(questions, (str, Path)):
        questions = read_multiple_choice(questions)
    letter_requests, cloze_requests, cloze_bytes = [], [], []
    for question in questions:
        prompt, cloze = letter_prompt(question), cloze_prompt(question)
        for index, choice in enumerate(question.choices):
            letter_requests.append(encode_continuation(tokenizer, prompt, f" {LETTERS[index]}"))
            cloze_requests.append(encode_continuation(tokenizer, cloze, f" {choice}"))
            cloze_bytes.append(len(f" {choice}".encode()))
    letter_logps = continuation_logprobs(model, letter_requests, batch_size)
    cloze_logps = continuation_logprobs(model, cloze_requests, batch_size)
    predictions, predictions_norm, offset = [], [], 0
    for question in questions:
        n = len(question.choices)
        letters = letter_logps[offset : offset + n]
        normed = [
            logp / size for logp, size in zip(cloze_logps[offset : offset + n], cloze_bytes[offset : offset + n])
        ]
        predictions.append(max(range(n), key=letters.__getitem__))
        predictions_norm.append(max(range(n), key=normed.__getitem__))
        offset += n
    answers = [q.answer for q in questions]
    return {
        "questions": len(questions),
        "accuracy": sum(p == a for p, a in zip(predictions, answers)) / len(questions),
        "accuracy_norm": sum(p == a for p, a in zip(predictions_norm, answers)) / len(questions),
        "predictions": predictions,
        "predictions_norm": predictions_norm,
    }
