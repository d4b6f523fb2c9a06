"""Kahneman–Tversky optimisation (``stage: kto``, Ethayarajh et al. 2024) on unpaired desirable / undesirable
examples, or preference pairs split into one of each (TRL's ``unpair_preference_dataset``).

Choices this recipe makes:

- The loss is ``losses.kto_loss`` per example (eq. 7, the constant λ dropped): with ``r = log π(y|x) −
  log π_ref(y|x)``, a desirable example costs ``λ_D·(1 − σ(β(r − z0)))``, an undesirable one
  ``λ_U·(1 − σ(β(z0 − r)))``. The micro-batch loss is the sum over its examples divided by the accumulated
  batch's example count.
- The reference point z0 estimates ``KL(π‖π_ref)`` as the mean log-ratio of mismatched (prompt, other example's
  completion) sequences (``data/pairs.py``), over the micro-batch and all processes, detached and clamped at 0 as
  in the paper and TRL. Each example and its mismatched sequence form one unit that shares the forward
  (``data.packing.Example``; packed, their common prompt is held once, ``data.share_prompt``).
  ``train.batch_size`` counts examples, packed or padded. Because z0 is
  a micro-batch statistic, gradient accumulation is not exactly equal to a larger micro-batch here (as in TRL).
- The reference log-probs of every example and every mismatched sequence are computed once, before the runtime
  restores a checkpoint, with the adapter switched off (or, for full and freeze tuning, from the initial
  weights), and cached (``models.forward.reference_logps``).
- Logged: loss, mean reward and log-prob of the desirable and of the undesirable examples, ``kl`` (z0, mean over
  micro-batches). Held-out evaluation: ``eval_loss`` with z0 over the
  whole held-out set, and ``eval_reward_gap`` (mean desirable minus mean undesirable reward).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from posttrain import losses
from posttrain.config import KtoBlock, KtoConfig
from posttrain.data.packing import Example, collate_examples, examples_of
from posttrain.data.pairs import load_unpaired
from posttrain.data.tokenize import TokenizedSequence
from posttrain.models import load_model, load_tokenizer
from posttrain.models.forward import batch_sequence_logps, shares_prefix
from posttrain.models.modes import eval_mode
from posttrain.runtime import Metrics, Runtime


def example_units(examples: list[TokenizedSequence]) -> list[tuple[TokenizedSequence, TokenizedSequence]]:
    return [(example, example.extra["kl"]) for example in examples]


def forward_examples(
    model: Any, batch: dict[str, torch.Tensor], ref_table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over whole (example, mismatched) units: the examples' policy and reference log-probs, the
    mismatched sequences' log-ratios (detached), and the examples' indices."""
    logps, _, ids = batch_sequence_logps(model, batch)
    logps, ref_logps, ids = logps.view(-1, 2), ref_table[ids].view(-1, 2), ids.view(-1, 2)
    return logps[:, 0], ref_logps[:, 0], (logps[:, 1] - ref_logps[:, 1]).detach(), ids[:, 0] // 2


@torch.no_grad()
def evaluate_examples(
    model: Any,
    items: list[Example],
    collate_rows: Any,
    labels: torch.Tensor,
    ref_table: torch.Tensor,
    options: KtoBlock,
    rt: Runtime,
) -> dict[str, float]:
    """Held-out KTO loss (z0 from the whole held-out set) and the gap between mean desirable and undesirable
    rewards (sharded over processes, summed)."""
    count = len(labels)
    policy, kl_ratios = torch.zeros(count, device=rt.device), torch.zeros(count, device=rt.device)
    with eval_mode(model):
        for batch in rt.eval_batches(items, collate_rows):
            logps, _, kl, index = forward_examples(model, batch, ref_table)
            policy[index], kl_ratios[index] = logps.float(), kl.float()
    policy, kl_ratios = rt.sum_over_processes(policy), rt.sum_over_processes(kl_ratios)
    ref_logps = ref_table.view(-1, 2)[:, 0]
    per_example, rewards = losses.kto_loss(
        policy, ref_logps, labels, kl_ratios.mean(), options.beta, options.desirable_weight, options.undesirable_weight
    )
    gap = rewards[labels].mean() - rewards[~labels].mean() if labels.any() and (~labels).any() else torch.tensor(0.0)
    return {"eval_loss": per_example.mean().item(), "eval_reward_gap": gap.item(), "eval_kl": kl_ratios.mean().item()}


