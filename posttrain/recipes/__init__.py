"""One recipe per stage, each readable top to bottom. ``RECIPES`` maps a config's ``stage`` to its entry point;
modules are imported on use so ``posttrain --help`` stays fast."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

_MODULES = {
    "pretrain": "sft",
    "sft": "sft",
    "reward": "reward",
    "dpo": "dpo",
    "kto": "kto",
    "rejection_sampling": "rejection_sampling",
    "ppo": "ppo",
}


def _entry(module: str) -> Callable[..., dict[str, Any]]:
    def run(config: Any, config_path: str | None = None) -> dict[str, Any]:
        return importlib.import_module(f"posttrain.recipes.{module}").run(config, config_path)

    run.__name__ = f"run_{module}"
    return run


RECIPES: dict[str, Callable[..., dict[str, Any]]] = {stage: _entry(module) for stage, module in _MODULES.items()}
