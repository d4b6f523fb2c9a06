"""Training losses as pure functions of tensors. Imports torch only.

Conventions: ``targets`` are already shifted (``targets[t]`` is the token that position ``t`` must predict) and
use -100 for positions that are not trained. Token-level losses return the *sum* over trained tokens divided by
``num_items_in_batch``, the trained-token count of the whole accumulated batch (all micro-batches, all processes):
summing these micro-batch losses gives exactly the token mean of the big batch, so gradient accumulation 1x8
equals 8x1 (the bug HF fixed in transformers 4.46, and torchtune #2307).

Preference losses (DPO family, SimPO, ORPO, KTO) take per-sequence log-probs from ``sequence_logps`` and return
*per-pair* (KTO: per-example) losses, which the recipe averages; the reward-model loss returns the mean over pairs.
Their rewards are detached and are for logging only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy over trained tokens, normalised by the accumulated batch's token count.

    ``logits`` is ``(N, V)`` for the N trained positions (the recipe computes logits only there) or
    ``(..., V)`` with ``targets`` of the matching leading shape holding -100 where not trained.
    Returns the loss and stats ``{"loss_sum", "num_tokens"}`` (detached) for logging.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    token_losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    loss_sum = token_losses.sum()
    num_tokens = (flat_targets != IGNORE_INDEX).sum()
    loss = loss_sum / num_items_in_batch
    return loss, {"loss_sum": loss_sum.detach(), "num_tokens": num_tokens.detach()}


def per_sequence_nll(
    logits: torch.Tensor, targets: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and trained-token count per sequence, for per-sample losses (e.g. packed vs padded checks,
    evaluation). ``sequence_ids`` gives each row of the flat ``logits``/``targets`` its sequence index."""
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_targets = targets.reshape(-1)
    token_losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=IGNORE_INDEX, reduction="none")
    trained = (flat_targets != IGNORE_INDEX).to(token_losses.dtype)
    ids = sequence_ids.reshape(-1)
    nll = torch.zeros(num_sequences, dtype=token_losses.dtype, device=token_losses.device).index_add_(
        0, ids, token_losses
    )
    counts = torch.zeros(num_sequences, dtype=trained.dtype, device=trained.device).index_add_(0, ids, trained)
    return nll, counts


# --- Preference learning -------------------------------------------------------------------------------------------


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each sequence's target tokens: the sum (or, with ``average``, the mean) over trained tokens.

    ``logits`` is ``(B, T, V)``, ``targets`` ``(B, T)`` already shifted, -100 where not trained. The softmax is
    taken in float32 whatever the logits' dtype (bf16 log-probs summed over hundreds of tokens lose the small
    log-ratio differences DPO trains on). ``average`` divides by the trained-token count (at least 1, so an empty
    sequence gives 0 rather than NaN): the length-normalised log-prob of IPO, SimPO and ORPO. Returns ``(B,)`` float32.
    """
    trained = targets != IGNORE_INDEX
    # -100 is not a valid index for gather; those positions are masked out below.
    safe_targets = targets.masked_fill(~trained, 0)
    token_logps = F.log_softmax(logits.float(), dim=-1).gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    summed = (token_logps * trained).sum(dim=-1)
    if not average:
        return summed
    return summed / trained.sum(dim=-1).clamp(min=1)


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley–Terry reward-model loss, mean over pairs: ``-logσ(r_c − r_r − m)``.

    Ouyang et al. 2022 (InstructGPT) eq. 1 with ``m = 0``; Touvron et al. 2023 (Llama 2, §3.2.2) add a per-pair
    ``margin`` m, larger for pairs the annotators found clearly separated. ``chosen_rewards``/``rejected_rewards``
    are the reward head's scalar outputs, ``(B,)``. Returns the loss and detached stats ``{"accuracy"`` (fraction
    of pairs with ``r_c > r_r``, margin not applied, as TRL logs it), ``"reward_gap"`` (mean ``r_c − r_r``)``}``.
    """
    gap = chosen_rewards - rejected_rewards
    logits = gap if margin is None else gap - margin
    loss = -F.logsigmoid(logits).mean()
    stats = {
        "accuracy": (gap > 0).float().mean().detach(),
        "reward_gap": gap.mean().detach(),
    }
    return loss, stats


