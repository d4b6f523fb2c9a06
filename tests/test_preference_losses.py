"""Preference losses: hand-derived values (the arithmetic in each docstring), properties, and parity with TRL 1.16.

Parity: TRL 1.16 computes its DPO, KTO and reward-model losses inside trainer methods that run a model
(``DPOTrainer._compute_loss``, ``KTOTrainer._compute_loss``, ``RewardTrainer.compute_loss``). The parity tests call
those unbound methods with a ``SimpleNamespace`` holding only the attributes the method reads, and a stand-in model
whose logits are fixed, so TRL's own code computes the loss from the same tensors ours see. SimPO and ORPO are
self-contained methods (``CPOTrainer.cpo_loss``, ``ORPOTrainer.odds_ratio_loss``), called the same way. TRL is a
dev/bench dependency: only the parity tests need it, and they skip without it.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections import defaultdict
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from posttrain.losses import (
    DPO_LOSSES,
    IGNORE_INDEX,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    pairwise_reward_loss,
    robust_dpo_loss,
    sequence_logps,
    simpo_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
PARITY = {"rtol": 1e-5, "atol": 1e-6}


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- Hand-derived values ---------------------------------------------------------------------------------------------


def test_sequence_logps_hand_derived() -> None:
    """Two sequences, two positions, vocabulary of 2.

    Sequence 0: logits [0, ln 3], target 1 → p = 3/4; logits [0, 0], target 0 → p = 1/2.
      sum = ln(3/4) + ln(1/2) = ln(3/8); mean over 2 tokens = ln(3/8)/2.
    Sequence 1: logits [ln 3, 0], target 1 → p = 1/4; second position ignored (its logits [9, -9] do not matter).
      sum = mean = ln(1/4).
    """
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]], [[LN3, 0.0], [9.0, -9.0]]])
    targets = torch.tensor([[1, 0], [1, IGNORE_INDEX]])
    assert_close(sequence_logps(logits, targets), _t(math.log(3 / 8), math.log(1 / 4)))
    assert_close(sequence_logps(logits, targets, average=True), _t(math.log(3 / 8) / 2, math.log(1 / 4)))


def test_pairwise_reward_loss_hand_derived() -> None:
    """Pair 0: r_c − r_r = ln 3 → −logσ(ln 3) = ln(1 + 1/3) = ln(4/3). Pair 1: gap 0 → −logσ(0) = ln 2.
    Mean = (ln(4/3) + ln 2)/2 = ln(8/3)/2. Accuracy 1/2 (only pair 0 has r_c > r_r); mean gap ln 3 / 2.

    With the Llama-2 margin m = [ln 3, −ln 3]: pair 0 gap − m = 0 → ln 2; pair 1: 0 + ln 3 → ln(4/3). Same mean;
    accuracy and gap are of the rewards, margin not applied.
    """
    chosen, rejected = _t(LN3 + 1.0, 2.0), _t(1.0, 2.0)
    loss, stats = pairwise_reward_loss(chosen, rejected)
    assert_close(loss, torch.tensor(math.log(8 / 3) / 2))
    assert_close(stats["accuracy"], torch.tensor(0.5))
    assert_close(stats["reward_gap"], torch.tensor(LN3 / 2))
    margin_loss, margin_stats = pairwise_reward_loss(chosen, rejected, margin=_t(LN3, -LN3))
    assert_close(margin_loss, torch.tensor(math.log(8 / 3) / 2))
    assert_close(margin_stats["accuracy"], torch.tensor(0.5))


# Two pairs with simple log-ratios log π − log π_ref:
#   pair 0: chosen ln 3, rejected 0     → h = ln 3
#   pair 1: chosen 0,    rejected ln 3  → h = −ln 3
POLICY_CHOSEN, REF_CHOSEN = _t(LN3 - 5.0, -5.0), _t(-5.0, -5.0)
POLICY_REJECTED, REF_REJECTED = _t(-7.0, LN3 - 7.0), _t(-7.0, -7.0)
PAIRS = (POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED)


def test_dpo_sigmoid_hand_derived() -> None:
    """β = 1: pair 0: −logσ(ln 3) = ln(1 + 1/3) = ln(4/3); pair 1: −logσ(−ln 3) = ln(1 + 3) = ln 4.
    Rewards β·(log π − log π_ref): chosen [ln 3, 0], rejected [0, ln 3].
    β = 2 with the log-ratios halved gives the same βh, so the same losses."""
    losses, chosen_rewards, rejected_rewards = dpo_sigmoid_loss(*PAIRS, beta=1.0)
    assert_close(losses, _t(math.log(4 / 3), math.log(4)))
    assert_close(chosen_rewards, _t(LN3, 0.0))
    assert_close(rejected_rewards, _t(0.0, LN3))
    halved = (POLICY_CHOSEN / 2, POLICY_REJECTED / 2, REF_CHOSEN / 2, REF_REJECTED / 2)
    assert_close(dpo_sigmoid_loss(*halved, beta=2.0)[0], losses)


def test_cdpo_label_smoothing_hand_derived() -> None:
    """cDPO, β = 1, ε = 1/4: −(3/4)·logσ(βh) − (1/4)·logσ(−βh).
    Pair 0 (βh = ln 3): (3/4)·ln(4/3) + (1/4)·ln 4. Pair 1 (βh = −ln 3): (3/4)·ln 4 + (1/4)·ln(4/3)."""
    losses, _, _ = dpo_sigmoid_loss(*PAIRS, beta=1.0, label_smoothing=0.25)
    a, b = math.log(4 / 3), math.log(4)
    assert_close(losses, _t(0.75 * a + 0.25 * b, 0.75 * b + 0.25 * a))


def test_robust_dpo_hand_derived() -> None:
    """Robust DPO, β = 1, ε = 1/4: (−(3/4)·logσ(βh) + (1/4)·logσ(−βh)) / (1/2).
    Pair 0 (βh = ln 3): 2·((3/4)·ln(4/3) − (1/4)·ln 4) = (3/2)·ln(4/3) − (1/2)·ln 4 = ln 4 − (3/2)·ln 3 (< 0).
    Pair 1 (βh = −ln 3): 2·((3/4)·ln 4 − (1/4)·ln(4/3)) = ln 4 + (1/2)·ln 3.
    Mean = ln 4 − (1/2)·ln 3 = ln(16/3)/2, equal to DPO's mean (ln(4/3) + ln 4)/2 on this symmetric pair set."""
    losses, _, _ = robust_dpo_loss(*PAIRS, beta=1.0, label_smoothing=0.25)
    assert_close(losses, _t(math.log(4) - 1.5 * LN3, math.log(4) + 0.5 * LN3))
    assert_close(losses.mean(), dpo_sigmoid_loss(*PAIRS, beta=1.0)[0].mean())


