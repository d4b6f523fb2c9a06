"""The forward pass every recipe shares: logits only at the positions that are trained."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.losses import IGNORE_INDEX
from posttrain.models.adapters import num_prepended_tokens


def token_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``(N, V)`` for the N positions whose target is trained, in row-major order (``targets[keep]``).

    Projecting only those hidden states onto the vocabulary (transformers' boolean ``logits_to_keep``) skips the
    lm_head matmul and the full-vocabulary logits for prompt and padding tokens: with assistant-only loss that
    is most of them.
    """
    keep = batch["targets"] != IGNORE_INDEX
    prepended = num_prepended_tokens(model)
    if prepended:
        # peft prepends virtual tokens inside forward; keep their (untrained) positions out.
        keep = torch.cat([keep.new_zeros(keep.shape[0], prepended), keep], dim=1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    output = model(**inputs, logits_to_keep=keep, use_cache=False)
    return output.logits.reshape(-1, output.logits.shape[-1])
