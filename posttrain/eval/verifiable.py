"""Exact match, gold reward, answer length and EOS rate of greedy answers to prompts with reference answers
(the toy tasks' eval.jsonl, or any prompt rows with a ``reference``).

Generation (:func:`~posttrain.eval.common.generate_answers`) and scoring (:func:`verifiable_metrics`) are
separate, so the metrics can be checked on hand-made answers and the answers reused (reward-model score, KL,
win-rate) without generating twice. Both count through :func:`answer_sums`; :func:`held_out_sums` is the same
evaluation for a training run, from a rollout engine and with the run's reward, on one process's share of the
prompts: its totals are summed over processes, then :func:`held_out_means` divides them
(:func:`held_out_evaluation` does all three).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from posttrain.data.records import Prompt
from posttrain.eval.common import prompt_text
from posttrain.rollout import Response, RolloutEngine, SamplingSettings
from posttrain.rollout.prompts import TokenizedPrompt
from posttrain.tasks import TASKS, exact_match, gold_reward, task_of

if TYPE_CHECKING:  # rewards reaches eval's reward-model scorer: a type, not a layer below
    from posttrain.rewards import Reward, WeightedReward

__all__ = [
    "answer_sums",
    "gold_sum",
    "held_out_evaluation",
    "held_out_means",
    "held_out_sums",
    "reference_reward",
    "verifiable_metrics",
]


def toy_task(row: Prompt) -> str | None:
    """The toy task a row belongs to: its ``task`` field when that names a toy task, else the task whose
    phrasing its prompt uses, else None."""
    task = row.meta.get("task")
    if isinstance(task, str) and task in TASKS:
        return task
    try:
        return task_of(prompt_text(row))
    except ValueError:
        return None


def reference_reward(row: Prompt, answer: str) -> float:
    """Gold reward of ``answer``: the toy task's graded reward (:func:`~posttrain.tasks.gold_reward`) for
    a toy prompt, else exact match as 0/1. The row must have a reference."""
    reference = row.reference
    if reference is None:
        raise ValueError(f"prompt {prompt_text(row)[:60]!r} has no reference answer to score against")
    task = toy_task(row)
    return gold_reward(task, answer, reference) if task else float(exact_match(answer, reference))


def verifiable_metrics(rows: Sequence[Prompt], answers: Sequence[Any]) -> dict[str, Any]:
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
    sums = answer_sums([row.reference for row in rows], answers)
    scored = [(row, answer.text) for row, answer in zip(rows, answers) if row.reference is not None]
    rewards = [reference_reward(row, text) for row, text in scored]
    return {
        "prompts": len(rows),
        "exact_match": sums["exact_match"] / len(scored) if scored else None,
        "gold_reward": sum(rewards) / len(scored) if scored else None,
        "length": sums["length"] / len(answers),
        "eos_rate": sums["finished"] / len(answers),
        "samples": [
            {"prompt": prompt_text(row), "reference": row.reference, "answer": answer.text}
            for row, answer in zip(rows[:5], answers[:5])
        ],
        "answers": [a.text for a in answers],
        "answer_tokens": [len(a.token_ids) for a in answers],
        "finished": [bool(a.finished) for a in answers],
    }


def answer_sums(references: Sequence[str | None], answers: Sequence[Any]) -> dict[str, float]:
    """The totals every evaluation of answers divides: ``prompts``, ``with_reference``, ``exact_match`` (among
    those with a reference), ``length`` (answer tokens, the stop token included) and ``finished`` (answers that
    ended with a stop token). ``answers`` are ``rollout.Response``-like."""
    with_reference = [i for i, reference in enumerate(references) if reference is not None]
    return {
        "prompts": float(len(answers)),
        "with_reference": float(len(with_reference)),
        "exact_match": float(sum(exact_match(answers[i].text, references[i] or "") for i in with_reference)),
        "length": float(sum(len(a.token_ids) for a in answers)),
        "finished": float(sum(bool(a.finished) for a in answers)),
    }


@torch.no_grad()
def held_out_sums(
    engine: RolloutEngine,
    prompt_ids: Sequence[list[int]],
    prompts: Sequence[Prompt],
    reward: WeightedReward,
    gold: Reward | None,
    max_new_tokens: int,
) -> dict[str, float]:
    """Greedy answers to ``prompts`` (rendered as ``prompt_ids``; one process's share), scored: the
    :func:`answer_sums` plus the ``reward``'s total and, with a ``gold`` reward, its total over the prompts it can
    score (those with a reference when it needs one) and their count. Sum them over processes, then
    :func:`held_out_means`."""
    greedy = SamplingSettings(1, max_new_tokens, 0.0)
    answers: list[Response] = [group[0] for group in engine.generate(list(prompt_ids), greedy)] if prompts else []
    messages, texts = [p.messages for p in prompts], [a.text for a in answers]
    references = [p.reference for p in prompts]
    scores = reward(messages, texts, references, finished=[a.finished for a in answers]) if prompts else []
    sums = {**answer_sums(references, answers), "reward": float(sum(scores))}
    if gold is not None:
        gold_total, gold_count = gold_sum(gold, messages, texts, references)
        sums.update(gold_reward=gold_total, gold_count=float(gold_count))
    return sums


def gold_sum(
    gold: Reward, messages: Sequence[Any], texts: Sequence[str], references: Sequence[str | None]
) -> tuple[float, int]:
    """The ``gold`` reward's total over the answers ``texts`` it can score (those whose prompt has a reference when
    it needs one), and their count: 0 and 0 when none can be scored, so a sum over processes still lines up."""
    known = [i for i, reference in enumerate(references) if reference is not None or not gold.needs_reference]
    if not known:
        return 0.0, 0
    scores = gold([messages[i] for i in known], [texts[i] for i in known], [references[i] for i in known])
    return float(sum(scores)), len(known)


def held_out_evaluation(
    prompts: Sequence[TokenizedPrompt],
    engine: RolloutEngine,
    reward: WeightedReward,
    gold: Reward | None,
    max_new_tokens: int,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> dict[str, float]:
    """A training run's evaluation: :func:`held_out_sums` of this process's share ``prompts`` of the held-out
    prompts, summed over every process by ``sum_over_processes`` (``Runtime.sum_over_processes``, on ``device``),
    then :func:`held_out_means`. Every process calls it, with or without prompts of its own."""
    sums = held_out_sums(
        engine, [p.prompt_ids for p in prompts], [p.prompt for p in prompts], reward, gold, max_new_tokens
    )
    keys = sorted(sums)
    totals = sum_over_processes(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device))
    return held_out_means(dict(zip(keys, totals.tolist())))


def held_out_means(sums: dict[str, float]) -> dict[str, float]:
    """``eval_reward``, ``eval_exact_match`` (over the prompts with a reference), ``eval_length``, ``eval_eos_rate``
    and, with a gold reward, ``eval_gold_reward`` from :func:`held_out_sums`' totals (summed over processes)."""
    n, n_ref = max(sums["prompts"], 1.0), max(sums["with_reference"], 1.0)
    means = {
        "eval_reward": sums["reward"] / n,
        "eval_exact_match": sums["exact_match"] / n_ref,
        "eval_length": sums["length"] / n,
        "eval_eos_rate": sums["finished"] / n,
    }
    if "gold_reward" in sums:
        means["eval_gold_reward"] = sums["gold_reward"] / max(sums["gold_count"], 1.0)
    return means
