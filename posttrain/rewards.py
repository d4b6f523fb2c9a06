"""Rewards for sampled responses: a trained reward model, a Python function, an HTTP service, or a weighted sum.

Every reward has one interface, :class:`Reward`: called with the prompts (message lists), the responses (text)
and the reference answers (``None`` where a row has none), it returns one float per response. Rejection sampling
and later the RL stages score through it, so a new kind of reward (a sandbox, say) is one class.

Reward functions, given as ``reward.function``:

- ``module:function`` — imported; called as ``function(prompt, response, reference) -> float`` once per
  response, where ``prompt`` is the text of the prompt's **last user message** (system prompts and earlier turns
  are not passed), ``response`` the sampled reply and ``reference`` the row's reference answer or ``None``.
- ``exact_match`` — 1.0 when the response equals the reference after whitespace normalisation, else 0.0.
- ``toy`` — the toy tasks' graded gold reward (``tasks.score_prompt``): 1.0 exact, partial credit below.
- ``toy_format`` — 1.0 when the response has the shape the toy task asks for (one integer for add and count,
  single lower-case letters for reverse, ...: ``tasks.format_reward``), else 0.0; right or wrong is not
  checked. A prompt that is not a toy task is an error.

``exact_match`` and ``toy`` need a reference on every row (``needs_reference``); the caller checks that before
sampling (:func:`reward_and_gold` for an RL run), so a row without one fails with its file and line rather than after
an hour of generation.
``toy_format`` needs none.

HTTP reward service (``reward.http: URL``, :class:`HttpReward`): batches of prompts (message lists), responses and
references are POSTed as JSON and one score per response comes back; busy-server errors (connection, timeout,
5xx, 429) are retried with a doubling wait, the caller's mistakes (other 4xx, malformed answers) fail at once.
The protocol and a minimal server are in ``docs/reward-http.md``.

Choices: with two or more sources (model, function, http) the reward is ``sum(weight * score)``, e.g.
``model_weight * model + function_weight * function`` (raw scores, not normalised: a reward model's scale is
arbitrary, so choose the weights for it); with one source its weight is not applied. ``reward.unfinished_penalty``
is then subtracted from every response that reached ``max_new_tokens`` without an end-of-turn token: a policy
that never stops would otherwise be scored on a truncated answer as if it were complete, and RL would not learn
to stop. A non-finite reward is an error, not a silently dropped sample.
"""

from __future__ import annotations

import http.client
import importlib
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from posttrain.config import RewardSource
from posttrain.data.dataset import require_references
from posttrain.data.records import Prompt
from posttrain.eval.reward_model import RewardScorer
from posttrain.models.loading import model_dir_of
from posttrain.tasks import exact_match, format_reward, score_prompt, task_of

Messages = list[dict[str, Any]]
RewardFn = Callable[[str, str, "str | None"], float]

HTTP_BACKOFF_S = 0.5
"""First wait before retrying a failed request to a reward service; it doubles after each failure."""
HTTP_BACKOFF_MAX_S = 8.0
"""Longest wait between two attempts."""


class RewardError(ValueError):
    """A reward could not be computed (a reward service failed or answered something other than the protocol)."""


class Reward(Protocol):
    """``reward(prompts, responses, references) -> [float]``, one score per response."""

    # Read-only: a plain attribute satisfies them, and so does a property (WeightedReward derives its own).
    @property
    def name(self) -> str: ...

    @property
    def needs_reference(self) -> bool: ...

    def __call__(
        self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]
    ) -> list[float]: ...


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


def _toy_format(prompt: str, response: str, reference: str | None) -> float:
    return format_reward(task_of(prompt), response)


BUILTIN_FUNCTIONS: dict[str, RewardFn] = {"exact_match": _exact_match, "toy": _toy, "toy_format": _toy_format}
"""Built-in reward functions by name."""
BUILTINS_NEEDING_REFERENCE: frozenset[str] = frozenset({"exact_match", "toy"})
"""The built-ins that compare with the row's reference answer."""


