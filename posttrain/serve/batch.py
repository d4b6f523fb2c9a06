"""The running batch of a continuous-batching engine: one KV cache for rows that started at different times.

Rows join by being prefilled together and merged into the running cache; they leave through transformers'
``DynamicCache.batch_select_indices`` (as ``rollout.hf.decode_batch`` retires finished rows). Rows of different
lengths share the cache by left padding: the shorter cache gets zero keys/values on the left of the sequence axis,
masked out (attention mask 0), and every row keeps its own position ids (its count of real tokens, what
``generate`` and ``decode_batch`` give left-padded rows), so a row computes what it would compute alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from posttrain.rollout.hf import left_padded, left_padded_positions

Forward = Callable[..., Any]
"""``forward(adapter_names, **model_inputs)``: the model's forward with one adapter name per row
(``AdapterRegistry.forward``)."""


class RunningBatch:
    """KV cache, attention mask, next position and next input token of each row being decoded; row order is the
    order rows were added, minus those dropped with :meth:`keep`."""

    def __init__(self, model_config: Any, device: torch.device | str = "cpu") -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        self.model_config, self.device = model_config, torch.device(device)
        self._new_cache = lambda: DynamicCache(config=model_config)
        kinds = {type(layer).__name__ for layer in self._new_cache().layers}
        if kinds - {DynamicLayer.__name__}:
            # A sliding-window layer keeps only its last W positions, so left padding added at a merge would push
            # real tokens out of its window: rows would no longer compute what they compute alone.
            raise ValueError(
                f"continuous batching needs full-attention KV caches; this model's cache has {sorted(kinds)} layers"
            )
        self.reset()

    def reset(self) -> None:
        self.cache: Any = None
        self.mask = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        """Cached sequence length, padding included."""
        return int(self.mask.shape[1])

    def add(
        self,
        forward: Forward,
        prompts: list[list[int]],
        adapter_names: list[str | None],
        copies: list[int],
        pad_id: int,
    ) -> torch.Tensor:
        """Prefill ``prompts`` in one left-padded forward, each through its adapter, and append ``copies[i]`` rows
        for prompt ``i`` (a request's ``n`` choices share one prefill). Returns each new row's next-token logits
        ``(sum(copies), V)``; set the tokens drawn from them with :meth:`set_next_tokens` before :meth:`decode`."""
        input_ids, mask = left_padded(prompts, pad_id, self.device)
        positions = left_padded_positions(mask)
        cache = self._new_cache()
        logits = forward(
            adapter_names,
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        select = torch.tensor([row for row, count in enumerate(copies) for _ in range(count)], device=self.device)
        if len(select) != len(prompts):
            cache.batch_select_indices(select)
            logits, mask = logits[select], mask[select]
        self._merge(cache, mask)
        return logits

    def set_next_tokens(self, tokens: torch.Tensor, first_row: int) -> None:
        """The tokens rows ``first_row, first_row + 1, ...`` feed at the next :meth:`decode`."""
        self.next_tokens[first_row : first_row + len(tokens)] = tokens.to(self.device)

    def decode(self, forward: Forward, adapter_names: list[str | None]) -> torch.Tensor:
        """Feed every row its next token in one forward; each row's next-token logits ``(B, V)``."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.size, 1)], dim=1)
        logits = forward(
            adapter_names,
            input_ids=self.next_tokens[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1]
        self.positions = self.positions + 1
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the padding columns every remaining row has on the left
        (left by a long row that left), so later steps do not attend over them."""
        if not rows:
            self.reset()
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.next_tokens = self.mask[index], self.positions[index], self.next_tokens[index]
        first_real = int(self.mask.any(dim=0).long().argmax())
        if first_real > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first_real:], layer.values[:, :, first_real:]
            self.mask = self.mask[:, first_real:]

    def _merge(self, cache: Any, mask: torch.Tensor) -> None:
        """Append the rows of a freshly prefilled ``cache`` (attention ``mask``) below the running ones."""
        positions = mask.sum(dim=-1)  # the next token's position: the row's count of real tokens
        tokens = torch.zeros(mask.shape[0], dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask, self.positions, self.next_tokens = cache, mask, positions, tokens
            return
        width = max(self.width, mask.shape[1])
        old_pad, new_pad = width - self.width, width - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers):
            # keys/values are (batch, heads, sequence, head_dim): pad the sequence axis on the left with zeros.
            old.keys = torch.cat([F.pad(old.keys, (0, 0, old_pad, 0)), F.pad(new.keys, (0, 0, new_pad, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, old_pad, 0)), F.pad(new.values, (0, 0, new_pad, 0))])
        self.mask = torch.cat([F.pad(self.mask, (old_pad, 0)), F.pad(mask, (new_pad, 0))])
        self.positions = torch.cat([self.positions, positions])
        self.next_tokens = torch.cat([self.next_tokens, tokens])
