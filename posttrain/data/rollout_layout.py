"""Sampled responses as training rows, and back: the layout online RL reads its rollouts in.

A rollout's per-token quantities live in *action space* (``rl.py``'s convention): ``(B, R)``, one row per response,
position ``t`` its t-th generated token, right-padded under a 0/1 ``mask``. A model's forward gives them flat, as
the N response positions of a collated batch; these helpers turn one into the other. How a rollout's responses
split over processes and optimizer updates is here too (:func:`mini_batches_per_epoch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.config import ConfigError
from posttrain.data.packing import Row, collate, pack_rows
from posttrain.data.tokenize import TokenizedSequence
from posttrain.losses import IGNORE_INDEX


def response_row(prompt_ids: list[int], response_ids: list[int], index: int) -> Row:
    """Prompt + response as one training row whose targets are exactly the response tokens."""
    input_ids = prompt_ids + response_ids
    targets = [IGNORE_INDEX] * (len(prompt_ids) - 1) + response_ids + [IGNORE_INDEX]
    n = len(input_ids)
    return Row(input_ids, targets, list(range(n)), [index] * n, len(response_ids), [0] * n)


@dataclass(frozen=True)
class ResponseLayout:
    """How rollout rows (prompt + response) become model inputs: padded, one row each; or, with
    ``share_prompt``, the responses to one prompt as one unit that holds the prompt once (``data.packing``'s
    shared prefixes: each response sees the prompt and itself), which spares the forward and backward of
    ``num_samples - 1`` copies of every prompt."""

    pad_token_id: int
    share_prompt: bool = False

    def batch(self, rows: list[Row], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The collated batch, and the permutation that puts its response positions (row-major in the batch) in
        the order of ``rows`` (what ``to_actions`` expects); None when they already are."""
        if not self.share_prompt:
            return {k: v.to(device) for k, v in collate(rows, self.pad_token_id, packed=False).items()}, None
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for index, row in enumerate(rows):
            by_prompt.setdefault(tuple(row.input_ids[: len(row.input_ids) - row.num_targets]), []).append(index)
        sequences = [TokenizedSequence(row.input_ids, row.targets) for row in rows]
        # Capacity 0: a row per unit, which collate then lays out in rows of a few units.
        packed = pack_rows(sequences, 0, 0, list(by_prompt.values()), share_prefix=True)
        batch = {k: v.to(device) for k, v in collate(packed, self.pad_token_id, packed=True).items()}
        # Sequence ids are indices into rows; a response's positions are in order within its branch.
        order = torch.argsort(batch["sequence_ids"][batch["targets"] != IGNORE_INDEX], stable=True)
        return batch, order


def in_row_order(flat: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Flat values at a batch's response positions, permuted by ``ResponseLayout.batch``'s ``order``."""
    return flat if order is None else flat[order]


def to_actions(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Values at the N response positions (row-major) → ``(B, R)`` action space, 0 where masked."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask.bool()] = flat
    return out


def action_mask(rows: list[Row], device: torch.device) -> torch.Tensor:
    """``(B, R)`` float mask of each row's response tokens, right-padded to the longest response."""
    lengths = torch.tensor([row.num_targets for row in rows], device=device)
    width = int(lengths.max()) if len(rows) else 0
    return (torch.arange(width, device=device)[None, :] < lengths[:, None]).float()


def mini_batches_per_epoch(prompts_per_step: int, num_samples: int, world_size: int, mini_batch: int) -> int:
    """Optimizer updates per pass over a rollout: each process's responses over ``train.batch_size x grad_accum``
    (``mini_batch``); a ConfigError when the prompts or the responses do not divide evenly."""
    if prompts_per_step % world_size:
        raise ConfigError(
            f"algorithm.prompts_per_step ({prompts_per_step}) must divide evenly over {world_size} processes"
        )
    responses_per_process = prompts_per_step // world_size * num_samples
    if responses_per_process % mini_batch:
        raise ConfigError(
            f"each process samples {responses_per_process} responses per step (algorithm.prompts_per_step / processes x "
            f"sampling.num_samples), which must be a multiple of train.batch_size x train.grad_accum ({mini_batch})"
        )
    return responses_per_process // mini_batch
