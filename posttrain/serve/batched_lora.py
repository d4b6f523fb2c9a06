"""One forward for a batch whose rows use different LoRA adapters, with no per-row copy of any weight.

peft's mixed-adapter batches (``adapter_names``) loop over the batch's adapters in every LoRA layer: a sub-batch
gather, two small matmuls and a scatter-add per adapter per layer (8.7 ms a decoding step of 32 rows with one
adapter, 25.5 ms with the rows spread over 8, in ``benchmarks/serve_load.py``'s setting). Gathering each row's A
and B instead (Punica's BGMV in plain torch) copies ``rows x (in + out) x rank`` weights in every layer at every
step, which on CPU cost as much as the matmuls it feeds.

Here each LoRA layer holds the batch's adapters side by side: ``A = [A_1^T | ... | A_k^T]`` (in, R) and
``B = [s_1 B_1^T ; ... ; s_k B_k^T]`` (R, out), ``R`` the sum of their ranks, scaling folded in. A row's update is
``((x A) * m) B`` where the mask ``m`` keeps the row's own adapter's columns and zeroes the others (all of them
for a base row): two dense matmuls and one multiply per layer whatever the number of adapters in the batch, and
the zeroed columns add exact zeros. The side-by-side stacks hold only the adapters present in the batch, so an
adapter resident but idle costs nothing per token; they are rebuilt when that set changes (in steady serving it
does not), and the mask is made once per forward for every layer sharing a column layout. A batch of base rows
only skips the update. Each LoRA layer's forward is replaced, for these forwards only, by its base layer plus
that update (peft's own forward costs Python time per layer even for rows without an adapter).

Only plain LoRA on linear layers is served (the registry refuses DoRA and prompt learning).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class _Stack:
    """One layer's adapters side by side: ``a`` (in, R), ``b`` (R, out) with the scaling folded in, and which
    adapter slot owns each of the R columns (``layout``, shared by layers whose columns are laid out alike)."""

    a: torch.Tensor
    b: torch.Tensor
    layout: int


class BatchedLora:
    def __init__(self, peft_model: Any) -> None:
        self.peft = peft_model
        # peft's layers, typed loosely here: their attributes are nn.Module containers mypy cannot see into.
        self.layers: list[Any] = []
        self._names: tuple[str, ...] | None = None  # the resident adapters when the stacks were made
        self._present: tuple[int, ...] | None = None  # the slots of the adapters the stacks hold
        self._stacks: dict[int, _Stack] = {}
        self._layouts: list[torch.Tensor] = []  # per layout: the adapter slot of each column
        self._rows: torch.Tensor | None = None  # this forward's adapter slot per row (-1: the base)
        self._masks: dict[int, torch.Tensor] = {}  # this forward's mask per layout

    def invalidate(self) -> None:
        """The resident adapters changed: stack again at the next forward. The stacks go now: they copy the
        adapters' weights, and an unloaded adapter's memory must come back at once."""
        self._names, self._present, self._stacks, self._layouts = None, None, {}, []

    def forward(self, adapter_names: list[str | None], **inputs: Any) -> Any:
        """The model's forward where row ``i`` uses adapter ``adapter_names[i]`` (None: the base)."""
        names = tuple(self.peft.peft_config)
        if names != self._names:
            self._wrap_new_layers()
            self._names, self._present = names, None
        slot = {name: index for index, name in enumerate(names)}
        slots = [slot[n] if n is not None else -1 for n in adapter_names]
        present = tuple(sorted({s for s in slots if s >= 0}))
        if present != self._present:
            self._stack(names, present)
        device = next(self.peft.parameters()).device
        self._rows = torch.tensor(slots, device=device) if present else None
        self._masks = {}
        self._active = True
        try:
            return self.peft(**inputs)
        finally:
            self._rows, self._masks, self._active = None, {}, False

    _active = False  # inside BatchedLora.forward

    def _wrap_new_layers(self) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        # An adapter may target modules no earlier one did: peft then wrapped new layers, which need ours too.
        known = {id(layer) for layer in self.layers}
        for module in self.peft.modules():
            if isinstance(module, LoraLinear) and id(module) not in known:
                module.forward = functools.partial(self._layer_forward, module, module.forward)  # type: ignore[method-assign]
                self.layers.append(module)

    def _stack(self, names: tuple[str, ...], present: tuple[int, ...]) -> None:
        layouts: dict[tuple[int, ...], int] = {}
        self._stacks = {}
        for layer in self.layers:
            columns: list[int] = []
            a_parts, b_parts = [], []
            for index in present:
                name = names[index]
                if name not in layer.lora_A:  # this adapter does not touch this layer
                    continue
                a_parts.append(layer.lora_A[name].weight.T)
                b_parts.append(layer.lora_B[name].weight.T * layer.scaling[name])
                columns += [index] * a_parts[-1].shape[1]
            if not columns:  # no adapter of the batch touches this layer
                continue
            layout = layouts.setdefault(tuple(columns), len(layouts))
            self._stacks[id(layer)] = _Stack(
                torch.cat(a_parts, 1).contiguous(), torch.cat(b_parts).contiguous(), layout
            )
        device = next(self.peft.parameters()).device
        self._layouts = [torch.tensor(columns, device=device) for columns in layouts]
        self._present = present

    def _layer_forward(self, layer: Any, peft_forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self._active:  # a forward outside BatchedLora.forward: peft's own
            return peft_forward(x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)
        stack = self._stacks.get(id(layer))
        if self._rows is None or stack is None:  # base rows only, or no adapter of the batch touches this layer
            return result
        mask = self._masks.get(stack.layout)
        if mask is None:
            # (rows, 1, R): broadcast over the row's tokens; 1 where the column is the row's adapter's.
            mask = (self._rows[:, None] == self._layouts[stack.layout][None, :]).to(stack.a.dtype)[:, None, :]
            self._masks[stack.layout] = mask
        hidden = torch.matmul(x.to(stack.a.dtype), stack.a).mul_(mask)  # (rows, tokens, R)
        flat = result.reshape(-1, result.shape[-1])
        return torch.addmm(flat, hidden.reshape(-1, hidden.shape[-1]), stack.b.to(flat.dtype)).view_as(result)
