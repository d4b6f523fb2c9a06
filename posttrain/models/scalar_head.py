"""Transformers with a scalar head: reward models (one score per sequence, read at its last token) and, later,
critics (one value per token).

The weights are a plain ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the ``score`` linear layer
on the final hidden state), the format TRL, OpenRLHF and vLLM load as a reward model. Its own forward pools at the
rightmost token that is not ``pad_token_id``, which is wrong when the pad token is also the EOS that ends every
response (a common choice) and impossible for packed rows. ``ScalarHeadModel`` therefore runs the backbone and
head itself and returns a value per token; the caller picks positions (``last_token_index`` for padded batches
of either side, ``data.packing.sequence_ends`` for packed rows). Being one ``nn.Module`` whose ``forward`` does
all the work, it can be wrapped by DDP like any model.

This module is the head only: ``models.loading`` builds models with it (``load_model(scalar_head=True)``, and
``load_scorer_model`` for a trained reward model); ``eval.reward_model.RewardScorer`` scores conversations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.models.adapters import is_peft_model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` position of each row's last real token (mask 1): ``len − 1`` when right-padded, ``T − 1`` when
    left-padded."""
    width = attention_mask.shape[-1]
    return width - 1 - attention_mask.flip(-1).long().argmax(-1)


class ScalarHeadModel(nn.Module):
    """A sequence-classification model (possibly with a peft adapter) that returns ``(B, T)`` scalar values."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def _inner(self) -> Any:
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        inner = self._inner()
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> None:
        self.model.save_pretrained(directory, **kwargs)

    @property
    def config(self) -> Any:
        return self._inner().config


def wrap_for_scalar_head(model: Any, tokenizer: Any) -> ScalarHeadModel:
    # Written into config.json so HF's own pooling finds padding when users load the model elsewhere.
    model.config.pad_token_id = tokenizer.pad_token_id
    return ScalarHeadModel(model)
