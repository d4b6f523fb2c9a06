"""Switching a model to eval mode for a while and back: rollouts, reference log-probs and evaluations run between
training steps and must leave the model as they found it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Dropout off inside the block; each model's training flag is restored afterwards, also on an exception (a
    model left in eval mode would train on without dropout, silently)."""
    flags = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, flag in zip(models, flags):
            model.train(flag)
