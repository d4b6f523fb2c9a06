"""Direct preference optimisation and its family (``stage: dpo``) on (prompt, chosen, rejected) pairs.

Choices this recipe makes:

- One loss per name (``dpo.loss``), each a pure function of per-pair log-probs from ``losses.py``: ``sigmoid``
  (DPO, Rafailov et al. 2023; with ``label_smoothing`` conservative DPO), ``ipo`` (Azar et al. 2023, on
  length-averaged log-probs), ``hinge`` (SLiC-HF, Zhao et al. 2023), ``robust`` (Chowdhury et al. 2024), and the
  reference-free ``simpo`` (Meng et al. 2024) and ``orpo`` (Hong et al. 2024; its SFT term is the per-pair
  token-mean NLL of the chosen response, the paper's form).
- The reference π_ref is the model as loaded: for adapters the base weights (adapter switched off), for full and
  freeze tuning the initial weights. Its log-probs are computed once, before the runtime restores any checkpoint,
  and cached for every training and held-out pair (``models.forward.reference_logps``), so training holds one
  model and a resumed run is the uninterrupted one. SimPO and ORPO skip this pass.
- Chosen and rejected share one forward: a pair's two sequences are one unit that is never split (packed into
  rows of ``2·data.max_length`` tokens, or one padded row per pair that ``collate`` splits into its two sides;
  ``data.packing.unit_rows``). Packed, the prompt both sides share is held once (``data.share_prompt``): one
  unit is prompt, chosen response, rejected response, with a mask that hides the chosen response from the
  rejected one, so the prompt's forward and backward are paid once per pair. ``train.batch_size`` counts pairs,
  packed or padded: the layout changes how a micro-batch's pairs lie in tensors, never which pairs it holds.
- A log-prob is summed over the response tokens (the prompt is never trained, ``data/pairs.py``); IPO, SimPO and
  ORPO divide by the response length.
- The loss is the sum of per-pair losses over the accumulated batch's pair count, so grad accumulation is exact.
  ``dpo.sft_weight`` adds the chosen response's token-mean NLL per pair (RPO, Pang et al. 2024).
- Logged: loss, reward accuracy (ties count one half, so a policy equal to its reference scores 0.5), reward
  margin, chosen/rejected rewards (β·log-ratio; β·mean log-prob for SimPO/ORPO), and the policy's log-probs.
  Held-out evaluation reports ``eval_loss`` (early stopping reads it), ``eval_accuracy`` and ``eval_margin``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from posttrain import losses
from posttrain.config import DpoBlock, DpoConfig
from posttrain.data.packing import Example, collate_examples
from posttrain.data.pairs import load_pairs, pair_examples, pair_sides
from posttrain.models import load_model, load_tokenizer
from posttrain.models.forward import batch_sequence_logps, shares_prefix
from posttrain.models.loading import load_for_inference
from posttrain.models.modes import eval_mode
from posttrain.runtime import Metrics, Runtime


def pair_losses(
    options: DpoBlock, logps: torch.Tensor, counts: torch.Tensor, ref_logps: torch.Tensor | None
) -> losses.PairLosses:
    """Per-pair losses and rewards of ``dpo.loss`` (``losses.DPO_LOSSES``) from the policy's log-probs ``(P, 2)``
    summed over each response's ``counts`` tokens and the reference's (None for a reference-free loss), plus
    ``sft_weight`` × the chosen response's token-mean NLL."""
    loss = losses.DPO_LOSSES[options.loss]
    policy, reference = logps, ref_logps
    if loss.length_averaged:
        policy = logps / counts.clamp(min=1)
        reference = ref_logps / counts.clamp(min=1) if ref_logps is not None else None
    ref_chosen, ref_rejected = (reference[:, 0], reference[:, 1]) if reference is not None else (None, None)
    # The DpoBlock field behind each option a loss may take (PreferenceLoss.options).
    available = {"label_smoothing": options.label_smoothing, "gamma_beta_ratio": options.simpo_gamma_beta_ratio}
    keywords = {name: available[name] for name in loss.options}
    per_pair, chosen_rewards, rejected_rewards = loss.fn(
        policy[:, 0], policy[:, 1], ref_chosen, ref_rejected, options.beta, **keywords
    )
    if options.sft_weight:
        per_pair = per_pair - options.sft_weight * logps[:, 0] / counts[:, 0].clamp(min=1)
    return per_pair, chosen_rewards, rejected_rewards


def reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 when the chosen reward is higher, 1/2 on a tie (a policy equal to its reference), else 0."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def forward_pairs(
    model: Any, batch: dict[str, torch.Tensor], options: DpoBlock, ref_table: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, losses.PairLosses]:
    """One forward over a batch of whole pairs: policy log-probs ``(P, 2)``, and the per-pair losses and rewards."""
    logps, counts, ids = batch_sequence_logps(model, batch)
    logps, counts = logps.view(-1, 2), counts.view(-1, 2)
    ref_logps = ref_table[ids].view(-1, 2) if ref_table is not None else None
    return logps, counts, pair_losses(options, logps, counts, ref_logps)


