"""Online RL's roles other than the trainer, as plain classes: a sampler (a rollout engine on its own copy of the
policy, with a weight version), the frozen reference's log-probs, and the reward. Each is built from the run's
config alone (:func:`build_role`), so the same object serves in the training process (``placement: local`` or
``colocate_with: policy``) and inside a Ray actor (``roles.placement.RoleHost``); tests use them without Ray."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from posttrain.config import PpoConfig
from posttrain.data.dataset import end_of_turn_ids, use_chat_template
from posttrain.data.packing import Row
from posttrain.data.records import Prompt
from posttrain.data.rollout_layout import response_row
from posttrain.models import load_model, load_tokenizer
from posttrain.models.actor_critic import frozen_reference
from posttrain.models.forward import reference_model
from posttrain.models.scoring import RolloutBatches, response_layout, score_logps
from posttrain.rewards import Reward, WeightedReward, reward_and_gold
from posttrain.rollout import Response, SamplingSettings, build_engine

# A weight sync's payload: parameter name -> (torch dtype name, array). numpy holds no bfloat16, so those travel
# as their int16 bit patterns; numpy arrays go through Ray's object store without a copy per reader.
PackedWeights = dict[str, tuple[str, np.ndarray]]


class StaleWeights(RuntimeError):
    """An engine asked to sample on weights older than the run allows."""


def trainable_weights(model: Any) -> dict[str, torch.Tensor]:
    """What an update can change: the parameters that require gradients (the adapter of a LoRA policy, every
    weight of a fully fine-tuned one). The rest was loaded from the same files on both sides and never moves."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def pack_weights(tensors: dict[str, torch.Tensor]) -> PackedWeights:
    packed: PackedWeights = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        packed[name] = (dtype, (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy())
    return packed


def unpack_weights(packed: PackedWeights) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, (dtype, array) in packed.items():
        tensor = torch.from_numpy(np.array(array))  # a writable copy: the object store's buffers are read-only
        tensors[name] = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
    return tensors


def _autocast(config: PpoConfig, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """The trainer's mixed precision (``train.precision``), so a role's forward computes what the trainer's would."""
    if config.train.precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if config.train.precision == "fp16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.float16)
    return nullcontext


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Sampler:
    """A rollout engine with a weight version: ``generate`` refuses to sample unless its weights are at least
    ``min_version``, so an engine that missed a sync fails loudly instead of sampling from an old policy.
    ``load_weights`` takes a sync; ``behaviour_logps`` scores what it sampled under the weights that sampled it
    (what asynchronous RL needs: by then the trainer has moved on)."""

    def __init__(self, policy: Any, engine: Any, batches: RolloutBatches | None, version: int = -1) -> None:
        self.policy, self.engine, self.batches, self.version = policy, engine, batches, version

    def load_weights(self, version: int, packed: PackedWeights) -> int:
        if version <= self.version:
            raise StaleWeights(
                f"a weight sync of version {version} reached an engine already at version {self.version}"
            )
        tensors = unpack_weights(packed)
        parameters = dict(self.policy.named_parameters())
        unknown = sorted(set(tensors) - set(parameters))
        if unknown:
            raise ValueError(
                f"weight sync: the engine's policy has no parameter {unknown[0]} ({len(unknown)} unknown)"
            )
        with torch.no_grad():
            for name, tensor in tensors.items():
                target = parameters[name]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"weight sync: {name} is {tuple(tensor.shape)}, the engine's {tuple(target.shape)}"
                    )
                target.copy_(tensor)
        self.engine.sync_weights(self.policy)
        self.version = version
        return version

    def follow_policy(self, version: int) -> None:
        """In the trainer's process ``policy`` is the trained policy itself: the HF engine samples from it as it
        is, a vLLM engine copies it in."""
        self.engine.sync_weights(self.policy)
        self.version = version

    def generate(
        self, prompt_ids: list[list[int]], settings: SamplingSettings, prompt_keys: list[int], min_version: int
    ) -> list[list[Response]]:
        if self.version < min_version:
            raise StaleWeights(
                f"the rollout engine holds weights of version {self.version}; this step needs version {min_version} "
                "or newer (a weight sync was lost)"
            )
        return self.engine.generate(prompt_ids, settings, prompt_keys)

    def sample(
        self,
        prompt_ids: list[list[int]],
        settings: SamplingSettings,
        prompt_keys: list[int],
        min_version: int,
        behaviour_temperature: float | None = None,
    ) -> tuple[list[list[Response]], torch.Tensor | None, int]:
        """One rollout's share: the responses, with ``behaviour_temperature`` the flat log-probs of their tokens
        (row order) under the weights that sampled them, and those weights' version."""
        groups = self.generate(prompt_ids, settings, prompt_keys, min_version)
        logps = None
        if behaviour_temperature is not None:
            assert self.batches is not None, "a sampler built without batches scores nothing"
            rows = [response_row(p, r.token_ids, i) for i, (p, g) in enumerate(zip(prompt_ids, groups)) for r in g]
            logps = score_logps(self.policy, rows, behaviour_temperature, self.batches)
        return groups, logps, self.version

    def weights(self) -> dict[str, torch.Tensor]:
        """The engine's copy of what training changes (tests compare it with the trainer's, bit for bit)."""
        return {name: t.clone() for name, t in trainable_weights(self.policy).items()}


class Reference:
    """The frozen reference's log-probs of response tokens: a frozen copy of a fully fine-tuned policy, or the
    policy itself with its adapter switched off (``models.forward.reference_model``)."""

    def __init__(self, model: Any, adapter_off: bool, batches: RolloutBatches) -> None:
        self.model, self.adapter_off, self.batches = model, adapter_off, batches

    def logps(self, rows: list[Row], temperature: float) -> torch.Tensor:
        if not self.adapter_off:
            return score_logps(self.model, rows, temperature, self.batches)
        with reference_model(self.model) as reference:
            return score_logps(reference, rows, temperature, self.batches)


class Scorer:
    """The reward optimised and the gold reward the watch compares it with."""

    def __init__(self, reward: WeightedReward | None, gold: Reward | None) -> None:
        self.reward, self.gold = reward, gold

    def breakdown(
        self, messages: Sequence[Any], texts: Sequence[str], references: Sequence[str | None], finished: Sequence[bool]
    ) -> dict[str, list[float]]:
        assert self.reward is not None, "this process's scorer was replaced by the reward role's actor"
        return self.reward.breakdown(messages, texts, references, finished=finished)

    def total(
        self, messages: Sequence[Any], texts: Sequence[str], references: Sequence[str | None], finished: Sequence[bool]
    ) -> list[float]:
        assert self.reward is not None, "this process's scorer was replaced by the reward role's actor"
        return list(self.reward(messages, texts, references, finished=finished))

    def gold_info(self) -> tuple[bool, bool]:
        """(there is a gold reward, it needs a reference answer)."""
        return self.gold is not None, bool(self.gold is not None and self.gold.needs_reference)

    def gold_scores(
        self, messages: Sequence[Any], texts: Sequence[str], references: Sequence[str | None]
    ) -> list[float]:
        assert self.gold is not None, "no gold reward in this run"
        return list(self.gold(messages, texts, references))


# ------------------------------------------------------------------------------------------ built from a config
def build_role(kind: str, config: PpoConfig, every_prompt: list[Prompt]) -> Any:
    """A role of ``kind`` (rollout, reference, reward) built from the run's config as the trainer builds its own
    parts (the same loading code), for a process of its own."""
    device = _device()
    if kind == "reward":
        reward, gold = reward_and_gold(
            config.reward, config.watch.gold, config.watch.gold_model, every_prompt, str(device)
        )
        return Scorer(reward, gold)
    tokenizer = load_tokenizer(config.model)
    policy, _ = load_model(config.model, config.peft, tokenizer)
    policy = policy.to(device).eval()
    layout = response_layout(config.data, config.sampling.num_samples, [policy], tokenizer.pad_token_id)
    batches = RolloutBatches(layout, device, config.train.batch_size, _autocast(config, device))
    if kind == "reference":
        copy = frozen_reference(policy, config.algorithm.kl_coef, device)
        return Reference(copy if copy is not None else policy, copy is None, batches)
    if kind == "rollout":
        stop_ids = end_of_turn_ids(tokenizer, use_chat_template(tokenizer, config.data.template))
        engine = build_engine(
            config.sampling,
            config.model,
            config.peft,
            policy,
            tokenizer,
            stop_ids,
            config.seed,
            config.data.max_length,
        )
        return Sampler(policy, engine, batches)
    raise ValueError(f"unknown role kind {kind!r} (rollout, reference, reward)")
