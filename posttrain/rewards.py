"""Rewards for sampled responses: a trained reward model, a Python function, or a weighted sum of them.

Every reward has one interface, :class:`Reward`: called with the prompts (message lists), the responses (text)
and the reference answers (``None`` where a row has none), it returns one float per response. Rejection sampling
and later the RL stages score through it, so a new kind of reward (an HTTP service, a sandbox) is one class.

Reward functions, given as ``reward.function``:

- ``module:function`` — imported; called as ``function(prompt, response, reference) -> float`` once per
  response, where ``prompt`` is the text of the prompt's **last user message** (system prompts and earlier turns
  are not passed), ``response`` the sampled reply and ``reference`` the row's reference answer or ``None``.
- ``exact_match`` — 1.0 when the response equals the reference after whitespace normalisation, else 0.0.
- ``toy`` — the toy tasks' graded gold reward (``demo.tasks.score_prompt``): 1.0 exact, partial credit below.

Both built-ins need a reference on every row (``needs_reference``); the caller checks that before sampling, so a
row without one fails with its file and line rather than after an hour of generation.

Choices: with both a reward model and a function, the reward is ``model_weight * model + function_weight *
function`` (raw scores, not normalised: a reward model's scale is arbitrary, so choose the weights for it); with
one source its weight is not applied. A non-finite reward is an error, not a silently dropped sample.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from posttrain.config import RewardSource
from posttrain.demo.tasks import exact_match, score_prompt

Messages = list[dict[str, Any]]
RewardFn = Callable[[str, str, "str | None"], float]


class Reward(Protocol):
    """``reward(prompts, responses, references) -> [float]``, one score per response."""

    name: str
    needs_reference: bool

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]) -> list[float]: ...


def last_user_text(messages: Messages) -> str:
    """The content of the last user message ('' when there is none): what a reward function sees as the prompt."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _exact_match(prompt: str, response: str, reference: str | None) -> float:
    return 1.0 if exact_match(response, reference or "") else 0.0


def _toy(prompt: str, response: str, reference: str | None) -> float:
    return score_prompt(prompt, response, reference or "")


BUILTIN_FUNCTIONS: dict[str, RewardFn] = {"exact_match": _exact_match, "toy": _toy}
"""Built-in reward functions by name; each compares with the row's reference."""


@dataclass
class FunctionReward:
    """A Python reward function applied to each response."""

    function: RewardFn
    name: str
    needs_reference: bool = False

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]) -> list[float]:
        scores = []
        for index, (messages, response, reference) in enumerate(zip(prompts, responses, references, strict=True)):
            if self.needs_reference and reference is None:
                raise ValueError(f"reward {self.name} compares with a reference answer, but prompt {index} has none")
            prompt = last_user_text(messages)
            try:
                value = float(self.function(prompt, response, reference))
            except Exception as error:
                raise ValueError(f"reward function {self.name} failed on prompt {prompt[:80]!r}, response {response[:80]!r}: {error}") from error
            if not math.isfinite(value):
                raise ValueError(f"reward function {self.name} returned {value} for prompt {prompt[:80]!r}; rewards must be finite")
            scores.append(value)
        return scores


def load_reward_function(spec: str) -> FunctionReward:
    """A built-in reward (``exact_match``, ``toy``) or ``module:function`` imported from the Python path.

    Raises ValueError naming ``spec`` when the name is unknown, the module cannot be imported, the attribute is
    missing or is not callable."""
    if spec in BUILTIN_FUNCTIONS:
        return FunctionReward(BUILTIN_FUNCTIONS[spec], spec, needs_reference=True)
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(
            f"reward.function {spec!r} is neither a built-in ({', '.join(BUILTIN_FUNCTIONS)}) nor module:function "
            "(e.g. my_rewards:score, with my_rewards importable from the working directory or the Python path)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"reward.function {spec!r}: cannot import module {module_name!r} ({error})") from None
    function = getattr(module, attribute, None)
    if function is None:
        raise ValueError(f"reward.function {spec!r}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(function):
        raise ValueError(f"reward.function {spec!r}: {attribute} is a {type(function).__name__}, not a function")
    return FunctionReward(function, spec)


class ModelReward:
    """A trained reward model (``stage: reward`` run directory or its ``model/`` folder) scoring the prompt
    messages followed by the response as an assistant turn. The weights load on first use, so a pipeline can
    build the reward before the policy has finished sampling and hold one model in memory at a time."""

    needs_reference = False

    def __init__(self, path: str, batch_size: int = 32, device: str | None = None) -> None:
        from posttrain.models.scalar_head import reward_model_dir

        reward_model_dir(path)  # a wrong path fails now, not after sampling
        self.path, self.batch_size, self.device = path, batch_size, device
        self.name = f"model:{path}"
        self._scorer: Any = None

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]) -> list[float]:
        from posttrain.models.scalar_head import RewardScorer

        if self._scorer is None:
            self._scorer = RewardScorer(self.path, device=self.device, batch_size=self.batch_size)
        conversations = [[*messages, {"role": "assistant", "content": response}] for messages, response in zip(prompts, responses, strict=True)]
        return self._scorer.score(conversations)

    def release(self) -> None:
        """Free the reward model's memory (it reloads on the next call)."""
        self._scorer = None


@dataclass
class WeightedReward:
    """``sum(weight * term)`` over named terms: the one place rewards are combined."""

    terms: list[tuple[str, Reward, float]] = field(default_factory=list)
    name: str = "reward"

    @property
    def needs_reference(self) -> bool:
        return any(reward.needs_reference for _, reward, _ in self.terms)

    def breakdown(self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]) -> dict[str, list[float]]:
        """Each term's unweighted scores by its name, and the weighted sum under ``"total"``."""
        parts = {name: reward(prompts, responses, references) for name, reward, _ in self.terms}
        weights = [weight for _, _, weight in self.terms]
        totals = [sum(w * s for w, s in zip(weights, scores)) for scores in zip(*parts.values())]
        return {**parts, "total": totals}

    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]) -> list[float]:
        return self.breakdown(prompts, responses, references)["total"]

    def release(self) -> None:
        for _, reward, _ in self.terms:
            if hasattr(reward, "release"):
                reward.release()


def build_reward(source: RewardSource, batch_size: int = 32, device: str | None = None) -> WeightedReward:
    """The reward a ``reward:`` config block describes (a model, a function, or both with their weights)."""
    terms: list[tuple[str, Reward, float]] = []
    both = bool(source.model and source.function)
    if source.model:
        terms.append(("model", ModelReward(source.model, batch_size, device), source.model_weight if both else 1.0))
    if source.function:
        terms.append(("function", load_reward_function(source.function), source.function_weight if both else 1.0))
    return WeightedReward(terms)
