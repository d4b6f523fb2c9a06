"""Online-RL math (posttrain/rl.py): hand-derived values (the arithmetic in each docstring), reference loops,
properties, and parity with TRL 1.16 where TRL exposes a pure function.

Parity: TRL 1.16 has no PPO trainer (so no GAE, value loss or KL controller to compare against) and computes GRPO's
advantages inline in ``GRPOTrainer._generate_and_score_completions``, a method that generates and scores
completions, so it cannot be called on bare tensors. ``test_group_advantages_match_trl`` therefore transcribes that
method's few lines for ``scale_rewards="group"`` around TRL's own pure ``nanstd``, which pins the part that matters (the
Bessel-corrected std); ``entropy_from_logits`` is compared with TRL's pure function of the same name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
from torch.testing import assert_close

from posttrain.rl import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    discounted_returns,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_estimate,
    leave_one_out_advantages,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    policy_loss,
    token_level_rewards,
    value_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
NAN = float("nan")


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _mask(lengths: list[int] | torch.Tensor, length: int) -> torch.Tensor:
    """Right-padded float mask: row b is 1 on its first ``lengths[b]`` positions."""
    return (torch.arange(length) < torch.as_tensor(lengths).unsqueeze(-1)).float()


def _ratios(*ratios: float) -> torch.Tensor:
    """Log-probs whose ratio to old log-probs of 0 is ``ratios``."""
    return torch.tensor([[math.log(ratio) for ratio in ratios]])


# --- Masked statistics -----------------------------------------------------------------------------------------------


def test_masked_sum_and_mean_hand_derived() -> None:
    """values [[1, 2, NaN], [4, NaN, NaN]], lengths [2, 1] (NaN only off the mask).
    All entries: sum 1 + 2 + 4 = 7, mean 7/3. Per row (dim=1): sums [3, 4], means [3/2, 4].
    Per column (dim=0): sums [5, 2, 0], means [5/2, 2, 0] (the empty column gives 0)."""
    values = torch.tensor([[1.0, 2.0, NAN], [4.0, NAN, NAN]])
    mask = _mask([2, 1], 3)
    assert_close(masked_sum(values, mask), torch.tensor(7.0))
    assert_close(masked_mean(values, mask), torch.tensor(7 / 3))
    assert_close(masked_sum(values, mask, dim=1), _t(3.0, 4.0))
    assert_close(masked_mean(values, mask, dim=1), _t(1.5, 4.0))
    assert_close(masked_sum(values, mask, dim=0), _t(5.0, 2.0, 0.0))
    assert_close(masked_mean(values, mask, dim=0), _t(2.5, 2.0, 0.0))


def test_masked_mean_of_empty_mask_is_zero() -> None:
    """No tokens at all: the mean is 0, not 0/0 = NaN; so is an empty row's."""
    values = torch.full((2, 3), NAN)
    mask = torch.zeros(2, 3)
    assert_close(masked_mean(values, mask), torch.tensor(0.0))
    assert_close(masked_mean(values, mask, dim=-1), _t(0.0, 0.0))
    assert_close(masked_var(values, mask), torch.tensor(0.0))


