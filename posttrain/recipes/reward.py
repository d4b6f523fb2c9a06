"""Reward-model training (``stage: reward``): a causal LM with a scalar head, trained on preference pairs.

Choices this recipe makes:

- The model is the policy architecture with a one-output linear ``score`` head on the final hidden state
  (``AutoModelForSequenceClassification``, ``num_labels=1``): InstructGPT's and Llama 2's reward model, saved in
  the format TRL, OpenRLHF and vLLM load. Full fine-tuning, freeze-tuning or LoRA/DoRA (peft then trains and saves
  the head in full).
- Each side of a pair is the prompt plus that response, rendered with the chat template; the reward is the head's
  output at the sequence's **last token** (the end-of-turn marker), found from the sequence layout, not from the
  pad token, so it is right for packed rows and for left- or right-padded batches alike
  (``models/scalar_head.py``).
- Loss: Bradley–Terry ``-logσ(r_c − r_r − m)`` (``losses.pairwise_reward_loss``), ``m`` the pair's margin when
  the data has one and ``reward.use_margin`` is on (Llama 2 §3.2.2), else 0. Averaged over the pairs of the whole
  accumulated batch, so grad accumulation is exact.
- Chosen and rejected are one concatenated forward: they share a row (packed, their common prompt held once:
  ``data.share_prompt``) or sit in consecutive rows. ``train.batch_size`` counts pairs, packed or padded.
- Held-out accuracy (share of pairs with ``r_c > r_r``) and mean reward gap are reported at every evaluation;
  ``eval_loss`` (the pairwise loss) drives the best checkpoint and early stopping.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from posttrain import losses
from posttrain.config import RewardConfig
from posttrain.data.packing import Example, collate_examples, local_sequence_ids, sequence_ends
from posttrain.data.pairs import TokenizedPair, load_pairs, pair_examples, pair_sides
from posttrain.models import load_model, load_tokenizer
from posttrain.models.forward import shares_prefix
from posttrain.models.modes import eval_mode
from posttrain.runtime import Metrics, Runtime


def pair_rewards(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, 2)`` rewards (chosen, rejected) of the batch's pairs and ``(P,)`` their global pair indices."""
    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    values = model(batch["input_ids"], **inputs)
    local, global_ids = local_sequence_ids(batch["sequence_ids"])
    rewards = values.reshape(-1)[sequence_ends(local, len(global_ids))].view(-1, 2)
    return rewards, global_ids.view(-1, 2)[:, 0] // 2


def pair_margins(pairs: list[TokenizedPair], use_margin: bool) -> torch.Tensor | None:
    """Per-pair margins (0 for pairs without one), or None when no pair has one or margins are off."""
    if not use_margin or all(p.margin is None for p in pairs):
        return None
    return torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)


@torch.no_grad()
def evaluate_pairs(
    model: Any, rows: list[Example], margins: torch.Tensor | None, collate_rows: Any, rt: Runtime
) -> dict[str, float]:
    """Held-out pairwise loss, accuracy and mean reward gap (rows sharded over processes, sums reduced)."""
    totals = torch.zeros(4, device=rt.device)  # loss sum, correct, gap sum, pairs
    with eval_mode(model):
        for batch in rt.eval_batches(rows, collate_rows):
            rewards, index = pair_rewards(model, batch)
            margin = margins[index.cpu()].to(rt.device) if margins is not None else None
            loss, stats = losses.pairwise_reward_loss(rewards[:, 0], rewards[:, 1], margin)
            n = rewards.shape[0]
            totals += torch.stack(
                [loss * n, stats["accuracy"] * n, stats["reward_gap"] * n, torch.tensor(float(n), device=rt.device)]
            )
    totals = rt.sum_over_processes(totals)
    pairs = totals[3].clamp(min=1)
    return {
        "eval_loss": (totals[0] / pairs).item(),
        "eval_accuracy": (totals[1] / pairs).item(),
        "eval_reward_gap": (totals[2] / pairs).item(),
    }


def run(config: RewardConfig, config_path: str | None = None) -> dict[str, Any]:
    """Train one reward model end to end; returns the run summary."""
    rt = Runtime(config, config_path)
    tokenizer = load_tokenizer(config.model)
    pairs = load_pairs(config.data, tokenizer, config.seed)
    rt.check_data(pair_sides(pairs), tokenizer)
    model, tokenizer = load_model(config.model, config.peft, tokenizer, scalar_head=True)

    share = shares_prefix(config.data, model)
    rows, eval_rows = pair_examples(pairs.train), pair_examples(pairs.held_out)
    margins, eval_margins = (
        pair_margins(pairs.train, config.reward.use_margin),
        pair_margins(pairs.held_out, config.reward.use_margin),
    )
    collate_rows = partial(
        collate_examples,
        pad_token_id=tokenizer.pad_token_id,
        packed=config.data.packing,
        max_length=config.data.max_length,
        seed=config.seed,
        share_prefix=share,
    )
    rt.log(
        f"data: {len(pairs.train)} training pairs, {config.train.batch_size} per micro-batch "
        f"({'packed' if config.data.packing else 'padded'}), "
        f"{pairs.truncated} with a side truncated at {config.data.max_length} tokens; {len(pairs.held_out)} held out; "
        f"margins {'used' if margins is not None else 'none'}; chat template {pairs.template}"
    )
    model = rt.setup(model, num_rows=len(rows))

    for batch in rt.batches(rows, collate_rows, weight=lambda pair: 1):
        rewards, index = pair_rewards(model, batch)
        margin = margins[index.cpu()].to(rewards.device) if margins is not None else None
        mean_loss, stats = losses.pairwise_reward_loss(rewards[:, 0], rewards[:, 1], margin)
        num_pairs = rewards.shape[0]
        # The mean over this micro-batch, re-weighted to a mean over every pair of the accumulated batch.
        loss = mean_loss * num_pairs / batch["num_items_in_batch"]
        metrics = Metrics()
        metrics.sum("count", num_pairs)
        metrics.example_mean("loss", mean_loss.detach() * num_pairs, num_pairs)
        metrics.example_mean("accuracy", stats["accuracy"] * num_pairs, num_pairs)
        metrics.example_mean("reward_gap", stats["reward_gap"] * num_pairs, num_pairs)
        metrics.example_mean("chosen_reward", rewards[:, 0].detach().sum(), num_pairs)
        metrics.example_mean("rejected_reward", rewards[:, 1].detach().sum(), num_pairs)
        metrics.per_second("tokens_per_s", batch["num_real_tokens"])
        rt.step(loss, metrics)
        if eval_rows and rt.should_evaluate():
            rt.record_evaluation(evaluate_pairs(model, eval_rows, eval_margins, collate_rows, rt))

    return rt.finish(
        model,
        tokenizer,
        summary={
            "train_pairs": len(pairs.train),
            "eval_pairs": len(pairs.held_out),
            "truncated_pairs": pairs.truncated,
            "skipped_invalid_rows": pairs.skipped_rows,
            "chat_template": pairs.template,
        },
    )
