"""One recipe per stage, each readable top to bottom. ``RECIPES`` maps a config's ``stage`` to its entry point."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _sft(config: Any, config_path: str | None = None) -> dict[str, Any]:
    from posttrain.recipes import sft

    return sft.run(config, config_path)


RECIPES: dict[str, Callable[..., dict[str, Any]]] = {"pretrain": _sft, "sft": _sft}
