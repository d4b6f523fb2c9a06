"""The training watch on synthetic metric sequences: healthy runs stay quiet, planted failures warn once, at the
step the rules give by hand, and a resumed watch continues exactly like an uninterrupted one."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable

import pytest
import torch

from posttrain.config import WatchBlock
from posttrain.diagnostics import TrainingWatch, WatchWarning, rollout_metrics

MAX_NEW_TOKENS = 64
WINDOW = 8  # the hand-computed warning steps below assume an 8-step window (the default is 16)
Metrics = dict[str, float]


def drive(watch: TrainingWatch, steps: range, metrics_at: Callable[[int], Metrics]) -> list[tuple[int, WatchWarning]]:
    """Observe every step of ``steps``; return (step, warning) for each warning given."""
    return [(step, warning) for step in steps for warning in watch.observe(step, metrics_at(step))]


def kinds(found: list[tuple[int, WatchWarning]]) -> list[tuple[int, str]]:
    return [(step, warning.kind) for step, warning in found]


def healthy(step: int) -> Metrics:
    """A step of a run with nothing wrong: small positive KL, stable length, varied answers."""
    return {"kl": 0.5, "response_length": 100.0, "unfinished_share": 0.02, "distinct_share": 0.9, "entropy": 1.2}


def planted_gold(step: int) -> float:
    """Gold reward: flat at 0.5 up to step 11, then falling 0.05 per step (0.45 at step 12)."""
    return 0.5 if step <= 11 else 0.5 - 0.05 * (step - 11)


def hacking(step: int) -> Metrics:
    """Proxy reward rising 0.02 per step throughout; the gold reward plateaus, then falls from step 12."""
    return {**healthy(step), "reward": 0.2 + 0.02 * step, "gold_reward": planted_gold(step)}


def test_healthy_run_gives_no_warnings() -> None:
    """Reward and gold rise together (with noise), KL small and positive, length stable: not a single warning."""
    rng = random.Random(0)

    def metrics_at(step: int) -> Metrics:
        rising = 0.2 + 0.002 * step
        return {
            "reward": rising + rng.gauss(0, 0.02),
            "gold_reward": rising - 0.05 + rng.gauss(0, 0.02),
            "kl": 0.3 + 0.01 * step + rng.gauss(0, 0.05),
            "response_length": 100 + rng.gauss(0, 5),
            "unfinished_share": 0.02,
            "distinct_share": 0.9,
            "entropy": 1.2 + rng.gauss(0, 0.05),
        }

    watch = TrainingWatch(WatchBlock(window=WINDOW, gold="exact_match"), MAX_NEW_TOKENS)
    assert drive(watch, range(300), metrics_at) == []


@pytest.mark.parametrize("stop_on_warning", [False, True])
def test_reward_hacking_warns_once_at_the_hand_computed_step(stop_on_warning: bool) -> None:
    """window = 8, halves of 4, a change must exceed 4 standard errors = 4 * sigma * sqrt(2/4).

    The reward is a noise-free line: sigma = 0, so it counts as rising from the first full window (step 7).
    Gold at step 14, window steps 7..14 = [.5 .5 .5 .5 | .5 .45 .4 .35]: change = .425 - .5 = -0.075.
    Its least-squares line leaves residuals with sigma = 0.0330 (RSS 0.00655 over 6 degrees of freedom), so
    4 standard errors = 4 * 0.0330 * 0.707 = 0.0934 > 0.075: no fall yet.
    Step 15, window 8..15 = [.5 .5 .5 .5 | .45 .4 .35 .3]: change = .375 - .5 = -0.125; the window is step 14's
    reflected, so sigma is the same and 0.125 > 0.0934: the gold falls while the reward rises -> warn at step 15.
    The fall goes on to step 39, but the episode warns once.
    """
    watch = TrainingWatch(
        WatchBlock(window=WINDOW, gold="exact_match", stop_on_warning=stop_on_warning), MAX_NEW_TOKENS
    )
    found = drive(watch, range(40), hacking)
    assert kinds(found) == [(15, "reward_hacking")]
    warning = found[0][1]
    assert warning.stops is stop_on_warning
    # Half means: reward steps 8..11 -> 0.2 + 0.02 * 9.5 = 0.39, steps 12..15 -> 0.47; gold 0.5 -> 0.375.
    assert warning.message.startswith(
        "step 15: the reward is rising while the gold reward falls (reward 0.39 -> 0.47, gold 0.5 -> 0.375 over the last 8 steps)"
    )
    assert "kl_coef" in warning.message and "unfinished_penalty" in warning.message


def test_flat_noisy_series_gives_no_hacking_warning() -> None:
    """Reward and gold flat with independent noise (seed 0) for 500 steps: the halves' means wander, but never
    by 4 standard errors in opposite directions at once. The same noise with a real trend is caught."""

    def run(slope: float) -> list[tuple[int, str]]:
        rng = random.Random(0)
        watch = TrainingWatch(WatchBlock(window=WINDOW, gold="exact_match"), MAX_NEW_TOKENS)
        return kinds(
            drive(
                watch,
                range(500),
                lambda step: {
                    "reward": 0.5 + slope * step + rng.gauss(0, 0.05),
                    "gold_reward": 0.5 - slope * step + rng.gauss(0, 0.05),
                },
            )
        )

    assert run(0.0) == []
    trending = run(0.03)
    assert trending and trending[0][1] == "reward_hacking" and trending[0][0] < 60


def test_negative_kl_warns_once_per_episode() -> None:
    """-0.2 opens an episode, -0.3 continues it, -0.04 is within the 0.05 tolerance and closes it, -0.2 reopens."""
    kls = [0.1, -0.2, -0.3, -0.04, -0.2, -0.2, 0.0]
    watch = TrainingWatch(WatchBlock(window=WINDOW, stop_on_warning=True), MAX_NEW_TOKENS)
    found = drive(watch, range(len(kls)), lambda step: {"kl": kls[step]})
    assert kinds(found) == [(1, "negative_kl"), (4, "negative_kl")]
    first = found[0][1]
    assert first.message.startswith("step 1: the KL to the reference is negative (-0.2 nats per response")
    for cause in ("temperature", "top-p", "chat template", "dropout", "precision", "k1"):
        assert cause in first.message
    assert not first.stops  # a measurement problem, not a run getting worse: it never stops the run


def test_kl_runaway_warns_past_the_limit() -> None:
    """KL = step, kl_limit = 10: 10 is not past the limit, 11 is."""
    watch = TrainingWatch(WatchBlock(window=WINDOW, kl_limit=10.0, stop_on_warning=True), MAX_NEW_TOKENS)
    found = drive(watch, range(20), lambda step: {"kl": float(step)})
    assert kinds(found) == [(11, "kl_runaway")]
    assert found[0][1].stops
    assert found[0][1].message.startswith("step 11: the KL to the reference is running away (11 nats per response")
    assert "ppo_epochs" in found[0][1].message


def test_length_runaway_against_the_first_window() -> None:
    """Baseline: 100 tokens over steps 0..7. Then +10 per step: 200 at step 17 (not above 2 x 100), 210 at step 18
    and rising (a noise-free line) -> warn at 18. From step 22 the length stays at 250: once the window is all 250s
    it is no longer rising and the episode closes (a longer but stable policy is not a runaway). Growth resumes at
    step 40 (+10 per step): the window 36..43 = [250 250 250 250 | 260 270 280 290] is the hacking test's gold
    window of step 15 mirrored and scaled, so it counts as rising first at step 43 -> a second warning there."""

    def length_at(step: int) -> float:
        if step <= 39:
            return 100.0 if step <= 7 else min(100.0 + 10 * (step - 7), 250.0)
        return 250.0 + 10 * (step - 39)

    watch = TrainingWatch(WatchBlock(window=WINDOW, stop_on_warning=True), MAX_NEW_TOKENS)
    found = drive(watch, range(60), lambda step: {"response_length": length_at(step)})
    assert kinds(found) == [(18, "length_runaway"), (43, "length_runaway")]
    assert found[0][1].stops
    assert found[0][1].message.startswith("step 18: the responses are running long (mean length 210 tokens, 2.1x")


def test_length_runaway_compares_with_the_fixed_baseline_not_a_moving_one() -> None:
    """Growth of 4% per step never doubles within one window, but passes 2x the first window's mean: with a
    baseline that moved along it would never warn."""
    watch = TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS)
    found = drive(watch, range(60), lambda step: {"response_length": 100.0 * 1.04**step})
    # Baseline = mean of 100 * 1.04**k for k < 8 = 100 * (1.04**8 - 1) / (0.04 * 8) = 115.18; 2x = 230.36;
    # 100 * 1.04**21 = 227.9, 100 * 1.04**22 = 237.0 (and the curve rises far beyond its slight bend).
    assert kinds(found) == [(22, "length_runaway")]


def test_unfinished_share_rising_past_half_is_a_length_runaway() -> None:
    """Baseline share 0.1 (steps 0..7); 0.7 at step 8 -> length_runaway and no_eos at step 8. A policy that never
    stopped from the start gives no_eos only: nothing ran away."""
    watch = TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS)
    found = drive(watch, range(12), lambda step: {"unfinished_share": 0.1 if step < 8 else 0.7})
    assert kinds(found) == [(8, "length_runaway"), (8, "no_eos")]
    assert "rose from 0.10 over the first 8 steps to 0.70" in found[0][1].message

    from_start = TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS)
    assert kinds(drive(from_start, range(12), lambda step: {"unfinished_share": 0.7})) == [(0, "no_eos")]


def test_no_eos_warns_when_most_responses_are_cut() -> None:
    shares = [0.1, 0.6, 0.7, 0.4, 0.8]
    watch = TrainingWatch(WatchBlock(window=WINDOW, stop_on_warning=True), MAX_NEW_TOKENS)
    found = drive(watch, range(len(shares)), lambda step: {"unfinished_share": shares[step]})
    assert kinds(found) == [(1, "no_eos"), (4, "no_eos")]
    message = found[0][1].message
    assert message.startswith("step 1: most responses never end (60% were cut at max_new_tokens=64")
    assert "reward.unfinished_penalty" in message and "end-of-turn token" in message
    assert not found[0][1].stops


@pytest.mark.parametrize(
    ("metrics", "seen"),
    [
        (
            [{"distinct_share": 0.9}, {"distinct_share": 0.5}, {"distinct_share": 0.05}, {"distinct_share": 0.02}],
            "only 5% of responses distinct",
        ),
        ([{"entropy": 1.0}, {"entropy": 0.3}, {"entropy": 0.04}, {"entropy": 0.01}], "entropy 0.04 nats per token"),
    ],
)
def test_collapse_warns_on_few_distinct_answers_or_low_entropy(metrics: list[Metrics], seen: str) -> None:
    """min_distinct_share 0.1 and entropy 0.05 nats: step 2 crosses, step 3 stays collapsed (no second line)."""
    watch = TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS)
    found = drive(watch, range(len(metrics)), lambda step: metrics[step])
    assert kinds(found) == [(2, "collapse")]
    message = found[0][1].message
    assert message.startswith("step 2: the policy is collapsing to one answer (") and seen in message
    assert "entropy_coef" in message and "mode collapse" in message


def test_missing_keys_skip_checks() -> None:
    """No metrics: no warnings and no error. A reward without a gold reward cannot be called hacking. A step with
    the KL missing (or NaN) neither continues nor closes the negative-KL episode: no second warning."""
    assert drive(TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS), range(30), lambda step: {}) == []

    no_gold = TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS)
    assert drive(no_gold, range(40), lambda step: {"reward": hacking(step)["reward"]}) == []

    kls: list[Metrics] = [{"kl": -0.2}, {}, {"kl": math.nan}, {"kl": -0.2}]
    gaps = TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS)
    assert kinds(drive(gaps, range(4), lambda step: kls[step])) == [(0, "negative_kl")]


def resumable(step: int) -> Metrics:
    """Hacking from step 15, a negative-KL episode over steps 9..12, length doubling by step 18."""
    return {
        **hacking(step),
        "kl": -0.2 if 9 <= step <= 12 else 0.5,
        "response_length": 100.0 if step <= 7 else 100.0 + 10 * (step - 7),
    }


@pytest.mark.parametrize("resume_at", [3, 10, 15, 30])
def test_state_dict_round_trip_continues_like_an_uninterrupted_watch(resume_at: int) -> None:
    """Resume inside the length baseline (3), inside the negative-KL episode (10), on the hacking step (15), and
    late (30): through json, the resumed watch gives exactly the warnings of the uninterrupted one."""
    config = WatchBlock(window=WINDOW, gold="exact_match", stop_on_warning=True)
    uninterrupted = drive(TrainingWatch(config, MAX_NEW_TOKENS), range(40), resumable)
    assert kinds(uninterrupted) == [(9, "negative_kl"), (15, "reward_hacking"), (18, "length_runaway")]

    before = TrainingWatch(config, MAX_NEW_TOKENS)
    found = drive(before, range(resume_at), resumable)
    after = TrainingWatch(config, MAX_NEW_TOKENS)
    after.load_state_dict(json.loads(json.dumps(before.state_dict())))
    found += drive(after, range(resume_at, 40), resumable)
    assert found == uninterrupted
    assert after.state_dict() == json.loads(json.dumps(after.state_dict()))


def test_load_state_dict_rejects_a_foreign_state() -> None:
    watch = TrainingWatch(WatchBlock(window=WINDOW), MAX_NEW_TOKENS)
    with pytest.raises(ValueError, match="version"):
        watch.load_state_dict({"pairs": []})
    state = watch.state_dict()
    with pytest.raises(ValueError, match="unknown warning kinds"):
        watch.load_state_dict({**state, "active": ["vibes"]})
    with pytest.raises(ValueError, match="malformed"):
        watch.load_state_dict({**state, "lengths": None})


def test_rollout_metrics_hand_derived() -> None:
    """Two responses of 2 and 1 tokens. Rewards [1, 3]: mean 2, population std 1; the two sources' terms are
    logged apart (three entries with the total). Lengths 1.5; one of two unfinished; one distinct text of two.
    Advantages [1, 2 | 3] → token mean 2. k1 = old − ref = [1, 1 | 0.5] (the padded 9 is masked) → 2.5 over two
    responses. Gold total 1 over 1 scorable response. Explained variance of values [1, 2 | 2] for returns
    [1, 2 | 3]: residuals [0, 0, 1] (unbiased var 1/3) over the returns' var 1 → 2/3. Without old log-probs (the
    on-policy rollout), a gold reward or a critic, those three are not recorded; one source's term is not either."""
    rewards, texts, finished = torch.tensor([1.0, 3.0]), ["a", "a"], torch.tensor([True, False])
    mask, advantages = torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    terms = {"total": [1.0, 3.0], "model": [0.5, 1.0], "function": [0.5, 2.0]}
    old_logps, ref_logps = torch.zeros(2, 2), torch.tensor([[-1.0, -1.0], [-0.5, 9.0]])
    returns, values = torch.tensor([[1.0, 2.0], [3.0, 0.0]]), torch.tensor([[1.0, 2.0], [2.0, 0.0]])
    metrics = rollout_metrics(
        rewards, terms, texts, finished, mask, advantages, old_logps, ref_logps, (1.0, 1), values, returns
    ).values()
    expected = {
        "kl": 1.25,
        "reward": 2.0,
        "reward_std": 1.0,
        "response_length": 1.5,
        "unfinished_share": 0.5,
        "distinct_share": 0.5,
        "advantage": 2.0,
        "reward_model": 0.75,
        "reward_function": 1.25,
        "gold_reward": 1.0,
        "value_explained_variance": 2 / 3,
    }
    assert list(metrics) == list(expected)
    assert metrics == pytest.approx(expected, rel=1e-6)
    one_source = {"total": [1.0, 3.0], "function": [1.0, 3.0]}
    bare = rollout_metrics(rewards, one_source, texts, finished, mask, advantages, None, ref_logps, None).values()
    assert list(bare) == ["reward", "reward_std", "response_length", "unfinished_share", "distinct_share", "advantage"]
