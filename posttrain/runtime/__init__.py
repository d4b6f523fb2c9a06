"""Mechanics every recipe shares, written once and tested once."""

from posttrain.runtime.trainer import ModelSelection, NonFiniteLossError, Runtime, TrainingInterrupted

__all__ = ["ModelSelection", "NonFiniteLossError", "Runtime", "TrainingInterrupted"]
