"""Exact match, gold reward, answer length and EOS rate of greedy answers to prompts with reference answers
(the toy tasks' eval.jsonl, or any prompt rows with a ``reference``).

Generation (:func:`~posttrain.eval.common.generate_answers`) and scoring (:func:`verifiable_metrics`) are
separate, so the metrics can be checked on hand-made answers and the answers reused (reward-model score, KL,
win-rate) without generating twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from posttrain.tasks import TASKS, exact_match, gold_reward, task_of
from posttrain.eval.common import PromptRow, generate_answers, prompt_text, read_prompts

__all__ = ["evaluate_verifiable", "read_prompts", "reference_reward", "verifiable_metrics"]


def toy_task(row: PromptRow) -> str | None:
    """The toy task a row belongs to: its ``task`` field when that names a toy task, else the task whose
    phrasing its prompt uses, else None."""
    task = row.get("task")
    if isinstance(task, str) and task in TASKS:
        return task
    try:
        return task_of(prompt_text(row))
    except ValueError:
        return None


def reference_reward(row: PromptRow, answer: str) -> float:
    """Gold reward of ``answer``: the toy task's graded reward (:func:`~posttrain.tasks.gold_reward`) for
    a toy prompt, else exact match as 0/1. The row must have a reference."""
    reference = row.get("reference")
    if reference is None:
        raise ValueError(f"prompt {prompt_text(row)[:60]!r} has no reference answer to score against")
    task = toy_task(row)
    return gold_reward(task, answer, reference) if task else float(exact_match(answer, reference))


def verifiable_metrics(rows: Sequence[PromptRow], answers: Sequence[Any]) -> dict[str, Any]:
    """Metrics of answers (``rollout.hf.Response``-like: ``text``, ``token_ids``, ``finished``) to ``rows``.

    - ``exact_match`` / ``gold_reward``: means over the rows that have a reference (None when none has);
    - ``length``: mean answer length in tokens (the stop token included, as generated);
    - ``eos_rate``: share of answers that ended with a stop token rather than at ``max_new_tokens``;
    - ``samples``: the first 5 as ``{prompt, reference, answer}``; ``answers``, ``answer_tokens``, ``finished``:
      every answer's text, token count and whether it finished, in prompt order."""
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} prompts but {len(answers)} answers")
    if not rows:
        raise ValueError("no prompts to score")
    scored = [(row, answer.text) for row, answer in zip(rows, answers) if row.get("reference") is not None]
    matches = [float(exact_match(text, row["reference"])) for row, text in scored]
    rewards = [reference_reward(row, text) for row, text in scored]
    return {
        "prompts": len(rows),
        "exact_match": sum(matches) / len(scored) if scored else None,
        "gold_reward": sum(rewards) / len(scored) if scored else None,
        "length": sum(len(a.token_ids) for a in answers) / len(answers),
        "eos_rate": sum(bool(a.finished) for a in answers) / len(answers),
        "samples": [
            {"prompt": prompt_text(row), "reference": row.get("reference"), "answer": answer.text}
            for row, answer in zip(rows[:5], answers[:5])
        ],
        "answers": [a.text for a in answers],
        "answer_tokens": [len(a.token_ids) for a in answers],
        "finished": [bool(a.finished) for a in answers],
    }


def evaluate_verifiable(
    model: Any, tokenizer: Any, rows: list[PromptRow], max_new_tokens: int = 32, batch_size: int = 64
) -> dict[str, Any]:
    """Greedy answers to each prompt, scored by :func:`verifiable_metrics`."""
    answers = generate_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return verifiable_metrics(rows, answers)
