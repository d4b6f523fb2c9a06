"""Measured memory of a run, to check its plan (``posttrain.estimate``) against.

On CUDA the allocator keeps the peak itself (``torch.cuda.max_memory_allocated``). On CPU nothing does: the
process's resident set counts the interpreter, imported libraries and freed pages glibc kept, so it cannot be
compared with a plan of tensor bytes. :class:`LiveTensorMeter` measures what the plan predicts instead: the bytes
of every tensor storage alive at once. It starts from the storages alive when it opens (weights, buffers, anything
a recipe holds) and follows every storage an operator returns until Python frees it, as torch's own
``MemTracker`` (``torch.distributed._tools``) does, without its module hooks (which a wrapped or sharded model
would see twice). Kernel-internal workspaces are not seen; they are small on CPU.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from posttrain.config import ConfigError
from posttrain.estimate import GIB, advise, plan_memory, render_advice
from posttrain.losses import IGNORE_INDEX

PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_OPEN_METERS: weakref.WeakSet[LiveTensorMeter] = weakref.WeakSet()  # meters entered and not yet stopped


class LiveTensorMeter(TorchDispatchMode):
    """Peak bytes of live CPU tensor storages between ``__enter__`` and ``__exit__`` (or :meth:`stop`)."""

    def __init__(self, exclude: WeakIdKeyDictionary | None = None) -> None:
        """``exclude``: storages (:func:`live_storages`) not to count, e.g. those alive before a run began."""
        super().__init__()
        self.exclude = exclude if exclude is not None else WeakIdKeyDictionary()
        self.live = 0
        self.peak = 0
        self._sizes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._refs: list[weakref.ref] = []
        self._open = False

    def _track(self, storage: torch.UntypedStorage) -> None:
        if storage.device.type != "cpu" or storage in self._sizes or storage in self.exclude:
            return
        size = storage.nbytes()
        self._sizes[storage] = size
        self.live += size

        def freed(_: Any, size: int = size) -> None:
            self.live -= size

        # The storage's Python object lives as long as the storage (torch preserves it), so its weak reference
        # fires when the memory is freed.
        self._refs.append(weakref.ref(storage, freed))
        if self.live > self.peak:
            self.peak = self.live

    def _track_tensor(self, tensor: Any) -> None:
        storage = plain_storage(tensor)
        if storage is not None:
            self._track(storage)

    def __enter__(self) -> LiveTensorMeter:
        _OPEN_METERS.add(self)
        for storage in live_storages():
            self._track(storage)
        self.peak = self.live
        self._open = True
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        self._open = False
        _OPEN_METERS.discard(self)
        super().__exit__(*args)

    def stop(self) -> None:
        if self._open:
            self.__exit__(None, None, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            self._track_tensor(tensor)
        return out


def live_storages() -> list[torch.UntypedStorage]:
    """The CPU storages of every plain tensor alive now (gc sees each one: tensors are container objects), and of
    their gradients. The exact-type test is C-fast; isinstance would run torch's Python-level __instancecheck__ on
    each of the process's objects."""
    found = []
    for obj in gc.get_objects():
        if type(obj) in PLAIN_TENSORS:
            found += [storage for storage in (plain_storage(obj), plain_storage(obj.grad)) if storage is not None]
    return found


def plain_storage(tensor: Any) -> torch.UntypedStorage | None:
    """A plain dense tensor's storage; None for anything else. A subclass (FSDP's DTensor) wraps a plain local
    tensor, which is counted instead."""
    if type(tensor) in PLAIN_TENSORS and tensor.layout == torch.strided and not tensor.is_meta:
        return tensor.untyped_storage()
    return None


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages behind ``tensors`` (an iterable of tensors or None)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None:
            continue
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # FSDP's DTensor: this process's shard
        storage = plain_storage(local)
        if storage is not None:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's per-parameter state tensors (Adam's moments and step counters)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


MEASURED_STEPS = 2  # the first steps hold every state a step needs (optimizer states exist after the first)


def close_open_meters() -> None:
    """Stop meters a run left open (it raised between its first step and its end): the next run starts clean."""
    for meter in list(_OPEN_METERS):
        meter.stop()


