"""Forward passes over an online-RL rollout: the sampled tokens' log-probs under a model (the old policy, the
reference, or the policy being updated) and a critic's values, at the N response positions of the rollout's rows.

The rollout's own passes (:func:`score_logps`, :func:`critic_values`) run without gradients, in eval mode and under
the run's autocast, ``batch_size`` rows at a time; the update's forward reads its log-probs through the same
:func:`token_logps`, so old, new and reference log-probs describe the same distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.data.packing import Row
from posttrain.data.rollout_layout import ResponseLayout, in_row_order
from posttrain.losses import IGNORE_INDEX
from posttrain.models.forward import shares_prefix, token_logits
from posttrain.models.modes import eval_mode


@dataclass(frozen=True)
class RolloutBatches:
    """How a rollout's rows reach a model: laid out by ``layout`` on ``device``, ``batch_size`` rows a batch for the
    no-grad passes, under ``autocast`` (the run's mixed precision, e.g. ``accelerator.autocast``)."""

    layout: ResponseLayout
    device: torch.device
    batch_size: int
    autocast: Callable[[], AbstractContextManager[Any]]

    def batch(self, rows: list[Row]) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """``ResponseLayout.batch`` on this device: the collated batch and the order of its response positions."""
        return self.layout.batch(rows, self.device)


def response_layout(data: Any, num_samples: int, models: list[Any], pad_token_id: int) -> ResponseLayout:
    """Shared prompts when every model that reads the rollout takes the mask (``models.forward.shares_prefix`` of
    the ``data`` config block) and there are several samples per prompt to share it."""
    share = num_samples > 1 and all(shares_prefix(data, m) for m in models)
    return ResponseLayout(pad_token_id, share)


def token_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log π(token) at the N response positions, float32, under the sampling temperature."""
    return torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def score_logps(model: Any, rows: list[Row], temperature: float, batches: RolloutBatches) -> torch.Tensor:
    """Flat log-probs (N,) of the response tokens of ``rows`` under ``model``."""

    def compute(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_logps(token_logits(model, batch), batch["targets"][batch["targets"] != IGNORE_INDEX], temperature)

    return _no_grad_pass(model, rows, batches, compute)


def critic_values(module: Any, rows: list[Row], batches: RolloutBatches) -> torch.Tensor:
    """Flat values (N,) of the critic of ``module`` (a ``models.actor_critic.ActorCritic``) at the response
    positions of ``rows``."""

    def compute(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module.values(batch["input_ids"], batch["attention_mask"], batch["targets"], batch.get("position_ids"))

    return _no_grad_pass(module, rows, batches, compute)


@torch.no_grad()
def _no_grad_pass(
    model: Any, rows: list[Row], batches: RolloutBatches, compute: Callable[[dict[str, torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """``compute(batch)`` over ``rows`` in batches of ``batches.batch_size`` rows, in eval mode under the run's
    autocast; the flat results concatenated in row order."""
    out = []
    with eval_mode(model), batches.autocast():
        for start in range(0, len(rows), batches.batch_size):
            batch, order = batches.batch(rows[start : start + batches.batch_size])
            out.append(in_row_order(compute(batch).float(), order))
    return torch.cat(out)
