"""``posttrain export RUN_DIR --checkpoint step-N --out DIR``: a Hugging Face directory from one checkpoint, whatever
strategy wrote it. A run that ended writes ``model/`` itself (gathered from every process); a run killed before its
end has only checkpoints, and those of a sharded run are shards: DCP files (fsdp) or ZeRO partitions (deepspeed).

The stage's model is built from the run's ``config.yaml`` as training built it (base weights, adapter, scalar
head), its trained weights are read from the checkpoint in this one process (DCP reshards to one process;
DeepSpeed's ``zero_to_fp32`` merges the partitions), and it is saved as ``model/`` would have been.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.models import load_model
from posttrain.runtime import checkpoint as ckpt
from posttrain.runtime.distributed import DCP_DIR, DEEPSPEED_TAG

# Online RL trains ``ActorCritic(policy, critic)``: its checkpoints name the policy's parameters ``policy.*``.
TRAINED_MODULE_PREFIX = {"ppo": "policy."}


def export_checkpoint(run_dir: str | Path, checkpoint: str, out_dir: str | Path) -> Path:
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    path = Path(checkpoint) if Path(checkpoint).is_dir() else run_dir / "checkpoints" / checkpoint
    state = ckpt.read_state(path)
    if state is None:
        found = ", ".join(p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")) or "none"
        raise FileNotFoundError(f"{path} is not a complete checkpoint (complete ones in {run_dir}: {found})")
    config = load_config(run_dir / "config.yaml")
    model, tokenizer = load_model(config.model, config.peft, scalar_head=config.stage == "reward")
    prefix = TRAINED_MODULE_PREFIX.get(config.stage, "")
    wanted = {prefix + name: tensor for name, tensor in ckpt.trainable_state_dict(model).items()}
    trained = read_trained_weights(path, state.get("strategy", "ddp"), wanted)
    ckpt.load_trainable_state_dict(model, {name.removeprefix(prefix): tensor for name, tensor in trained.items()})
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def read_trained_weights(path: Path, strategy: str, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full tensors of the parameters named in ``wanted`` (their shapes and dtypes), from checkpoint ``path``
    written under ``strategy``; a missing name is an error (the checkpoint is of another model or method)."""
    if strategy == "fsdp":
        import torch.distributed.checkpoint as dcp

        # Without a process group, DCP loads into this process whatever the number of processes that saved.
        state = {"model": {name: torch.empty_like(tensor) for name, tensor in wanted.items()}}
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        return state["model"]
    if strategy == "deepspeed":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        merged: dict[str, Any] = get_fp32_state_dict_from_zero_checkpoint(
            str(path), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True
        )
    else:
        merged = load_file(str(path / "weights.safetensors"))
    missing = sorted(set(wanted) - set(merged))
    if missing:
        raise ValueError(f"{path}: no weights for {missing[:3]}; was it written by another model or peft.method?")
    return {name: merged[name].to(wanted[name].dtype) for name in wanted}
