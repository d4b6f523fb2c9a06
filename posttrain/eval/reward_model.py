"""``posttrain score RM data.jsonl``: a trained reward model's scores for a data file.

Preference pairs get a score per side and the file's accuracy (share of pairs where the chosen side scores
higher) and mean gap; conversations (and KTO's labelled completions) get one score each. Scores are written as
JSONL, one row per record in file order, with the canonical messages so a row can be checked by eye.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.data.formats import read_records
from posttrain.data.records import Conversation, Preference, Unpaired


def score_file(model_path: str | Path, data_path: str | Path, out_path: str | Path | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Score every record of ``data_path``; returns the summary (and writes rows to ``out_path`` if given)."""
    from posttrain.models.scalar_head import RewardScorer

    result = read_records(data_path)
    if result.kind not in ("preference", "conversation", "unpaired"):
        raise ValueError(f"{data_path}: holds {result.kind} records; a reward model scores conversations or preference pairs")
    scorer = RewardScorer(model_path, batch_size=batch_size)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"records": len(result.records), "kind": result.kind, "format": result.format}
    if result.kind == "preference":
        pairs = [r for r in result.records if isinstance(r, Preference)]
        chosen = scorer.score([p.prompt + p.chosen for p in pairs])
        rejected = scorer.score([p.prompt + p.rejected for p in pairs])
        for pair, c, r in zip(pairs, chosen, rejected):
            rows.append({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "chosen_reward": c, "rejected_reward": r})
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