def test_ipo_hand_derived() -> None:
    """β = 1/2, so the target 1/(2β) = 1. Length-averaged log-ratios chosen − rejected:
    h = 1 → (1 − 1)² = 0;  h = −1 → (−1 − 1)² = 4;  h = 3 → (3 − 1)² = 4."""
    policy_chosen, ref_chosen = _t(-1.0, -2.0, -1.0), _t(-2.0, -2.0, -2.0)  # chosen log-ratios 1, 0, 1
    policy_rejected, ref_rejected = _t(-3.0, -2.0, -5.0), _t(-3.0, -3.0, -3.0)  # rejected log-ratios 0, 1, −2
    losses, chosen_rewards, _ = ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    assert_close(losses, _t(0.0, 4.0, 4.0))
    assert_close(chosen_rewards, _t(0.5, 0.0, 0.5))


def test_hinge_hand_derived() -> None:
    """β = 1/2: relu(1 − βh) for h = 0, 2, −1 → 1, 0, 3/2."""
    policy_chosen, policy_rejected = _t(-1.0, 1.0, -2.0), _t(-1.0, -1.0, -1.0)
    zeros = torch.zeros(3)
    losses, _, _ = hinge_loss(policy_chosen, policy_rejected, zeros, zeros, beta=0.5)
    assert_close(losses, _t(1.0, 0.0, 1.5))


