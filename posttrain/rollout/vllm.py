"""vLLM rollout engine (GPU, optional): generation with vLLM's paged attention and continuous batching, in the
training process ("colocate", as TRL and OpenRLHF's hybrid engine do), with the policy's weights copied in after
every update.

**Experimental.** No config key selects this engine yet: the RL recipe always generates with ``HFEngine``, and the
only caller is ``tests/test_rollout.py``, which runs (on a CUDA GPU with vLLM installed) a greedy comparison with
``HFEngine`` before and after a weight sync. Wiring it to a config key waits for a GPU to measure it on.

Choices, and why:

- vLLM runs in this process with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: only then is its model object reachable
  for an in-place ``load_weights`` (the same path TRL's colocate mode takes); a separate engine process would
  need NCCL weight broadcast, which is the cluster (Ray) layout's job.
- ``gpu_memory_utilization`` is small by default because the trainer shares the GPU.
- Weights: a peft policy is merged into its base for the copy (``merge_adapter`` → state dict without the
  ``base_layer``/adapter names → ``unmerge_adapter``), so vLLM always holds plain weights and needs no LoRA
  support. Full fine-tuning copies the state dict as is.
- Sampling settings map one to one (``top_k=0`` → vLLM's ``-1``); vLLM samples ``n`` per prompt natively.
- The trainer recomputes the log-probs of the sampled tokens, so vLLM's own log-probs are not used.

Assumptions: one GPU per engine (tensor parallel 1); a policy whose architecture vLLM supports.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from posttrain.models.adapters import is_peft_model
from posttrain.rollout.hf import Response, SamplingSettings


def vllm_available() -> bool:
    """vLLM importable and a CUDA GPU visible."""
    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_state_dict(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of ``model`` as a plain transformers checkpoint: a peft model's adapter merged in and its
    wrapper names removed."""
    if not is_peft_model(model):
        yield from model.state_dict().items()
        return
    model.merge_adapter()
    try:
        prefix = model.prefix  # "lora_" for LoRA/DoRA
        for name, tensor in model.get_base_model().state_dict().items():
            if prefix in name or "modules_to_save" in name:
                continue
            yield name.replace(".base_layer", ""), tensor
    finally:
        model.unmerge_adapter()


class VllmEngine:
    """``RolloutEngine`` on vLLM (experimental: no config selects it; see the module docstring). ``model_path`` is the directory the policy was loaded from (vLLM reads its
    config and initial weights there); ``sync_weights`` copies the current policy in."""

    def __init__(
        self,
        model_path: str,
        stop_token_ids: Iterable[int],
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        max_model_len: int | None = None,
    ) -> None:
        if not vllm_available():
            raise RuntimeError("the vLLM rollout engine needs a CUDA GPU and `pip install vllm`")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.stop_token_ids = sorted(set(stop_token_ids))
        self.seed = seed
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
        )

    def generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, prompt_keys: list[int] | None = None
    ) -> list[list[Response]]:
        """With ``prompt_keys`` each prompt's request is seeded from its key (vLLM's per-request ``seed``): the
        same prompt, step and seed draw the same samples on any engine or GPU count, though not the HF engine's."""
        from vllm import SamplingParams

        params = SamplingParams(
            n=settings.num_samples,
            temperature=settings.temperature,
            top_p=settings.top_p if settings.temperature > 0 else 1.0,
            top_k=settings.top_k if settings.top_k > 0 and settings.temperature > 0 else -1,
            max_tokens=settings.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            skip_special_tokens=True,
        )
        per_prompt: Any = params
        if prompt_keys is not None:
            per_prompt = [params.clone() for _ in prompt_ids]
            for request, key in zip(per_prompt, prompt_keys):
                request.seed = key & 0x7FFFFFFFFFFFFFFF
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], per_prompt, use_tqdm=False)
        stops = set(self.stop_token_ids)
        grouped = []
        for output in outputs:
            group = []
            for completion in output.outputs:
                ids = list(completion.token_ids)
                finished = bool(ids) and ids[-1] in stops
                group.append(Response(completion.text.strip(), ids, finished))
            grouped.append(group)
        return grouped

    def _vllm_model(self) -> Any:
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        runner = getattr(worker, "model_runner", None) or worker.worker.model_runner  # V0 / V1 layouts
        return runner.model

    @torch.no_grad()
    def sync_weights(self, model: Any) -> None:
        self._vllm_model().load_weights(_plain_state_dict(model))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