def test_masked_var_hand_derived() -> None:
    """Masked-in [1, 3, 5] (a 1e9 off the mask): mean 3, squared deviations 4 + 0 + 4 = 8;
    unbiased 8/2 = 4, biased 8/3. One entry: no spread to measure → 0 (both forms)."""
    values = torch.tensor([[1.0, 3.0], [5.0, 1e9]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert_close(masked_var(values, mask), torch.tensor(4.0))
    assert_close(masked_var(values, mask, unbiased=False), torch.tensor(8 / 3))
    single = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert_close(masked_var(values, single), torch.tensor(0.0))
    assert_close(masked_var(values, single, unbiased=False), torch.tensor(0.0))


def test_masked_whiten_hand_derived() -> None:
    """Masked-in [1, 3, 5]: mean 3, unbiased var 4, std 2 → (v − 3)/2 = [−1, 0, 1] (eps = 1e-8 changes the 9th digit).
    shift_mean=False adds the mean back: [2, 3, 4]. Off the mask (a 1e9 there): 0."""
    values = torch.tensor([[1.0, 3.0, 5.0, 1e9]])
    mask = _mask([3], 4)
    assert_close(masked_whiten(values, mask), _t(-1.0, 0.0, 1.0, 0.0).unsqueeze(0))
    assert_close(masked_whiten(values, mask, shift_mean=False), _t(2.0, 3.0, 4.0, 0.0).unsqueeze(0))


def test_masked_whiten_gives_zero_mean_unit_variance() -> None:
    """On random right-padded batches the whitened masked-in entries have mean 0 and unbiased variance 1."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=generator) * 3 + 2
    mask = _mask([7, 3, 0, 5, 1], 7)
    whitened = masked_whiten(values, mask)
    assert_close(masked_mean(whitened, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(masked_var(whitened, mask), torch.tensor(1.0))
    kept_mean = masked_whiten(values, mask, shift_mean=False)
    assert_close(masked_mean(kept_mean, mask), masked_mean(values, mask))


# --- KL estimators ---------------------------------------------------------------------------------------------------


def test_kl_estimators_hand_derived() -> None:
    """Log-ratios x = log π − log π_ref of ln 2, −ln 2, 0:
    k1 = x: [ln 2, −ln 2, 0].  k2 = x²/2: [(ln 2)²/2, (ln 2)²/2, 0].
    k3 = e^{−x} + x − 1: x = ln 2 → 1/2 + ln 2 − 1 = ln 2 − 1/2; x = −ln 2 → 2 − ln 2 − 1 = 1 − ln 2; x = 0 → 0."""
    ref_logps = _t(-3.0, -3.0, -3.0)
    logps = ref_logps + _t(LN2, -LN2, 0.0)
    assert_close(kl_estimate(logps, ref_logps), _t(LN2, -LN2, 0.0))
    assert_close(kl_estimate(logps, ref_logps, "k2"), _t(LN2**2 / 2, LN2**2 / 2, 0.0))
    assert_close(kl_estimate(logps, ref_logps, "k3"), _t(LN2 - 0.5, 1 - LN2, 0.0))
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_kl_estimate_rejects_unknown_estimator() -> None:
    with pytest.raises(ValueError, match=r"'k4'.*\['k1', 'k2', 'k3'\]"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_k3_is_non_negative_finite_and_accurate_near_zero() -> None:
    """k3 ≥ 0 for log-ratios spanning 1e-8 to 1e2 in size, finite at ±1e4 (clamped at 20 nats: e^20 − 20 − 1 for
    π_ref ≫ π, e^{−20} + 20 − 1 ≈ 19 for π ≫ π_ref), and for x = 1e-4 equal to x²/2 = 5e-9 to 0.1 % (exp(x) − x − 1 in
    float32 gives 0 there)."""
    generator = torch.Generator().manual_seed(0)
    log_ratios = torch.randn(100_000, generator=generator) * torch.logspace(-8, 2, 100_000)
    k3 = kl_estimate(log_ratios, torch.zeros_like(log_ratios), "k3")
    assert bool((k3 >= 0).all()) and bool(torch.isfinite(k3).all())
    extreme = kl_estimate(_t(-1e4, 1e4), torch.zeros(2), "k3")
    assert_close(extreme, _t(math.exp(20) - 21, math.exp(-20) + 19))
    assert_close(kl_estimate(_t(1e-4), _t(0.0), "k3"), _t(5e-9), rtol=1e-3, atol=0)


def test_kl_estimators_sample_means_approximate_the_true_kl() -> None:
    """100 000 tokens from π = [.4, .3, .15, .1, .05], π_ref = [.1, .2, .3, .25, .15]: KL(π‖π_ref) ≈ 0.4256.
    Measured with this seed: k1's mean is off by 4e-4 (standard error 0.0029), k3's by 1e-3 (s.e. 0.0008); the
    tolerances are about 4 standard errors. k2 is biased: its mean estimates E[x²]/2 ≈ 0.518, not the KL."""
    pi, ref = _t(0.4, 0.3, 0.15, 0.1, 0.05), _t(0.1, 0.2, 0.3, 0.25, 0.15)
    true_kl = float((pi * (pi / ref).log()).sum())
    generator = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(pi, 100_000, replacement=True, generator=generator)
    logps, ref_logps = pi.log()[tokens], ref.log()[tokens]
    assert kl_estimate(logps, ref_logps, "k1").mean().item() == pytest.approx(true_kl, abs=0.012)
    assert kl_estimate(logps, ref_logps, "k3").mean().item() == pytest.approx(true_kl, abs=0.0035)
    half_second_moment = float((pi * (pi / ref).log() ** 2).sum()) / 2
    assert kl_estimate(logps, ref_logps, "k2").mean().item() == pytest.approx(half_second_moment, abs=0.005)
    assert half_second_moment - true_kl > 0.05


def test_kl_estimator_gradients_in_expectation() -> None:
    """As loss terms on tokens sampled from π (π's probabilities held fixed as the sampling weights), exactly over a
    categorical π = softmax(θ): E[∇k1] = 0, E[∇k2] = ∇KL(π‖π_ref), E[∇k3] = ∇KL(π_ref‖π) (the module docstring's
    claim: k3 pulls towards the reference through the *forward* KL)."""
    generator = torch.Generator().manual_seed(1)
    ref_logps = torch.log_softmax(torch.randn(6, generator=generator), dim=0)
    theta = torch.randn(6, generator=generator, requires_grad=True)

    def expected_gradient(estimator: str) -> torch.Tensor:
        logps = torch.log_softmax(theta, dim=0)
        weights = logps.exp().detach()
        (gradient,) = torch.autograd.grad((weights * kl_estimate(logps, ref_logps, estimator)).sum(), theta)
        return gradient

    def true_gradient(reverse: bool) -> torch.Tensor:
        logps = torch.log_softmax(theta, dim=0)
        if reverse:
            kl = (logps.exp() * (logps - ref_logps)).sum()
        else:
            kl = (ref_logps.exp() * (ref_logps - logps)).sum()
        (gradient,) = torch.autograd.grad(kl, theta)
        return gradient

    assert_close(expected_gradient("k1"), torch.zeros(6), atol=1e-6, rtol=0)
    assert_close(expected_gradient("k2"), true_gradient(reverse=True))
    assert_close(expected_gradient("k3"), true_gradient(reverse=False))


def test_token_level_rewards_hand_derived() -> None:
    """kl_coef 1/2, scores [1, 2, 3], lengths [3, 1, 0]:
    row 0: −kl/2 = [−0.1, −0.2, −1], score 1 at position 2 → [−0.1, −0.2, 0];
    row 1: [−0.2] + 2 at position 0 → [1.8, 0, 0] (NaN KL on its padding ignored);
    row 2: empty → zeros (its score 3 is dropped)."""
    kl = torch.tensor([[0.2, 0.4, 2.0], [0.4, NAN, NAN], [NAN, 5.0, 5.0]])
    rewards = token_level_rewards(_t(1.0, 2.0, 3.0), kl, _mask([3, 1, 0], 3), kl_coef=0.5)
    assert_close(rewards, torch.tensor([[-0.1, -0.2, 0.0], [1.8, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# --- Advantages ------------------------------------------------------------------------------------------------------


def test_gae_hand_derived() -> None:
    """γ = 1/2, λ = 1/2 (γλ = 1/4).
    Row 0, rewards [0, 0, 1], values [1, 2, 2], length 3:
      δ2 = 1 + 0 − 2 = −1 (V after the last token is 0); δ1 = 0 + 2/2 − 2 = −1; δ0 = 0 + 2/2 − 1 = 0.
      A2 = −1; A1 = −1 + (−1)/4 = −1.25; A0 = 0 + (−1.25)/4 = −0.3125. Returns A + V = [0.6875, 0.75, 1].
    Row 1, rewards [1, 2, ·], values [2, 4, 1e9], length 2 (padding holds garbage):
      δ1 = 2 + 0 − 4 = −2; δ0 = 1 + 4/2 − 2 = 1. A = [1 − 2/4, −2] = [0.5, −2]; returns [2.5, 2, 0].
    Row 2, empty: zeros."""
    rewards = torch.tensor([[0.0, 0.0, 1.0], [1.0, 2.0, 1e9], [7.0, 7.0, 7.0]])
    values = torch.tensor([[1.0, 2.0, 2.0], [2.0, 4.0, 1e9], [7.0, 7.0, 7.0]])
    advantages, returns = gae(rewards, values, _mask([3, 2, 0], 3), gamma=0.5, lam=0.5)
    assert_close(advantages, torch.tensor([[-0.3125, -1.25, -1.0], [0.5, -2.0, 0.0], [0.0, 0.0, 0.0]]))
    assert_close(returns, torch.tensor([[0.6875, 0.75, 1.0], [2.5, 2.0, 0.0], [0.0, 0.0, 0.0]]))


def _random_case(seed: int, rows: int = 6, length: int = 9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 rewards and values and a right-padded mask whose lengths include 0 and the full length."""
    generator = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, length, generator=generator, dtype=torch.float64)
    values = torch.randn(rows, length, generator=generator, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (rows,), generator=generator)
    lengths[0], lengths[1] = 0, length
    return rewards, values, _mask(lengths, length).double()


def _gae_loop(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE written as the textbook loop, one row and one token at a time."""
    advantages, returns = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        advantage = 0.0
        for t in reversed(range(length)):
            next_value = float(values[b, t + 1]) if t + 1 < length else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            advantage = delta + gamma * lam * advantage
            advantages[b, t] = advantage
            returns[b, t] = advantage + float(values[b, t])
    return advantages, returns


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_reference_loop(seed: int, gamma: float, lam: float) -> None:
    rewards, values, mask = _random_case(seed)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    expected_advantages, expected_returns = _gae_loop(rewards, values, mask, gamma, lam)
    assert_close(advantages, expected_advantages)
    assert_close(returns, expected_returns)


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_lambda_one_is_discounted_returns_minus_values(seed: int) -> None:
    """λ = 1 telescopes: A_t = Σ_k γ^k r_{t+k} − V_t, the Monte-Carlo return minus the baseline."""
    rewards, values, mask = _random_case(seed)
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=1.0)
    expected_returns = discounted_returns(rewards, mask, gamma=0.9)
    assert_close(advantages, (expected_returns - values) * mask)
    assert_close(returns, expected_returns)


@pytest.mark.parametrize("seed", [0, 1])
def test_gae_lambda_zero_is_one_step_td_error(seed: int) -> None:
    """λ = 0: A_t = δ_t = r_t + γ·V_{t+1} − V_t, with V_{t+1} = 0 at each row's last token."""
    rewards, values, mask = _random_case(seed)
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    expected = (rewards + 0.9 * next_values - values) * mask
    advantages, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    assert_close(advantages, expected)


def test_gae_accepts_an_empty_response_axis() -> None:
    """R = 0 (every response empty) gives empty outputs rather than an indexing error."""
    advantages, returns = gae(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), 1.0, 0.95)
    assert advantages.shape == returns.shape == (2, 0)


def test_discounted_returns_hand_derived() -> None:
    """γ = 1/2, rewards [1, 0, 2] then padding: G2 = 2, G1 = 0 + 2/2 = 1, G0 = 1 + 1/2 = 1.5, 0 on the padding.
    γ = 1 (the default): G = [3, 2, 2]."""
    rewards = torch.tensor([[1.0, 0.0, 2.0, 1e9]])
    mask = _mask([3], 4)
    assert_close(discounted_returns(rewards, mask, gamma=0.5), torch.tensor([[1.5, 1.0, 2.0, 0.0]]))
    assert_close(discounted_returns(rewards, mask), torch.tensor([[3.0, 2.0, 2.0, 0.0]]))


def test_group_advantages_hand_derived() -> None:
    """Groups of 3: [0, 2, 4]: mean 2, Bessel std sqrt((4 + 0 + 4)/2) = 2 → [−1, 0, 1];
    [1, 1, 1]: std 0 → [0, 0, 0]; [3, 6, 9]: mean 6, std sqrt((9 + 0 + 9)/2) = 3 → [−1, 0, 1] (eps 1e-6 aside).
    Dr.GRPO (no std): [−2, 0, 2, 0, 0, 0, −3, 0, 3]."""
    scores = _t(0.0, 2.0, 4.0, 1.0, 1.0, 1.0, 3.0, 6.0, 9.0)
    assert_close(group_advantages(scores, 3), _t(-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0))
    assert_close(group_advantages(scores, 3, scale_by_std=False), _t(-2.0, 0.0, 2.0, 0.0, 0.0, 0.0, -3.0, 0.0, 3.0))


def test_leave_one_out_advantages_hand_derived() -> None:
    """Group [0, 2, 4]: 0 − (2 + 4)/2 = −3, 2 − (0 + 4)/2 = 0, 4 − (0 + 2)/2 = 3. Group of 2 [1, 5]: [−4, 4]."""
    assert_close(leave_one_out_advantages(_t(0.0, 2.0, 4.0), 3), _t(-3.0, 0.0, 3.0))
    assert_close(leave_one_out_advantages(_t(1.0, 5.0, 5.0, 1.0), 2), _t(-4.0, 4.0, 4.0, -4.0))


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_baselines_properties(group_size: int) -> None:
    """For GRPO, Dr.GRPO and RLOO: each group's advantages sum to 0; a constant group gives 0;
    RLOO = G/(G−1)·(r − group mean) = G/(G−1) times Dr.GRPO's."""
    generator = torch.Generator().manual_seed(group_size)
    scores = torch.randn(6 * group_size, generator=generator, dtype=torch.float64)
    scores[:group_size] = 0.7
    advantages = {
        "grpo": group_advantages(scores, group_size),
        "dr_grpo": group_advantages(scores, group_size, scale_by_std=False),
        "rloo": leave_one_out_advantages(scores, group_size),
    }
    for name, values in advantages.items():
        grouped = values.view(-1, group_size)
        assert_close(grouped.sum(dim=1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0, msg=name)
        assert_close(grouped[0], torch.zeros(group_size, dtype=torch.float64), atol=1e-12, rtol=0, msg=name)
    assert_close(advantages["rloo"], group_size / (group_size - 1) * advantages["dr_grpo"])


@pytest.mark.parametrize("score", [5.3, 2 / 3, 0.3 - 0.5, -7.1, 1e4 / 3])
@pytest.mark.parametrize("group_size", [2, 5, 8, 16])
def test_equal_scores_give_exactly_zero_advantage_in_float32(score: float, group_size: int) -> None:
    """A group whose samples all scored the same carries no signal: advantage exactly 0, in the float32 the recipe
    uses. (The float32 group mean of eight 5.3s is off by one ulp, and dividing by a std of ~1 ulp + 1e-6 used to
    give +0.316 to every sample.) The dtype stays float32."""
    scores = torch.full((3 * group_size,), score, dtype=torch.float32)
    for function in (group_advantages, leave_one_out_advantages):
        advantages = function(scores, group_size)
        assert advantages.dtype == torch.float32
        assert torch.equal(advantages, torch.zeros_like(scores)), (function.__name__, advantages)
    assert torch.equal(group_advantages(scores, group_size, scale_by_std=False), torch.zeros_like(scores))
    assert torch.equal(group_advantages(torch.full((8,), 5.3), 8), torch.zeros(8))


def test_loss_aggregations_hand_derived() -> None:
    """Per-token losses [[1, 2, 3, ·], [4, ·, ·, ·]] (· off the mask, NaN here), max_new_tokens 4:
    token_mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5; sequence_mean: (6/3 + 4/1) / 2 responses = 3;
    sum_over_max_tokens (Dr. GRPO): (6/4 + 4/4) / 2 responses = 1.25 — the long response's tokens weigh as much
    as the short one's (1/8 each), where sequence_mean gives them 1/6 against 1/2."""
    nan = math.nan
    token_loss = _t([1.0, 2.0, 3.0, nan], [4.0, nan, nan, nan])
    mask = _t([1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    expected = {"token_mean": (4, 2.5), "sequence_mean": (2, 3.0), "sum_over_max_tokens": (2, 1.25)}
    assert set(expected) == set(LOSS_AGGREGATIONS)
    for name, (normaliser, value) in expected.items():
        assert {"token": 4, "response": 2}[LOSS_AGGREGATIONS[name].per] == normaliser, name
        assert_close(aggregate_loss(token_loss, mask, name, normaliser, max_tokens=4), torch.tensor(value), msg=name)
        # Two micro-batches of one response each, divided by the update's normaliser, add up to the whole.
        halves = sum(aggregate_loss(token_loss[i : i + 1], mask[i : i + 1], name, normaliser, 4) for i in range(2))
        assert_close(halves, torch.tensor(value), msg=name)
    # The gradient per token: Dr. GRPO gives every token 1/(responses x max_new_tokens), whatever its length.
    leaf = torch.zeros(2, 4, requires_grad=True)
    aggregate_loss(leaf, mask, "sum_over_max_tokens", 2, 4).backward()
    assert_close(leaf.grad, mask / 8)


def test_loss_aggregation_names_match_the_config() -> None:
    """The config's choices are exactly the registry's entries."""
    from typing import get_args

    from posttrain.config import AlgorithmBlock

    assert set(get_args(AlgorithmBlock.model_fields["loss_aggregation"].annotation)) == set(LOSS_AGGREGATIONS)


@pytest.mark.parametrize("function", [group_advantages, leave_one_out_advantages])
def test_group_functions_validate_group_size(function: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="at least 2"):
        function(_t(1.0, 2.0), 1)
    with pytest.raises(ValueError, match="groups of group_size=4"):
        function(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="1-D"):
        function(torch.zeros(2, 4), 2)


# --- Policy loss -----------------------------------------------------------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_advantage() -> None:
    """logps = old_logps: ρ = 1, inside any clip range, so the loss is −A and nothing is clipped."""
    logps = torch.tensor([[-1.0, -2.0, -0.5]])
    advantages = torch.tensor([[2.0, -3.0, 0.0]])
    loss, clipped = policy_loss(logps, logps.clone(), advantages, torch.ones(1, 3))
    assert_close(loss, torch.tensor([[-2.0, 3.0, 0.0]]))
    assert_close(clipped, torch.zeros(1, 3))


def test_policy_loss_clip_hand_derived() -> None:
    """ε = 0.2, range [0.8, 1.2]; loss = max(−Aρ, −A·clip(ρ)).
    A = +2: ρ 1.1 (inside) → −2.2; ρ 1.5 → max(−3, −2.4) = −2.4 clipped; ρ 0.5 → max(−1, −1.6) = −1 (the unclipped
    branch is the pessimistic one: the drop is fully penalised).
    A = −1: ρ 0.9 (inside) → 0.9; ρ 1.5 → max(1.5, 1.2) = 1.5 unclipped; ρ 0.5 → max(0.5, 0.8) = 0.8 clipped.
    Off the mask (NaN log-probs): 0, not clipped."""
    logps = torch.cat([_ratios(1.1, 1.5, 0.5, 0.9, 1.5, 0.5), torch.tensor([[NAN]])], dim=1)
    advantages = torch.tensor([[2.0, 2.0, 2.0, -1.0, -1.0, -1.0, 5.0]])
    loss, clipped = policy_loss(logps, torch.zeros(1, 7), advantages, _mask([6], 7))
    assert_close(loss, torch.tensor([[-2.2, -2.4, -1.0, 0.9, 1.5, 0.8, 0.0]]))
    assert_close(clipped, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]]))


def test_policy_loss_dual_clip_hand_derived() -> None:
    """dual_clip c = 3, ε = 0.2. A = −1: ρ 5 → max(5, 1.2) = 5, capped at −cA = 3 (flagged clipped); ρ 2 → 2 < 3,
    untouched; ρ 0.5 → 0.8 (ordinary clip). A = +1, ρ 5 → max(−5, −1.2) = −1.2: the dual clip is for A < 0 only."""
    logps = _ratios(5.0, 2.0, 0.5, 5.0)
    advantages = torch.tensor([[-1.0, -1.0, -1.0, 1.0]])
    loss, clipped = policy_loss(logps, torch.zeros(1, 4), advantages, torch.ones(1, 4), dual_clip=3.0)
    assert_close(loss, torch.tensor([[3.0, 2.0, 0.8, -1.2]]))
    assert_close(clipped, torch.tensor([[1.0, 0.0, 1.0, 1.0]]))
    plain, _ = policy_loss(logps, torch.zeros(1, 4), advantages, torch.ones(1, 4))
    assert_close(plain, torch.tensor([[5.0, 2.0, 0.8, -1.2]]))


def test_policy_loss_clip_higher_hand_derived() -> None:
    """clip_low 0.2, clip_high 0.28 (DAPO), range [0.8, 1.28]. A = +1: ρ 1.25 → −1.25 unclipped (symmetric ε = 0.2
    would clip it to −1.2); ρ 1.5 → −1.28 clipped. A = −1: ρ 0.75 → max(0.75, 0.8) = 0.8, the low side unchanged."""
    logps = _ratios(1.25, 1.5, 0.75)
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    old, mask = torch.zeros(1, 3), torch.ones(1, 3)
    loss, clipped = policy_loss(logps, old, advantages, mask, clip_low=0.2, clip_high=0.28)
    assert_close(loss, torch.tensor([[-1.25, -1.28, 0.8]]))
    assert_close(clipped, torch.tensor([[0.0, 1.0, 1.0]]))
    symmetric, symmetric_clipped = policy_loss(logps, old, advantages, mask, clip_low=0.2)
    assert_close(symmetric, torch.tensor([[-1.2, -1.2, 0.8]]))
    assert_close(symmetric_clipped, torch.ones(1, 3))


def test_policy_loss_gradient_is_zero_exactly_on_clipped_tokens() -> None:
    """d loss/d logp = −Aρ where the unclipped branch sets the loss and 0 where the clip (or dual clip) does; off the
    mask the NaN log-probs get a 0 gradient, not NaN."""
    ratios = [1.1, 1.5, 0.5, 0.9, 1.5, 0.5, 5.0, 1.0]
    advantages = torch.tensor([[2.0, 2.0, 2.0, -1.0, -1.0, -1.0, -1.0, 3.0]])
    logps = torch.cat([_ratios(*ratios), torch.tensor([[NAN]])], dim=1).requires_grad_()
    advantages = torch.cat([advantages, torch.ones(1, 1)], dim=1)
    loss, clipped = policy_loss(logps, torch.zeros(1, 9), advantages, _mask([8], 9), dual_clip=3.0)
    loss.sum().backward()
    expected = torch.tensor([[-2.2, 0.0, -1.0, 0.9, 1.5, 0.0, 0.0, -3.0, 0.0]])
    assert_close(logps.grad, expected)
    assert_close(clipped, torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    assert bool(((logps.grad == 0) == (clipped.bool() | (advantages == 0) | ~_mask([8], 9).bool())).all())


def test_policy_loss_stays_finite_far_off_policy() -> None:
    """A log-ratio of 200 (ρ would overflow to inf) with A < 0 gives a finite loss and gradient: the log-ratio is
    clamped at 20 nats, so the loss is e^20·|A|."""
    logps = torch.tensor([[200.0]], requires_grad=True)
    loss, _ = policy_loss(logps, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1))
    loss.sum().backward()
    assert_close(loss, torch.tensor([[math.exp(20.0)]]))
    assert bool(torch.isfinite(logps.grad).all())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"clip_low": 1.0}, "0 < clip_low < 1"),
        ({"clip_low": 0.2, "clip_high": 0.0}, "clip_high > 0"),
    ],
)
def test_policy_loss_validates_arguments(options: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), **options)


