"""The math of online RL for LLMs (PPO, GRPO, RLOO, REINFORCE++) as pure functions of tensors. Imports torch only.

Conventions
-----------
Everything per token lives in *action space*: shape ``(B, R)``, B sampled responses, R the longest response's
length; position ``t`` is the t-th generated token (the prompt is not there). ``mask`` is a bool or 0/1 float
``(B, R)`` tensor, true on real response tokens, contiguous from position 0 and right-padded. Masked-out positions
are selected away with ``torch.where``, never multiplied by 0, so NaN or garbage there (padding logits, a reference
model that was not run on pads) cannot leak into outputs or gradients; every per-token output is 0 there. A row
whose mask is empty is allowed: it contributes nothing and gives zeros (``masked_mean`` of nothing is 0, not NaN).

Where each piece is used
------------------------
* Reward shaping (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT): ``token_level_rewards`` puts
  ``-β·KL`` on every token and the reward model's score on the last one; the KL coefficient β is kept fixed or
  steered to a target KL by ``AdaptiveKLController``.
* Advantages: ``gae`` (Schulman et al. 2016) with a learned value function (PPO); ``discounted_returns`` for
  critic-free REINFORCE and REINFORCE++ (Hu 2025, which then whitens them over the batch with ``masked_whiten``);
  ``group_advantages`` for GRPO (Shao et al. 2024, DeepSeekMath) and Dr.GRPO (Liu et al. 2025, no std scaling);
  ``leave_one_out_advantages`` for RLOO (Ahmadian et al. 2024). ``ADVANTAGES`` names each estimator and says what
  it needs (a critic, groups of samples) and whether it is whitened.
* Reward normalisation: ``RunningMoments``, the mean and variance of every reward so far, which
  ``optimised_scores`` divides by. Statistics that span processes (``whiten_over_processes``,
  ``loss_normaliser``) take the run's ``SumOverProcesses``.
* Losses: ``policy_loss``, the clipped surrogate of PPO (Schulman et al. 2017) with DAPO's asymmetric clip-higher
  (Yu et al. 2025) and dual clip (Ye et al. 2020); ``value_loss``, PPO's clipped value loss; ``entropy_from_logits``
  for an entropy bonus or for logging. The per-token losses are returned unreduced; ``LOSS_AGGREGATIONS`` reduces them
  (token mean, sequence mean, or Dr.GRPO's constant normaliser), the recipe's choice.
* KL estimators (Schulman 2020, "Approximating KL divergence"), from tokens sampled from π, of KL(π‖π_ref):
  ``k1 = log π − log π_ref`` is unbiased but high-variance and can be negative per token: the usual choice for the
  KL *penalty in the reward*, whose value matters and which is not differentiated. ``k2 = ½(log π − log π_ref)²`` is
  biased but low-variance; as a *loss term* its gradient equals ∇KL(π‖π_ref) in expectation. ``k3 =
  π_ref/π − log(π_ref/π) − 1`` is unbiased, non-negative and low-variance (GRPO's KL loss term, DeepSeekMath eq. 4);
  note that as a loss its gradient equals ∇KL(π_ref‖π), the *forward* KL, in expectation, and k1's is zero
  (tests/test_rl.py checks all three exactly on a categorical π).
* Diagnostics: ``explained_variance`` of the value head, ``masked_mean`` of KL, entropy, clip fractions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

SumOverProcesses = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over every process of the run (an all-reduce; the identity for one process): statistics that span
the whole rollout take one, so the results do not depend on how many processes share it."""

# Both exp(20) ≈ 4.9e8 and exp(-20) ≈ 2e-9 are far from float32's limits (exp overflows past ~88.7), and a token
# whose policy and reference log-probs differ by 20 nats is an outlier whatever its exact value.
_MAX_LOG_RATIO = 20.0