def _logratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = (log π_c − log ref_c) − (log π_r − log ref_r)`` and the implicit rewards ``β·(log π − log ref)``
    (detached)."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    return h, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, eq. 7): ``-logσ(β·h)`` per pair, h the difference of the chosen and rejected
    log-ratios ``log π/π_ref`` (summed over the response's tokens).

    ``label_smoothing`` ε > 0 gives conservative DPO (cDPO; Mitchell 2023, "A note on DPO with noisy
    preferences"): the label is assumed flipped with probability ε, ``-(1−ε)·logσ(βh) − ε·logσ(−βh)``. (TRL 1.16's
    ``"sigmoid"`` no longer takes label smoothing; its ``"aot"`` loss on one pair reduces to this formula.)
    Returns ``(losses (B,), chosen_rewards, rejected_rewards)``, rewards ``β·(log π − log π_ref)`` detached.
    """
    h, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    eq. 17): ``(h − 1/(2β))²``, β the paper's τ; h as in ``dpo_sigmoid_loss``.

    Pass **length-averaged** log-probs (``sequence_logps(..., average=True)``), as TRL does (it divides each
    summed log-ratio by the completion's token count; the IPO authors confirmed their results use this form).
    With summed log-probs the squared loss grows with response length and the target 1/(2β) loses its meaning.
    The rewards are therefore ``β`` times the *per-token* log-ratio (TRL logs the summed one).
    """
    h, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, chosen_rewards, rejected_rewards


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SLiC-HF hinge loss (Zhao et al. 2023), on the reference-normalised log-ratio as in RSO (Liu et al. 2023):
    ``relu(1 − β·h)``, zero once the pair is separated by a margin of 1/β in log-ratio."""
    h, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = torch.relu(1 - beta * h)
    return losses, chosen_rewards, rejected_rewards


def robust_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    *,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), labels flipped with probability ε:
    ``(−(1−ε)·logσ(βh) + ε·logσ(−βh)) / (1 − 2ε)``, an unbiased estimate of the DPO loss on the clean labels
    (cDPO's smoothed loss is not). It can be negative. ε = ``label_smoothing`` must lie in [0, 0.5); ε = 0 is DPO.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"robust_dpo_loss: label_smoothing must lie in [0, 0.5) (the assumed label-flip rate), got "
            f"{label_smoothing}; 1 − 2ε is the denominator."
        )
    h, chosen_rewards, rejected_rewards = _logratios(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, chosen_rewards, rejected_rewards


def simpo_loss(
    policy_chosen_logps_avg: torch.Tensor,
    policy_rejected_logps_avg: torch.Tensor,
    beta: float,
    gamma_beta_ratio: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024): reference-free and length-normalised,
    ``-logσ(β·(avg_c − avg_r) − γ)`` with ``avg`` the mean token log-prob (``sequence_logps(..., average=True)``)
    and target margin ``γ = gamma_beta_ratio·β`` (the SimPO code's parameter; TRL's ``simpo_gamma`` is γ itself).
    The paper tunes β in 2–10 with γ/β 0.3–0.5: β scales a length-averaged margin, far smaller than DPO's summed
    log-ratio, so DPO's β = 0.1 leaves the loss nearly flat (its ``DPO_LOSSES`` entry defaults β to 2.0).
    Returns ``(losses (B,), chosen_rewards, rejected_rewards)``, rewards ``β·avg`` detached.
    """
    gamma = gamma_beta_ratio * beta
    losses = -F.logsigmoid(beta * (policy_chosen_logps_avg - policy_rejected_logps_avg) - gamma)
    return losses, beta * policy_chosen_logps_avg.detach(), beta * policy_rejected_logps_avg.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for x ≤ 0, stable at both ends (Mächler 2012, as TRL's ORPO): ``log1p(−exp(x))`` below
    −ln 2, ``log(−expm1(x))`` above. Each branch sees only its own half (clamped), so the branch ``where`` does not
    pick cannot put inf·0 = NaN into the gradient."""
    cut = -0.6931471805599453  # -ln 2
    low = torch.log1p(-torch.exp(x.clamp(max=cut)))
    high = torch.log(-torch.expm1(x.clamp(min=cut)))
    return torch.where(x < cut, low, high)


def orpo_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024): ``NLL_chosen + β·(−logσ(log odds_c − log odds_r))``, reference-free.

    ``odds(y) = p/(1 − p)`` with ``p = exp(avg)`` the length-averaged likelihood (``sequence_logps(...,
    average=True)``), so ``log odds = avg − log(1 − exp(avg))``, computed stably. ``chosen_nll`` is the SFT term: a
    scalar (TRL: mean NLL over all chosen tokens of the batch) or per pair ``(B,)``; it is broadcast. β is the
    paper's λ. Returns ``(losses (B,), chosen_rewards, rejected_rewards)``, rewards ``β·avg`` detached (as TRL).
    """
    log_odds = (chosen_logps_avg - rejected_logps_avg) - (_log1mexp(chosen_logps_avg) - _log1mexp(rejected_logps_avg))
    losses = chosen_nll - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_logps_avg.detach(), beta * rejected_logps_avg.detach()


PairLosses = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # per-pair losses (B,), chosen and rejected rewards


def _simpo_pair_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
    *,
    gamma_beta_ratio: float,
) -> PairLosses:
    return simpo_loss(chosen_logps_avg, rejected_logps_avg, beta, gamma_beta_ratio)


def _orpo_pair_loss(
    chosen_logps_avg: torch.Tensor,
    rejected_logps_avg: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    beta: float,
) -> PairLosses:
    # The SFT term is the chosen response's token-mean NLL per pair (the paper's form).
    return orpo_loss(chosen_logps_avg, rejected_logps_avg, -chosen_logps_avg, beta)


@dataclass(frozen=True)
class PreferenceLoss:
    """One loss of the DPO family and what it needs from the recipe.

    ``fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, **options)`` returns per-pair
    ``(losses (B,), chosen_rewards, rejected_rewards)``; the reference log-probs are None for a reference-free
    loss. An option a loss does not take (``label_smoothing`` for ``hinge``) is a TypeError, not ignored."""

    fn: Callable[..., PairLosses]
    default_beta: float = 0.1
    """β when ``dpo.beta`` is unset: β means different things per loss (SimPO's scales a length-averaged margin)."""
    reference_free: bool = False
    """Needs no reference model: no reference log-probs are computed."""
    length_averaged: bool = False
    """Takes log-probs divided by the response's token count (``sequence_logps(..., average=True)``), not sums."""
    options: tuple[str, ...] = ()
    """Keyword options ``fn`` takes besides β: ``label_smoothing`` (the assumed share of flipped labels),
    ``gamma_beta_ratio`` (SimPO's target margin over β)."""

    @property
    def takes_label_smoothing(self) -> bool:
        return "label_smoothing" in self.options


DPO_LOSSES: dict[str, PreferenceLoss] = {
    # TRL's ``loss_type`` names. β 0.1 as the papers and TRL use it.
    "sigmoid": PreferenceLoss(dpo_sigmoid_loss, options=("label_smoothing",)),
    # Length-averaged as TRL computes it (see ipo_loss).
    "ipo": PreferenceLoss(ipo_loss, length_averaged=True),
    "hinge": PreferenceLoss(hinge_loss),
    "robust": PreferenceLoss(robust_dpo_loss, options=("label_smoothing",)),
    # The SimPO paper tunes β in 2–10 with γ/β 0.3–0.5 (Meng et al. 2024, Table 7); DPO's 0.1 leaves it nearly flat.
    "simpo": PreferenceLoss(
        _simpo_pair_loss, default_beta=2.0, reference_free=True, length_averaged=True, options=("gamma_beta_ratio",)
    ),
    "orpo": PreferenceLoss(_orpo_pair_loss, reference_free=True, length_averaged=True),
}
"""The DPO family by ``dpo.loss`` name."""


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_estimate: torch.Tensor | float,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7), unpaired: with ``r = log π(y|x) − log π_ref(y|x)`` and reference point
    ``z0``, a desirable example (``labels`` True) costs ``λ_D·(1 − σ(β(r − z0)))``, an undesirable one
    ``λ_U·(1 − σ(β(z0 − r)))`` (the paper's ``λ − v`` with the constant λ dropped, as TRL does).

    ``kl_estimate`` is the batch estimate of ``KL(π‖π_ref)``, the mean log-ratio on mismatched (prompt, response)
    pairs; z0 is that value detached (the paper does not backpropagate through it) and clamped at 0 (a KL is
    non-negative; a negative estimate is noise). Returns per-example ``(losses (B,), rewards β·r detached)`` in the
    input order; TRL's loss is their mean.
    """
    z0 = torch.as_tensor(kl_estimate, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    # +1 for desirable, −1 for undesirable: 1 − σ(β(r − z0)) and 1 − σ(β(z0 − r)) in one expression.
    sign = labels.to(logratios.dtype) * 2 - 1
    weights = torch.where(labels, desirable_weight, undesirable_weight).to(logratios.dtype)
    losses = weights * (1 - torch.sigmoid(beta * sign * (logratios - z0)))
    return losses, beta * logratios.detach()