# --- Value loss ------------------------------------------------------------------------------------------------------


def test_value_loss_hand_derived() -> None:
    """clip_range c = 0.2, V_old = 1 everywhere.
    Token 0: V 1.5, R 2: (V − R)² = 0.25; V_clip = 1 + 0.2 = 1.2, (1.2 − 2)² = 0.64 → ½·0.64 = 0.32, clipped.
    Token 1: V 1.5, R 1: 0.25 vs (1.2 − 1)² = 0.04 → ½·0.25 = 0.125, not clipped.
    Token 2: V 1.1 (inside the clip), R 0.1: both 1 → 0.5, not clipped.
    Token 3: V 0.5, R 0: 0.25 vs (0.8 − 0)² = 0.64 → 0.32, clipped (the clip binds below too).
    Token 4 off the mask (NaN): 0. Without clipping: ½(V − R)² = [0.125, 0.125, 0.5, 0.125, 0]."""
    values = _t(1.5, 1.5, 1.1, 0.5, NAN).unsqueeze(0)
    old_values = _t(1.0, 1.0, 1.0, 1.0, NAN).unsqueeze(0)
    returns = _t(2.0, 1.0, 0.1, 0.0, NAN).unsqueeze(0)
    mask = _mask([4], 5)
    loss, clipped = value_loss(values, old_values, returns, mask, clip_range=0.2)
    assert_close(loss, _t(0.32, 0.125, 0.5, 0.32, 0.0).unsqueeze(0))
    assert_close(clipped, _t(1.0, 0.0, 0.0, 1.0, 0.0).unsqueeze(0))
    unclipped, never = value_loss(values, old_values, returns, mask)
    assert_close(unclipped, _t(0.125, 0.125, 0.5, 0.125, 0.0).unsqueeze(0))
    assert_close(never, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="clip_range must be > 0"):
        value_loss(values, old_values, returns, mask, clip_range=0.0)


