"""One forward for a batch whose rows use different LoRA adapters, at a cost that does not grow with the number
of adapters in the batch.

peft's mixed-adapter batches (``adapter_names``) loop over the batch's adapters in every LoRA layer: a sub-batch
gather, two small matmuls and a scatter-add per adapter per layer. On the toy model one decoding step of 32 rows
took 8.7 ms with one adapter and 25.5 ms with rows spread over 8 (``benchmarks/serve_load.py``), so serving 8
adapters ran at 0.63x the base's throughput. Here every LoRA layer computes its update for all rows at once: the
resident adapters' A and B are stacked (ranks zero-padded to the largest, which adds exact zeros), each row's pair
gathered by its adapter's index, and the update is two batched matmuls whatever the number of adapters (the idea
of S-LoRA and Punica's BGMV, in plain torch). Each LoRA layer's forward is replaced, for these forwards only, by
its base layer plus ``scaling * B_i A_i x`` for row ``i`` (zero for base rows): peft's own forward costs Python
time per layer even for rows without an adapter (the helper measured 5.4 ms a step for an all-base batch).

Only plain LoRA on linear layers is served (the registry refuses DoRA and prompt learning); the stacks are rebuilt
when the set of resident adapters changes.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


class BatchedLora:
    def __init__(self, peft_model: Any) -> None:
        self.peft = peft_model
        # peft's layers, typed loosely here: their attributes are nn.Module containers mypy cannot see into.
        self.layers: list[Any] = []
        self._names: tuple[str, ...] | None = None
        # Per layer: A transposed (adapters + 1, in, rank) and B transposed and scaled (adapters + 1, rank, out).
        self._stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: torch.Tensor | None = None

    def invalidate(self) -> None:
        """The resident adapters changed: stack again at the next forward."""
        self._names = None

    def forward(self, adapter_names: list[str | None], **inputs: Any) -> Any:
        """The model's forward where row ``i`` uses adapter ``adapter_names[i]`` (None: the base)."""
        names = tuple(self.peft.peft_config)
        if names != self._names:
            self._stack(names)
        slot = {name: index for index, name in enumerate(names)}
        base = len(names)  # an all-zero slot
        device = next(self.peft.parameters()).device
        self._rows = torch.tensor([slot[n] if n is not None else base for n in adapter_names], device=device)
        try:
            return self.peft(**inputs)
        finally:
            self._rows = None

    def _stack(self, names: tuple[str, ...]) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        # An adapter may target modules no earlier one did: peft then wrapped new layers, which need ours too.
        known = {id(layer) for layer in self.layers}
        for module in self.peft.modules():
            if isinstance(module, LoraLinear) and id(module) not in known:
                module.forward = functools.partial(self._layer_forward, module, module.forward)  # type: ignore[method-assign]
                self.layers.append(module)
        self._stacks = {}
        for layer in self.layers:
            present = [n for n in names if n in layer.lora_A]
            weight = layer.base_layer.weight
            rank = max((layer.lora_A[n].weight.shape[0] for n in present), default=1)
            a = torch.zeros(len(names) + 1, layer.in_features, rank, dtype=weight.dtype, device=weight.device)
            b = torch.zeros(len(names) + 1, rank, layer.out_features, dtype=weight.dtype, device=weight.device)
            for index, name in enumerate(names):
                if name not in layer.lora_A:  # this adapter does not touch this layer
                    continue
                r = layer.lora_A[name].weight.shape[0]
                a[index, :, :r] = layer.lora_A[name].weight.T
                b[index, :r] = layer.lora_B[name].weight.T * layer.scaling[name]
            self._stacks[id(layer)] = (a, b)
        self._names = names

    def _layer_forward(self, layer: Any, peft_forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        rows = self._rows
        if rows is None:  # a forward outside BatchedLora.forward: peft's own
            return peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        a, b = self._stacks[id(layer)]
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # (rows, tokens, in)
        update = torch.bmm(torch.bmm(flat, a[rows]), b[rows])  # (rows, tokens, out)
        return result + update.reshape(result.shape).to(result.dtype)
