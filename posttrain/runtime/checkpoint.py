"""Atomic checkpoints: written to a temporary directory and renamed into place, so a crash at any moment leaves
either the previous complete checkpoint or the new complete one, never a half-written one that resume picks up.

A checkpoint holds the trainable weights (the whole model, or the adapter), optimizer and scheduler state, every
process's RNG states and the exact data position. Layout: ``checkpoints/step-000005/{weights.safetensors,
optimizer.pt, scheduler.pt, rng.pt, state.json}`` for a replicated model (``distributed.strategy=ddp``); a sharded
one holds ``dcp/`` (fsdp) or ``deepspeed/`` (deepspeed) instead of the weights and optimizer files, and
``rng-rankN.pt`` per further process. ``state.json`` is written last and is what marks a checkpoint complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def write_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all: into ``NAME.tmp`` beside it, then renamed over it, so a crash
    mid-write leaves the previous file (state that a resumed run or stage reads back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the parameters being trained (names as in ``model.named_parameters()``, which lists a tied
    tensor once). Frozen base weights are not copied into every checkpoint."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    missing = [name for name, p in parameters.items() if p.requires_grad and name not in state]
    unknown = [name for name in state if name not in parameters]
    if missing or unknown:
        raise ValueError(
            f"checkpoint does not match the model being trained (missing {missing[:3]}, unexpected {unknown[:3]}); "
            "was it written with a different peft.method or model?"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    """Each process's RNG states: ``rng.pt`` for the first (a one-process run's only file), ``rng-rank1.pt``..."""
    return "rng.pt" if rank == 0 else f"rng-rank{rank}.pt"


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / STATE_FILE).is_file()


def read_state(path: Path) -> dict[str, Any] | None:
    """The trainer state a complete checkpoint holds, or None."""
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8")) if is_complete(path) else None


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary (``.tmp-*``) or incomplete directories are ignored."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


# A checkpoint is written in three moves, so that every process of a multi-process run can write its part:
# the main process opens a fresh temporary directory (open_checkpoint); every process writes its share into it
# (the strategy's model and optimizer, save_rng); the main process writes the rest and renames it into place
# (commit_checkpoint), state.json last.
def temporary_dir(directory: Path, step: int) -> Path:
    return directory / f".tmp-step-{step:06d}"


def open_checkpoint(directory: Path, step: int) -> Path:
    temporary = temporary_dir(directory, step)
    if temporary.exists():  # left by a crash mid-write
        shutil.rmtree(temporary)
    temporary.mkdir(parents=True)
    return temporary


def save_rng(temporary: Path, rank: int) -> None:
    torch.save(rng_state(), temporary / rng_file(rank))


def commit_checkpoint(temporary: Path, scheduler: Any, state: dict[str, Any], scaler: Any = None) -> Path:
    """Write the schedule and the trainer state, then rename ``temporary`` to ``step-NNNNNN``; returns its path."""
    torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), temporary / "scaler.pt")
    with open(temporary / STATE_FILE, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    final = temporary.parent / f"step-{state['step']:06d}"
    if final.exists():  # a re-run of the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(temporary, final)
    return final


def save_model_and_optimizer(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A replicated model's part of a checkpoint (written by the main process only)."""
    save_file(trainable_state_dict(model), str(directory / "weights.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")


def load_weights(path: Path, model: torch.nn.Module) -> None:
    load_trainable_state_dict(model, load_file(str(path / "weights.safetensors")))


def load_model_and_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    if not (path / "weights.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: no weights.safetensors; the checkpoint was written by distributed.strategy="
            f"{(read_state(path) or {}).get('strategy')}, resume it with that one"
        )
    load_weights(path, model)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))


def load_trainer_state(path: Path, scheduler: Any, rank: int, scaler: Any = None) -> dict[str, Any]:
    """Restore the schedule, this process's RNG states (the first process's when the checkpoint was written by
    fewer processes) and return the trainer state; the strategy restores model and optimizer."""
    state = read_state(path)
    if state is None:
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    rng = path / rng_file(rank)
    set_rng_state(torch.load(rng if rng.exists() else path / rng_file(0), weights_only=False))
    return state


def prune_checkpoints(directory: Path, keep: int, protect: set[str] | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and leftover temporary ones); ``protect`` names
    survive (the best checkpoint)."""
    protect = protect or set()
    complete = list_checkpoints(directory)
    for old in complete[:-keep] if keep else complete:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob(".tmp-step-*"):  # pruning follows a commit: any left is from a crash
        shutil.rmtree(leftover, ignore_errors=True)