def _check_shapes(function: str, **tensors: torch.Tensor) -> None:
    shapes = {name: tuple(tensor.shape) for name, tensor in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{function}: expected tensors of one shape (B, R), got {listed}.")


def _select(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` on the mask, 0 elsewhere (a select, so NaN/inf off the mask neither propagates nor gets gradient)."""
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


# --- Masked statistics -----------------------------------------------------------------------------------------------


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``values`` over masked-in entries: a scalar when ``dim`` is None, else reduced along ``dim``."""
    selected = _select(values, mask)
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` over masked-in entries: a scalar when ``dim`` is None, else reduced along ``dim``
    (``dim=-1`` gives each sequence's token mean). An empty mask (or an empty row) gives 0, not NaN, so a batch whose
    responses are all empty does not poison the logged metrics or the loss."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` over all masked-in entries, a scalar; ``unbiased`` applies Bessel's correction n/(n−1).

    With fewer than two entries (one for the biased form) the spread is unobservable and the result is 0 rather than
    NaN; TRL and OpenRLHF raise there instead, which needs a device sync on every call.
    """
    count = mask.bool().sum()
    centred = _select(values - masked_mean(values, mask), mask)
    denominator = count - 1 if unbiased else count
    # With n ≤ 1 the squared deviations sum to exactly 0, so clamping the denominator yields 0.
    return (centred**2).sum() / denominator.clamp(min=1)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(v − mean)/sqrt(var + eps)`` with the mean and (unbiased) variance over masked-in entries; 0 off the mask.

    ``shift_mean=False`` adds the mean back, ``(v − mean)·rsqrt(var + eps) + mean`` (TRL's and OpenRLHF's
    convention): rescales without recentring, as used for rewards whose sign carries meaning. Whitening advantages
    over the batch is PPO's usual normalisation and REINFORCE++'s global baseline (Hu 2025).
    """
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)


def whiten_over_processes(
    values: torch.Tensor, mask: torch.Tensor, sum_over_processes: SumOverProcesses
) -> torch.Tensor:
    """``masked_whiten`` with the mean and unbiased variance of the whole rollout (every process's tokens), so the
    advantages do not depend on how many processes share the rollout."""
    sums = sum_over_processes(
        torch.stack([masked_sum(values, mask), masked_sum(values**2, mask), mask.sum()]).double()
    )
    count = sums[2].clamp(min=2)
    mean = sums[0] / count
    var = (sums[1] - count * mean**2) / (count - 1)
    return ((values - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8)).to(values.dtype) * mask


# --- KL to the reference policy --------------------------------------------------------------------------------------


def _kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return logps - ref_logps


def _kl_k2(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logps - ref_logps) ** 2


def _kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    # Clamped because exp(ref − logp) overflows float32 to inf past 88.7 nats (fp16 past 11), and one inf token turns
    # the loss and every gradient into NaN; a >20-nat gap is a degenerate sample, so capping it loses nothing.
    log_ratio = (ref_logps - logps).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    # expm1(x) − x rather than exp(x) − x − 1: for the small x of a policy near its reference the latter cancels
    # catastrophically in float32 (x = 1e-4: true value 5e-9, exp's rounding error 1e-7). k3 ≥ 0 by convexity of exp;
    # the clamp keeps that true whatever a backend's expm1 rounds to, so a KL metric or loss term is never negative.
    return (torch.expm1(log_ratio) - log_ratio).clamp(min=0)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _kl_k1,
    "k2": _kl_k2,
    "k3": _kl_k3,
}


def kl_estimate(
    logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k1", *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from the log-probs of tokens sampled from π (Schulman 2020).

    ``estimator`` names an entry of ``KL_ESTIMATORS`` (the module docstring says which to use where). With
    ``mask`` the result is 0 off the mask whatever the inputs hold there.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: unknown estimator {estimator!r}; expected one of {sorted(KL_ESTIMATORS)}.")
    kl = KL_ESTIMATORS[estimator](logps, ref_logps)
    return kl if mask is None else _select(kl, mask)


def token_level_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float | torch.Tensor
) -> torch.Tensor:
    """Per-token rewards of RLHF-PPO (Ziegler et al. 2019; InstructGPT): ``−kl_coef·kl`` on every response token,
    plus the sequence score ``scores[b]`` (B,) at row b's last masked-in token, where the reward model judged the
    whole response. A row with an empty mask gets all zeros (its score is dropped). Returns ``(B, R)``."""
    _check_shapes("token_level_rewards", kl=kl, mask=mask)
    rewards = _select(-kl_coef * kl, mask)
    lengths = mask.bool().sum(dim=-1)
    scores = _select(scores.to(rewards.dtype), lengths > 0)
    # An empty row's index is clamped to 0 and its (zeroed) score added there, which leaves the row unchanged.
    last = (lengths - 1).clamp(min=0).unsqueeze(-1)
    return rewards.scatter_add(-1, last, scores.unsqueeze(-1))


# --- Advantages ------------------------------------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016).

    ``δ_t = r_t + γ·V_{t+1} − V_t`` and ``A_t = δ_t + γλ·A_{t+1}``, with V = 0 and A = 0 after a row's last
    masked-in token: the episode ends there (a response truncated at the length limit is treated as terminal too,
    as TRL and OpenRLHF do). ``λ = 1`` gives Monte-Carlo returns minus V; ``λ = 0`` the one-step TD error.
    Returns ``(advantages, returns)``, both ``(B, R)`` and 0 off the mask, ``returns = advantages + values`` being
    the value head's regression target. Gradients flow through ``values`` if it has any: pass detached values.
    """
    _check_shapes("gae", rewards=rewards, values=values, mask=mask)
    keep = mask.bool()
    rewards, values = _select(rewards, keep), _select(values, keep)
    if rewards.shape[-1] == 0:
        return torch.zeros_like(values), torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(values[:, 0])
    advantages_reversed = []
    # Off the mask values are 0, so V_{t+1} after the last token is 0 without tracking lengths; the select keeps A at
    # 0 on padding so the recursion restarts at each row's true end.
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, torch.zeros_like(delta))
        advantages_reversed.append(advantage)
        next_value, next_advantage = values[:, t], advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    return advantages, advantages + values


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Returns-to-go ``G_t = r_t + γ·G_{t+1}`` within each row's mask (REINFORCE; REINFORCE++, Hu 2025), 0 off it.
    This is GAE with V ≡ 0 and λ = 1."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


def _grouped(function: str, scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"{function}: scores must be 1-D (B,), got shape {tuple(scores.shape)}.")
    if group_size < 2:
        raise ValueError(
            f"{function}: group_size must be at least 2, got {group_size}; a group of one sample has no baseline "
            "to compare against (sample several responses per prompt)."
        )
    if scores.shape[0] % group_size != 0:
        raise ValueError(
            f"{function}: {scores.shape[0]} scores do not split into groups of group_size={group_size}; lay them "
            "out as contiguous groups of group_size samples of the same prompt."
        )
    # Group statistics in float64: the float32 mean of n equal scores is generally off by an ulp, and GRPO's
    # division by a std of ~1 ulp (+ eps) blew that up into a same-sign advantage for the whole group (+0.316 for
    # eight 5.3s), pushing a group that carries no signal up or down. In float64 the sum of n equal float32 values
    # is exact (n < 2^29), so their mean is the value itself and r − mean is exactly 0.
    return scores.view(-1, group_size).double()


def group_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO's outcome-reward advantages (Shao et al. 2024, DeepSeekMath): ``(r − mean_g)/(std_g + eps)`` within each
    group of ``group_size`` samples of one prompt, laid out contiguously in ``scores`` (B,).

    The std has Bessel's correction (``torch.std``'s default, as TRL's GRPOTrainer computes it). A group whose
    samples all scored the same gets advantage exactly 0 (the statistics are taken in float64): it carries no
    signal. ``scale_by_std=False`` is Dr.GRPO (Liu et
    al. 2025, "Understanding R1-Zero-Like Training"), ``r − mean_g``: dividing by the std up-weights prompts that are
    nearly always or never solved. TRL uses ``eps = 1e-4``. Returns ``(B,)``; broadcast it over the response tokens.
    """
    grouped = _grouped("group_advantages", scores, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + eps)
    return advantages.reshape(-1).to(scores.dtype)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): ``r_i − mean_{j≠i} r_j`` within each group of
    ``group_size`` samples of one prompt, contiguous in ``scores`` (B,). The baseline excludes the sample itself, so
    the policy gradient stays unbiased; it equals ``G/(G−1)·(r_i − mean_g)``. Returns ``(B,)``."""
    grouped = _grouped("leave_one_out_advantages", scores, group_size)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).reshape(-1).to(scores.dtype)


@dataclass(frozen=True)
class AdvantageSettings:
    """What an estimator reads besides the rollout."""

    kl_coef: float
    """β of the per-token KL penalty taken from the reward (0 when the KL is in the loss, or off)."""
    gamma: float = 1.0
    """Discount over response tokens (gae, reinforce++)."""
    lam: float = 0.95
    """GAE's λ."""
    group_size: int = 1
    """Samples per prompt, laid out contiguously (grpo, rloo)."""
    scale_by_std: bool = True
    """grpo: divide by the group's std (False: Dr. GRPO)."""


