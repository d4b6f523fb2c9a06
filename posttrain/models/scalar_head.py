"""Transformers with a scalar head: reward models (one score per sequence, read at its last token) and, later,
critics (one value per token).

The weights are a plain ``AutoModelForSequenceClassification`` with ``num_labels=1`` (the ``score`` linear layer
on the final hidden state), the format TRL, OpenRLHF and vLLM load as a reward model. Its own forward pools at the
rightmost token that is not ``pad_token_id``, which is wrong when the pad token is also the EOS that ends every
response (a common choice) and impossible for packed rows. ``ScalarHeadModel`` therefore runs the backbone and
head itself and returns a value per token; the caller picks positions (``last_token_index`` for padded batches
of either side, ``data.packing.sequence_ends`` for packed rows). Being one ``nn.Module`` whose ``forward`` does
all the work, it can be wrapped by DDP like any model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from posttrain.models.adapters import is_peft_model
from posttrain.models.loading import load_weights, model_dir_of


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
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).last_hidden_state
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


def load_scorer_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ScalarHeadModel, Any]:
    """Load a trained reward model (full weights, or a LoRA/DoRA adapter (chain) over the base named in its
    ``adapter_config.json``, merged for speed: ``models.loading.load_weights``) with its tokenizer, in eval mode."""
    from transformers import AutoTokenizer

    directory = model_dir_of(path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_weights(directory, "SEQ_CLS", dtype=dtype)
    if getattr(model.config, "num_labels", 1) != 1:
        raise ValueError(f"{directory} has {model.config.num_labels} output labels; a reward model has 1")
    scorer = wrap_for_scalar_head(model, tokenizer)
    scorer.eval()
    return scorer, tokenizer


class RewardScorer:
    """Scores conversations with a trained reward model: ``scorer.score([messages, ...]) -> [float, ...]``.

    Each conversation is rendered with the chat template saved with the reward model (the one it was trained
    with) and scored at its last token."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32) -> None:
        self.model, self.tokenizer = load_scorer_model(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.batch_size = batch_size
        self.path = str(path)

    @torch.no_grad()
    def score(self, conversations: list[list[dict[str, Any]]]) -> list[float]:
        from posttrain.data.tokenize import tokenize_conversation

        scores: list[float] = []
        for start in range(0, len(conversations), self.batch_size):
            # Tokenised exactly as reward training tokenised (same template, same boundary handling), untruncated.
            ids = [
                {"input_ids": tokenize_conversation(self.tokenizer, messages, max_length=1 << 30).input_ids}
                for messages in conversations[start : start + self.batch_size]
            ]
            encoded = self.tokenizer.pad(ids, return_tensors="pt").to(self.device)
            values = self.model(encoded["input_ids"], attention_mask=encoded["attention_mask"])
            last = last_token_index(encoded["attention_mask"])
            scores += values[torch.arange(len(ids), device=self.device), last].tolist()
        return scores
