"""Prompts for online RL as an engine takes them: each rendered once with the chat template, generation prompt
appended, and split into training and held-out prompts."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config import ConfigError, DataConfig
from posttrain.data.dataset import read_prompts
from posttrain.data.records import Prompt
from posttrain.rollout.hf import render_prompt_ids


@dataclass
class TokenizedPrompt:
    prompt: Prompt
    prompt_ids: list[int]  # rendered with the chat template, generation prompt appended
    index: int = 0  # its position among the training (or held-out) prompts: part of its samples' key


def tokenized_prompts(
    data: DataConfig, tokenizer: Any, max_new_tokens: int, max_prompts: int | None, seed: int
) -> tuple[list[TokenizedPrompt], list[TokenizedPrompt]]:
    """Training and held-out prompts: ``data.train`` (its first ``max_prompts``), and ``data.eval`` (every prompt of
    it) or else a seeded ``data.eval_fraction`` of the training prompts. Prompts that leave no room for
    ``max_new_tokens`` within ``data.max_length`` are dropped and counted."""
    budget = data.max_length - max_new_tokens
    if budget < 1:
        raise ConfigError(
            f"data.max_length ({data.max_length}) leaves no room for a prompt after sampling.max_new_tokens ({max_new_tokens})"
        )
    rows = _rendered(read_prompts(data, max_prompts), tokenizer, budget)
    if data.eval:
        # The held-out file read like the training one (every prompt of it, whatever sampling.max_prompts).
        held_out = data.model_copy(update={"train": data.eval, "eval": None})
        return _numbered(rows), _numbered(_rendered(read_prompts(held_out), tokenizer, budget))
    if data.eval_fraction:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=generator).tolist()
        cut = max(1, int(round(data.eval_fraction * len(rows))))
        return _numbered([rows[i] for i in sorted(order[cut:])]), _numbered([rows[i] for i in sorted(order[:cut])])
    return _numbered(rows), []


def _rendered(prompts: list[Prompt], tokenizer: Any, budget: int) -> list[TokenizedPrompt]:
    rows = [TokenizedPrompt(prompt, render_prompt_ids(tokenizer, prompt.messages)) for prompt in prompts]
    kept = [row for row in rows if len(row.prompt_ids) <= budget]
    if len(kept) < len(rows):
        print(
            f"data: {len(rows) - len(kept)} prompts longer than data.max_length - sampling.max_new_tokens ({budget} tokens) were dropped",
            file=sys.stderr,
        )
    return kept


def _numbered(rows: list[TokenizedPrompt]) -> list[TokenizedPrompt]:
    for index, row in enumerate(rows):
        row.index = index
    return rows
