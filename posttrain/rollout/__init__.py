"""Generation engines behind one interface; the default is transformers' ``generate`` with a KV cache."""

from posttrain.rollout.hf import Response, generate_responses, sample_responses

__all__ = ["Response", "generate_responses", "sample_responses"]
