"""What an RL run says about itself each step: the rollout's statistics (:func:`rollout_metrics`), a few of its
samples (:func:`append_samples`), and the training watch, plain-language warnings when the run goes wrong.

PPO and GRPO runs fail quietly: the loss keeps going down while the policy learns to exploit its reward, stops
ending its answers, or says the same thing to every prompt. The RL recipe hands each step's metrics to
:class:`TrainingWatch`, which returns a :class:`WatchWarning` per problem that just started; the recipe prints them
(and, for the kinds marked ``stops`` under ``watch.stop_on_warning``, checkpoints and exits non-zero).

Metrics (all optional; a missing or non-finite value skips the checks that need it and leaves their state as it
was): ``reward`` (mean proxy reward, the one optimised), ``gold_reward`` (mean gold reward, from watch.gold or
watch.gold_model), ``kl`` (mean per-response KL to the reference, summed over response tokens), ``response_length``
(mean response tokens), ``unfinished_share`` (share cut at max_new_tokens without an end token), ``distinct_share``
(distinct responses / responses) and ``entropy`` (mean per-token entropy, nats).

The checks, and why each is there:

- ``negative_kl``: ``kl < -watch.negative_kl_tolerance``. The true KL is >= 0; the k1 estimate may dip slightly
  below from noise, but a clearly negative mean says the log-probs used for training are not those of the
  distribution the responses were sampled from, which silently corrupts both the KL penalty and the PPO ratio.
- ``kl_runaway``: ``kl > watch.kl_limit``. The policy has left the region where the reward model was trained
  to be right; it usually precedes reward hacking or gibberish.
- ``reward_hacking``: over the last ``window`` steps the proxy reward rose and the gold reward fell (trend test
  below). This is Goodhart's law made visible (Gao et al. 2022): the proxy keeps paying while the truth gets
  worse, and the proxy curve alone looks like success.
- ``length_runaway``: the mean response length is above ``watch.length_growth`` x the baseline (the mean of the
  first ``window`` steps with a length, kept in the state) and still rising (trend test), or ``unfinished_share >
  0.5`` while the baseline's share was below 0.5. Length is the cheapest way to please most reward models
  (Singhal et al. 2023); the baseline is fixed, so slow growth cannot hide by moving it.
- ``no_eos``: ``unfinished_share > 0.5`` at any step. Most responses hit max_new_tokens: their reward and KL are
  computed on truncated text, and the policy may never learn to stop.
- ``collapse``: ``distinct_share < watch.min_distinct_share`` or ``entropy < 0.05`` nats per token. Mode
  collapse: the same answer for every prompt leaves no variance between samples for advantages to learn from
  (GRPO/RLOO advantages become zero), and it rarely recovers.

Episodes: each kind warns once when its condition becomes true, and not again until a step where the condition
was evaluated and found false; so a problem that lasts 50 steps gives one line, not 50.

Trend test (``reward_hacking`` and "still rising" of ``length_runaway``): take the last ``window`` values of the
metric (steps where it was present) and compare the mean of the first ``window // 2`` with the mean of the last
``window // 2`` (the middle value of an odd window is left out). The change counts as a rise (or a fall) when it
exceeds ``TREND_Z = 4`` standard errors of that difference, ``sigma * sqrt(2 / (window // 2))``, where ``sigma`` is
the spread of the window's values around their least-squares line (so the threshold is in the metric's own units
and noise, and a steady trend is not counted as noise); it must also exceed ``1e-6 x max(1, |first-half mean|)`` so
float rounding on a constant series is no trend. Why 4 rather than the usual 2 or 3: sigma rests on only
``window - 2`` degrees of freedom, so its errors have heavy tails, and the test runs at every step of a long run;
4 keeps false warnings on flat noisy series rare over a whole run while a steady opposite drift of proxy and gold
is still caught within a couple of windows (a noise-free trend at once). For noisier metrics raise
``watch.window``: more values give a better sigma, so a longer window is more sensitive at the same false-alarm
rate. With ``window = 2`` there is no spread to measure and any change beyond the rounding floor counts. Nothing
trend-based can fire before ``window`` steps with the metric.

The watch reads plain floats (the standard library and posttrain.config are all it needs), so it is cheap to test;
the tensors it summarises are reduced by :func:`rollout_metrics` and the recipe's loss.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain import rl
from posttrain.config import WatchBlock
from posttrain.data.records import Prompt
from posttrain.runtime import Metrics

SAMPLES_PER_STEP_LOGGED = 4
"""Rollouts per step that :func:`append_samples` writes to ``samples.jsonl``."""

KINDS = ("negative_kl", "kl_runaway", "reward_hacking", "length_runaway", "no_eos", "collapse")
"""Every warning kind, in the order warnings of one step are returned."""
STOPPING_KINDS = frozenset({"reward_hacking", "kl_runaway", "length_runaway"})
"""Kinds that stop the run under watch.stop_on_warning: the run is getting worse, not just odd."""
TREND_Z = 4.0
"""A trend counts when the half-window change exceeds this many standard errors (see the module docstring)."""
TREND_FLOOR = 1e-6
"""...and exceeds this times max(1, |first-half mean|), so rounding on a constant series is no trend."""
COLLAPSE_ENTROPY = 0.05
"""Mean per-token entropy (nats) below which the policy is all but deterministic."""
UNFINISHED_LIMIT = 0.5
"""Share of responses cut at max_new_tokens above which the policy is said not to stop."""
STATE_VERSION = 1


@dataclass(frozen=True)
class WatchWarning:
    """One problem that started at a step: its kind, a plain-language message, and whether it stops the run."""

    kind: str
    """One of KINDS."""
    message: str
    """What was seen (step, numbers), the usual causes, what to try."""
    stops: bool
    """True when watch.stop_on_warning is set and the kind is one of STOPPING_KINDS."""


def _halves(values: Sequence[float]) -> tuple[list[float], list[float]]:
    half = len(values) // 2
    return list(values[:half]), list(values[len(values) - half :])


def _trend(values: Sequence[float]) -> int:
    """+1 when the second half of ``values`` is significantly above the first, -1 when below, else 0."""
    first, second = _halves(values)
    if not first:
        return 0
    change = statistics.fmean(second) - statistics.fmean(first)
    threshold = max(
        TREND_Z * _noise(values) * math.sqrt(2 / len(first)), TREND_FLOOR * max(1.0, abs(statistics.fmean(first)))
    )
    if change > threshold:
        return 1
    if change < -threshold:
        return -1
    return 0


def _noise(values: Sequence[float]) -> float:
    """Standard deviation of ``values`` around their least-squares line (n - 2 degrees of freedom; 0 for n <= 2).

    Around the line rather than around the mean, so a steady trend is not mistaken for noise and hidden by it.
    """
    count = len(values)
    if count <= 2:
        return 0.0
    center_x, center_y = (count - 1) / 2, statistics.fmean(values)
    slope = sum((x - center_x) * (y - center_y) for x, y in enumerate(values)) / sum(
        (x - center_x) ** 2 for x in range(count)
    )
    residuals = [y - center_y - slope * (x - center_x) for x, y in enumerate(values)]
    return math.sqrt(sum(r * r for r in residuals) / (count - 2))


def _finite(metrics: Mapping[str, float], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class TrainingWatch:
    """Watches an RL run's per-step metrics and says, once per episode, what went wrong and what to try.

    ``observe`` is called after every step; ``state_dict``/``load_state_dict`` carry the history (trend windows,
    the length baseline, open episodes) across a resume, as plain JSON-serialisable lists and numbers.
    """

    def __init__(self, config: WatchBlock, max_new_tokens: int) -> None:
        self.config = config
        self.max_new_tokens = max_new_tokens
        self._pairs: list[tuple[float, float]] = []  # (reward, gold_reward) of the last `window` steps with both
        self._lengths: list[float] = []  # response_length of the last `window` steps with one
        self._baseline_lengths: list[float] = []  # the first `window` response lengths, then frozen
        self._baseline_unfinished: list[float] = []  # the first `window` unfinished shares, then frozen
        self._active: set[str] = set()  # kinds whose condition held at their last evaluation
        self._last_step: int | None = None

    # -- per step ------------------------------------------------------------------------------------------------

    def observe(self, step: int, metrics: dict[str, float]) -> list[WatchWarning]:
        """Take one step's metrics; return a warning for each kind whose condition started at this step."""
        window = self.config.window
        reward, gold = _finite(metrics, "reward"), _finite(metrics, "gold_reward")
        kl, length = _finite(metrics, "kl"), _finite(metrics, "response_length")
        unfinished = _finite(metrics, "unfinished_share")
        distinct, entropy = _finite(metrics, "distinct_share"), _finite(metrics, "entropy")

        if reward is not None and gold is not None:
            self._pairs = (self._pairs + [(reward, gold)])[-window:]
        if length is not None:
            self._lengths = (self._lengths + [length])[-window:]
            if len(self._baseline_lengths) < window:
                self._baseline_lengths.append(length)
        if unfinished is not None and len(self._baseline_unfinished) < window:
            self._baseline_unfinished.append(unfinished)
        self._last_step = step

        # Each entry: kind -> None (not evaluated this step), or the message when the condition holds, or "".
        found: dict[str, str | None] = {
            "negative_kl": self._negative_kl(step, kl),
            "kl_runaway": self._kl_runaway(step, kl),
            "reward_hacking": self._reward_hacking(step, reward, gold),
            "length_runaway": self._length_runaway(step, length, unfinished),
            "no_eos": self._no_eos(step, unfinished),
            "collapse": self._collapse(step, distinct, entropy),
        }
        warnings = []
        for kind in KINDS:
            message = found[kind]
            if message is None:
                continue  # not evaluated: an open episode stays open, a closed one stays closed
            if not message:
                self._active.discard(kind)
            elif kind not in self._active:
                self._active.add(kind)
                stops = self.config.stop_on_warning and kind in STOPPING_KINDS
                warnings.append(WatchWarning(kind, message, stops))
        return warnings

    # -- the checks: None when a metric is missing, "" when healthy, else the message ----------------------------

    def _negative_kl(self, step: int, kl: float | None) -> str | None:
        if kl is None:
            return None
        tolerance = self.config.negative_kl_tolerance
        if kl >= -tolerance:
            return ""
        return (
            f"step {step}: the KL to the reference is negative ({kl:.3g} nats per response, below "
            f"-watch.negative_kl_tolerance={-tolerance:.3g}), which a true KL never is. "
            "Usual causes: log-probs recomputed under other settings than sampling (temperature or top-p applied to "
            "the sampling distribution but not to the log-probs, or the other way round), a tokenizer or chat "
            "template mismatch between generation and training (re-tokenising the text instead of using the sampled "
            "ids), dropout left on in the policy or reference pass, or different precision for policy and reference. "
            "Check those first; if all match, there may be too few responses per step for the k1 estimator "
            "(sample more, or use algorithm.kl_estimator=k3)."
        )

    def _kl_runaway(self, step: int, kl: float | None) -> str | None:
        if kl is None:
            return None
        if kl <= self.config.kl_limit:
            return ""
        return (
            f"step {step}: the KL to the reference is running away ({kl:.3g} nats per response, above "
            f"watch.kl_limit={self.config.kl_limit:.3g}): the policy has moved far from where it started. "
            "Usual causes: a learning rate too high, algorithm.kl_coef too low, reward hacking, or too many "
            "algorithm.ppo_epochs over one rollout. Try a lower optim.lr, a higher kl_coef (or algorithm.kl_target), "
            "fewer ppo_epochs, and read some samples."
        )

    def _reward_hacking(self, step: int, reward: float | None, gold: float | None) -> str | None:
        window = self.config.window
        if reward is None or gold is None or len(self._pairs) < window:
            return None
        rewards = [pair[0] for pair in self._pairs]
        golds = [pair[1] for pair in self._pairs]
        if not (_trend(rewards) > 0 and _trend(golds) < 0):
            return ""
        reward_before, reward_after = (statistics.fmean(half) for half in _halves(rewards))
        gold_before, gold_after = (statistics.fmean(half) for half in _halves(golds))
        return (
            f"step {step}: the reward is rising while the gold reward falls (reward {reward_before:.3g} -> "
            f"{reward_after:.3g}, gold {gold_before:.3g} -> {gold_after:.3g} over the last {window} steps): "
            "the policy is learning to please the reward rather than to be right. Read some samples; the usual causes "
            "are a reward model that pays for length or format, or a reward function with a loophole. "
            "Try a higher algorithm.kl_coef, stopping at the checkpoint with the best gold reward, fixing the reward, "
            "or a reward.unfinished_penalty."
        )

    def _length_runaway(self, step: int, length: float | None, unfinished: float | None) -> str | None:
        window = self.config.window
        evaluated = False
        if length is not None and len(self._baseline_lengths) >= window and len(self._lengths) >= window:
            evaluated = True
            baseline = statistics.fmean(self._baseline_lengths)
            if length > self.config.length_growth * baseline and _trend(self._lengths) > 0:
                seen = (
                    f"mean length {length:.4g} tokens, {length / baseline:.3g}x the first {window} steps' "
                    f"{baseline:.4g} and still rising"
                )
                return self._length_message(step, seen)
        if unfinished is not None and len(self._baseline_unfinished) >= window:
            evaluated = True
            baseline_share = statistics.fmean(self._baseline_unfinished)
            if unfinished > UNFINISHED_LIMIT and baseline_share < UNFINISHED_LIMIT:
                seen = (
                    f"the share cut at max_new_tokens={self.max_new_tokens} rose from {baseline_share:.2f} over the "
                    f"first {window} steps to {unfinished:.2f}"
                )
                return self._length_message(step, seen)
        return "" if evaluated else None

    def _length_message(self, step: int, seen: str) -> str:
        return (
            f"step {step}: the responses are running long ({seen}). "
            "Usual causes: the reward pays for length (a reward model that prefers longer answers), and nothing "
            "penalises responses that never end. Read some samples; try reward.unfinished_penalty, a higher "
            "algorithm.kl_coef, or a reward that does not grow with length."
        )

    def _no_eos(self, step: int, unfinished: float | None) -> str | None:
        if unfinished is None:
            return None
        if unfinished <= UNFINISHED_LIMIT:
            return ""
        return (
            f"step {step}: most responses never end ({unfinished:.0%} were cut at "
            f"max_new_tokens={self.max_new_tokens} without an end token): the policy does not stop. "
            "Check that the chat template's end-of-turn token is the one generation stops on and that SFT trained "
            "it, and set reward.unfinished_penalty so unfinished responses earn less."
        )

    def _collapse(self, step: int, distinct: float | None, entropy: float | None) -> str | None:
        if distinct is None and entropy is None:
            return None
        seen = []
        if distinct is not None and distinct < self.config.min_distinct_share:
            seen.append(
                f"only {distinct:.0%} of responses distinct, below watch.min_distinct_share="
                f"{self.config.min_distinct_share:.0%}"
            )
        if entropy is not None and entropy < COLLAPSE_ENTROPY:
            seen.append(f"entropy {entropy:.3g} nats per token, below {COLLAPSE_ENTROPY}")
        if not seen:
            return ""
        return (
            f"step {step}: the policy is collapsing to one answer ({'; '.join(seen)}): it produces the same answer for "
            "every prompt (mode collapse), which leaves nothing for advantages to compare. "
            "Usual causes: a learning rate too high, algorithm.entropy_coef 0 with a reward that is easy to max out, "
            "or algorithm.kl_coef too low; try a lower optim.lr, a small entropy_coef or a higher kl_coef."
        )

    # -- resume --------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The history as plain lists and numbers (json.dumps-able), so a resumed run keeps its trends."""
        return {
            "version": STATE_VERSION,
            "pairs": [[reward, gold] for reward, gold in self._pairs],
            "lengths": list(self._lengths),
            "baseline_lengths": list(self._baseline_lengths),
            "baseline_unfinished": list(self._baseline_unfinished),
            "active": sorted(self._active),
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a history saved by ``state_dict`` (after json.dumps/json.loads); raises ValueError if malformed."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"training-watch state has version {state.get('version')!r}, expected {STATE_VERSION}; "
                "it was saved by another posttrain version (start the watch afresh by not loading it)"
            )
        try:
            window = self.config.window
            # A changed watch.window keeps the most recent values; a baseline already longer stays as it was.
            pairs = [(float(reward), float(gold)) for reward, gold in state["pairs"]][-window:]
            lengths = [float(value) for value in state["lengths"]][-window:]
            baseline_lengths = [float(value) for value in state["baseline_lengths"]]
            baseline_unfinished = [float(value) for value in state["baseline_unfinished"]]
            active = {str(kind) for kind in state["active"]}
            last_step = state["last_step"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"training-watch state is malformed ({error!r}); expected the dict of state_dict()"
            ) from error
        unknown = active - set(KINDS)
        if unknown:
            raise ValueError(
                f"training-watch state names unknown warning kinds {sorted(unknown)}; expected some of {KINDS}"
            )
        self._pairs, self._lengths = pairs, lengths
        self._baseline_lengths, self._baseline_unfinished = baseline_lengths, baseline_unfinished
        self._active = active
        self._last_step = None if last_step is None else int(last_step)