@dataclass
class FunctionReward:
    """A Python reward function applied to each response."""

    function: RewardFn
    name: str
    needs_reference: bool = False

    def __call__(
        self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]
    ) -> list[float]:
        scores = []
        for index, (messages, response, reference) in enumerate(zip(prompts, responses, references, strict=True)):
            if self.needs_reference and reference is None:
                raise ValueError(f"reward {self.name} compares with a reference answer, but prompt {index} has none")
            prompt = last_user_text(messages)
            try:
                value = float(self.function(prompt, response, reference))
            except Exception as error:
                raise ValueError(
                    f"reward function {self.name} failed on prompt {prompt[:80]!r}, response {response[:80]!r}: {error}"
                ) from error
            if not math.isfinite(value):
                raise ValueError(
                    f"reward function {self.name} returned {value} for prompt {prompt[:80]!r}; rewards must be finite"
                )
            scores.append(value)
        return scores


def load_reward_function(spec: str) -> FunctionReward:
    """A built-in reward (``exact_match``, ``toy``, ``toy_format``) or ``module:function`` imported from the
    Python path.

    Raises ValueError naming ``spec`` when the name is unknown, the module cannot be imported, the attribute is
    missing or is not callable."""
    if spec in BUILTIN_FUNCTIONS:
        return FunctionReward(BUILTIN_FUNCTIONS[spec], spec, needs_reference=spec in BUILTINS_NEEDING_REFERENCE)
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

        model_dir_of(path)  # a wrong path fails now, not after sampling
        self.path, self.batch_size, self.device = path, batch_size, device
        self.name = f"model:{path}"
        self._scorer: Any = None

    def __call__(
        self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]
    ) -> list[float]:

        if self._scorer is None:
            self._scorer = RewardScorer(self.path, device=self.device, batch_size=self.batch_size)
        conversations = [
            [*messages, {"role": "assistant", "content": response}]
            for messages, response in zip(prompts, responses, strict=True)
        ]
        return self._scorer.score(conversations)

    def release(self) -> None:
        """Free the reward model's memory (it reloads on the next call)."""
        self._scorer = None


