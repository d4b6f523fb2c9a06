"""What every evaluation shares: the error type, prompts as the data layer's ``Prompt`` records, greedy answers, the
device."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from posttrain.data.dataset import end_of_turn_ids, use_chat_template
from posttrain.data.formats import read_records
from posttrain.data.records import Prompt
from posttrain.data.templates import END_OF_TURN
from posttrain.rollout.hf import sample_responses


class EvalError(ValueError):
    """An evaluation that cannot run as asked (wrong kind of model for the data, models that do not share a
    tokenizer, a judge that needs references the prompts lack); the message says what to change."""


def device_of(model: Any) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


def text_table(header: list[str], rows: list[list[str]], rule: bool = False) -> str:
    """Cells laid out in fixed-width columns for a terminal: the first (the model's name) left-aligned, the
    figures right-aligned so their digits line up; ``rule`` draws dashes under the header."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in [header, *rows]
    ]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def inference_device() -> torch.device:
    """Where freshly loaded evaluation models run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_prompts(prompts: str | Path | Iterable[Any]) -> list[Prompt]:
    """A prompt file (any prompt format the data layer reads), or rows already in memory, as
    :class:`~posttrain.data.records.Prompt` records; the row's ``task``, when it has one, is in ``meta["task"]``.

    In-memory rows may be ``Prompt`` records or raw file rows: ``messages`` (a message list) or ``prompt`` (a
    string, or a message list), with ``reference`` (or ``answer``) and ``task`` optional. ``reference`` is ``None``
    for a row without one (exact match then skips it)."""
    if isinstance(prompts, (str, Path)):
        return [r for r in read_records(prompts, kind="prompt").records if isinstance(r, Prompt)]
    rows: list[Prompt] = []
    for index, item in enumerate(prompts):
        if isinstance(item, Prompt):
            rows.append(item)
            continue
        if not isinstance(item, Mapping):
            raise EvalError(f"prompt row {index}: expected a dict or a Prompt record, got {type(item).__name__}")
        messages = item.get("messages", item.get("prompt"))
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages:
            raise EvalError(
                f"prompt row {index}: expected 'messages' (a message list) or 'prompt' (a string or message list)"
            )
        reference = item.get("reference", item.get("answer"))
        task = item.get("task")
        rows.append(
            Prompt(messages, None if reference is None else str(reference), {} if task is None else {"task": task})
        )
    if not rows:
        raise EvalError("no prompts to evaluate")
    return rows


def prompt_text(prompt: Prompt) -> str:
    """The last user turn of a prompt (what a sample shows and what the toy tasks are recognised by)."""
    users = [m for m in prompt.messages if m.get("role") == "user"]
    return str((users or prompt.messages)[-1].get("content", ""))


def answer_stop_ids(tokenizer: Any) -> set[int]:
    """Ids that end an answer: EOS plus the end-of-turn marker of any built-in template that the tokenizer's
    chat template writes (``<|im_end|>``, ``<|eot_id|>``).

    A trained model's saved tokenizer carries its training template as its own, so the template's name is
    gone; looking for the markers in the template text recovers what ``end_of_turn_ids`` would have given."""

    ids = end_of_turn_ids(tokenizer, "tokenizer")
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for marker in {m for m in END_OF_TURN.values() if m}:
        if marker in template:
            marker_id = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(marker_id, int) and marker_id != tokenizer.unk_token_id:
                ids.add(marker_id)
    return ids


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[Prompt], max_new_tokens: int = 32, batch_size: int = 64
) -> list[Any]:
    """One greedy answer per prompt (``rollout.hf.Response``: text, token ids with the stop token, finished),
    rendered with the tokenizer's chat template (the built-in ``default`` when it has none)."""

    use_chat_template(tokenizer, None)
    groups = sample_responses(
        model,
        tokenizer,
        [prompt.messages for prompt in prompts],
        num_samples=1,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=0.0,
        stop_token_ids=answer_stop_ids(tokenizer),
    )
    return [group[0] for group in groups]
