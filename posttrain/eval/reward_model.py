"""Reward-model evaluation: ``posttrain score RM data.jsonl`` (:func:`score_file`), and the reward-model score
of a policy's answers.

``score_file``: preference pairs get a score per side and the file's accuracy (share of pairs where the chosen
side scores higher) and mean gap; conversations (and KTO's labelled completions) get one score each. Scores
are written as JSONL, one row per record in file order, with the canonical messages so a row can be checked by
eye. :func:`reward_model_accuracy` is the same computation for ``posttrain eval``. :class:`RewardScorer` is the
loaded reward model every caller scores with (evaluation, the RL ``model:`` reward, rejection sampling).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from posttrain.data.formats import read_records
from posttrain.data.records import Conversation, Preference, Unpaired
from posttrain.data.tokenize import tokenize_conversation
from posttrain.eval.common import EvalError
from posttrain.models.loading import load_scorer_model, model_dir_of
from posttrain.models.scalar_head import last_token_index


class RewardScorer:
    """Scores conversations with a trained reward model: ``scorer.score([messages, ...]) -> [float, ...]``.

    Each conversation is rendered with the chat template saved with the reward model (the one it was trained
    with) and scored at its last token."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32) -> None:
        self.model, self.tokenizer = load_scorer_model(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        self.path = str(path)

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, Any]]]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            # Tokenised exactly as reward training tokenised (same template, same boundary handling), untruncated.
            ids = [
                {"input_ids": tokenize_conversation(self.tokenizer, messages, max_length=1 << 30).input_ids}
                for messages in conversations[start : start + self.batch_size]
            ]
            encoded = self.tokenizer.pad(ids, return_tensors="pt").to(self.device)
            values = self.model(encoded["input_ids"], attention_mask=encoded["attention_mask"])
            last = last_token_index(encoded["attention_mask"])
            scores += values[torch.arange(len(ids), device=self.device), last].tolist()
        return scores


def score_file(
    model_path: str | Path, data_path: str | Path, out_path: str | Path | None = None, batch_size: int = 32
) -> dict[str, Any]:
    """Score every record of ``data_path``; returns the summary (and writes rows to ``out_path`` if given)."""
    result = read_records(data_path)
    if result.kind not in ("preference", "conversation", "unpaired"):
        raise ValueError(
            f"{data_path}: holds {result.kind} records; a reward model scores conversations or preference pairs"
        )
    scorer = RewardScorer(model_path, batch_size=batch_size)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"records": len(result.records), "kind": result.kind, "format": result.format}
    if result.kind == "preference":
        pairs = [r for r in result.records if isinstance(r, Preference)]
        chosen = scorer.score([p.prompt + p.chosen for p in pairs])
        rejected = scorer.score([p.prompt + p.rejected for p in pairs])
        for pair, c, r in zip(pairs, chosen, rejected):
            rows.append(
                {
                    "prompt": pair.prompt,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "chosen_reward": c,
                    "rejected_reward": r,
                }
            )
        summary["accuracy"] = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        summary["mean_gap"] = sum(c - r for c, r in zip(chosen, rejected)) / len(pairs)
        scores = chosen + rejected
    else:
        records = [r for r in result.records if isinstance(r, (Conversation, Unpaired))]
        conversations = [r.messages if isinstance(r, Conversation) else r.prompt + r.completion for r in records]
        scores = scorer.score(conversations)
        for record, messages, score in zip(records, conversations, scores):
            row: dict[str, Any] = {"messages": messages, "reward": score}
            if isinstance(record, Unpaired):
                row["label"] = record.label
            rows.append(row)
    summary["mean_reward"] = sum(scores) / len(scores)
    summary["std_reward"] = (sum((s - summary["mean_reward"]) ** 2 for s in scores) / len(scores)) ** 0.5
    if out_path is not None:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        summary["out"] = str(out)
    return summary


def is_reward_model(path: str | Path) -> bool:
    """Whether ``path`` (a run directory, model directory or adapter directory) holds a model with a scalar
    score head (``*ForSequenceClassification``, or a ``SEQ_CLS`` adapter) rather than a causal LM."""
    directory = model_dir_of(path)
    if (directory / "adapter_config.json").exists():
        adapter = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        return adapter.get("task_type") == "SEQ_CLS"
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return any(str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or [])


def as_scorer(reward_model: str | Path | RewardScorer, batch_size: int = 32) -> RewardScorer:
    """A reward-model path → a loaded ``RewardScorer`` (a scorer is returned as is)."""
    if isinstance(reward_model, RewardScorer):
        return reward_model
    if not is_reward_model(reward_model):
        raise EvalError(
            f"{reward_model}: not a reward model (no score head); give a stage: reward run or its model/ folder"
        )
    return RewardScorer(reward_model, batch_size=batch_size)


def score_answers(scorer: RewardScorer, prompts: list[list[dict[str, Any]]], answers: list[str]) -> list[float]:
    """The reward model's score of each answer as the assistant's reply to its prompt."""
    return scorer.score(
        [list(messages) + [{"role": "assistant", "content": answer}] for messages, answer in zip(prompts, answers)]
    )


def reward_model_accuracy(reward_model: str | Path, data_path: str | Path, batch_size: int = 32) -> dict[str, Any]:
    """A reward model on held-out preference pairs (:func:`score_file`): ``accuracy`` (share of pairs where
    chosen scores higher), ``mean_gap`` (chosen − rejected), ``mean_reward`` and the number of ``pairs``."""
    if not is_reward_model(reward_model):
        raise EvalError(
            f"{reward_model}: not a reward model (no score head). Preference pairs are evaluated with a reward "
            "model: pass a stage: reward run (or its model/ folder) as MODEL"
        )
    summary = score_file(reward_model, data_path, batch_size=batch_size)
    if summary["kind"] != "preference":
        raise EvalError(f"{data_path}: holds {summary['kind']} records, not preference pairs")
    return {
        "accuracy": summary["accuracy"],
        "mean_gap": summary["mean_gap"],
        "mean_reward": summary["mean_reward"],
        "pairs": summary["records"],
    }