# --- Entropy and diagnostics -----------------------------------------------------------------------------------------


def test_entropy_hand_derived() -> None:
    """logits [0, ln 3] → p = [1/4, 3/4]: H = (1/4)·ln 4 + (3/4)·ln(4/3) = ln 4 − (3/4)·ln 3.
    Uniform over V = 7 (any constant logit, here 1e4): ln 7. One logit 1e4 above the rest: p = one-hot, H = 0.
    [1e4, 1e4] → ln 2 exactly (no cancellation between 1e4-sized numbers). A −inf logit is a probability of 0:
    [0, 0, −inf] → ln 2, with a finite gradient."""
    assert_close(entropy_from_logits(_t(0.0, LN3)), torch.tensor(math.log(4) - 0.75 * LN3))
    assert_close(entropy_from_logits(torch.full((2, 3, 7), 1e4)), torch.full((2, 3), math.log(7)))
    assert_close(entropy_from_logits(_t(1e4, 0.0, 0.0, 0.0)), torch.tensor(0.0))
    assert_close(entropy_from_logits(_t(1e4, 1e4)), torch.tensor(LN2), atol=1e-7, rtol=0)
    banned = _t(0.0, 0.0, -math.inf).requires_grad_()
    entropy = entropy_from_logits(banned)
    entropy.backward()
    assert_close(entropy.detach(), torch.tensor(LN2))
    assert bool(torch.isfinite(banned.grad).all())


