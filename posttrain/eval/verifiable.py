"""Exact match and gold reward on prompts with reference answers (the toy tasks, or any ``reference`` rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.data.formats import read_records
from posttrain.data.records import Prompt
from posttrain.demo.tasks import exact_match, gold_reward
from posttrain.rollout import generate_responses


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Prompt rows (any prompt format the data layer reads) as ``{"messages", "reference", "task"}``."""
    records = read_records(path, kind="prompt").records
    return [
        {"messages": r.messages, "reference": r.reference or "", "task": r.meta.get("task")}
        for r in records
        if isinstance(r, Prompt)
    ]


def evaluate_verifiable(model: Any, tokenizer: Any, rows: list[dict[str, Any]], max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy answers to each prompt: exact-match rate, mean gold reward, and a few sample answers."""
    replies = generate_responses(model, tokenizer, [r["messages"] for r in rows], max_new_tokens=max_new_tokens)
    matches = [exact_match(reply, r["reference"]) for reply, r in zip(replies, rows)]
    rewards = [gold_reward(r["task"], reply, r["reference"]) if r["task"] else float(m) for reply, r, m in zip(replies, rows, matches)]
    return {
        "exact_match": sum(matches) / max(len(rows), 1),
        "gold_reward": sum(rewards) / max(len(rows), 1),
        "samples": [{"prompt": r["messages"][-1]["content"], "reference": r["reference"], "answer": a} for r, a in zip(rows[:5], replies)],
    }