def test_simpo_takes_its_papers_beta_when_beta_is_unset() -> None:
    """dpo.loss=simpo with dpo.beta unset gives β = 2 and γ = 1 (γ/β = 0.5), the SimPO paper's range, instead
    of DPO's 0.1; a β the user writes is kept, and the other losses keep 0.1. Through the recipe: average
    log-probs chosen −1, rejected −1.5 (sums −2 over 2 tokens, −3 over 2): 2·(−1 + 1.5) − 1 = 0 → loss ln 2,
    chosen reward 2·(−1) = −2; with β 0.1 (γ 0.05) the margin would be 0.05 − 0.05 = 0 too, so a second pair,
    averages −1 and −2, tells them apart: 2·1 − 1 = 1 → −logσ(1), where β 0.1 gives −logσ(0.05)."""
    from posttrain.config import DpoBlock, build_config
    from posttrain.recipes.dpo import pair_losses

    config = build_config(
        {"stage": "dpo", "model": {"path": "m"}, "data": {"train": "d.jsonl"}, "dpo": {"loss": "simpo"}}
    )
    assert config.dpo.beta == 2.0 and config.dpo.simpo_gamma_beta_ratio * config.dpo.beta == 1.0
    assert DpoBlock(loss="simpo", beta=0.5).beta == 0.5
    assert DpoBlock().beta == DpoBlock(loss="orpo").beta == 0.1
    assert DPO_LOSSES["simpo"].default_beta == 2.0
    logps = torch.tensor([[-2.0, -3.0], [-2.0, -4.0]])
    counts = torch.tensor([[2, 2], [2, 2]])
    per_pair, chosen_rewards, _ = pair_losses(config.dpo, logps, counts, None)
    assert_close(per_pair, torch.tensor([math.log(2.0), -math.log(torch.sigmoid(torch.tensor(1.0)).item())]))
    assert_close(chosen_rewards, torch.tensor([-2.0, -2.0]))


def test_simpo_hand_derived() -> None:
    """β = 2, gamma_beta_ratio = 1/2 → γ = 1. Average log-probs chosen [−1, −1], rejected [−1.5, −1]:
    pair 0: β·0.5 − 1 = 0 → −logσ(0) = ln 2; pair 1: β·0 − 1 = −1 → −logσ(−1) = ln(1 + e).
    Rewards β·avg: chosen [−2, −2], rejected [−3, −2]."""
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        _t(-1.0, -1.0), _t(-1.5, -1.0), beta=2.0, gamma_beta_ratio=0.5
    )
    assert_close(losses, _t(LN2, math.log(1 + math.e)))
    assert_close(chosen_rewards, _t(-2.0, -2.0))
    assert_close(rejected_rewards, _t(-3.0, -2.0))


def test_orpo_hand_derived() -> None:
    """β = 1/2. Pair 0: p_c = 3/4 → odds 3, p_r = 1/4 → odds 1/3; log odds ratio ln 9; −logσ(ln 9) = ln(10/9).
    Pair 1: p_c = p_r = 1/2 → log odds ratio 0 → ln 2.
    chosen_nll per pair = −log p_c = [ln(4/3), ln 2]. Losses: ln(4/3) + ln(10/9)/2 and ln 2 + ln 2/2 = (3/2)·ln 2.
    Rewards β·avg: chosen [ln(3/4)/2, −ln 2/2]."""
    chosen, rejected = _t(math.log(3 / 4), -LN2), _t(math.log(1 / 4), -LN2)
    losses, chosen_rewards, _ = orpo_loss(chosen, rejected, chosen_nll=-chosen, beta=0.5)
    assert_close(losses, _t(math.log(4 / 3) + math.log(10 / 9) / 2, 1.5 * LN2))
    assert_close(chosen_rewards, _t(math.log(3 / 4) / 2, -LN2 / 2))


