"""Atomic checkpoints: written to a temporary directory and renamed into place, so a crash at any moment leaves
either the previous complete checkpoint or the new complete one, never a half-written one that resume picks up.

A checkpoint holds the trainable weights (the whole model, or the adapter), optimizer and scheduler state, every
RNG state and the exact data position. Layout: ``checkpoints/step-000005/{weights.safetensors, optimizer.pt,
scheduler.pt, rng.pt, state.json}``; ``state.json`` is written last and is what marks a checkpoint complete.
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


def is_complete(path: Path) -> bool:
    return STEP_DIR.match(path.name) is not None and (path / STATE_FILE).is_file()


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Temporary (``.tmp-*``) or incomplete directories are ignored."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    scaler: Any = None,
) -> Path:
    """Write ``directory/step-NNNNNN`` atomically and return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:06d}"
    temporary = directory / f".tmp-step-{step:06d}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    save_file(trainable_state_dict(model), str(temporary / "weights.safetensors"))
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    torch.save(scheduler.state_dict(), temporary / "scheduler.pt")
    torch.save(rng_state(), temporary / "rng.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), temporary / "scaler.pt")
    with open(temporary / STATE_FILE, "w", encoding="utf-8") as handle:
        json.dump(state, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # a re-run of the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.rename(temporary, final)
    return final


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any = None
) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` wrote; returns the saved trainer state."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    load_trainable_state_dict(model, load_file(str(path / "weights.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))


def prune_checkpoints(directory: Path, keep: int, protect: set[str] | None = None) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and leftover temporary ones); ``protect`` names
    survive (the best checkpoint)."""
    protect = protect or set()
    complete = list_checkpoints(directory)
    for old in complete[:-keep] if keep else complete:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in directory.glob(".tmp-step-*"):
        if leftover.name.endswith(f"-{os.getpid()}"):
            continue
        shutil.rmtree(leftover, ignore_errors=True)
