"""vLLM rollout engine (GPU, ``sampling.engine: vllm``): generation with vLLM's paged attention and continuous
batching, in the process that holds it (the trainer's when colocated, a rollout actor's under
``distributed.placement: ray``), with the policy's weights copied in after every update.

Choices, and why:

- vLLM runs in this process with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``: only then is its model object reachable
  for an in-place ``load_weights`` (the path TRL's colocate mode takes). With ``tensor_parallel_size > 1`` the
  shards live in vLLM's own workers and the weights reach each through ``LLM.collective_rpc``.
- ``gpu_memory_utilization`` is small by default because the trainer may share the GPU; ``sleep`` (vLLM's sleep
  mode, level 1: weights offloaded to CPU, KV cache freed) gives the GPU back to training between rollouts, as
  veRL's hybrid engine and OpenRLHF's ``--vllm_enable_sleep`` do; the engine wakes for the next sync.
- Weights: a LoRA policy sends only its adapter: it is saved once per version and used as a vLLM ``LoRARequest``
  (``enable_lora``), so a sync moves megabytes, not the base. Other peft methods are merged into the base for the
  copy (``merge_adapter`` → plain names → ``unmerge_adapter``); full fine-tuning copies the state dict as is.
- Sampling settings map one to one (``top_k=0`` → vLLM's ``-1``); vLLM samples ``n`` per prompt natively; a
  prompt's key seeds its request (vLLM's per-request ``seed``), so its samples do not depend on the batch.

Verified on CPU: nothing (vLLM has no CPU build on PyPI); ``tests/test_rollout.py`` runs it on a CUDA machine.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from posttrain.config import ConfigError
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
    """``RolloutEngine`` on vLLM (see the module docstring). ``model_path`` is the directory the policy was loaded
    from (vLLM reads its config and initial weights there); ``sync_weights`` copies the current policy in.
    ``lora_rank``: the policy is a LoRA adapter of that rank over ``model_path`` (only the adapter is synced)."""

    def __init__(
        self,
        model_path: str,
        stop_token_ids: Iterable[int],
        dtype: str = "bfloat16",
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        sleep: bool = False,
        lora_rank: int | None = None,
    ) -> None:
        if not vllm_available():
            raise ConfigError(
                "sampling.engine=vllm needs a CUDA GPU and vLLM (pip install 'posttrain[vllm]'); use sampling.engine=hf"
            )
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.stop_token_ids = sorted(set(stop_token_ids))
        self.seed, self.sleep, self.asleep = seed, sleep, False
        self.lora_request: Any = None
        self._lora_dir = tempfile.TemporaryDirectory(prefix="posttrain-lora-") if lora_rank else None
        self._lora_version = 0
        lora = {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": 1} if lora_rank else {}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            max_model_len=max_model_len,
            enable_prefix_caching=True,
            tensor_parallel_size=tensor_parallel_size,
            enable_sleep_mode=sleep,
            **lora,
        )
        self.tensor_parallel_size = tensor_parallel_size

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _rest(self) -> None:
        if self.sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

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
        self._wake()
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            per_prompt,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        self._rest()
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
        self._wake()
        if self._lora_dir is not None:
            # Only the adapter: saved under a new name and id per version (vLLM caches adapters by id).
            from vllm.lora.request import LoRARequest

            self._lora_version += 1
            path = os.path.join(self._lora_dir.name, f"v{self._lora_version}")
            model.save_pretrained(path)
            self.lora_request = LoRARequest(f"policy-v{self._lora_version}", self._lora_version, path)
        elif self.tensor_parallel_size > 1:
            weights = [(name, tensor.detach().cpu()) for name, tensor in _plain_state_dict(model)]

            def load(worker: Any) -> None:
                worker.model_runner.model.load_weights(weights)

            self.llm.collective_rpc(load)
        else:
            self._vllm_model().load_weights(_plain_state_dict(model))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._rest()
