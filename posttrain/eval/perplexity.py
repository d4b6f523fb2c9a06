"""Held-out loss and perplexity of a causal LM on a data file.

Conversations are scored as SFT trains them: rendered with the chat template, loss over the assistant turns
only (their end-of-turn token included), from ``data.tokenize.tokenize_conversation``'s loss masks. Plain
``text`` rows are scored on every token, as pretraining trains them (BOS + text + EOS, ``tokenize_text``).
The loss is the token-weighted mean NLL over the whole file (every scored token counts once, so long answers
weigh more than short ones, as in training), and perplexity is its exponential.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from posttrain.data.dataset import use_chat_template
from posttrain.data.formats import read_records
from posttrain.data.records import Conversation, Record, Text
from posttrain.data.tokenize import TokenizedSequence, tokenize_conversation, tokenize_text
from posttrain.eval.common import EvalError, device_of
from posttrain.losses import IGNORE_INDEX
from posttrain.models.modes import eval_mode


def loss_sequences(tokenizer: Any, records: Sequence[Record], max_length: int = 2048) -> list[TokenizedSequence]:
    """Conversation or text records → tokenised sequences with their targets (-100 where not scored)."""

    sequences: list[TokenizedSequence] = []
    if any(isinstance(r, Conversation) for r in records):
        use_chat_template(tokenizer, None)
    for record in records:
        if isinstance(record, Conversation):
            sequences.append(tokenize_conversation(tokenizer, record.messages, max_length, tools=record.tools))
        elif isinstance(record, Text):
            sequences += tokenize_text(tokenizer, record.text, max_length)
        else:
            raise EvalError(f"held-out loss needs conversations or text rows, not {type(record).__name__} records")
    return sequences


@torch.no_grad()
def sequences_nll(
    model: Any, sequences: Sequence[TokenizedSequence], pad_token_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """Summed NLL (float64) and count of the scored targets of ``sequences`` (right-padded batches)."""
    device = device_of(model)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))  # less padding per batch
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        chunk = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(s.input_ids) for s in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            length = len(sequence.input_ids)
            input_ids[row, :length] = torch.tensor(sequence.input_ids)
            targets[row, :length] = torch.tensor(sequence.targets)
            attention_mask[row, :length] = 1
        targets = targets.to(device)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        scored = targets != IGNORE_INDEX
        # Only the scored positions are upcast: float32 logits of a whole batch over a 150k vocabulary are large.
        total += F.cross_entropy(logits[scored].float(), targets[scored], reduction="sum").double().item()
        count += int(scored.sum())
    return total, count


def heldout_loss(
    model: Any, tokenizer: Any, data: str | Path | Sequence[Record], max_length: int = 2048, batch_size: int = 8
) -> dict[str, Any]:
    """Token-weighted mean NLL (``loss``) and ``perplexity`` = exp(loss) of ``model`` on a file (or records) of
    conversations (assistant tokens only) or text (all tokens); also the ``tokens`` scored, the ``sequences``
    and how many were ``truncated`` at ``max_length``."""
    if isinstance(data, (str, Path)):
        result = read_records(data)
        if result.kind not in ("conversation", "text"):
            raise EvalError(f"{data}: holds {result.kind} records; held-out loss needs conversations or text rows")
        records: Sequence[Record] = result.records
    else:
        records = data
    sequences = loss_sequences(tokenizer, records, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with eval_mode(model):
        total, count = sequences_nll(model, sequences, pad, batch_size)
    if count == 0:
        raise EvalError(
            f"{data if isinstance(data, (str, Path)) else 'records'}: no token to score (no assistant turns?)"
        )
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "tokens": count,
        "sequences": len(sequences),
        "truncated": sum(s.truncated for s in sequences),
    }