def test_kto_hand_derived() -> None:
    """β = 1, KL estimate z0 = ln 2, λ_D = 1, λ_U = 2. Log-ratios r and labels:
    desirable r = ln 2 + ln 3: 1 − σ(ln 3) = 1 − 3/4 = 1/4.
    undesirable r = ln 2 − ln 3: 2·(1 − σ(z0 − r)) = 2·(1 − σ(ln 3)) = 1/2.
    desirable r = ln 2: 1 − σ(0) = 1/2.
    A negative estimate is clamped to z0 = 0: desirable r = 0 → 1/2; undesirable r = 0 → 2·(1/2) = 1."""
    policy = _t(LN2 + LN3, LN2 - LN3, LN2) - 4.0
    ref = torch.full((3,), -4.0)
    labels = torch.tensor([True, False, True])
    losses, rewards = kto_loss(policy, ref, labels, torch.tensor(LN2), beta=1.0, undesirable_weight=2.0)
    assert_close(losses, _t(0.25, 0.5, 0.5))
    assert_close(rewards, _t(LN2 + LN3, LN2 - LN3, LN2))
    clamped, _ = kto_loss(ref, ref, torch.tensor([True, False, True]), -0.7, beta=1.0, undesirable_weight=2.0)
    assert_close(clamped, _t(0.5, 1.0, 0.5))


# --- Properties ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options", "strictly"),
    [("sigmoid", {}, True), ("robust", {"label_smoothing": 0.2}, True), ("hinge", {}, False)],
)
def test_dpo_loss_decreases_as_chosen_logratio_grows(name: str, options: dict[str, float], strictly: bool) -> None:
    """Raising log π(chosen) with everything else fixed lowers the loss (hinge: never raises it, flat past 1/β)."""
    chosen = torch.linspace(-5.0, 5.0, 41)
    zeros = torch.zeros_like(chosen)
    losses, _, _ = DPO_LOSSES[name].fn(chosen, zeros, zeros, zeros, 0.5, **options)
    steps = losses[1:] - losses[:-1]
    assert bool((steps < 0).all()) if strictly else bool((steps <= 0).all() and (steps < 0).any())


def test_cdpo_stops_pushing_at_its_optimum() -> None:
    """cDPO's loss −(1−ε)logσ(βh) − ε·logσ(−βh) has zero slope where σ(βh) = 1 − ε, i.e. βh = ln((1−ε)/ε):
    with ε = 0.1, β = 0.5, h = 2·ln 9. Plain DPO still pushes there."""
    h = torch.tensor([2 * math.log(9)], requires_grad=True)
    zeros = torch.zeros(1)
    dpo_sigmoid_loss(h, zeros, zeros, zeros, 0.5, label_smoothing=0.1)[0].sum().backward()
    assert_close(h.grad, torch.zeros(1))
    h.grad = None
    dpo_sigmoid_loss(h, zeros, zeros, zeros, 0.5)[0].sum().backward()
    assert float(h.grad) < 0


def test_robust_with_no_smoothing_is_dpo() -> None:
    """ε = 0: (−logσ(βh) + 0)/1 = −logσ(βh), the DPO loss; the same for cDPO."""
    torch.manual_seed(0)
    pairs = [torch.randn(16) * 3 for _ in range(4)]
    dpo = dpo_sigmoid_loss(*pairs, beta=0.3)
    for other in (robust_dpo_loss(*pairs, beta=0.3), dpo_sigmoid_loss(*pairs, beta=0.3, label_smoothing=0.0)):
        for ours, expected in zip(other, dpo, strict=True):
            assert_close(ours, expected)


def test_ipo_is_zero_with_zero_gradient_at_its_target() -> None:
    """IPO regresses h onto 1/(2β): at h = 1/(2·0.25) = 2 the loss and its gradient vanish."""
    chosen = torch.tensor([2.0], requires_grad=True)
    zeros = torch.zeros(1)
    losses, _, _ = ipo_loss(chosen, zeros, zeros, zeros, beta=0.25)
    losses.sum().backward()
    assert_close(losses, zeros)
    assert_close(chosen.grad, zeros)


