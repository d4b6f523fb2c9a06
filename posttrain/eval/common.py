"""What every evaluation shares: the error type, prompt rows in one shape, greedy answers, the device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from posttrain.data.records import Prompt

PromptRow = dict[str, Any]
"""One evaluation prompt: ``{"messages": [...], "reference": str | None, "task": str | None}``."""


class EvalError(ValueError):
    """An evaluation that cannot run as asked (wrong kind of model for the data, models that do not share a
    tokenizer, a judge that needs references the prompts lack); the message says what to change."""


def device_of(model: Any) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


@contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Dropout off while evaluating; each model's training flag is restored afterwards."""
    flags = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, flag in zip(models, flags):
            model.train(flag)


def inference_device() -> torch.device:
    """Where freshly loaded evaluation models run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Prompt rows (any prompt format the data layer reads) as ``{"messages", "reference", "task"}``.

    ``reference`` is ``None`` for a row without one (exact match then skips it)."""
    from posttrain.data.formats import read_records

    records = read_records(path, kind="prompt").records
    return [_row_of_record(r) for r in records if isinstance(r, Prompt)]


def _row_of_record(record: Prompt) -> PromptRow:
    return {"messages": record.messages, "reference": record.reference, "task": record.meta.get("task")}


def prompt_rows(prompts: str | Path | Iterable[Any]) -> list[PromptRow]:
    """A prompt file, or rows already in memory, as :data:`PromptRow` s.

    In-memory rows may be :class:`~posttrain.data.records.Prompt` records, rows from :func:`read_prompts`, or raw
    file rows: ``messages`` (a message list) or ``prompt`` (a string, or a message list), with ``reference`` (or
    ``answer``) and ``task`` optional."""
    if isinstance(prompts, (str, Path)):
        return read_prompts(prompts)
    rows: list[PromptRow] = []
    for index, item in enumerate(prompts):
        if isinstance(item, Prompt):
            rows.append(_row_of_record(item))
            continue
        if not isinstance(item, Mapping):
            raise EvalError(f"prompt row {index}: expected a dict or a Prompt record, got {type(item).__name__}")
        messages = item.get("messages", item.get("prompt"))
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, list) or not messages:
            raise EvalError(f"prompt row {index}: expected 'messages' (a message list) or 'prompt' (a string or message list)")
        reference = item.get("reference", item.get("answer"))
        rows.append({"messages": messages, "reference": None if reference is None else str(reference), "task": item.get("task")})
    if not rows:
        raise EvalError("no prompts to evaluate")
    return rows


def prompt_text(row: PromptRow) -> str:
    """The last user turn of a prompt (what a sample shows and what the toy tasks are recognised by)."""
    users = [m for m in row["messages"] if m.get("role") == "user"]
    return str((users or row["messages"])[-1].get("content", ""))


def answer_stop_ids(tokenizer: Any) -> set[int]:
    """Ids that end an answer: EOS plus the end-of-turn marker of any built-in template that the tokenizer's
    chat template writes (``<|im_end|>``, ``<|eot_id|>``).

    A trained model's saved tokenizer carries its training template as its own, so the template's name is
    gone; looking for the markers in the template text recovers what ``end_of_turn_ids`` would have given."""
    from posttrain.data.dataset import end_of_turn_ids
    from posttrain.data.templates import END_OF_TURN

    ids = end_of_turn_ids(tokenizer, "tokenizer")
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    for marker in {m for m in END_OF_TURN.values() if m}:
        if marker in template:
            marker_id = tokenizer.convert_tokens_to_ids(marker)
            if isinstance(marker_id, int) and marker_id != tokenizer.unk_token_id:
                ids.add(marker_id)
    return ids


def generate_answers(
    model: Any, tokenizer: Any, rows: list[PromptRow], max_new_tokens: int = 32, batch_size: int = 64
) -> list[Any]:
    """One greedy answer per prompt (``rollout.hf.Response``: text, token ids with the stop token, finished),
    rendered with the tokenizer's chat template (the built-in ``default`` when it has none)."""
    from posttrain.data.dataset import use_chat_template
    from posttrain.rollout.hf import sample_responses

    use_chat_template(tokenizer, None)
    groups = sample_responses(
        model, tokenizer, [row["messages"] for row in rows], num_samples=1, max_new_tokens=max_new_tokens,
        batch_size=batch_size, temperature=0.0, stop_token_ids=answer_stop_ids(tokenizer),
    )
    return [group[0] for group in groups]
