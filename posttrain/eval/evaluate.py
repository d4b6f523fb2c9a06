"""Entry points: :func:`evaluate_model` (one model on prompts, what the pipeline calls after each stage) and
:func:`evaluate_files` (``posttrain eval``: several models on one data file, the metrics chosen by what the file
holds), with :func:`format_report` to print the result."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from posttrain.data.errors import DataError
from posttrain.data.formats import detect_file, file_rows
from posttrain.eval.common import EvalError, generate_answers, inference_device, load_prompts, text_table
from posttrain.eval.kl import kl_to_reference
from posttrain.eval.multiple_choice import evaluate_multiple_choice, looks_like_multiple_choice
from posttrain.eval.perplexity import heldout_loss
from posttrain.eval.reward_model import as_scorer, is_reward_model, reward_model_accuracy, score_answers
from posttrain.eval.verifiable import verifiable_metrics
from posttrain.eval.win_rate import compare_answers
from posttrain.models.loading import load_for_inference

DATA_KINDS = {
    "prompts": "prompts: greedy answers, exact match, gold reward, length, EOS rate",
    "loss": "conversations or text: held-out loss and perplexity",
    "preference": "preference pairs: reward-model accuracy",
    "multiple_choice": "multiple-choice questions: log-likelihood accuracy",
}


def load_reference(reference: Any) -> tuple[Any, Any]:
    """A reference for KL: a path (loaded with its tokenizer), a ``(model, tokenizer)`` pair, or a model."""

    if isinstance(reference, (str, Path)):
        model, tokenizer = load_for_inference(reference)
        return model.to(inference_device()), tokenizer
    if isinstance(reference, tuple):
        return reference
    return reference, None


def evaluate_model(
    model_path: str | Path,
    prompts: str | Path | Iterable[Any],
    *,
    reward_model: Any = None,
    reference: Any = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Evaluate a trained causal LM (run directory, model directory or adapter directory) on prompts (a prompt
    file, or rows: see ``eval.common.load_prompts``) from its greedy answers, generated once.

    Returns ``exact_match``, ``gold_reward`` (None when no prompt has a reference), ``length`` (mean answer
    tokens), ``eos_rate``, ``samples`` (the first 5 ``{prompt, reference, answer}``), ``answers`` (every answer
    text; also ``answer_tokens`` and ``finished``), and ``prompts`` (the count); plus ``rm_score`` (mean reward-
    model score of the answers) when ``reward_model`` (a path or ``RewardScorer``) is given, and
    ``kl_to_reference`` (``eval.kl``: summed full-vocabulary KL along the answers, mean over prompts) when
    ``reference`` (a path, a model, or a ``(model, tokenizer)`` pair) is given."""

    rows = load_prompts(prompts)
    model, tokenizer = load_for_inference(model_path)
    model.to(inference_device())
    answers = generate_answers(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    result = verifiable_metrics(rows, answers)
    messages = [row.messages for row in rows]
    if reward_model is not None:
        scores = score_answers(as_scorer(reward_model), messages, result["answers"])
        result["rm_score"] = sum(scores) / len(scores)
    if reference is not None:
        reference_model, reference_tokenizer = load_reference(reference)
        result["kl_to_reference"] = kl_to_reference(
            model,
            reference_model,
            tokenizer,
            messages,
            answers,
            batch_size=min(batch_size, 16),
            reference_tokenizer=reference_tokenizer,
        )
    return result


def detect_eval_data(path: str | Path) -> str:
    """What a data file holds, as a key of :data:`DATA_KINDS` (from its first row; DataError for a missing
    file or unreadable row; EvalError for records evaluation has no metric for)."""

    first = next((item for item in file_rows(path) if not isinstance(item, DataError)), None)
    if first is not None and looks_like_multiple_choice(first[1]):
        return "multiple_choice"
    _format, kind = detect_file(path)
    kinds = {"prompt": "prompts", "conversation": "loss", "text": "loss", "preference": "preference"}
    if kind not in kinds:
        raise EvalError(
            f"{path}: holds {kind} records; posttrain eval takes prompts (with references), conversations, text, "
            "preference pairs or multiple-choice questions (use posttrain score to score labelled completions)"
        )
    return kinds[kind]


def _require_policy(path: str) -> None:

    if is_reward_model(path):
        raise EvalError(
            f"{path} is a reward model (a score head, no language-model head): it cannot answer prompts or be "
            "scored by loss; pass it as --reward-model or --judge, or evaluate it on preference pairs"
        )


def evaluate_files(
    models: Sequence[str | Path],
    data: str | Path,
    *,
    reward_model: str | Path | None = None,
    reference: str | Path | None = None,
    judge: str | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    max_length: int = 2048,
) -> dict[str, Any]:
    """``posttrain eval``: every model on ``data``, the metrics chosen by what the file holds
    (:func:`detect_eval_data`):

    - prompts → :func:`evaluate_model` (``reward_model`` adds ``rm_score``, ``reference`` ``kl_to_reference``);
      with ``judge`` (``"gold"`` or a reward-model path) and 2+ models, each later model's answers are judged
      against the FIRST model's (the baseline): its ``win_rate`` (ties count half), ``wins``, ``ties``, ``losses``;
    - conversations / text → held-out ``loss`` and ``perplexity`` (``eval.perplexity``);
    - preference pairs → a reward model's ``accuracy`` and ``mean_gap`` (every MODEL must be a reward model);
    - multiple-choice rows → ``accuracy`` and ``accuracy_norm`` (``eval.multiple_choice``).

    Returns ``{"data", "kind", "models": {path as given: metrics}}`` (+ ``baseline`` and ``judge`` when judged)."""

    if not models:
        raise EvalError("no model to evaluate")
    kind = detect_eval_data(data)
    names = [str(m) for m in models]
    if len(set(names)) != len(names):
        raise EvalError(f"a model is given twice: {names}")
    extras = {"--reward-model": reward_model, "--reference": reference, "--judge": judge}
    given = [flag for flag, value in extras.items() if value is not None]
    if kind != "prompts" and given:
        raise EvalError(f"{', '.join(given)} apply to prompt files; {data} holds {DATA_KINDS[kind].split(':')[0]}")
    if judge is not None and len(names) < 2:
        raise EvalError("--judge compares models: give two or more (the first is the baseline)")
    report: dict[str, Any] = {"data": str(data), "kind": kind, "models": {}}
    results = report["models"]

    if kind == "preference":
        for name in names:
            results[name] = reward_model_accuracy(name, data, batch_size=min(batch_size, 32))
        return report

    for name in names:
        _require_policy(name)
    if kind == "prompts":
        rows = load_prompts(data)
        scorer = as_scorer(reward_model) if reward_model is not None else None
        reference_pair = load_reference(reference) if reference is not None else None
        for name in names:
            results[name] = evaluate_model(
                name,
                rows,
                reward_model=scorer,
                reference=reference_pair,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
        if judge is not None:
            if judge != "gold" and reward_model is not None and Path(judge) == Path(reward_model):
                judge_with: Any = scorer
            else:
                judge_with = judge if judge == "gold" else as_scorer(judge)
            baseline = results[names[0]]["answers"]
            for name in names[1:]:
                comparison = compare_answers(rows, results[name]["answers"], baseline, judge_with)
                results[name].update({key: comparison[key] for key in ("win_rate", "wins", "ties", "losses")})
            report.update(baseline=names[0], judge=str(judge))
        return report

    for name in names:
        model, tokenizer = load_for_inference(name)
        model.to(inference_device())
        if kind == "loss":
            results[name] = heldout_loss(model, tokenizer, data, max_length=max_length, batch_size=min(batch_size, 8))
        else:
            results[name] = evaluate_multiple_choice(model, tokenizer, data, batch_size=min(batch_size, 16))
        del model
    return report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """One row per model, one column per scalar metric (lists such as answers are left to the JSON)."""
    results: dict[str, dict[str, Any]] = report["models"]
    columns: list[str] = []
    for metrics in results.values():
        for key, value in metrics.items():
            if key not in columns and (value is None or isinstance(value, (int, float))):
                columns.append(key)
    header = ["model", *columns]
    rows = [[name, *(_cell(metrics.get(column)) for column in columns)] for name, metrics in results.items()]
    lines = [f"{report['data']}: {DATA_KINDS[report['kind']]}", text_table(header, rows)]
    if "baseline" in report:
        lines.append(
            f"win_rate: share of prompts where the model's answer beats {report['baseline']}'s (ties count half), judged by {report['judge']}"
        )
    return "\n".join(lines)
