"""Optimizers and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from posttrain.config import OptimConfig, ScheduleConfig


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter] | list[dict[str, Any]], config: OptimConfig
) -> torch.optim.Optimizer:
    """The optimizer ``config`` names over the trainable ``parameters``: tensors, or torch parameter groups
    (``[{"params": [...], "lr": ...}, ...]``) whose own options override the config's."""
    items: list[Any] = list(parameters)
    if items and isinstance(items[0], dict):
        groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in items]
        params: list[Any] = [group for group in groups if group["params"]]
    else:
        params = [p for p in items if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check peft.method and its target modules")
    if config.name == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    if config.name == "adam":
        return torch.optim.Adam(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def lr_multiplier(step: int, total_steps: int, config: ScheduleConfig) -> float:
    """Share of the peak learning rate at optimizer step ``step`` (0-based): linear warm-up, then decay."""
    warmup = config.warmup_steps or int(config.warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if config.name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if config.name == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, config: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, config))
