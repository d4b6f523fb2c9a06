"""How a run spreads its model over processes (``distributed.strategy``): the engines users already trust, each
behind the same few verbs the :class:`~posttrain.runtime.trainer.Runtime` calls.

- ``ddp``: accelerate's DistributedDataParallel (what a one-process run uses too): every process holds the whole
  model; gradients are all-reduced on the last micro-batch of a step.
- ``fsdp``: torch FSDP2 (``fully_shard``), each decoder layer a unit then the root: parameters, gradients and
  optimizer states are sharded, a layer's parameters gathered only while it runs. Checkpoints are
  ``torch.distributed.checkpoint`` shards (resumable at another process count).
- ``deepspeed``: a DeepSpeed engine at ZeRO stage 0-3 with a client torch optimizer (DeepSpeed's own optimizers
  JIT-compile kernels on first use) and caller-owned gradient accumulation (``managed_gradient_accumulation:
  false``): the recipe's loss is already normalised over the whole accumulated batch, so DeepSpeed must neither
  rescale it nor decide when a step ends. Checkpoints are DeepSpeed's own.

accelerate is not used for fsdp or deepspeed: on a CPU-only machine (CI) its plugins refuse, or silently fall
back to DDP or to independent copies (``shared/research/cpu-distributed.md``), so the strategies would be
untestable there. accelerate still forms the process group and provides device and autocast for all three.

Every strategy gives the same verbs: :meth:`prepare` (wrap model and optimizer), :meth:`no_sync`,
:meth:`backward`, :meth:`step` (clip, guard, step), :meth:`full_weights` (a context in which every process can run
forwards independently: evaluation and generation, whose number of forward passes differs between processes),
:meth:`save` / :meth:`load` / :meth:`load_weights` (the model and optimizer part of a checkpoint) and
:meth:`save_pretrained` (the final model as a Hugging Face directory, gathered on the main process).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from posttrain.config import ConfigError, StageConfig
from posttrain.runtime import checkpoint as ckpt

DCP_DIR = "dcp"  # fsdp: the torch.distributed.checkpoint shards of model and optimizer inside a step directory
DEEPSPEED_TAG = "deepspeed"  # deepspeed: engine.save_checkpoint's tag inside a step directory


def ensure_process_group() -> None:
    """A one-process run under fsdp or deepspeed still needs a process group (of one) for the engine's
    collectives; a launched run already has one (accelerate forms it from torchrun's environment). It lives as
    long as the process, as a launched one does: DeepSpeed keeps references to the group it first saw, so a later
    run in this process (a pipeline's next stage) must find the same one."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # The group never leaves this process: any free loopback port will do.
        init_method = f"tcp://127.0.0.1:{free_loopback_port()}"
        dist.init_process_group(backend, init_method=init_method, rank=0, world_size=1)


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the operating system's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _as_float(norm: torch.Tensor) -> float:
    """A gradient norm as a float; under FSDP2 it is a DTensor whose full value needs one reduction."""
    full_tensor = getattr(norm, "full_tensor", None)
    return float(full_tensor() if full_tensor is not None else norm)


def clip_groups(optimizer: Any, default_max_norm: float | None) -> dict[str, float]:
    """Each optimizer parameter group clipped on its own, to its ``max_grad_norm`` entry if it has one, else
    ``default_max_norm``; returns each group's norm before its clip, by the group's ``name``."""
    group_norms: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        parameters = [p for p in group["params"] if p.requires_grad]
        max_norm = group.get("max_grad_norm", default_max_norm) or math.inf
        group_norms[group.get("name", f"group{index}")] = _as_float(
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        )
    return group_norms


class DdpStrategy:
    """Replicated model, all-reduced gradients (accelerate's prepare: DDP under several processes)."""

    name = "ddp"

    def __init__(self, config: StageConfig, accelerator: Any) -> None:
        self.config = config
        self.accelerator = accelerator

    def close(self) -> None:
        """The end of the run: undo what the strategy changed in the process for it."""

    def shard(self, model: Any) -> Any:
        """The model as the optimizer must see its parameters (FSDP2 replaces them): here, unchanged."""
        return model

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        return self.accelerator.prepare(model, optimizer)

    def unwrap(self, module: Any) -> Any:
        return self.accelerator.unwrap_model(module)

    def describe(self, module: Any) -> str:
        """What the prepared model really is, in one line for the log (a test reads it: proof of the wrapping)."""
        return f"ddp over {self.accelerator.num_processes} process(es): {type(module).__name__}"

    def no_sync(self, module: Any) -> Any:
        return self.accelerator.no_sync(module)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, optimizer: Any, loss_finite: bool) -> tuple[dict[str, float], bool]:
        """Clip each parameter group, then step unless the loss or the gradients are not finite (the update is then
        skipped); gradients are zeroed either way. Returns the groups' norms and whether the step was applied."""
        # fp16: gradients are unscaled once, before any norm is taken (what accelerate's clip_grad_norm_ does).
        self.accelerator.unscale_gradients()
        group_norms = clip_groups(optimizer, self.config.optim.max_grad_norm)
        # Under fp16 an inf gradient is the loss scaler's business (it skips the step and lowers the scale);
        # a NaN/inf *loss* is always ours.
        grads_finite = all(math.isfinite(n) for n in group_norms.values()) or self.config.train.precision == "fp16"
        applied = loss_finite and grads_finite
        if applied:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return group_norms, applied

    def full_weights(self, module: Any) -> Any:
        return nullcontext()

    def save(self, directory: Path, module: Any, optimizer: Any) -> None:
        if self.accelerator.is_main_process:
            ckpt.save_model_and_optimizer(directory, self.unwrap(module), optimizer)

    def load(self, directory: Path, module: Any, optimizer: Any) -> None:
        ckpt.load_model_and_optimizer(directory, self.unwrap(module), optimizer)

    def load_weights(self, directory: Path, module: Any) -> None:
        ckpt.load_weights(directory, self.unwrap(module))

    def save_pretrained(self, module: Any, model_dir: Path) -> None:
        if self.accelerator.is_main_process:
            self.unwrap(module).save_pretrained(model_dir, safe_serialization=True)


class FsdpStrategy(DdpStrategy):
    """torch FSDP2: ``fully_shard`` per decoder layer (``distributed.wrap``), then the whole model."""

    name = "fsdp"

    def shard(self, model: Any) -> Any:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        ensure_process_group()
        block = self.config.distributed
        options: dict[str, Any] = {"reshard_after_forward": block.reshard_after_forward}
        if self.config.train.precision == "bf16":
            options["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=getattr(torch, block.reduce_dtype)
            )
        options["offload_policy"] = CPUOffloadPolicy() if block.offload == "all" else OffloadPolicy()
        if block.wrap == "decoder_layer":
            layers = decoder_layers(model)
            if not layers:
                raise ConfigError(
                    "distributed.wrap=decoder_layer: the model declares no decoder layer class (_no_split_modules); "
                    "use distributed.wrap=model"
                )
            for layer in layers:
                fully_shard(layer, **options)
        fully_shard(model, **options)
        # FSDP2 settles which unit is the root at the first forward, which must go through the root; a policy's
        # first forward is a rollout through the policy alone (inside an ActorCritic), so settle it now.
        model._get_fsdp_state()._lazy_init()
        return model

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        return model, optimizer

    def unwrap(self, module: Any) -> Any:
        return module

    def describe(self, module: Any) -> str:
        from torch.distributed.fsdp import FSDPModule

        units = sum(isinstance(m, FSDPModule) for m in module.modules())
        local = sum(p.to_local().numel() for p in module.parameters())
        total = sum(p.numel() for p in module.parameters())
        return (
            f"fsdp over {dist.get_world_size()} process(es): {units} FSDP units, this process holds {local:,} of "
            f"{total:,} parameter elements"
        )

    def no_sync(self, module: Any) -> Any:
        @contextmanager
        def gradients_kept_local() -> Iterator[None]:
            # FSDP2's no_sync: accumulate unsharded gradients, reduce-scatter once on the last micro-batch.
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return gradients_kept_local()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextmanager
    def full_weights(self, module: Any) -> Iterator[None]:
        """Every unit gathered once and kept until the block ends: forwards then need no collective, so each
        process can run as many as its own prompts need (generation, evaluation)."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(self.config.distributed.reshard_after_forward, recurse=False)

    def _state_dicts(self, module: Any, optimizer: Any) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=True)  # an adapter run saves its adapter, not the base
        state: dict[str, Any] = {"model": get_model_state_dict(module, options=options)}
        if optimizer is not None:
            state["optimizer"] = get_optimizer_state_dict(module, optimizer)
        return state

    def save(self, directory: Path, module: Any, optimizer: Any) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state_dicts(module, optimizer), checkpoint_id=str(directory / DCP_DIR))

    def load(self, directory: Path, module: Any, optimizer: Any) -> None:
        self._load(directory, module, optimizer)

    def load_weights(self, directory: Path, module: Any) -> None:
        self._load(directory, module, None)

    def _load(self, directory: Path, module: Any, optimizer: Any) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if not (directory / DCP_DIR).is_dir():
            raise FileNotFoundError(
                f"{directory}: no {DCP_DIR}/ shards; the checkpoint was written by another distributed.strategy "
                f"({_written_by(directory)}), resume it with that one"
            )
        state = self._state_dicts(module, optimizer)
        dcp.load(state, checkpoint_id=str(directory / DCP_DIR))  # reshards to this run's process count
        set_model_state_dict(module, state["model"], options=StateDictOptions(ignore_frozen_params=True))
        if optimizer is not None:
            set_optimizer_state_dict(module, optimizer, state["optimizer"])

    def save_pretrained(self, module: Any, model_dir: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Collective: every process sends its shards; the main process receives the whole model, on CPU.
        full: dict[str, Any] = get_model_state_dict(
            module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if _rank() == 0:
            with parameters_replaced(module, full):
                module.save_pretrained(model_dir, safe_serialization=True)
        _barrier()


class DeepSpeedStrategy(DdpStrategy):
    """A DeepSpeed engine at ``distributed.zero_stage`` (0-3), optimizer and parameter offload to CPU."""

    name = "deepspeed"

    def __init__(self, config: StageConfig, accelerator: Any) -> None:
        super().__init__(config, accelerator)
        self.engine: Any = None

    def close(self) -> None:
        release_local_rank()
        super().close()

    def engine_config(self, world_size: int, hidden_size: int) -> dict[str, Any]:
        """The DeepSpeed JSON config this run's settings mean."""
        train, block = self.config.train, self.config.distributed
        # Communication buckets sized by the model, as the transformers integration's "auto" values: DeepSpeed's
        # fixed defaults (5e8 elements) hold more memory than a small model's states, so ZeRO would save nothing.
        zero: dict[str, Any] = {
            "stage": block.zero_stage,
            "reduce_bucket_size": hidden_size * hidden_size,
            "allgather_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
        if block.offload in ("optimizer", "all"):
            zero["offload_optimizer"] = {"device": "cpu"}
        if block.offload == "all":
            zero["offload_param"] = {"device": "cpu"}
        return {
            "train_micro_batch_size_per_gpu": train.batch_size,
            "gradient_accumulation_steps": train.grad_accum,
            "train_batch_size": train.batch_size * train.grad_accum * world_size,
            # The caller ends a step (engine.step), and the loss arrives normalised over the whole step.
            "managed_gradient_accumulation": False,
            "gradient_clipping": self.config.optim.max_grad_norm or 0.0,
            "zero_optimization": zero,
            "bf16": {"enabled": train.precision == "bf16"},
            "fp16": {"enabled": train.precision == "fp16"},
            # The client torch optimizer is exact and needs no JIT build; DeepSpeed's CPU Adam would be faster
            # with offload but compiles for minutes on first use.
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 2**31 - 1,  # our metrics log is the record
            "wall_clock_breakdown": False,
        }

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        import deepspeed
        import deepspeed.ops

        custom_norms = {g["max_grad_norm"] for g in optimizer.param_groups if "max_grad_norm" in g}
        if custom_norms - {self.config.optim.max_grad_norm}:
            raise ConfigError(
                "distributed.strategy=deepspeed clips the global gradient norm only (optim.max_grad_norm); a parameter "
                "group with its own max_grad_norm (critic.max_grad_norm) needs strategy=ddp or fsdp"
            )
        ensure_process_group()
        # DeepSpeed's shared-memory all-reduce is JIT-compiled on first use (minutes on CPU) and leaves buffers in
        # /dev/shm; torch's own collectives do the same work.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        hidden_sizes = [
            m.config.hidden_size for m in model.modules() if hasattr(getattr(m, "config", None), "hidden_size")
        ]
        config = self.engine_config(dist.get_world_size(), max(hidden_sizes))
        # A one-process run has no launcher to set LOCAL_RANK, which DeepSpeed reads (in every ZeRO-3 forward too).
        # Set for the run only: left in the environment, accelerate (in this process) and every subprocess would
        # take themselves for launched ones. close() releases it, and so does the next run's start or a failure.
        global _LOCAL_RANK_SET_HERE
        if "LOCAL_RANK" not in os.environ:
            os.environ["LOCAL_RANK"] = "0"
            _LOCAL_RANK_SET_HERE = True
        self.engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return self.engine, optimizer

    def unwrap(self, module: Any) -> Any:
        return getattr(module, "module", module)

    def describe(self, module: Any) -> str:
        stage = self.engine.zero_optimization_stage()
        parameters = list(self.unwrap(module).parameters())
        # ZeRO-3 keeps each process's partition in ds_tensor; below stage 3 every process holds every parameter.
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in parameters)
        total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in parameters)
        return (
            f"deepspeed over {dist.get_world_size()} process(es): {type(self.engine).__name__}, ZeRO-{stage}, "
            f"{type(self.engine.optimizer).__name__}, this process holds {local:,} of {total:,} parameter elements"
        )

    def no_sync(self, module: Any) -> Any:
        # Caller-owned accumulation already keeps gradients local until engine.step().
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, optimizer: Any, loss_finite: bool) -> tuple[dict[str, float], bool]:
        # DeepSpeed clips the global norm and skips a step whose gradients are not finite (a non-finite loss
        # gives non-finite gradients); it zeroes the gradients either way.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = math.nan if norm is None else _as_float(torch.as_tensor(norm))
        return {"group0": norm}, bool(self.engine.was_step_applied()) and loss_finite

    def full_weights(self, module: Any) -> Any:
        if self.config.distributed.zero_stage < 3:
            return nullcontext()
        # DeepSpeed's own context for generation under ZeRO-3: the parameters gathered once and ZeRO's forward hooks
        # removed meanwhile (with the hooks, every forward still fetches and releases, a collective).
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    def save(self, directory: Path, module: Any, optimizer: Any) -> None:
        self.engine.save_checkpoint(
            str(directory), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True
        )

    def load(self, directory: Path, module: Any, optimizer: Any) -> None:
        self._load(directory, module_only=False)

    def load_weights(self, directory: Path, module: Any) -> None:
        self._load(directory, module_only=True)

    def _load(self, directory: Path, module_only: bool) -> None:
        if not (directory / DEEPSPEED_TAG).is_dir():
            raise FileNotFoundError(
                f"{directory}: no {DEEPSPEED_TAG}/ checkpoint; it was written by another distributed.strategy "
                f"({_written_by(directory)}), resume it with that one"
            )
        written_by = (ckpt.read_state(directory) or {}).get("world_size", dist.get_world_size())
        if written_by != dist.get_world_size():
            # DeepSpeed's ZeRO partitions are per process; loading them into another count is not resharding.
            raise ConfigError(
                f"{directory} was written by {written_by} DeepSpeed processes and this run has "
                f"{dist.get_world_size()}: resume with --nproc {written_by}, or export it "
                "(posttrain export RUN --checkpoint STEP) and start a new run from the exported model"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(directory),
            tag=DEEPSPEED_TAG,
            load_module_only=module_only,
            load_optimizer_states=not module_only,
            load_lr_scheduler_states=False,  # the schedule is ours (scheduler.pt)
            load_module_strict=False,  # frozen base weights are not in an adapter run's checkpoint
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory / DEEPSPEED_TAG}")

    def save_pretrained(self, module: Any, model_dir: Path) -> None:
        gathered: Any = nullcontext()
        if self.config.distributed.zero_stage == 3:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(self.unwrap(module).parameters()), modifier_rank=None)
        with gathered:  # ZeRO-3: every process takes part in the gather
            if _rank() == 0:
                self.unwrap(module).save_pretrained(model_dir, safe_serialization=True)
        _barrier()


