"""Supervised fine-tuning (``stage: sft``) and continued pretraining (``stage: pretrain``).

Choices this recipe makes:

- Chat rows are rendered with the model's own chat template; by default only assistant turns are trained, every
  assistant turn of a multi-turn dialogue, each including the end-of-turn token the template emits after it
  (``data/tokenize.py``). Pretraining rows train every token, documents cut into ``max_length`` chunks.
- The loss is token-level cross-entropy normalised by the trained-token count of the whole accumulated batch
  (``losses.sft_loss``), so long and short sequences weigh by their tokens and grad accumulation is exact.
- Packing (``data.packing: true``, the default) puts several sequences in one row with ``position_ids`` that
  restart at 0 per sequence and no attention mask; transformers builds a block-diagonal causal mask from them
  for sdpa/eager attention (and uses the varlen kernel under flash-attention), so no token attends across
  sequences. Padded mode pads each row and masks the padding. Both give the same per-sample losses (tested).
- Logits are computed only at trained positions (``models.forward.token_logits``).
- Full fine-tuning, LoRA/DoRA/QLoRA, prompt tuning, P-tuning, prefix tuning and freeze-tuning are the same
  recipe with a different ``peft`` block.
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import torch

from posttrain import losses
from posttrain.config import SftConfig
from posttrain.data.errors import DataError
from posttrain.data.packing import Row, collate, pack_rows, single_rows
from posttrain.data.reader import detect_format, read_conversations, read_texts
from posttrain.data.tokenize import TokenizedSequence, tokenize_conversation, tokenize_text
from posttrain.losses import IGNORE_INDEX
from posttrain.models import load_model, load_tokenizer, token_logits
from posttrain.runtime import Runtime


def tokenize_file(path: str, config: SftConfig, tokenizer: Any) -> list[TokenizedSequence]:
    """Read one file in the stage's format and tokenise every row."""
    data = config.data
    file_format = detect_format(path) if data.format == "auto" else data.format
    expected = "text" if config.stage == "pretrain" else "messages"
    if file_format != expected:
        raise DataError(path, 1, expected, f"stage {config.stage} reads {expected!r} rows, this file has {file_format!r} rows")
    if file_format == "text":
        return [chunk for text in read_texts(path) for chunk in tokenize_text(tokenizer, text, data.max_length)]
    return [
        tokenize_conversation(tokenizer, messages, data.max_length, data.train_on_prompt)
        for messages in read_conversations(path)
    ]


def load_sequences(config: SftConfig, tokenizer: Any) -> tuple[list[TokenizedSequence], list[TokenizedSequence]]:
    """Training and held-out sequences (``data.eval``, or an ``eval_fraction`` split of the training rows)."""
    paths = [config.data.train] if isinstance(config.data.train, str) else config.data.train
    train = [seq for path in paths for seq in tokenize_file(path, config, tokenizer)]
    held_out = tokenize_file(config.data.eval, config, tokenizer) if config.data.eval else []
    if not held_out and config.data.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        cut = max(1, int(len(train) * config.data.eval_fraction))
        held_out = [train[i] for i in order[:cut]]
        train = [train[i] for i in order[cut:]]
    return train, held_out


def check_end_of_turn_trained(sequences: list[TokenizedSequence], tokenizer: Any, stage: str) -> None:
    """Refuse to train a chat model that would never learn to stop (no EOS/end-of-turn ever labelled)."""
    if stage != "sft" or tokenizer.eos_token_id is None:
        return
    if not any(tokenizer.eos_token_id in seq.targets for seq in sequences):
        raise DataError(
            None, None, "chat_template",
            f"no trained token is the EOS/end-of-turn token {tokenizer.eos_token!r}: the model would never learn "
            "to stop. Check the chat template (each assistant turn must end with it) or data.max_length",
        )


def make_rows(sequences: list[TokenizedSequence], config: SftConfig) -> list[Row]:
    if config.data.packing:
        return pack_rows(sequences, config.data.max_length, config.seed)
    return single_rows(sequences)


def evaluate_loss(model: Any, rows: list[Row], collate_rows: Any, rt: Runtime) -> dict[str, float]:
    """Token-mean validation loss and perplexity over ``rows`` (sharded over processes, summed)."""
    rank, world, size = rt.accelerator.process_index, rt.world_size, rt.train.batch_size
    mine = rows[rank::world]
    total = torch.zeros(2, device=rt.device)
    for start in range(0, len(mine), size):
        batch = {k: v.to(rt.device) for k, v in collate_rows(mine[start : start + size]).items()}
        _, stats = losses.sft_loss(token_logits(model, batch), batch["targets"][batch["targets"] != IGNORE_INDEX], 1)
        total += torch.stack([stats["loss_sum"].float(), stats["num_tokens"].float()])
    if world > 1:
        total = rt.accelerator.reduce(total, reduction="sum")
    eval_loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": eval_loss, "eval_ppl": float(torch.exp(torch.tensor(min(eval_loss, 50.0))))}


def run(config: SftConfig, config_path: str | None = None) -> dict[str, Any]:
    """Train one SFT / pretraining run end to end; returns the run summary."""
    rt = Runtime(config, config_path)
    tokenizer = load_tokenizer(config.model)
    # Data before weights: a bad row fails in a second, not after a multi-gigabyte load.
    train_sequences, eval_sequences = load_sequences(config, tokenizer)
    check_end_of_turn_trained(train_sequences, tokenizer, config.stage)
    model, tokenizer = load_model(config.model, config.peft, tokenizer)
    rows = make_rows(train_sequences, config)
    eval_rows = make_rows(eval_sequences, config)
    collate_rows = partial(collate, pad_token_id=tokenizer.pad_token_id, packed=config.data.packing)
    truncated = sum(seq.truncated for seq in train_sequences)
    rt.log(
        f"data: {len(train_sequences)} training sequences in {len(rows)} rows "
        f"({'packed' if config.data.packing else 'padded'}), {truncated} truncated at {config.data.max_length} tokens; "
        f"{len(eval_sequences)} held out"
    )

    evaluate = partial(evaluate_loss, rows=eval_rows, collate_rows=collate_rows, rt=rt) if eval_rows else None
    model = rt.setup(model, num_rows=len(rows), evaluate=(lambda: evaluate(model)) if evaluate else None)

    for batch in rt.batches(rows, collate_rows):
        trained = batch["targets"] != IGNORE_INDEX
        loss, stats = losses.sft_loss(token_logits(model, batch), batch["targets"][trained], batch["num_items_in_batch"])
        rt.step(loss, {**stats, "num_real_tokens": batch["num_real_tokens"]})

    return rt.finish(
        model,
        tokenizer,
        summary={"train_sequences": len(train_sequences), "truncated_sequences": truncated, "eval_sequences": len(eval_sequences)},
    )