# ------------------------------------------------------------------------------------------- what a step records
def rollout_metrics(
    rewards: torch.Tensor,
    reward_terms: Mapping[str, Sequence[float]],
    texts: Sequence[str],
    finished: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    gold: tuple[float, int] | None,
    values: torch.Tensor | None = None,
    returns: torch.Tensor | None = None,
) -> Metrics:
    """This process's statistics of a rollout of B responses, means per response unless said otherwise (over every
    process once the step reduces them): ``rewards`` (B,) as scored, before normalisation and clipping, and each of
    ``reward_terms`` (``WeightedReward.breakdown``) when there are several; response length and the shares
    ``finished`` and distinct among ``texts``; the token mean of ``advantages`` under the action ``mask``, like the
    loss; the KL to the reference (k1 of the sampling policy's ``old_logps`` and the ``ref_logps``, summed per
    response) when both are there; the ``gold`` reward's total and count (``eval.verifiable.gold_sum``); and with a
    critic the explained variance of its ``values`` for the ``returns`` (one value per process, averaged over
    them)."""
    metrics, num_responses = Metrics(), len(texts)
    if old_logps is not None and ref_logps is not None:  # the KL to the reference is measured
        metrics.example_mean("kl", rl.kl_estimate(old_logps, ref_logps, "k1", mask=mask).sum(), num_responses)
    metrics.example_mean("reward", rewards.sum(), num_responses)
    metrics.std("reward_std", rewards)
    metrics.example_mean("response_length", mask.sum(), num_responses)
    metrics.example_mean("unfinished_share", (~finished).sum(), num_responses)
    metrics.example_mean("distinct_share", len(set(texts)), num_responses)
    metrics.token_mean("advantage", rl.masked_sum(advantages, mask), mask.sum())  # a token mean, like the loss
    for name, term in reward_terms.items():
        if name != "total" and len(reward_terms) > 2:
            metrics.example_mean(f"reward_{name}", sum(term), num_responses)
    if gold is not None:
        # Recorded on every process (count 0 where no response is scorable), so the reduce lines up everywhere.
        metrics.example_mean("gold_reward", *gold)
    if returns is not None and values is not None:
        metrics.example_mean("value_explained_variance", rl.explained_variance(values, returns, mask), 1)
    return metrics


def append_samples(
    path: Path,
    step: int,
    prompts: Sequence[Prompt],
    texts: Sequence[str],
    rewards: Sequence[float],
    finished: Sequence[bool],
) -> None:
    """The step's first few rollouts (prompt, reference, response, the reward optimised, whether it ended),
    appended to ``samples.jsonl`` to read along with the metrics."""
    with open(path, "a", encoding="utf-8") as handle:
        for i in range(min(SAMPLES_PER_STEP_LOGGED, len(texts))):
            sample = {
                "step": step,
                "prompt": prompts[i].messages[-1]["content"],
                "reference": prompts[i].reference,
                "response": texts[i],
                "reward": float(rewards[i]),
                "finished": bool(finished[i]),
            }
            handle.write(json.dumps(sample) + "\n")
