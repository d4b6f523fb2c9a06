"""``posttrain label report``: what a label store says about its annotators and, for battles, about the models.

Agreement over the regular items' votes (skips left out; canonical A/B values on the 8-point scale): Cohen's kappa
for each pair of annotators with items in common, Fleiss' kappa, Krippendorff's ordinal alpha and Gwet's AC1
(``feedback.agreement``); each annotator's accuracy on the hidden gold items (the side of the gold answer, any
degree), flagged under a threshold; position bias (the share of votes for the response shown on the left, with
its 95% Wilson interval); and the arena board: Bradley-Terry ratings with bootstrap intervals
(``feedback.ratings``). A measure the data cannot give (one annotator, no overlap, no gold) is reported as such.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Any

from posttrain.feedback.agreement import (
    cohens_kappa,
    fleiss_kappa,
    gold_accuracy,
    gwet_ac1,
    krippendorff_alpha,
    position_bias,
)
from posttrain.feedback.ratings import bootstrap_intervals, bradley_terry
from posttrain.feedback.store import SCALE, LabelStore

CATEGORIES = list(SCALE)


def label_report(
    store: LabelStore, min_gold_accuracy: float = 0.7, bootstrap_rounds: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """The report as plain data (JSON-ready; an undefined coefficient is None with a ``reason``)."""
    votes = store.votes()
    ratings = store.ratings()
    annotators = sorted({annotator for _, annotator, _ in ratings})
    agreement: dict[str, Any] = {
        "cohens_kappa": {},
        "fleiss_kappa": _measure(fleiss_kappa, ratings, CATEGORIES),
        "krippendorff_alpha_ordinal": _measure(krippendorff_alpha, ratings, CATEGORIES, "ordinal"),
        "gwet_ac1": _measure(gwet_ac1, ratings, CATEGORIES),
    }
    rated = {name: {item for item, annotator, _ in ratings if annotator == name} for name in annotators}
    for first, second in itertools.combinations(annotators, 2):
        common = len(rated[first] & rated[second])
        if common:
            kappa = _measure(cohens_kappa, ratings, first, second, CATEGORIES)
            agreement["cohens_kappa"][f"{first}|{second}"] = {**kappa, "common_items": common}
    gold = {
        annotator: {
            "correct": correct,
            "total": total,
            "accuracy": correct / total if total else None,
            "below_threshold": bool(total) and correct / total < min_gold_accuracy,
        }
        for annotator, (correct, total) in gold_accuracy(store.ratings(include_gold=True), store.gold()).items()
    }
    left_chosen = store.left_chosen()
    report: dict[str, Any] = {
        "progress": store.progress(),
        "answers": {
            "votes": sum(vote.value is not None for vote in votes),
            "skips": sum(vote.value is None for vote in votes),
            "flags": dict(Counter(vote.flag for vote in votes if vote.flag)),
            "safety": dict(Counter(vote.safety for vote in votes if vote.safety)),
        },
        "agreement": agreement,
        "gold_accuracy": gold,
        "min_gold_accuracy": min_gold_accuracy,
        "position_bias": dict(zip(("left_share", "low", "high"), position_bias(left_chosen))) if left_chosen else None,
        "arena": _arena(store.battles(), bootstrap_rounds, seed),
    }
    return report


def _measure(function: Any, *args: Any) -> dict[str, Any]:
    """``{"value": x}``, or ``{"value": None, "reason": ...}`` when the data cannot give it."""
    try:
        value = function(*args)
    except ValueError as error:
        return {"value": None, "reason": str(error)}
    if math.isnan(value):
        return {"value": None, "reason": "undefined: every rating in one category (no chance disagreement)"}
    return {"value": value}


def _arena(battles: list[tuple[str, str, str]], rounds: int, seed: int) -> dict[str, Any] | None:
    if not battles:
        return None
    counts: Counter[str] = Counter()
    for model_a, model_b, _ in battles:
        counts[model_a] += 1
        counts[model_b] += 1
    try:
        ratings = bradley_terry(battles)
        intervals = bootstrap_intervals(battles, rounds=rounds, seed=seed)
    except ValueError as error:
        return {"battles": len(battles), "board": [], "reason": str(error)}
    board = [
        {
            "model": model,
            "rating": rating,
            "low": intervals[model][0],
            "high": intervals[model][1],
            "votes": counts[model],
        }
        for model, rating in sorted(ratings.items(), key=lambda pair: -pair[1])
    ]
    return {"battles": len(battles), "board": board}


def format_report(report: dict[str, Any]) -> str:
    """The report as text for the terminal."""
    progress, answers, agreement = report["progress"], report["answers"], report["agreement"]
    lines = [
        f"items: {progress['items']} (+{progress['gold_items']} gold), overlap {progress['overlap']}: "
        f"{progress['answers_given']}/{progress['answers_needed']} answers"
        f"{' (complete)' if progress['complete'] else ''}",
        f"answers: {answers['votes']} votes, {answers['skips']} skips; flags: {_counts(answers['flags'])}; "
        f"safety: {_counts(answers['safety'])}",
        "",
        "agreement (8-point scale, regular items)",
    ]
    for pair, kappa in agreement["cohens_kappa"].items():
        lines.append(f"  Cohen's kappa {pair.replace('|', ' vs ')}: {_value(kappa)} ({kappa['common_items']} items)")
    if not agreement["cohens_kappa"]:
        lines.append("  Cohen's kappa: no two annotators rated an item in common")
    for key, name in (
        ("fleiss_kappa", "Fleiss' kappa"),
        ("krippendorff_alpha_ordinal", "Krippendorff's alpha (ordinal)"),
        ("gwet_ac1", "Gwet's AC1"),
    ):
        lines.append(f"  {name}: {_value(agreement[key])}")
    lines += ["", f"gold accuracy (same side as the gold answer; flagged under {report['min_gold_accuracy']:.0%})"]
    for annotator, score in report["gold_accuracy"].items():
        if score["total"]:
            flag = "  <- below threshold" if score["below_threshold"] else ""
            lines.append(f"  {annotator}: {score['correct']}/{score['total']} = {score['accuracy']:.0%}{flag}")
        else:
            lines.append(f"  {annotator}: no gold item answered yet")
    if not report["gold_accuracy"]:
        lines.append("  no votes yet")
    bias = report["position_bias"]
    lines += [
        "",
        "position bias: "
        + (
            f"{bias['left_share']:.1%} of votes for the left response (95% CI {bias['low']:.1%} to {bias['high']:.1%};"
            " 50% is unbiased)"
            if bias
            else "no votes yet"
        ),
    ]
    arena = report["arena"]
    if arena is not None:
        lines += ["", f"arena: Bradley-Terry (Elo scale, mean 1000) over {arena['battles']} votes, 95% bootstrap CI"]
        if not arena["board"]:
            lines.append(f"  no board: {arena['reason']}")
        for rank, row in enumerate(arena["board"], start=1):
            lines.append(
                f"  {rank}. {row['model']:24} {row['rating']:7.1f}  [{row['low']:.1f}, {row['high']:.1f}]  "
                f"{row['votes']} votes"
            )
    return "\n".join(lines)


def _value(measure: dict[str, Any]) -> str:
    return f"{measure['value']:.3f}" if measure["value"] is not None else f"n/a ({measure['reason']})"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items())) or "none"
