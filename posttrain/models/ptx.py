"""PPO-ptx (Ouyang et al. 2022, InstructGPT): the SFT loss of rows from a second data set, mixed into every
micro-batch of an online-RL update so the policy keeps what supervised training taught it.

The rows are drawn in a cycle whose position depends only on how many were drawn so far over every process
(:attr:`PtxMix.drawn`, which a run checkpoints), so a resumed run draws the rows the uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from posttrain import losses
from posttrain.config import DataConfig
from posttrain.data.dataset import load_sequences
from posttrain.data.packing import Row, collate, single_rows
from posttrain.losses import IGNORE_INDEX
from posttrain.models.forward import token_logits
from posttrain.models.scoring import RolloutBatches


def ptx_rows(data: DataConfig, ptx_data: str | None, tokenizer: Any, seed: int) -> list[Row]:
    """The SFT rows of ``algorithm.ptx_data``, read with the run's ``data`` settings, unpacked and with none held
    out."""
    assert ptx_data is not None
    ptx = DataConfig(**{**data.model_dump(), "train": ptx_data, "eval": None, "eval_fraction": 0.0, "packing": False})
    return single_rows(load_sequences(ptx, tokenizer, "sft", seed).train)


@dataclass
class PtxMix:
    """``coef`` × the token-mean SFT loss of ``rows``, ``batch_size`` of them per micro-batch on each of
    ``world_size`` processes (this one ``process_index``)."""

    rows: list[Row]
    coef: float
    pad_token_id: int
    batch_size: int
    process_index: int
    world_size: int
    drawn: int = 0
    """Rows drawn so far over every process: the position in the cycle."""

    def next_loss(
        self, policy: Any, micro_batches: int, batches: RolloutBatches
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, loss_sum, num_tokens)`` of this process's next ``batch_size`` rows under ``policy``: this
        micro-batch's share of the ptx loss over the ``micro_batches`` of the update on every process, and the SFT
        loss's token sum and count for the step's ``ptx_loss`` statistic. ``drawn`` moves past every process's
        rows."""
        start = self.drawn + self.process_index * self.batch_size
        rows = [self.rows[(start + j) % len(self.rows)] for j in range(self.batch_size)]
        self.drawn += self.world_size * self.batch_size
        batch = {k: v.to(batches.device) for k, v in collate(rows, self.pad_token_id, packed=False).items()}
        trained = batch["targets"] != IGNORE_INDEX
        with batches.autocast():
            logits = token_logits(policy, batch)
        # Normalised by this micro-batch's tokens, averaged over the update's micro-batches and processes.
        per_token, stats = losses.sft_loss(logits, batch["targets"][trained], trained.sum().clamp(min=1))
        return self.coef * per_token / micro_batches, stats["loss_sum"], stats["num_tokens"]