def test_entropy_computes_in_float32_and_matches_gradient_of_definition() -> None:
    """bf16 logits give float32 entropy equal to the upcast logits'; the gradient matches −Σ p log p by autograd."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=generator) * 4
    entropy = entropy_from_logits(logits.to(torch.bfloat16))
    assert entropy.dtype == torch.float32
    assert_close(entropy, entropy_from_logits(logits.to(torch.bfloat16).float()))
    ours = logits.clone().requires_grad_()
    reference = logits.clone().requires_grad_()
    entropy_from_logits(ours).sum().backward()
    logps = torch.log_softmax(reference, dim=-1)
    (-(logps.exp() * logps).sum(-1)).sum().backward()
    assert_close(ours.grad, reference.grad)


def test_explained_variance_hand_derived() -> None:
    """returns [0, 2] (unbiased var 2). values = returns → residual 0 → 1. values [1, 1] (the mean) → residual
    [−1, 1], var 2 → 1 − 2/2 = 0. values [0.5, 1.5] → residual [−0.5, 0.5], var 0.5 → 1 − 0.5/2 = 0.75.
    A NaN off the mask is ignored. Constant returns [3, 3]: Var = 0, defined as 0 (not NaN)."""
    returns = torch.tensor([[0.0, 2.0, NAN]])
    mask = _mask([2], 3)
    assert_close(explained_variance(returns.clone(), returns, mask), torch.tensor(1.0))
    assert_close(explained_variance(torch.tensor([[1.0, 1.0, NAN]]), returns, mask), torch.tensor(0.0))
    assert_close(explained_variance(torch.tensor([[0.5, 1.5, NAN]]), returns, mask), torch.tensor(0.75))
    constant = explained_variance(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[3.0, 3.0, NAN]]), mask)
    assert_close(constant, torch.tensor(0.0))


def test_explained_variance_of_the_mean_predictor_is_zero() -> None:
    """Predicting every token's return as the batch mean explains none of the variance, on a random padded batch."""
    rewards, _, mask = _random_case(5)
    returns = discounted_returns(rewards, mask)
    values = torch.full_like(returns, float(masked_mean(returns, mask)))
    assert_close(explained_variance(values, returns, mask), torch.tensor(0.0, dtype=torch.float64))