Advantages = tuple[torch.Tensor, "torch.Tensor | None"]  # (advantages (B, R), returns (B, R) or None)


def _gae_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    settings: AdvantageSettings,
) -> Advantages:
    if values is None:
        raise ValueError("gae: needs the critic's values (B, R); the other estimators need no critic.")
    token_rewards = token_level_rewards(scores, kl, mask, settings.kl_coef)
    return gae(token_rewards, values, mask, settings.gamma, settings.lam)


def _reinforce_pp_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    settings: AdvantageSettings,
) -> Advantages:
    return discounted_returns(token_level_rewards(scores, kl, mask, settings.kl_coef), mask, settings.gamma), None


def _sequence_scores(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """The score of each response minus ``kl_coef`` × its summed KL: the critic-free baselines compare these."""
    return scores - kl_coef * masked_sum(kl, mask, dim=1)


def _grpo_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    settings: AdvantageSettings,
) -> Advantages:
    sequence_scores = _sequence_scores(scores, kl, mask, settings.kl_coef)
    per_response = group_advantages(sequence_scores, settings.group_size, scale_by_std=settings.scale_by_std)
    return per_response[:, None] * mask, None


def _rloo_advantages(
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    settings: AdvantageSettings,
) -> Advantages:
    per_response = leave_one_out_advantages(_sequence_scores(scores, kl, mask, settings.kl_coef), settings.group_size)
    return per_response[:, None] * mask, None


