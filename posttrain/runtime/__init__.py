"""Mechanics every recipe shares, written once and tested once."""

from posttrain.runtime.metrics import Metrics
from posttrain.runtime.trainer import ModelSelection, NonFiniteLossError, Runtime, TrainingInterrupted

__all__ = ["Metrics", "ModelSelection", "NonFiniteLossError", "Runtime", "TrainingInterrupted"]
