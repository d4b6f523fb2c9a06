"""Generation engines behind one interface.

A :class:`RolloutEngine` turns tokenised prompts into sampled responses (their token ids, text, and whether a
stop token ended them) and takes the trained weights after each update. The default, ``HFEngine``, decodes on
the policy itself (a transformers model) with a KV cache, each group's prompt computed once and finished rows
leaving the batch; ``VllmEngine`` (GPU, when vLLM is installed; experimental, not yet selectable from a config)
generates with vLLM and receives the weights after every update. Trainers recompute the log-probs of the sampled
tokens themselves, so an engine only has to sample.
"""

from typing import Any, Protocol

from posttrain.rollout.hf import (
    HFEngine,
    Response,
    SamplingSettings,
    generate_from_ids,
    render_prompt_ids,
    sample_responses,
)


class RolloutEngine(Protocol):
    def generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, prompt_keys: list[int] | None = None
    ) -> list[list[Response]]:
        """``settings.num_samples`` responses per prompt; ``result[i]`` holds prompt ``i``'s. ``prompt_keys`` (one
        ``hf.sample_key`` per prompt) make the draws a function of the prompt's key, not of the engine's RNG."""
        ...

    def sync_weights(self, model: Any) -> None:
        """Make the next ``generate`` sample from ``model``'s current weights."""
        ...


__all__ = [
    "HFEngine",
    "Response",
    "RolloutEngine",
    "SamplingSettings",
    "generate_from_ids",
    "render_prompt_ids",
    "sample_responses",
]