@dataclass(frozen=True)
class AdvantageEstimator:
    """One way of turning a rollout's scores into per-token advantages.

    ``estimate(scores (B,), kl (B, R), mask (B, R), values (B, R) or None, settings)`` returns ``(advantages (B, R),
    returns (B, R) or None)``, the returns being the critic's regression target."""

    estimate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, AdvantageSettings], Advantages]
    needs_critic: bool = False
    """Reads a learned value function's ``values`` and returns its targets (PPO's critic)."""
    needs_groups: bool = False
    """Compares the samples of one prompt: needs at least two per prompt."""
    whitened: bool = False
    """The advantages are whitened over the whole rollout when the recipe asks for it (the caller does it, since
    the statistics may span processes)."""


ADVANTAGES: dict[str, AdvantageEstimator] = {
    # PPO (Schulman et al. 2017): the score at the last token minus the per-token KL, GAE over the critic's values.
    "gae": AdvantageEstimator(_gae_advantages, needs_critic=True, whitened=True),
    # GRPO (Shao et al. 2024): (score − group mean) / group std, the same on every token of a response.
    "grpo": AdvantageEstimator(_grpo_advantages, needs_groups=True),
    # RLOO (Ahmadian et al. 2024): the score minus the mean of the other samples of the prompt.
    "rloo": AdvantageEstimator(_rloo_advantages, needs_groups=True),
    # REINFORCE++ (Hu 2025): returns-to-go of the token rewards, whitened over the batch.
    "reinforce++": AdvantageEstimator(_reinforce_pp_advantages, whitened=True),
}
"""Advantage estimators by ``algorithm.advantage`` name."""