def run(config: KtoConfig, config_path: str | None = None) -> dict[str, Any]:
    """Train one KTO run end to end; returns the run summary."""
    rt = Runtime(config, config_path)
    options = config.kto
    tokenizer = load_tokenizer(config.model)
    # Data before weights: a bad row fails in a second, not after a multi-gigabyte load.
    examples = load_unpaired(config.data, tokenizer, config.seed)
    rt.check_data(examples, tokenizer)
    model, tokenizer = load_model(config.model, config.peft, tokenizer)
    packed = config.data.packing
    share = shares_prefix(config.data, model)
    items, eval_items = examples_of(example_units(examples.train)), examples_of(example_units(examples.held_out))
    collate_rows = partial(
        collate_examples,
        pad_token_id=tokenizer.pad_token_id,
        packed=packed,
        max_length=config.data.max_length,
        seed=config.seed,
        share_prefix=share,
    )
    labels = torch.tensor([e.extra["label"] for e in examples.train], dtype=torch.bool, device=rt.device)
    eval_labels = torch.tensor([e.extra["label"] for e in examples.held_out], dtype=torch.bool, device=rt.device)
    desirable = int(labels.sum())
    rt.log(
        f"data: {len(examples.train)} training examples ({desirable} desirable, {len(labels) - desirable} undesirable), "
        f"{config.train.batch_size} per micro-batch ({'packed' if packed else 'padded'}), each with a mismatched completion for the KL "
        f"estimate; {examples.truncated} truncated at {config.data.max_length} tokens; {len(examples.held_out)} held out"
    )

    # Two sequences an example: its completion and the mismatched one for the KL estimate.
    train, held_out = (items, 2 * len(examples.train)), (eval_items, 2 * len(examples.held_out))
    ref_table, eval_ref_table = rt.reference_tables(model, collate_rows, train, held_out)

    model = rt.setup(model, num_rows=len(items))

    for batch in rt.batches(items, collate_rows, weight=lambda example: 1):
        logps, ref_logps, kl_ratios, index = forward_examples(model, batch, ref_table)
        kl_total = torch.stack([kl_ratios.sum(), torch.tensor(float(len(kl_ratios)), device=kl_ratios.device)])
        if rt.world_size > 1:  # every process must use the same z0, as one large micro-batch would
            kl_total = rt.accelerator.reduce(kl_total, reduction="sum")
        kl_estimate = kl_total[0] / kl_total[1]
        example_labels = labels[index]
        per_example, rewards = losses.kto_loss(
            logps,
            ref_logps,
            example_labels,
            kl_estimate,
            options.beta,
            options.desirable_weight,
            options.undesirable_weight,
        )
        loss = per_example.sum() / batch["num_items_in_batch"]  # the mean over every example of the accumulated batch
        num_desirable, num_undesirable, stats = example_labels.sum(), (~example_labels).sum(), Metrics()
        stats.example_mean("loss", per_example.detach().sum(), len(per_example))
        stats.example_mean(
            "kl", kl_estimate.clamp(min=0), 1
        )  # z0, the same on every process: its mean over micro-batches
        stats.example_mean("rewards/desirable", rewards[example_labels].sum(), num_desirable)
        stats.example_mean("rewards/undesirable", rewards[~example_labels].sum(), num_undesirable)
        stats.example_mean("logps/desirable", logps[example_labels].detach().sum(), num_desirable)
        stats.example_mean("logps/undesirable", logps[~example_labels].detach().sum(), num_undesirable)
        stats.per_second("tokens_per_s", batch["num_real_tokens"])
        rt.step(loss, stats)
        if eval_ref_table is not None and rt.should_evaluate():  # there is held-out data
            rt.record_evaluation(
                evaluate_examples(model, eval_items, collate_rows, eval_labels, eval_ref_table, options, rt)
            )

    return rt.finish(
        model,
        tokenizer,
        summary={
            "train_examples": len(examples.train),
            "desirable_examples": desirable,
            "undesirable_examples": len(labels) - desirable,
            "eval_examples": len(examples.held_out),
            "truncated_examples": examples.truncated,
            "skipped_invalid_rows": examples.skipped_rows,
            "chat_template": examples.template,
        },
    )