@torch.no_grad()
def evaluate_pairs(
    model: Any, items: list[Example], collate_rows: Any, options: DpoBlock, ref_table: torch.Tensor | None, rt: Runtime
) -> dict[str, float]:
    """Held-out mean loss, implicit-reward preference accuracy and margin (sharded over processes, summed)."""
    total = torch.zeros(4, device=rt.device)
    with eval_mode(model):
        for batch in rt.eval_batches(items, collate_rows):
            _, _, (per_pair, chosen_rewards, rejected_rewards) = forward_pairs(model, batch, options, ref_table)
            total += torch.stack(
                [
                    per_pair.sum(),
                    reward_accuracy(chosen_rewards, rejected_rewards).sum(),
                    (chosen_rewards - rejected_rewards).sum(),
                    torch.tensor(float(len(per_pair)), device=rt.device),
                ]
            )
    total = rt.sum_over_processes(total)
    count = total[3].clamp(min=1)
    return {
        "eval_loss": (total[0] / count).item(),
        "eval_accuracy": (total[1] / count).item(),
        "eval_margin": (total[2] / count).item(),
    }


def run(config: DpoConfig, config_path: str | None = None) -> dict[str, Any]:
    """Train one DPO-family run end to end; returns the run summary."""
    rt = Runtime(config, config_path)
    options = config.dpo
    tokenizer = load_tokenizer(config.model)
    # Data before weights: a bad row fails in a second, not after a multi-gigabyte load.
    pairs = load_pairs(config.data, tokenizer, config.seed)
    rt.check_data(pair_sides(pairs), tokenizer)
    model, tokenizer = load_model(config.model, config.peft, tokenizer)
    packed = config.data.packing
    share = shares_prefix(config.data, model)
    items, eval_items = pair_examples(pairs.train), pair_examples(pairs.held_out)
    collate_rows = partial(
        collate_examples,
        pad_token_id=tokenizer.pad_token_id,
        packed=packed,
        max_length=config.data.max_length,
        seed=config.seed,
        share_prefix=share,
    )
    truncated = sum(p.truncated for p in pairs.train)
    rt.log(
        f"data: {len(pairs.train)} training pairs, {config.train.batch_size} per micro-batch "
        f"({'packed' if packed else 'padded'}), "
        f"{truncated} truncated at {config.data.max_length} tokens; {len(pairs.held_out)} held out"
        + (f"; chat template: {pairs.template}" if pairs.template else "")
    )

    ref_table = eval_ref_table = None
    reference_free = losses.DPO_LOSSES[options.loss].reference_free
    if not reference_free:  # two sequences a pair
        train, held_out = (items, 2 * len(pairs.train)), (eval_items, 2 * len(pairs.held_out))
        if options.reference:
            # Its own weights for the tables, then gone: training still holds one model.
            reference, _ = load_for_inference(options.reference, config.model.dtype)
            ref_table, eval_ref_table = rt.reference_tables(reference, collate_rows, train, held_out)
            del reference
        else:
            ref_table, eval_ref_table = rt.reference_tables(model, collate_rows, train, held_out)

    model = rt.setup(model, num_rows=len(items))

    for batch in rt.batches(items, collate_rows, weight=lambda pair: 1):
        logps, _, (per_pair, chosen_rewards, rejected_rewards) = forward_pairs(model, batch, options, ref_table)
        loss = per_pair.sum() / batch["num_items_in_batch"]  # the mean over every pair of the accumulated batch
        num_pairs, stats = len(per_pair), Metrics()
        stats.example_mean("loss", per_pair.detach().sum(), num_pairs)
        stats.example_mean("rewards/accuracy", reward_accuracy(chosen_rewards, rejected_rewards).sum(), num_pairs)
        stats.example_mean("rewards/margin", (chosen_rewards - rejected_rewards).sum(), num_pairs)
        stats.example_mean("rewards/chosen", chosen_rewards.sum(), num_pairs)
        stats.example_mean("rewards/rejected", rejected_rewards.sum(), num_pairs)
        stats.example_mean("logps/chosen", logps[:, 0].detach().sum(), num_pairs)
        stats.example_mean("logps/rejected", logps[:, 1].detach().sum(), num_pairs)
        stats.per_second("tokens_per_s", batch["num_real_tokens"])
        rt.step(loss, stats)
        if eval_items and rt.should_evaluate():
            rt.record_evaluation(evaluate_pairs(model, eval_items, collate_rows, options, eval_ref_table, rt))

    return rt.finish(
        model,
        tokenizer,
        summary={
            "loss_type": options.loss,
            "train_pairs": len(pairs.train),
            "eval_pairs": len(pairs.held_out),
            "truncated_pairs": truncated,
            "skipped_invalid_rows": pairs.skipped_rows,
            "reference": "none" if reference_free else f"cached ({options.reference or 'the model as loaded'})",
            "chat_template": pairs.template,
        },
    )
