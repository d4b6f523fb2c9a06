"""Evaluation: held-out loss/perplexity, exact match and gold reward on verifiable prompts, reward-model score and
accuracy, win-rate by a judge, KL to a reference model, multiple-choice log-likelihood benchmarks.

Each metric is a plain function of a model (torch/transformers) in its own module; :func:`evaluate_model` (one
model on prompts, for the pipeline) and :func:`evaluate_files` (``posttrain eval``) put them together."""

from posttrain.eval.common import EvalError, generate_answers, load_prompts
from posttrain.eval.evaluate import detect_eval_data, evaluate_files, evaluate_model, format_report
from posttrain.eval.reward_model import reward_model_accuracy, score_file

__all__ = [
    "EvalError",
    "detect_eval_data",
    "evaluate_files",
    "evaluate_model",
    "format_report",
    "generate_answers",
    "load_prompts",
    "reward_model_accuracy",
    "score_file",
]