# --- Reward normalisation --------------------------------------------------------------------------------------------


class RunningMoments:
    """Mean and variance of every reward seen so far (Chan et al.'s parallel update), for reward normalisation.

    ``update`` takes a batch's count, mean and sum of squared deviations; a caller whose batch spans processes sums
    those over processes first."""

    def __init__(self, state: dict[str, float] | None = None) -> None:
        state = state or {}
        self.count, self.mean, self.m2 = state.get("count", 0.0), state.get("mean", 0.0), state.get("m2", 0.0)

    def update(self, count: float, mean: float, m2: float) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / max(self.count - 1, 1))

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


def optimised_scores(
    raw: torch.Tensor,
    normalize: bool,
    clip: float | None,
    moments: RunningMoments,
    sum_over_processes: SumOverProcesses,
) -> torch.Tensor:
    """The scores (B,) the advantages are computed from: the rewards ``raw``, with ``normalize`` divided by the
    running statistics of every reward so far (``moments`` is updated with this batch, over all processes first),
    and clipped to ± ``clip`` when it is set."""
    scores = raw
    if normalize:
        sums = sum_over_processes(
            torch.stack([raw.sum(), (raw**2).sum(), torch.tensor(float(len(raw)), device=raw.device)]).double()
        )
        count, mean = float(sums[2]), float(sums[0] / sums[2])
        moments.update(count, mean, float(sums[1] - count * mean**2))
        scores = (raw - moments.mean) / max(moments.std, 1e-8)
    if clip:
        scores = scores.clamp(-clip, clip)
    return scores