def test_dpo_family_shares_one_signature_and_detached_rewards() -> None:
    """Every table entry takes the same five positional arguments and returns rewards without a graph:
    β·(log π − log π_ref) with a reference, β·log π for the reference-free ones (given None for the reference);
    an option a loss does not take is an error, not silently ignored (TRL only warns)."""
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    for name, loss in DPO_LOSSES.items():
        references = (None, None) if loss.reference_free else (REF_CHOSEN, REF_REJECTED)
        options = {"gamma_beta_ratio": 0.5} if "gamma_beta_ratio" in loss.options else {}
        losses, chosen_rewards, rejected_rewards = loss.fn(policy_chosen, POLICY_REJECTED, *references, 1.0, **options)
        assert losses.shape == (2,) and losses.requires_grad, name
        assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad, name
        assert_close(chosen_rewards, POLICY_CHOSEN if loss.reference_free else _t(LN3, 0.0))
    with pytest.raises(TypeError):
        DPO_LOSSES["hinge"].fn(*PAIRS, 1.0, label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        DPO_LOSSES["robust"].fn(*PAIRS, 1.0, label_smoothing=0.5)


def test_sequence_logps_computes_in_float32() -> None:
    """bf16 logits give float32 log-probs equal to those of the same (bf16-rounded) logits upcast first."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 64, 1000) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 1000, (2, 64))
    targets[1, 40:] = IGNORE_INDEX
    result = sequence_logps(logits, targets)
    assert result.dtype == torch.float32
    assert_close(result, sequence_logps(logits.float(), targets))


def test_orpo_is_finite_at_the_extremes() -> None:
    """log(1 − exp(x)) near x = 0 (a near-certain response) and at x = −50 stays finite, and so do the gradients."""
    chosen = torch.tensor([-1e-6, -50.0, -0.5], requires_grad=True)
    rejected = torch.tensor([-50.0, -1e-6, -0.6931], requires_grad=True)
    losses, _, _ = orpo_loss(chosen, rejected, chosen_nll=torch.tensor(0.0), beta=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()


def test_kto_reference_point_gets_no_gradient() -> None:
    """z0 is detached: the loss's gradient does not reach the KL estimate."""
    kl = torch.tensor(0.3, requires_grad=True)
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([-1.5, -1.5]), torch.tensor([True, False]), kl, beta=0.5)
    losses.sum().backward()
    assert kl.grad is None and policy.grad is not None


# --- Parity with TRL 1.16 --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trl() -> ModuleType:
    """TRL with the trainer modules the parity tests reach into; skips the test when TRL is not installed."""
    module = pytest.importorskip("trl")
    with warnings.catch_warnings():  # trl.experimental warns on import that its APIs are unstable
        warnings.simplefilter("ignore")
        for name in (
            "trainer.dpo_trainer",
            "trainer.kto_trainer",
            "trainer.reward_trainer",
            "experimental.cpo.cpo_trainer",
            "experimental.orpo.orpo_trainer",
        ):
            importlib.import_module(f"trl.{name}")
    return module


_ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)


