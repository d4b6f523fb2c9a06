"""Mechanics every recipe shares, written once and tested once."""

from posttrain.runtime.trainer import NonFiniteLossError, Runtime, TrainingInterrupted

__all__ = ["NonFiniteLossError", "Runtime", "TrainingInterrupted"]
