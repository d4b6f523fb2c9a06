"""Generation engines behind one interface; the default is transformers' ``generate`` with a KV cache."""

from posttrain.rollout.hf import generate_responses

__all__ = ["generate_responses"]
