"""Win-rate of one model's answers over another's on the same prompts, by a judge: a reward model, the gold
reward of verifiable prompts, or any function of (prompt row, answer text)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from posttrain.data.records import Prompt
from posttrain.eval.common import EvalError
from posttrain.eval.reward_model import as_scorer, score_answers
from posttrain.eval.verifiable import reference_reward

Judge = Callable[[Sequence[Prompt], Sequence[str]], list[float]]
"""Scores a list of answers, one per prompt; higher is better."""


def win_rate(scores_a: Sequence[float], scores_b: Sequence[float], tie_tolerance: float = 0.0) -> dict[str, Any]:
    """A's ``win_rate`` over B: the share of prompts where A's answer scores higher, a tie (scores within
    ``tie_tolerance``) counting one half; with the ``wins``, ``ties`` and ``losses`` of A."""
    if len(scores_a) != len(scores_b):
        raise ValueError(
            f"{len(scores_a)} scores for A but {len(scores_b)} for B: compare answers to the same prompts"
        )
    if not scores_a:
        raise ValueError("no prompts to compare")
    wins = sum(a - b > tie_tolerance for a, b in zip(scores_a, scores_b))
    losses = sum(b - a > tie_tolerance for a, b in zip(scores_a, scores_b))
    ties = len(scores_a) - wins - losses
    return {"win_rate": (wins + 0.5 * ties) / len(scores_a), "wins": wins, "ties": ties, "losses": losses}


def gold_judge(rows: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
    """The gold reward of each answer (toy task reward, else exact match); every row needs a reference."""

    if any(row.reference is None for row in rows):
        raise EvalError("the gold judge needs a reference answer on every prompt; judge with a reward model instead")
    return [reference_reward(row, answer) for row, answer in zip(rows, answers)]


def reward_model_judge(reward_model: Any, batch_size: int = 32) -> Judge:
    """A judge that scores each answer with a reward model (a path or a ``RewardScorer``)."""

    scorer = as_scorer(reward_model, batch_size)

    def judge(rows: Sequence[Prompt], answers: Sequence[str]) -> list[float]:
        return score_answers(scorer, [row.messages for row in rows], list(answers))

    return judge


def make_judge(judge: str | Any) -> Judge:
    """``"gold"`` → :func:`gold_judge`; a callable → itself; a reward-model path or scorer → its judge."""
    if isinstance(judge, str) and judge == "gold":
        return gold_judge
    if callable(judge) and not hasattr(judge, "score"):
        return judge
    return reward_model_judge(judge)


def compare_answers(
    rows: Sequence[Prompt], answers_a: Sequence[str], answers_b: Sequence[str], judge: str | Any = "gold"
) -> dict[str, Any]:
    """:func:`win_rate` of answers A over answers B to the same ``rows``, scored by ``judge``
    (:func:`make_judge`); also the judge's mean score of each side."""
    if not len(rows) == len(answers_a) == len(answers_b):
        raise ValueError(f"{len(rows)} prompts, {len(answers_a)} answers A, {len(answers_b)} answers B")
    score = make_judge(judge)
    scores_a, scores_b = score(rows, answers_a), score(rows, answers_b)
    return {
        **win_rate(scores_a, scores_b),
        "score_a": sum(scores_a) / len(scores_a),
        "score_b": sum(scores_b) / len(scores_b),
    }