class HttpReward:
    """A reward service over HTTP: POSTs batches of prompts, responses and references as JSON and reads back one
    score per response (the protocol: ``docs/reward-http.md``).

    Retries a connection error, a timeout, HTTP 5xx or 429 up to ``retries`` times, waiting ``backoff`` seconds
    (default ``HTTP_BACKOFF_S``, read when called) and doubling up to ``HTTP_BACKOFF_MAX_S``; other 4xx answers
    and malformed JSON fail at once. Every failure is a :class:`RewardError` naming the URL."""

    needs_reference = False

    def __init__(
        self, url: str, timeout: float = 30.0, retries: int = 3, batch_size: int = 64, backoff: float | None = None
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"reward URL {url!r} is not an http:// or https:// URL (e.g. http://localhost:8000/score)"
            )
        if not (timeout > 0 and retries >= 0 and batch_size >= 1 and (backoff is None or backoff >= 0)):
            raise ValueError(
                f"HttpReward({url!r}): expected timeout > 0, retries >= 0, batch_size >= 1 and backoff >= 0; got "
                f"timeout={timeout}, retries={retries}, batch_size={batch_size}, backoff={backoff}"
            )
        self.url, self.timeout, self.retries, self.batch_size, self.backoff = (
            url,
            timeout,
            retries,
            batch_size,
            backoff,
        )
        self.name = f"http:{url}"

    def __call__(
        self, prompts: Sequence[Messages], responses: Sequence[str], references: Sequence[str | None]
    ) -> list[float]:
        if not len(prompts) == len(responses) == len(references):
            raise ValueError(
                f"{self.name}: {len(prompts)} prompts, {len(responses)} responses and {len(references)} references; expected one of each per response"
            )
        scores: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            end = start + self.batch_size
            batch = {
                "prompts": list(prompts[start:end]),
                "responses": list(responses[start:end]),
                "references": list(references[start:end]),
            }
            scores += self._score_batch(batch, start)
        return scores

    def _score_batch(self, batch: dict[str, list[Any]], start: int) -> list[float]:
        count = len(batch["responses"])
        where = f"reward service {self.url} (responses {start}..{start + count - 1})"
        try:
            payload = json.dumps(batch, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise RewardError(
                f"{where}: the batch cannot be sent as JSON ({error}); prompts must be JSON message lists"
            ) from None
        body, attempt = self._post(payload, where)
        expected = f'expected {{"scores": [number, ...]}} with {count} finite numbers, one per response'
        context = f"{where} answered on attempt {attempt}"
        try:
            answer = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RewardError(
                f"{context} with a body that is not JSON ({error}): {_excerpt(body)!r}; {expected}"
            ) from None
        if not isinstance(answer, dict):
            raise RewardError(
                f"{context} with a JSON {type(answer).__name__}, not an object: {_excerpt(body)!r}; {expected}"
            )
        if "scores" not in answer:
            raise RewardError(f'{context} with an object without "scores" (keys: {sorted(answer)[:10]}); {expected}')
        raw = answer["scores"]
        if not isinstance(raw, list):
            raise RewardError(f'{context} with "scores" as a JSON {type(raw).__name__}, not a list; {expected}')
        if len(raw) != count:
            raise RewardError(f"{context} with {len(raw)} scores for {count} responses; {expected}")
        for index, value in enumerate(raw):
            # bool is an int in Python, but true/false is not a score a server meant to send.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RewardError(
                    f"{context} with score {value!r} at index {index} (response {start + index}); {expected}"
                )
        return [float(value) for value in raw]

    def _post(self, payload: bytes, where: str) -> tuple[bytes, int]:
        """The body of the first successful answer and its attempt number; retries what may be transient."""
        attempts = self.retries + 1
        request = urllib.request.Request(
            self.url,
            data=payload,
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        failure = ""
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                    return answer.read(), attempt
            except urllib.error.HTTPError as error:  # before URLError, its base class
                status = f"HTTP {error.code} {error.reason}: {_excerpt(_read_quietly(error))!r}"
                if error.code != 429 and error.code < 500:
                    raise RewardError(
                        f"{where} answered {status} on attempt {attempt} of {attempts}; not retried (a 4xx other than "
                        "429 means the request is wrong: check the URL and that the server speaks this protocol)"
                    ) from None
                failure = status
            except (
                OSError,
                http.client.HTTPException,
            ) as error:  # refused, reset, DNS, timeouts (URLError, TimeoutError)
                reason = error.reason if isinstance(error, urllib.error.URLError) else error
                failure = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
                if isinstance(reason, TimeoutError) or "timed out" in failure:
                    failure = f"no answer within {self.timeout} s ({failure})"
            if attempt < attempts:
                base = HTTP_BACKOFF_S if self.backoff is None else self.backoff
                time.sleep(min(base * 2 ** (attempt - 1), HTTP_BACKOFF_MAX_S))
        raise RewardError(
            f"{where} failed {attempts} attempt(s) (1 + reward.http_retries={self.retries}); last: {failure}"
        )


def _read_quietly(error: urllib.error.HTTPError) -> bytes:
    try:
        return error.read()
    except (OSError, http.client.HTTPException):
        return b""


def _excerpt(body: bytes, limit: int = 200) -> str:
    text = body.decode("utf-8", errors="replace")
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class WeightedReward:
    """``sum(weight * term)`` over named terms, minus ``unfinished_penalty`` for each response that did not finish:
    the one place rewards are combined."""

    terms: list[tuple[str, Reward, float]] = field(default_factory=list)
    name: str = "reward"
    unfinished_penalty: float = 0.0

    def __post_init__(self) -> None:
        if not self.unfinished_penalty >= 0:
            raise ValueError(
                f"unfinished_penalty is {self.unfinished_penalty}; expected a number >= 0 (it is subtracted)"
            )

    @property
    def needs_reference(self) -> bool:
        return any(reward.needs_reference for _, reward, _ in self.terms)

    def breakdown(
        self,
        prompts: Sequence[Messages],
        responses: Sequence[str],
        references: Sequence[str | None],
        finished: Sequence[bool] | None = None,
    ) -> dict[str, list[float]]:
        """Each term's unweighted scores by its name, ``"unfinished"`` (``-unfinished_penalty`` where
        ``finished`` is false, else 0) when the penalty is on, and the weighted sum of them all under ``"total"``.

        ``finished[i]``: response i ended with an end-of-turn token rather than at ``max_new_tokens``. Required
        when ``unfinished_penalty`` > 0 (ValueError otherwise)."""
        count = len(responses)
        if finished is not None and len(finished) != count:
            raise ValueError(
                f"{self.name}: {len(finished)} finished flags for {count} responses; expected one per response"
            )
        parts: dict[str, list[float]] = {}
        weights: dict[str, float] = {}
        for name, reward, weight in self.terms:
            scores = list(reward(prompts, responses, references))
            if len(scores) != count:
                raise RewardError(
                    f"reward term {name!r} ({reward.name}) returned {len(scores)} scores for {count} responses; expected one per response"
                )
            parts[name], weights[name] = scores, weight
        if self.unfinished_penalty > 0:
            if finished is None:
                raise ValueError(
                    f"{self.name} has unfinished_penalty {self.unfinished_penalty}: pass finished= (one bool per response, "
                    "true when it ended with an end-of-turn token) to score the responses"
                )
            parts["unfinished"] = [0.0 if done else -self.unfinished_penalty for done in finished]
            weights["unfinished"] = 1.0
        totals = [sum(weights[name] * scores[i] for name, scores in parts.items()) for i in range(count)]
        return {**parts, "total": totals}

    def __call__(
        self,
        prompts: Sequence[Messages],
        responses: Sequence[str],
        references: Sequence[str | None],
        finished: Sequence[bool] | None = None,
    ) -> list[float]:
        return self.breakdown(prompts, responses, references, finished)["total"]

    def release(self) -> None:
        for _, reward, _ in self.terms:
            if hasattr(reward, "release"):
                reward.release()


def build_reward(source: RewardSource, batch_size: int = 32, device: str | None = None) -> WeightedReward:
    """The reward a ``reward:`` config block describes: a model, a function and/or an HTTP service (with two or
    more, each weighted by its ``*_weight``; with one, unweighted), and the unfinished penalty. ``batch_size`` and
    ``device`` are the reward model's."""
    weighted = sum(bool(s) for s in (source.model, source.function, source.http)) >= 2
    terms: list[tuple[str, Reward, float]] = []
    if source.model:
        terms.append(
            ("model", ModelReward(source.model, batch_size, device), source.model_weight if weighted else 1.0)
        )
    if source.function:
        terms.append(("function", load_reward_function(source.function), source.function_weight if weighted else 1.0))
    if source.http:
        reward = HttpReward(source.http, timeout=source.http_timeout, retries=source.http_retries)
        terms.append(("http", reward, source.http_weight if weighted else 1.0))
    return WeightedReward(terms, unfinished_penalty=source.unfinished_penalty)


def reward_and_gold(
    source: RewardSource, gold: str | None, gold_model: str | None, prompts: Sequence[Prompt], device: str | None
) -> tuple[WeightedReward, Reward | None]:
    """The reward an RL run optimises (``source``) and the gold reward its watch compares it with (``gold``: a
    function, or ``gold_model``: a second reward model), if any. Either may need every one of ``prompts`` to carry a
    reference answer: refused here, before any sampling, naming the first row without one."""
    reward = build_reward(source, device=device)
    if reward.needs_reference:
        require_references(list(prompts), "the reward")
    gold_reward: Reward | None = None
    if gold:
        gold_reward = load_reward_function(gold)
    elif gold_model:
        gold_reward = build_reward(RewardSource(model=gold_model), device=device)
    if gold_reward is not None and gold_reward.needs_reference:
        require_references(list(prompts), "watch.gold")
    return reward, gold_reward