# --- KL controllers --------------------------------------------------------------------------------------------------


def test_fixed_kl_controller_never_moves() -> None:
    controller = FixedKLController(value=0.05)
    controller.update(current_kl=100.0, n_steps=512)
    assert controller.value == 0.05


def test_adaptive_kl_controller_hand_derived() -> None:
    """β = 0.1, target 6, horizon 10 000.
    KL 6.6: e = 6.6/6 − 1 = 0.1, n = 1000 → β·(1 + 0.1·0.1) = 0.1·1.01 = 0.101.
    KL 9: e = 0.5 clipped to 0.2, n = 500 → 0.101·(1 + 0.2·0.05) = 0.101·1.01 = 0.10201.
    KL 0: e = −1 clipped to −0.2, n = 10 000 → 0.10201·0.8 = 0.081608.
    KL 6 (on target): e = 0 → unchanged."""
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10_000)
    controller.update(current_kl=6.6, n_steps=1000)
    assert controller.value == pytest.approx(0.101)
    controller.update(current_kl=9.0, n_steps=500)
    assert controller.value == pytest.approx(0.10201)
    controller.update(current_kl=0.0, n_steps=10_000)
    assert controller.value == pytest.approx(0.081608)
    controller.update(current_kl=6.0, n_steps=10_000)
    assert controller.value == pytest.approx(0.081608)


