"""Supervised fine-tuning (``stage: sft``) and continued pretraining (``stage: pretrain``).

Choices this recipe makes:

- Chat rows are rendered with the model's own chat template; by default only assistant turns are trained, every
  assistant turn of a multi-turn dialogue, each including the end-of-turn token the template emits after it
  (``data/tokenize.py``). Pretraining rows train every token, documents cut into ``max_length`` chunks.
- The loss is token-level cross-entropy normalised by the trained-token count of the whole accumulated batch
  (``losses.sft_loss``), so long and short sequences weigh by their tokens and grad accumulation is exact.
- ``train.batch_size`` counts sequences (conversations; pretraining chunks), whatever the packing: each
  micro-batch is that many sequences of the seeded order, and packing decides only how they lie in tensors.
  Packed (``data.packing: true``, the default), a micro-batch's sequences share rows of up to ``data.max_length``
  tokens with ``position_ids`` that restart at 0 per sequence and no attention mask; transformers builds a
  block-diagonal causal mask from them for sdpa/eager attention (and uses the varlen kernel under
  flash-attention), so no token attends across sequences. Padded mode pads each sequence to the micro-batch's
  longest and masks the padding. Both train the same sequences in every step and end at the same weights
  (tested through this recipe).
- Logits are computed only at trained positions (``models.forward.token_logits``).
- Full fine-tuning, LoRA/DoRA/QLoRA, prompt tuning, P-tuning, prefix tuning and freeze-tuning are the same
  recipe with a different ``peft`` block.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from posttrain import losses
from posttrain.config import SftConfig
from posttrain.data.dataset import load_sequences
from posttrain.data.packing import Example, collate_examples, examples_of
from posttrain.losses import IGNORE_INDEX
from posttrain.models import load_model, load_tokenizer, token_logits
from posttrain.models.modes import eval_mode
from posttrain.runtime import Metrics, Runtime


@torch.no_grad()
def evaluate_loss(model: Any, examples: list[Example], collate_rows: Any, rt: Runtime) -> dict[str, float]:
    """Token-mean validation loss and perplexity over ``examples`` (sharded over processes, summed)."""
    total = torch.zeros(2, device=rt.device)
    with eval_mode(model):
        for batch in rt.eval_batches(examples, collate_rows):
            _, stats = losses.sft_loss(
                token_logits(model, batch), batch["targets"][batch["targets"] != IGNORE_INDEX], 1
            )
            total += torch.stack([stats["loss_sum"].float(), stats["num_tokens"].float()])
    total = rt.sum_over_processes(total)
    eval_loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": eval_loss, "eval_ppl": float(torch.exp(torch.tensor(min(eval_loss, 50.0))))}


def run(config: SftConfig, config_path: str | None = None) -> dict[str, Any]:
    """Train one SFT / pretraining run end to end; returns the run summary."""
    rt = Runtime(config, config_path)
    tokenizer = load_tokenizer(config.model)
    # Data before weights: a bad row fails in a second, not after a multi-gigabyte load.
    sequences = load_sequences(config.data, tokenizer, config.stage, config.seed)
    train_sequences, eval_sequences = sequences.train, sequences.held_out
    rt.check_data(sequences, tokenizer)
    model, tokenizer = load_model(config.model, config.peft, tokenizer)
    examples, eval_examples = examples_of(train_sequences), examples_of(eval_sequences)
    collate_rows = partial(
        collate_examples,
        pad_token_id=tokenizer.pad_token_id,
        packed=config.data.packing,
        max_length=config.data.max_length,
        seed=config.seed,
    )
    truncated = sequences.truncated
    rt.log(
        f"data: {len(train_sequences)} training sequences, {config.train.batch_size} per micro-batch "
        f"({'packed' if config.data.packing else 'padded'}), {truncated} truncated at {config.data.max_length} tokens "
        f"({sequences.cut_turns} inside a trained turn); {len(eval_sequences)} held out"
        + (f"; chat template: {sequences.template}" if sequences.template else "")
    )

    model = rt.setup(model, num_rows=len(examples))

    sources = sequences.source_names
    for batch in rt.batches(examples, collate_rows):
        trained = batch["targets"] != IGNORE_INDEX
        logits = token_logits(model, batch)
        loss, loss_stats = losses.sft_loss(logits, batch["targets"][trained], batch["num_items_in_batch"])
        stats = Metrics()
        stats.token_mean("loss", loss_stats["loss_sum"], loss_stats["num_tokens"])
        stats.count_trained_tokens(loss_stats["num_tokens"])
        if len(sources) > 1:  # a mixture: loss per source too, so a domain set's progress is visible
            with torch.no_grad():
                nll, counts = losses.per_sequence_nll(
                    logits, batch["targets"][trained], batch["source_ids"][trained], len(sources)
                )
            for index, name in enumerate(sources):
                stats.sum(f"tokens/{name}", counts[index])
                stats.token_mean(f"loss/{name}", nll[index], counts[index])
        stats.per_second("tokens_per_s", batch["num_real_tokens"])
        rt.step(loss, stats)
        if eval_examples and rt.should_evaluate():
            rt.record_evaluation(evaluate_loss(model, examples=eval_examples, collate_rows=collate_rows, rt=rt))

    return rt.finish(
        model,
        tokenizer,
        summary={
            "train_sequences": len(train_sequences),
            "truncated_sequences": truncated,
            "truncated_inside_a_trained_turn": sequences.cut_turns,
            "skipped_invalid_rows": sequences.skipped_rows,
            "eval_sequences": len(eval_sequences),
            "chat_template": sequences.template,
            **{
                f"sequences/{n}": c
                for n, c in zip(sequences.source_names, sequences.source_counts)
                if len(sequences.source_names) > 1
            },
        },
    )