class MemoryWatch:
    """A run's memory plan, printed when it starts, and its measured peak, set against the plan in the summary.

    The plan is ``posttrain estimate``'s for the run's own config and process count. The measurement is the CUDA
    allocator's peak, or on CPU the live-tensor peak over the first :data:`MEASURED_STEPS` optimizer steps (the
    meter's bookkeeping slows every operator, so it stops there; later steps repeat the same tensors)."""

    def __init__(self, config: Any, devices: int, device: torch.device) -> None:
        self.config, self.devices, self.device = config, devices, device
        self.plan: Any = None
        self.unavailable = ""
        self._meter: LiveTensorMeter | None = None
        self._first_step = 0
        self.states: dict[str, int] = {}  # measured weights and optimizer-state bytes, after the measured steps
        self.largest_micro_batch = (0, 0)  # (tokens, trained positions) of the largest measured micro-batch
        self._measuring = False
        # What the process held before this run (an earlier run's leftovers, a test session's fixtures) is not
        # this run's: on CPU the meter leaves those storages out.
        self._before: WeakIdKeyDictionary = WeakIdKeyDictionary()
        if device.type == "cpu":
            for storage in live_storages():
                self._before[storage] = True
        try:
            self.plan = plan_memory(config, devices, accelerator=device.type)
        except (ConfigError, OSError, ValueError) as error:  # a model whose config.json the plan cannot read
            self.unavailable = str(error).splitlines()[0]

    def describe(self) -> str:
        if self.plan is None:
            return f"memory plan: unavailable ({self.unavailable})"
        parts = ", ".join(
            f"{name} {self.plan.lines[name].bytes / 2**20:.1f}"
            for name in ("weights", "gradients", "optimizer", "activations", "logits", "kv_cache", "other_models")
            if self.plan.lines[name].bytes
        )
        floor = self.plan.runtime_floor
        runtime = f" + {floor / 2**20:.0f} MiB CUDA runtime" if floor else ""
        return (
            f"memory plan: predicted peak {self.plan.tensor_peak / 2**20:.1f} MiB per device{runtime} ({parts} MiB; "
            "`posttrain estimate` explains each line)"
        )

    def refuse_if_it_cannot_fit(self) -> None:
        """On CUDA, before any weight is loaded: a plan larger than the device stops the run with the advice."""
        if self.plan is None or self.device.type != "cuda":
            return
        capacity = torch.cuda.get_device_properties(self.device).total_memory
        if self.plan.peak > capacity:
            advice = render_advice(advise(self.config, self.devices, capacity / GIB))
            raise ConfigError(
                f"this run needs {self.plan.peak / GIB:.2f} GiB per device and {torch.cuda.get_device_name(self.device)} "
                f"has {capacity / GIB:.2f} GiB; stopped before loading weights.\n{advice}"
            )

    def start(self, step: int) -> None:
        """Measure from now (the model and optimizer are set up; ``step`` is the step the run starts at)."""
        self._first_step = step
        self._measuring = True
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        close_open_meters()
        self._meter = LiveTensorMeter(exclude=self._before)
        self._meter.__enter__()

    def step_done(self, step: int, model: Any, optimizer: Any) -> None:
        """After each optimizer step; the last measured one also measures the model states the plan predicts."""
        if step - self._first_step != MEASURED_STEPS:
            return
        self._measuring = False
        if self._meter is not None:
            self._meter.stop()
        self.states = {"weights": tensor_bytes(model.parameters())}
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's and DeepSpeed's wrappers hold torch's
        if isinstance(getattr(inner, "state", None), dict):
            self.states["optimizer"] = optimizer_state_bytes(inner)

    def saw_micro_batch(self, batch: dict[str, Any]) -> None:
        """A micro-batch (its ``input_ids`` and ``targets``, when it has them): during the measured steps, the
        largest one's token ids and trained positions. The plan assumes every sequence at data.max_length and every
        position trained; the data may be shorter, so the probe also plans at what the steps saw. After the
        measured steps it returns at once (it is called on every micro-batch of the run)."""
        if not self._measuring or "input_ids" not in batch or "targets" not in batch:
            return
        tokens = batch["input_ids"].numel()
        if tokens > self.largest_micro_batch[0]:
            self.largest_micro_batch = (int(tokens), int((batch["targets"] != IGNORE_INDEX).sum()))

    def measured_peak(self) -> float | None:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        if self._meter is None:
            return None
        self._meter.stop()
        return float(self._meter.peak)

    def measured_by(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated"
        return f"live tensor storages over the first {MEASURED_STEPS} steps"