_LOCAL_RANK_SET_HERE = False  # LOCAL_RANK was set by a one-process DeepSpeed run, not by a launcher


def release_local_rank() -> None:
    """Remove the LOCAL_RANK a one-process DeepSpeed run set (a no-op otherwise)."""
    global _LOCAL_RANK_SET_HERE
    if _LOCAL_RANK_SET_HERE:
        os.environ.pop("LOCAL_RANK", None)
        _LOCAL_RANK_SET_HERE = False


STRATEGIES: dict[str, type[DdpStrategy]] = {
    "ddp": DdpStrategy,
    "fsdp": FsdpStrategy,
    "deepspeed": DeepSpeedStrategy,
}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of every transformers model inside ``model`` (a policy and its critic, an adapter's base):
    modules whose class a ``PreTrainedModel`` names in ``_no_split_modules``, the unit FSDP shards by."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


@contextmanager
def parameters_replaced(module: torch.nn.Module, state: dict[str, Any]) -> Iterator[None]:
    """``module``'s parameters swapped for the full tensors of ``state`` (names as in its state dict) for the
    duration of the block, then put back: how the main process writes a sharded model with the model's own
    ``save_pretrained`` (adapters, value heads and tied weights handled as they are in a one-process run)."""
    replaced: list[tuple[torch.nn.Module, str, Any]] = []
    replacements: dict[int, torch.nn.Parameter] = {}  # by the original's id: tied weights stay one tensor
    try:
        for name, tensor in state.items():
            owner_name, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            original = owner._parameters.get(attribute)
            if original is not None:
                replaced.append((owner, attribute, original))
                if id(original) not in replacements:
                    replacements[id(original)] = torch.nn.Parameter(tensor, requires_grad=False)
                owner._parameters[attribute] = replacements[id(original)]
        yield
    finally:
        for owner, attribute, original in reversed(replaced):
            owner._parameters[attribute] = original


def _written_by(directory: Path) -> str:
    state = ckpt.read_state(directory)
    return str(state.get("strategy", "ddp")) if state else "unknown"


def check_world_size(world_size: int) -> None:
    """Refuse a run whose processes do not form the group they were launched as (independent copies training
    each alone, as accelerate's CPU FSDP/DeepSpeed paths silently do): torchrun's ``WORLD_SIZE`` and the
    launcher's own expectation must equal the process group's size."""
    for variable in ("WORLD_SIZE", "POSTTRAIN_EXPECTED_WORLD_SIZE"):
        expected = os.environ.get(variable)
        if expected is not None and int(expected) != world_size:
            raise RuntimeError(
                f"this process is in a group of {world_size} process(es) but {variable}={expected}: the processes "
                "did not join one run (they would train as independent copies); check the launcher and the "
                "master address/port"
            )
