"""Generation engines behind one interface.

A :class:`RolloutEngine` turns tokenised prompts into sampled responses (their token ids, text, and whether a
stop token ended them) and takes the trained weights after each update. The default, ``HFEngine``, decodes on
the policy itself (a transformers model) with a KV cache, each group's prompt computed once and finished rows
leaving the batch; ``VllmEngine`` (GPU, when vLLM is installed; ``sampling.engine: vllm``) generates with vLLM and receives the weights after every update. Trainers recompute the log-probs of the sampled
tokens themselves, so an engine only has to sample. ``build_engine`` picks one from ``sampling.engine``.
"""

from collections.abc import Iterable
from typing import Any, Protocol

from posttrain.config import ModelConfig, PeftConfig, SamplingBlock
from posttrain.rollout.hf import (
    HFEngine,
    Response,
    SamplingSettings,
    generate_from_ids,
    render_prompt_ids,
    sample_responses,
)
from posttrain.rollout.vllm import VllmEngine


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


def build_engine(
    sampling: SamplingBlock,
    model: ModelConfig,
    peft: PeftConfig | None,
    policy: Any,
    tokenizer: Any,
    stop_token_ids: Iterable[int],
    seed: int,
    max_model_len: int | None = None,
) -> RolloutEngine:
    """The engine ``sampling.engine`` names, sampling from ``policy`` (loaded from ``model`` with ``peft``): the HF
    loop on the policy itself, or vLLM loading ``model.path`` and taking the policy's weights at every sync (only
    the adapter of a LoRA policy)."""
    if sampling.engine == "hf":
        return HFEngine(policy, tokenizer, stop_token_ids, batch_size=sampling.batch_size)
    settings = sampling.vllm
    lora_rank = peft.r if peft is not None and peft.method in ("lora", "qlora") else None
    return VllmEngine(
        model.path,
        stop_token_ids,
        dtype=settings.dtype,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        seed=seed,
        max_model_len=max_model_len,
        tensor_parallel_size=settings.tensor_parallel_size,
        sleep=settings.sleep,
        lora_rank=lora_rank,
    )


__all__ = [
    "build_engine",
    "HFEngine",
    "Response",
    "RolloutEngine",
    "SamplingSettings",
    "generate_from_ids",
    "render_prompt_ids",
    "sample_responses",
]