def test_adaptive_kl_controller_rejects_bad_settings_and_nan() -> None:
    with pytest.raises(ValueError, match="target and horizon must be > 0"):
        AdaptiveKLController(value=0.1, target=0.0, horizon=10)
    controller = AdaptiveKLController(value=0.1, target=6.0, horizon=10)
    with pytest.raises(ValueError, match="must be finite"):
        controller.update(current_kl=NAN, n_steps=1)
    assert controller.value == 0.1


# --- Masked positions are ignored ------------------------------------------------------------------------------------


def _masked_outputs(inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every masked function's outputs on the same inputs."""
    a, b, c = inputs["a"], inputs["b"], inputs["c"]
    outputs = {
        "masked_sum": masked_sum(a, mask),
        "masked_sum_rows": masked_sum(a, mask, dim=1),
        "masked_mean": masked_mean(a, mask),
        "masked_mean_rows": masked_mean(a, mask, dim=1),
        "masked_var": masked_var(a, mask),
        "masked_whiten": masked_whiten(a, mask),
        "masked_whiten_keep_mean": masked_whiten(a, mask, shift_mean=False),
        "token_level_rewards": token_level_rewards(torch.ones(a.shape[0]), a, mask, 0.1),
        "gae": torch.stack(gae(a, b, mask, 0.99, 0.95)),
        "discounted_returns": discounted_returns(a, mask, 0.9),
        "policy_loss": torch.stack(policy_loss(a, b, c, mask, dual_clip=3.0)),
        "value_loss": torch.stack(value_loss(a, b, c, mask, clip_range=0.2)),
        "explained_variance": explained_variance(a, b, mask),
    }
    for estimator in KL_ESTIMATORS:
        outputs[f"kl_{estimator}"] = kl_estimate(a, b, estimator, mask=mask)
    return outputs


@pytest.mark.parametrize("fill", [NAN, 1e9, -math.inf])
def test_masked_functions_ignore_masked_positions(fill: float) -> None:
    """Filling the padding of every input with NaN, 1e9 or −inf changes no output: they equal those on zero padding,
    are finite, and every per-token output is 0 on the padding. The lengths include an empty row."""
    generator = torch.Generator().manual_seed(0)
    mask = _mask([5, 2, 0, 4], 5)
    clean = {name: torch.randn(4, 5, generator=generator) * mask for name in "abc"}
    dirty = {name: torch.where(mask.bool(), value, torch.tensor(fill)) for name, value in clean.items()}
    expected, outputs = _masked_outputs(clean, mask), _masked_outputs(dirty, mask)
    for name, output in outputs.items():
        assert bool(torch.isfinite(output).all()), name
        assert_close(output, expected[name], msg=name)
        if output.shape[-2:] == mask.shape:
            assert bool((output[..., ~mask.bool()] == 0).all()), name


def test_masked_positions_get_no_gradient() -> None:
    """With NaN on the padding, the gradients of the policy and value losses are finite and 0 there."""
    mask = _mask([3, 0], 3)
    padding = ~mask.bool()
    logps = torch.where(mask.bool(), torch.tensor(-1.0), torch.tensor(NAN)).requires_grad_()
    values = torch.where(mask.bool(), torch.tensor(0.1), torch.tensor(NAN)).requires_grad_()
    advantages = torch.where(mask.bool(), torch.tensor(1.0), torch.tensor(NAN))
    loss, _ = policy_loss(logps, torch.full((2, 3), -1.1), advantages, mask)
    critic_loss, _ = value_loss(values, torch.zeros(2, 3), advantages, mask, clip_range=0.2)
    (loss.sum() + critic_loss.sum()).backward()
    for grad in (logps.grad, values.grad):
        assert bool(torch.isfinite(grad).all()) and bool((grad[padding] == 0).all())
        assert bool((grad[mask.bool()] != 0).all())


def test_bool_and_float_masks_agree() -> None:
    rewards, values, mask = _random_case(7)
    for bool_output, float_output in zip(
        (*gae(rewards, values, mask.bool(), 1.0, 0.95), masked_whiten(rewards, mask.bool())),
        (*gae(rewards, values, mask, 1.0, 0.95), masked_whiten(rewards, mask)),
        strict=True,
    ):
        assert_close(bool_output, float_output)


# --- Parity with TRL 1.16 --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl_utils() -> ModuleType:
    """``trl.trainer.utils`` (pure tensor helpers); skips the test when TRL is not installed."""
    pytest.importorskip("trl")
    import trl.trainer.utils

    return trl.trainer.utils


@pytest.mark.parametrize("group_size", [2, 4, 8])
def test_group_advantages_match_trl(trl_utils: ModuleType, group_size: int) -> None:
    """TRL's GRPOTrainer (trl/trainer/grpo_trainer.py, ``scale_rewards="group"``): ``rewards − mean_grouped`` over
    ``nanstd(rewards.view(-1, G), dim=1) + 1e-4``, both repeated per sample; ``nanstd`` is TRL's own function.
    Includes a constant group, where both give 0."""
    generator = torch.Generator().manual_seed(group_size)
    rewards = torch.randint(0, 3, (5 * group_size,), generator=generator).float()
    rewards[:group_size] = 1.0
    mean_grouped = rewards.view(-1, group_size).mean(dim=1).repeat_interleave(group_size)
    std_grouped = trl_utils.nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size)
    expected = (rewards - mean_grouped) / (std_grouped + 1e-4)
    assert_close(group_advantages(rewards, group_size, eps=1e-4), expected, rtol=1e-5, atol=1e-6)


def test_entropy_matches_trl(trl_utils: ModuleType) -> None:
    """``trl.trainer.utils.entropy_from_logits`` (chunked log-softmax) on CPU float32 logits."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, 300, generator=generator) * 5
    assert_close(entropy_from_logits(logits), trl_utils.entropy_from_logits(logits), rtol=1e-5, atol=1e-6)
