"""Training losses as pure functions of tensors. Imports torch only.

Conventions: ``targets`` are already shifted (``targets[t]`` is the token that position ``t`` must predict) and
use -100 for positions that are not trained. Token-level losses return the *sum* over trained tokens divided by
``num_items_in_batch``, the trained-token count of the whole accumulated batch (all micro-batches, all processes):
summing these micro-batch losses gives exactly the token mean of the big batch, so gradient accumulation 1x8
equals 8x1 (the bug HF fixed in transformers 4.46, and torchtune #2307).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy over trained tokens, normalised by the accumulated batch's token count.

    ``logits`` is ``(N, V)`` for the N trained positions (the recipe computes logits only there) or
    ``(..., V)`` with ``targets`` of the matching leading shape holding -100 where not trained.
    Returns the loss and stats ``{"loss_sum", "num_tokens"}`` (detached) for logging.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    token_losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    loss_sum = token_losses.sum()
    num_tokens = (flat_targets != IGNORE_INDEX).sum()
    loss = loss_sum / num_items_in_batch
    return loss, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.detach()}


def per_sequence_nll(
    logits: torch.Tensor, targets: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and trained-token count per sequence, for per-sample losses (e.g. packed vs padded checks,
    evaluation). ``sequence_ids`` gives each row of the flat ``logits``/``targets`` its sequence index."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    token_losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    trained = (flat_targets != IGNORE_INDEX).to(token_losses.dtype)
    ids = sequence_ids.reshape(-1)
    nll = torch.zeros(num_sequences, dtype=token_losses.dtype, device=token_losses.device).index_add_(
        0, ids, token_losses
    )
    counts = torch.zeros(num_sequences, dtype=trained.dtype, device=trained.device).index_add_(0, ids, trained)
    return nll, counts
