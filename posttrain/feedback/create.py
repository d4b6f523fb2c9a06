"""Items to label: from a file of pairs, or sampled from trained models (every pair of models on every prompt).

A pairs file (JSONL, JSON, CSV or Parquet, read by the data layer, so errors name file, line and field) has one
comparison per row: ``prompt`` (a string or a list of messages), ``response_a`` and ``response_b`` (or ``chosen``
and ``rejected``: A is then the chosen), each a string or one assistant message; optional ``gold`` (the known
answer on the A/B 8-point scale: 1 = A much better ... 8 = B much better), ``model_a``, ``model_b``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from posttrain.data.errors import DataError
from posttrain.data.formats import Where, file_rows, read_records, records_from_rows
from posttrain.data.records import Preference, Prompt
from posttrain.feedback.store import SCALE, Item
from posttrain.rollout.hf import sample_responses
from posttrain.serve.chat import load_session, unique_names

# The file's keys for A and B: response_a/response_b, or a preference pair's chosen/rejected.
_SIDES = (("response_a", "response_b"), ("chosen", "rejected"))


def items_from_pairs(path: str | Path, battle: bool = False, gold_required: bool = False) -> list[Item]:
    """One :class:`Item` per row of the pairs file ``path``; ``gold_required`` for a file of gold items.
    ``battle`` makes arena items, which need ``model_a`` and ``model_b`` on every row."""
    items = []
    for row in file_rows(path):
        if isinstance(row, DataError):
            raise row
        where, data = row
        if not isinstance(data, dict):
            raise where.error(None, f"expected a JSON object with prompt, response_a and response_b, got {data!r:.40}")
        side_keys = next((keys for keys in _SIDES if keys[0] in data or keys[1] in data), _SIDES[0])
        for key in side_keys:
            if key not in data:
                raise where.error(
                    key, "missing: a row needs prompt, response_a and response_b (or chosen and rejected)"
                )
        if "prompt" not in data:
            raise where.error("prompt", "missing: the prompt the two responses answer")
        # The data layer's preference reader parses prompt and responses (strings or message lists).
        record = records_from_rows(
            [(where, data)],
            path,
            kind="preference",
            format="preference",
            columns={"chosen": side_keys[0], "rejected": side_keys[1]},
        ).records[0]
        assert isinstance(record, Preference)
        item = Item(
            record.prompt,
            _reply(record.chosen, side_keys[0], where),
            _reply(record.rejected, side_keys[1], where),
            model_a=_optional_text(data, "model_a", where),
            model_b=_optional_text(data, "model_b", where),
            gold=_gold(data.get("gold"), where, gold_required),
            kind="battle" if battle else "pair",
        )
        if battle and not (item.model_a and item.model_b):
            raise where.error("model_a", "a battle row needs model_a and model_b (revealed after the vote)")
        items.append(item)
    if not items:
        raise DataError(path, None, None, "no rows (the file is empty)")
    return items


def _reply(messages: list[dict[str, Any]], field: str, where: Where) -> str:
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise where.error(field, "expected one response: a string or one assistant message")
    return str(messages[0]["content"])


def _optional_text(data: dict[str, Any], key: str, where: Where) -> str | None:
    value = data.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise where.error(key, f"expected a model name (a non-empty string), got {value!r:.40}")
    return value


def _gold(value: Any, where: Where, required: bool) -> int | None:
    if value is None:
        if required:
            raise where.error("gold", "missing: a gold item needs its answer, 1 (A much better) to 8 (B much better)")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value not in SCALE:
        raise where.error("gold", f"expected an integer 1 (A much better) to 8 (B much better), got {value!r:.40}")
    return value


def items_from_models(
    prompts_path: str | Path,
    models: Sequence[str],
    battle: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    template: str | None = None,
    dtype: str = "float32",
) -> list[Item]:
    """One response per model per prompt (each model loaded in turn, as ``posttrain chat`` loads it: a run, model
    or adapter directory, rendered with its chat template), then an item for every pair of models on every prompt
    (A = the earlier model on the command line). Pairs whose two responses are identical are left out (nothing to
    judge) and counted on stderr. ``battle`` makes arena items (model names hidden until the vote)."""
    if len(models) < 2:
        raise ValueError(f"--models: give at least two models to compare, got {len(models)}")
    prompts = read_records(prompts_path, kind="prompt").records
    print(f"data: {len(prompts)} prompts from {prompts_path}", file=sys.stderr)
    names = unique_names(models)
    replies: list[list[str]] = []
    for path, name in zip(models, names):
        session = load_session(path, name, template=template, dtype=dtype)
        torch.manual_seed(seed)  # each model samples as it would alone, whatever the order on the command line
        sampled = sample_responses(
            session.model,
            session.tokenizer,
            [_messages(prompt) for prompt in prompts],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=session.stop_token_ids,
        )
        replies.append([responses[0].text for responses in sampled])
        print(f"sampled {len(prompts)} responses from {name} ({path})", file=sys.stderr)
        del session
    items, identical = [], 0
    for first, second in itertools.combinations(range(len(models)), 2):
        for index, prompt in enumerate(prompts):
            if replies[first][index] == replies[second][index]:
                identical += 1
                continue
            items.append(
                Item(
                    _messages(prompt),
                    replies[first][index],
                    replies[second][index],
                    model_a=names[first],
                    model_b=names[second],
                    kind="battle" if battle else "pair",
                )
            )
    if identical:
        print(f"{identical} pairs left out: both models gave the same response", file=sys.stderr)
    return items


def _messages(prompt: Any) -> list[dict[str, Any]]:
    assert isinstance(prompt, Prompt)
    return prompt.messages