class _FixedLogitsModel:
    """Stands in for a causal LM under TRL's fused LM head (trl/trainer/utils.py ``add_fused_lm_head``): whatever the
    input ids, its logits are ``logits``; ``model(..., labels=labels, fused_lm_head=True).log_probs[:, t]`` is the
    log-prob of ``labels[:, t + 1]``, 0 where that label is -100. The logging-only fields are zeros."""

    training = True

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, *, labels: torch.Tensor, **_: Any) -> SimpleNamespace:
        next_labels = labels[:, 1:]
        all_logps = F.log_softmax(self.logits[:, :-1].float(), dim=-1)
        log_probs = all_logps.gather(-1, next_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        log_probs = log_probs.masked_fill(next_labels == IGNORE_INDEX, 0.0)
        zeros = torch.zeros_like(log_probs.detach())
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _trainer_namespace(model: Any, **attributes: Any) -> SimpleNamespace:
    """The attributes every TRL ``_compute_loss`` reads besides its loss settings."""
    metrics: defaultdict[str, defaultdict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    return SimpleNamespace(
        model=model,
        accelerator=_ACCELERATOR,
        aux_loss_enabled=False,
        _metrics=metrics,
        _total_train_tokens=0,
        _tp_size=1,
        **attributes,
    )


def _completion_batch(rows: int, length: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Prompt + completion + right padding per row, in TRL's collated form, with labels -100 outside completions."""
    input_ids = torch.randint(0, vocab, (rows, length), generator=generator)
    positions = torch.arange(length)
    prompt_lengths = torch.randint(1, 4, (rows, 1), generator=generator)
    ends = prompt_lengths + torch.randint(1, length - 3, (rows, 1), generator=generator)
    completion_mask = ((positions >= prompt_lengths) & (positions < ends)).long()
    attention_mask = (positions < ends).long()
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "labels": labels,
    }


def _trl_dpo(
    trl: ModuleType,
    loss_type: str,
    beta: float,
    label_smoothing: float,
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """TRL's ``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py) on precomputed reference log-probs."""
    model = _FixedLogitsModel(logits)
    trainer = _trainer_namespace(
        model,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(),
    )
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    inputs |= {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trl.trainer.dpo_trainer.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _dpo_case(seed: int, pairs: int = 6) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Random logits for ``pairs`` chosen rows then ``pairs`` rejected rows, and summed reference log-probs near the
    policy's so that the log-ratio differences are O(1)."""
    generator = torch.Generator().manual_seed(seed)
    batch = _completion_batch(2 * pairs, 12, 11, generator)
    logits = torch.randn(2 * pairs, 12, 11, generator=generator) * 2
    policy = sequence_logps(logits[:, :-1], batch["labels"][:, 1:])
    ref = policy + torch.randn(2 * pairs, generator=generator)
    return logits, batch, ref


@pytest.mark.parametrize(
    ("loss_type", "beta", "label_smoothing"),
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 1.0, 0.0),
        ("hinge", 0.5, 0.0),
        ("ipo", 0.1, 0.0),
        ("ipo", 2.0, 0.0),
        ("robust", 0.5, 0.0),
        ("robust", 0.5, 0.2),
    ],
)
def test_dpo_family_matches_trl(trl: ModuleType, loss_type: str, beta: float, label_smoothing: float) -> None:
    """Loss, its gradient with respect to the logits, and the logged rewards match TRL's ``loss_type``."""
    logits, batch, ref = _dpo_case(seed=0)
    ref_chosen, ref_rejected = ref.chunk(2)
    trl_logits = logits.clone().requires_grad_()
    trl_loss, metrics = _trl_dpo(trl, loss_type, beta, label_smoothing, trl_logits, batch, ref_chosen, ref_rejected)
    trl_loss.backward()

    our_logits = logits.clone().requires_grad_()
    average = DPO_LOSSES[loss_type].length_averaged
    policy = sequence_logps(our_logits[:, :-1], batch["labels"][:, 1:], average=average)
    if average:  # TRL divides the summed log-ratio by the completion's token count
        ref = ref / batch["completion_mask"].sum(dim=1)
    options = {"label_smoothing": label_smoothing} if loss_type == "robust" else {}
    losses, chosen_rewards, rejected_rewards = DPO_LOSSES[loss_type].fn(
        *policy.chunk(2), *ref.chunk(2), beta, **options
    )
    losses.mean().backward()

    assert_close(losses.mean(), trl_loss.detach(), **PARITY)
    assert_close(our_logits.grad, trl_logits.grad, **PARITY)
    if not average:  # with IPO TRL logs the summed-log-ratio rewards, ours are per token
        assert metrics["rewards/chosen"][-1] == pytest.approx(chosen_rewards.mean().item(), rel=1e-5, abs=1e-6)
        assert metrics["rewards/margins"][-1] == pytest.approx(
            (chosen_rewards - rejected_rewards).mean().item(), rel=1e-5, abs=1e-6
        )


def test_cdpo_matches_trl_aot_on_single_pairs(trl: ModuleType) -> None:
    """TRL 1.16's ``"sigmoid"`` has no label smoothing any more; its ``"aot"`` loss sorts the batch's log-ratios and
    applies −(1−ε)·logσ(βδ) − ε·logσ(−βδ). On a batch of one pair the sort is the identity and δ = h, which is cDPO,
    so each pair is sent alone."""
    logits, batch, ref = _dpo_case(seed=7, pairs=4)
    policy = sequence_logps(logits[:, :-1], batch["labels"][:, 1:])
    losses, _, _ = dpo_sigmoid_loss(*policy.chunk(2), *ref.chunk(2), 0.5, label_smoothing=0.2)
    for pair in range(4):
        rows = [pair, pair + 4]
        single = {key: value[rows] for key, value in batch.items()}
        trl_loss, _ = _trl_dpo(trl, "aot", 0.5, 0.2, logits[rows], single, ref[[pair]], ref[[pair + 4]])
        assert_close(losses[pair], trl_loss, **PARITY)


@pytest.mark.parametrize("kl_sign", [1.0, -1.0])
def test_kto_matches_trl(trl: ModuleType, kl_sign: float) -> None:
    """TRL's ``KTOTrainer._compute_loss`` (trl/trainer/kto_trainer.py), KL estimated on mismatched completions:
    positive (used as z0) and negative (clamped to 0), unequal desirable/undesirable weights."""
    generator = torch.Generator().manual_seed(3)
    rows, beta = 8, 0.3
    batch = _completion_batch(rows, 12, 11, generator)
    kl_batch = _completion_batch(rows, 12, 11, generator)
    logits = torch.randn(rows, 12, 11, generator=generator) * 2
    labels = torch.tensor([True, False, True, True, False, True, False, True])
    policy = sequence_logps(logits[:, :-1], batch["labels"][:, 1:])
    kl_policy = sequence_logps(logits[:, :-1], kl_batch["labels"][:, 1:])
    ref = policy + torch.randn(rows, generator=generator)
    ref_kl = kl_policy - kl_sign * (0.5 + torch.rand(rows, generator=generator))

    model = _FixedLogitsModel(logits.clone().requires_grad_())
    trainer = _trainer_namespace(
        model,
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=1.0,
        undesirable_weight=1.5,
    )
    trainer._compute_kl_logps = lambda m, b: trl.trainer.kto_trainer.KTOTrainer._compute_kl_logps(trainer, m, b)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    inputs |= {"KL_" + key: kl_batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    inputs |= {"label": labels, "ref_logps": ref, "ref_KL_logps": ref_kl}
    trl_loss = trl.trainer.kto_trainer.KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    trl_loss.backward()

    our_logits = logits.clone().requires_grad_()
    our_policy = sequence_logps(our_logits[:, :-1], batch["labels"][:, 1:])
    kl_estimate = (kl_policy - ref_kl).mean()
    losses, rewards = kto_loss(our_policy, ref, labels, kl_estimate, beta, undesirable_weight=1.5)
    losses.mean().backward()

    assert_close(losses.mean(), trl_loss.detach(), **PARITY)
    assert_close(our_logits.grad, model.logits.grad, **PARITY)
    metrics = trainer._metrics["train"]
    assert metrics["kl"][-1] == pytest.approx(max(kl_estimate.item(), 0.0), rel=1e-5, abs=1e-6)
    assert metrics["rewards/chosen"][-1] == pytest.approx(rewards[labels].mean().item(), rel=1e-5, abs=1e-6)
    assert metrics["rewards/rejected"][-1] == pytest.approx(rewards[~labels].mean().item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("with_margin", [False, True])
def test_pairwise_reward_loss_matches_trl(trl: ModuleType, with_margin: bool) -> None:
    """TRL's ``RewardTrainer.compute_loss`` (trl/trainer/reward_trainer.py) with a model whose scalar outputs are
    the chosen rewards then the rejected ones; loss, accuracy and margin metrics."""
    generator = torch.Generator().manual_seed(5)
    chosen, rejected = torch.randn(16, generator=generator) * 2, torch.randn(16, generator=generator) * 2
    margin = torch.rand(16, generator=generator) if with_margin else None
    reward_head = _RewardOutputs(torch.cat([chosen, rejected]).unsqueeze(-1))
    trainer = _trainer_namespace(reward_head, args=SimpleNamespace(center_rewards_coefficient=None))
    inputs: dict[str, torch.Tensor] = {
        "input_ids": torch.zeros(32, 4, dtype=torch.long),
        "attention_mask": torch.ones(32, 4, dtype=torch.long),
    }
    if margin is not None:
        inputs["margin"] = margin
    trl_loss = trl.trainer.reward_trainer.RewardTrainer.compute_loss(trainer, reward_head, inputs)

    loss, stats = pairwise_reward_loss(chosen, rejected, margin)
    assert_close(loss, trl_loss, **PARITY)
    metrics = trainer._metrics["train"]
    assert metrics["accuracy"][-1] == pytest.approx(stats["accuracy"].item())
    assert metrics["margin"][-1] == pytest.approx(stats["reward_gap"].item(), rel=1e-5, abs=1e-6)


class _RewardOutputs:
    """Stands in for a sequence-classification reward model: returns fixed ``(2B, 1)`` logits."""

    training = True

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def __call__(self, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def test_sequence_logps_matches_trl_get_batch_logps(trl: ModuleType) -> None:
    """TRL's ``get_batch_logps`` (trl/experimental/cpo/cpo_trainer.py) takes unshifted labels and drops the last
    logit position; ours takes the shifted pair."""
    generator = torch.Generator().manual_seed(11)
    batch = _completion_batch(5, 10, 13, generator)
    logits = torch.randn(5, 10, 13, generator=generator) * 3
    get_batch_logps = trl.experimental.cpo.cpo_trainer.CPOTrainer.get_batch_logps
    for average in (False, True):
        expected = get_batch_logps(logits, batch["labels"], average_log_prob=average)
        assert_close(sequence_logps(logits[:, :-1], batch["labels"][:, 1:], average=average), expected, **PARITY)


def test_simpo_matches_trl_cpo(trl: ModuleType) -> None:
    """TRL's ``CPOTrainer.cpo_loss`` with ``loss_type="simpo"`` (trl/experimental/cpo/cpo_trainer.py): its
    ``simpo_gamma`` is γ = gamma_beta_ratio·β."""
    generator = torch.Generator().manual_seed(13)
    chosen_avg, rejected_avg = -torch.rand(12, generator=generator) * 3, -torch.rand(12, generator=generator) * 3
    beta, gamma_beta_ratio = 2.5, 0.55
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        simpo_gamma=gamma_beta_ratio * beta,
        loss_type="simpo",
        label_smoothing=0.0,
        accelerator=_ACCELERATOR,
    )
    expected = trl.experimental.cpo.cpo_trainer.CPOTrainer.cpo_loss(trainer, chosen_avg, rejected_avg)
    ours = simpo_loss(chosen_avg, rejected_avg, beta, gamma_beta_ratio)
    for our_tensor, trl_tensor in zip(ours, expected, strict=True):
        assert_close(our_tensor, trl_tensor, **PARITY)


def test_orpo_matches_trl(trl: ModuleType) -> None:
    """TRL's ``ORPOTrainer.odds_ratio_loss`` (trl/experimental/orpo/orpo_trainer.py) returns β·logσ(log odds
    ratio) and the trainer's loss is ``nll − mean`` of it; ``chosen_nll`` here is its token mean over the batch.
    Averages span both branches of log(1 − exp(x)) (−ln 2 ≈ −0.69), down to −1e-4."""
    generator = torch.Generator().manual_seed(17)
    chosen_avg = -torch.rand(12, generator=generator) * 3
    rejected_avg = -torch.rand(12, generator=generator) * 3
    chosen_avg[0], rejected_avg[1] = -1e-4, -1e-4
    chosen_nll = torch.tensor(1.7)
    trainer = SimpleNamespace(beta=0.25, accelerator=_ACCELERATOR)
    ratio_losses, trl_chosen_rewards, trl_rejected_rewards, _, _ = (
        trl.experimental.orpo.orpo_trainer.ORPOTrainer.odds_ratio_loss(trainer, chosen_avg, rejected_avg)
    )
    losses, chosen_rewards, rejected_rewards = orpo_loss(chosen_avg, rejected_avg, chosen_nll, 0.25)
    assert_close(losses.mean(), chosen_nll - ratio_losses.mean(), **PARITY)
    assert_close(losses, chosen_nll - ratio_losses, **PARITY)
    assert_close(chosen_rewards, trl_chosen_rewards, **PARITY)
    assert_close(rejected_rewards, trl_rejected_rewards, **PARITY)