# --- Losses ----------------------------------------------------------------------------------------------------------


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), as a loss to minimise:
    ``max(−A·ρ, −A·clip(ρ, 1 − clip_low, 1 + clip_high))``, ``ρ = exp(logps − old_logps)``.

    ``clip_high`` None means ``clip_low``; a larger one is DAPO's clip-higher (Yu et al. 2025), which lets
    low-probability tokens with A > 0 grow further and so keeps entropy from collapsing. ``dual_clip`` c > 1 (Ye et
    al. 2020, "Mastering Complex Control in MOBA Games") caps the loss of A < 0 tokens at ``−c·A``: with far
    off-policy samples ρ is unbounded above, and so would be the loss. ``advantages`` is ``(B, R)``; broadcast
    sequence advantages before calling.

    Returns ``(per_token_loss, clipped)``, both ``(B, R)`` and 0 off the mask; ``clipped`` is 1.0 where the clipped
    branch or the dual clip set the loss, i.e. where the token gets no gradient (its mean is the clip fraction).
    """
    _check_shapes("policy_loss", logps=logps, old_logps=old_logps, advantages=advantages, mask=mask)
    clip_high = clip_low if clip_high is None else clip_high
    if not 0 < clip_low < 1 or clip_high <= 0:
        raise ValueError(
            f"policy_loss: need 0 < clip_low < 1 and clip_high > 0, got clip_low={clip_low}, clip_high={clip_high}."
        )
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"policy_loss: dual_clip must be > 1 (the cap is −dual_clip·A for A < 0), got {dual_clip}.")
    keep = mask.bool()
    # Off the mask the log-ratio is 0 (ρ = 1), so NaN log-probs on padding stay out of the loss and its gradient. The
    # clamp keeps ρ finite: a far off-policy token (stale samples, a numerics bug) would otherwise give an inf loss.
    log_ratio = _select(logps - old_logps, keep).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_branch = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    # where, not maximum: on ties maximum would split the gradient between two equal branches; the select gives the
    # clipped flag and the gradient from the same branch.
    is_clipped = clipped_branch > unclipped
    loss = torch.where(is_clipped, clipped_branch, unclipped)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        capped = (advantages < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        is_clipped = is_clipped | capped
    return _select(loss, keep), (is_clipped & keep).to(loss.dtype)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's value loss per token: ``½·max((V − R)², (V_old + clamp(V − V_old, −c, c) − R)²)`` with c =
    ``clip_range`` (the clipped form of OpenAI baselines' PPO2, kept by TRL and OpenRLHF); ``½(V − R)²`` when None.

    Returns ``(per_token_loss, clipped)``, both ``(B, R)`` and 0 off the mask; ``clipped`` is 1.0 where the clipped
    branch is the larger (the value clip fraction).
    """
    _check_shapes("value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_range is not None and clip_range <= 0:
        raise ValueError(f"value_loss: clip_range must be > 0 or None (no clipping), got {clip_range}.")
    keep = mask.bool()
    values, old_values, returns = _select(values, keep), _select(old_values, keep), _select(returns, keep)
    squared_error = (values - returns) ** 2
    if clip_range is None:
        return _select(0.5 * squared_error, keep), torch.zeros_like(squared_error)
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    clipped_error = (clipped_values - returns) ** 2
    is_clipped = clipped_error > squared_error
    loss = 0.5 * torch.where(is_clipped, clipped_error, squared_error)
    return _select(loss, keep), (is_clipped & keep).to(loss.dtype)


# --- Loss aggregation ------------------------------------------------------------------------------------------------


def _token_sum(token_loss: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    return masked_sum(token_loss, mask)


def _sum_of_sequence_means(token_loss: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    return (masked_sum(token_loss, mask, dim=1) / mask.bool().sum(dim=1).clamp(min=1)).sum()


def _token_sum_over_max_tokens(token_loss: torch.Tensor, mask: torch.Tensor, max_tokens: int) -> torch.Tensor:
    return masked_sum(token_loss, mask) / max_tokens


@dataclass(frozen=True)
class LossAggregation:
    """How per-token losses ``(B, R)`` become one loss: ``partial_sum(token_loss, mask, max_tokens)`` over each
    micro-batch, divided by the whole update's count of ``per`` ("token": masked-in response tokens;
    "response": responses) over every micro-batch and process, so gradient accumulation is exact."""

    partial_sum: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    per: str


LOSS_AGGREGATIONS: dict[str, LossAggregation] = {
    # DAPO (Yu et al. 2025), OpenRLHF: every token weighs the same; the normaliser varies with the batch's lengths.
    "token_mean": LossAggregation(_token_sum, per="token"),
    # The GRPO paper (Shao et al. 2024), TRL's "grpo": every response weighs the same, each its own token mean,
    # so a token of a long response weighs less (the length bias Dr. GRPO removes).
    "sequence_mean": LossAggregation(_sum_of_sequence_means, per="response"),
    # Dr. GRPO (Liu et al. 2025), TRL's "dr_grpo", verl's "seq-mean-token-sum-norm": each response's token sum
    # over a constant (the generation limit), averaged over responses: no length bias and a normaliser that does
    # not depend on the batch.
    "sum_over_max_tokens": LossAggregation(_token_sum_over_max_tokens, per="response"),
}


def aggregate_loss(
    token_loss: torch.Tensor, mask: torch.Tensor, aggregation: str, normaliser: float, max_tokens: int
) -> torch.Tensor:
    """This micro-batch's share of the loss under ``LOSS_AGGREGATIONS[aggregation]``: its partial sum divided by
    ``normaliser``, the update's global count of tokens or responses (``LossAggregation.per``)."""
    _check_shapes("aggregate_loss", token_loss=token_loss, mask=mask)
    return LOSS_AGGREGATIONS[aggregation].partial_sum(token_loss, mask, max_tokens) / normaliser


def loss_normaliser(
    mask: torch.Tensor, aggregation: str, world_size: int, sum_over_processes: SumOverProcesses
) -> float:
    """The global denominator of one update's loss, whose responses on this process have the action ``mask``: its
    response tokens or its responses over every process, as ``LOSS_AGGREGATIONS[aggregation].per`` says."""
    if LOSS_AGGREGATIONS[aggregation].per == "response":
        return float(len(mask) * world_size)
    return float(sum_over_processes(mask.sum().clone()).clamp(min=1))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last axis, ``(..., V) → (...)``, in float32 whatever the input dtype.

    The row max is subtracted before the logsumexp, so logits of 1e4 neither overflow nor lose the log-probs' low
    bits to cancellation; ``-inf`` logits (banned tokens) count as probability 0 with a finite gradient.
    """
    logits = logits.float()
    # The entropy does not depend on the shift, so the max needs no gradient.
    shifted = logits - logits.amax(dim=-1, keepdim=True).detach()
    logps = shifted - torch.logsumexp(shifted, dim=-1, keepdim=True)
    probs = torch.exp(logps)
    # 0·log 0 = 0; selecting on both factors keeps a -inf log-prob from making NaN in the forward or the backward.
    nonzero = probs > 0
    logps = torch.where(nonzero, logps, torch.zeros_like(logps))
    return -(torch.where(nonzero, probs, torch.zeros_like(probs)) * logps).sum(dim=-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 − Var[returns − values] / Var[returns]`` over masked-in entries, a detached scalar: 1 for a perfect value
    head, 0 for one that predicts the mean, negative for one worse than that.

    When ``Var[returns]`` is 0 (one token, or all returns equal) the ratio is undefined; this returns 0 then, not
    NaN, so a degenerate batch logs "explains nothing" instead of breaking the metric's averages.
    """
    _check_shapes("explained_variance", values=values, returns=returns, mask=mask)
    values, returns = values.detach(), returns.detach()
    returns_var = masked_var(returns, mask)
    residual_var = masked_var(returns - values, mask)
    defined = returns_var > 0
    ratio = residual_var / torch.where(defined, returns_var, torch.ones_like(returns_var))
    return torch.where(defined, 1 - ratio, torch.zeros_like(ratio))


# --- KL coefficient controllers --------------------------------------------------------------------------------------


@dataclass
class FixedKLController:
    """A constant KL coefficient β."""

    value: float
    """β, the coefficient of the KL penalty."""

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: β stays fixed (the signature matches ``AdaptiveKLController.update``)."""


@dataclass
class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2):
    ``e = clip(KL/target − 1, −0.2, 0.2)``, ``β ← β·(1 + e·n_steps/horizon)``. β grows while the measured KL is above
    the target and shrinks below it; the clip bounds each update's step however far off the KL is."""

    value: float
    """β, the current coefficient of the KL penalty."""
    target: float
    """The KL (nats per response) that β steers towards (TRL's former PPOTrainer default: 6)."""
    horizon: int
    """Samples over which a proportional error is corrected (TRL's former PPOTrainer default: 10000)."""

    def __post_init__(self) -> None:
        if not (self.target > 0 and self.horizon > 0):
            raise ValueError(
                f"AdaptiveKLController: target and horizon must be > 0, got target={self.target}, "
                f"horizon={self.horizon}; use FixedKLController for a constant coefficient."
            )

    def update(self, current_kl: float, n_steps: int) -> None:
        """Moves β after ``n_steps`` samples (the batch size, in Ziegler et al.) with mean KL ``current_kl``."""
        # A NaN KL would otherwise make β NaN for the rest of training, and every reward with it.
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl must be finite, got {current_kl}.")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def kl_controller(
    kl_coef: float, kl_target: float | None, kl_horizon: int, resumed_coef: float | None = None
) -> FixedKLController | AdaptiveKLController:
    """The KL coefficient β: fixed at ``kl_coef``, or, with a ``kl_target``, steered to it over ``kl_horizon``
    responses (Ziegler et al.) from ``kl_coef``, or from ``resumed_coef``, the β a resumed run had reached."""
    if kl_target:
        return AdaptiveKLController(kl_coef if resumed_coef is None else resumed_coef, kl_target, kl_horizon)
    return FixedKLController(kl_coef)
