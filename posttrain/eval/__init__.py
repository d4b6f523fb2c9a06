"""Evaluation: held-out loss, exact match and gold reward on verifiable prompts."""
