"""The forward pass every recipe shares: logits only at the positions that are trained; per-sequence
log-probabilities of a batch and the frozen reference model's, for the preference losses."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, overload

import torch

from posttrain.data.packing import local_sequence_ids
from posttrain.losses import IGNORE_INDEX, per_sequence_nll
from posttrain.models.adapters import is_peft_model, is_prompt_learning, num_prepended_tokens
from posttrain.models.modes import eval_mode


def shares_prefix(data: Any, model: Any) -> bool:
    """Whether the pair and KTO recipes lay their units out with a shared prefix (``data.packing``'s module
    docstring): asked for (``data.share_prompt``), packed, and a model that takes a custom 4D boolean mask as it
    is, i.e. sdpa attention (eager adds the mask to the scores, flash-attention takes none) and no peft prompt
    learning (its virtual tokens or prefix keys would not be covered by the mask)."""
    if not (data.packing and data.share_prompt):
        return False
    if is_prompt_learning(model):
        return False
    return getattr(model.config, "_attn_implementation", None) == "sdpa"


@overload
def token_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
@overload
def token_logits(
    model: Any, batch: dict[str, torch.Tensor], with_hidden: Literal[True]
) -> tuple[torch.Tensor, torch.Tensor]: ...


def token_logits(model: Any, batch: dict[str, torch.Tensor], with_hidden: bool = False) -> Any:
    """Logits ``(N, V)`` for the N positions whose target is trained, in row-major order (``targets[keep]``);
    ``with_hidden``: also the final hidden states ``(N, H)`` there (what a shared value head reads).

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
    output = model(**inputs, logits_to_keep=keep, use_cache=False, output_hidden_states=with_hidden)
    logits = output.logits.reshape(-1, output.logits.shape[-1])
    if with_hidden:
        return logits, output.hidden_states[-1][keep]
    return logits


def batch_sequence_logps(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sequence of ``batch``: the summed log-probability of its trained tokens (``log π(response | prompt)``
    for preference data), its trained-token count, and its global sequence id; each ``(S,)``, in increasing
    global id order (``local_sequence_ids``), so a batch of whole pairs laid out as ``[c0, r0, c1, r1, ...]``
    reshapes with ``.view(-1, 2)`` to (chosen, rejected). Sums are float32 (``per_sequence_nll``)."""
    trained = batch["targets"] != IGNORE_INDEX
    local_ids, global_ids = local_sequence_ids(batch["sequence_ids"])
    nll, counts = per_sequence_nll(
        token_logits(model, batch), batch["targets"][trained], local_ids[trained], len(global_ids)
    )
    return -nll, counts, global_ids


@contextmanager
def reference_model(model: Any) -> Iterator[Any]:
    """The model whose log-probs are the reference π_ref: a peft model with its adapter switched off (the base
    weights, whatever the adapter has learnt or a checkpoint restored), otherwise ``model`` itself (full and freeze
    tuning: the caller must use it before any update). Prompt learning yields the bare base model, as peft's
    ``disable_adapter`` swaps ``forward`` but ``token_logits`` would still skip the virtual tokens' positions."""
    if not is_peft_model(model):
        yield model
    elif is_prompt_learning(model):
        yield model.get_base_model()
    else:
        with model.disable_adapter():
            yield model


@torch.no_grad()
def reference_logps(
    model: Any, batches: Iterable[dict[str, torch.Tensor]], num_sequences: int, accelerator: Any
) -> torch.Tensor:
    """Summed reference log-probs of every sequence in ``batches`` (this process's share, e.g.
    ``Runtime.eval_batches``), ``(num_sequences,)`` float32 indexed by global sequence id, computed once (in eval
    mode, under the run's autocast) so training holds a single model. The processes' tables are summed, so every
    process ends with the whole table.

    Call it before ``Runtime.setup``: setup restores a checkpoint, and for full fine-tuning the reference is the
    weights as loaded; computing it first keeps a resumed run equal to an uninterrupted one.
    """
    if not getattr(model, "is_quantized", False):  # bitsandbytes weights are already placed and cannot move
        model.to(accelerator.device)
    logps = torch.zeros(num_sequences, dtype=torch.float32, device=accelerator.device)
    with eval_mode(model), reference_model(model) as reference, accelerator.autocast():
        for batch in batches:
            sums, _, ids = batch_sequence_logps(reference, batch)
            logps[ids] = sums.float()
    if accelerator.num_processes > 1:
        logps = accelerator.reduce(logps, reduction="sum")
    return logps
