"""Reward functions the loop tests plant (importable as ``loop_rewards:NAME`` with ``tests/`` on the path)."""

from __future__ import annotations


def longer_is_better(prompt: str, response: str, reference: str | None) -> float:
    """A hackable reward: the longer the answer, the better, right or wrong."""
    return float(len(response))
