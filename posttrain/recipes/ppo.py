"""Online RL from prompts (``stage: ppo``): PPO with a critic, and the critic-free GRPO, RLOO and REINFORCE++.

Every step: sample ``sampling.num_samples`` responses to each of ``algorithm.prompts_per_step`` prompts from
the current policy, score them, compute the sampled tokens' log-probs under the policy and the reference (and
the critic's values), turn rewards into advantages, then run ``algorithm.ppo_epochs`` passes of clipped-surrogate
updates over the rollout. Choices this recipe makes:

- **Log-probs are recomputed** by a forward pass in eval mode on the sampled ids (never re-tokenised text),
  with the logits divided by the sampling temperature, so the old log-probs, the new ones and the reference's
  describe the distribution that was sampled (top-p/top-k are not applied to them, as in TRL and OpenRLHF).
- **Reference**: the policy as loaded; for adapters the same model with the adapter switched off (no second
  copy), for full fine-tuning a frozen copy. The per-token KL to it is logged every step; with ``kl_coef: 0``
  there is no reference at all (no copy, no pass) and no KL is logged.
- **KL anchor**: ``kl_mode: reward`` subtracts ``kl_coef * KL_t`` from every token's reward (InstructGPT; k1 is
  the unbiased choice) with a fixed or adaptive coefficient (Ziegler et al. 2019); for the critic-free
  estimators the per-response sum is subtracted from the score before the baseline. ``kl_mode: loss`` adds
  ``kl_coef * KL_t`` (k3 by default in ``configs/grpo.yaml``) to the loss instead (GRPO).
- **Advantages** (``rl.ADVANTAGES``): ``gae`` — the score at the last token, GAE(γ, λ) over the critic's values,
  whitened over the rollout; ``grpo`` — (score − group mean) / group std, the same for every token;
  ``rloo`` — score minus the mean of the other samples of the prompt; ``reinforce++`` — returns-to-go of the
  token rewards, whitened over the rollout.
- **Loss**: clipped surrogate (optional clip-higher and dual clip) − ``entropy_coef`` × entropy (+ ``kl_coef`` ×
  KL in loss mode) + ``vf_coef`` × clipped value loss (gae), aggregated by ``algorithm.loss_aggregation``
  (``rl.LOSS_AGGREGATIONS``: a token mean over the whole mini-batch, a mean of per-response token means, or
  Dr. GRPO's per-response token sums over ``sampling.max_new_tokens``), normalised by the mini-batch's global
  count so grad accumulation is exact. ``ptx_coef`` mixes in the SFT loss on ``ptx_data`` (InstructGPT's PPO-ptx).
- **Rewards** (``rewards.build_reward``): a reward model, a function, an HTTP service, or their weighted sum,
  minus ``unfinished_penalty`` for responses that never ended; optionally normalised by running statistics and
  clipped. Sampling and scoring happen per step on each process's own prompts; groups never cross processes.
- **Diagnostics** every step (``diagnostics.TrainingWatch``): rewards per source, KL, clip fraction, approx-KL,
  entropy, length, share without an end token, distinct responses, the critic's explained variance, and the
  gold reward when ``watch.gold`` names one; warnings in plain words, and an optional stop.
- **Resume**: the data position is the step count (``Runtime.iterations``); the KL coefficient, the reward
  statistics and the watch's history are checkpointed with the weights (``Runtime.recipe_state``). Sampling
  draws from the global torch RNG, restored from the checkpoint.

Run directory: the usual files, the policy in ``model/``, a separate critic in ``critic/`` (a shared value head
in ``value_head.safetensors``), and ``samples.jsonl`` with a few rollouts per step.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain import rl
from posttrain.config import (
    AlgorithmBlock,
    ConfigError,
    CriticBlock,
    ModelConfig,
    PeftConfig,
    PpoConfig,
    RewardSource,
    SamplingBlock,
    WatchBlock,
)
from posttrain.data.dataset import end_of_turn_ids, require_references, use_chat_template
from posttrain.data.packing import Row
from posttrain.data.rollout_layout import action_mask, in_row_order, response_row, to_actions
from posttrain.diagnostics import TrainingWatch
from posttrain.eval.verifiable import gold_sum, held_out_evaluation
from posttrain.losses import IGNORE_INDEX
from posttrain.models import load_model, load_tokenizer
from posttrain.models.actor_critic import ActorCritic
from posttrain.models.adapters import is_peft_model
from posttrain.models.forward import reference_model
from posttrain.models.loading import model_dir_of
from posttrain.models.ptx import PtxMix, ptx_rows
from posttrain.models.scoring import RolloutBatches, critic_values, response_layout, score_logps, token_logps
from posttrain.rewards import Reward, WeightedReward, build_reward, load_reward_function
from posttrain.rl import RunningMoments, SumOverProcesses
from posttrain.rollout import HFEngine, RolloutEngine, SamplingSettings
from posttrain.rollout.prompts import TokenizedPrompt, tokenized_prompts
from posttrain.runtime import Metrics, ModelSelection, Runtime

SAMPLES_PER_STEP_LOGGED = 4
# There is no held-out loss in online RL: the best checkpoint, and early stopping, follow the mean reward of greedy
# answers to the held-out prompts (eval.verifiable.held_out_sums), maximised.
MODEL_SELECTION = ModelSelection("eval_reward", maximize=True)


@dataclass
class Roles:
    """Who takes part in a step: the engine that samples from the policy, the trained policy (and critic), the
    frozen reference (a copy of a fully fine-tuned policy; None for adapters, switched off instead, or without
    KL), the reward optimised and the gold reward watched."""

    engine: RolloutEngine
    trained: ActorCritic
    frozen_reference: Any
    reward: WeightedReward
    gold: Reward | None


@dataclass
class Rollout:
    """One step's sampled responses on this process, in action space (``(B, R)``, right-padded)."""

    rows: list[Row]  # prompt + response as training rows (targets: the response tokens)
    prompts: list[TokenizedPrompt]  # one per response
    texts: list[str]
    finished: torch.Tensor  # (B,) bool
    mask: torch.Tensor  # (B, R) float
    old_logps: torch.Tensor | None  # None when the one update is on-policy: the update's own forward gives them
    ref_logps: torch.Tensor | None  # None without a KL anchor (kl_coef 0): no reference is kept or run
    values: torch.Tensor | None
    scores: torch.Tensor  # (B,) the reward optimised (after penalty, normalisation, clipping)
    advantages: torch.Tensor  # (B, R)
    returns: torch.Tensor | None  # (B, R), from estimators with a critic
    metrics: Metrics  # this process's statistics of the rollout, for the step's record


def run(config: PpoConfig, config_path: str | None = None) -> dict[str, Any]:
    """Train one online-RL run end to end; returns the run summary."""
    rt = Runtime(config, config_path)
    algorithm, sampling = config.algorithm, config.sampling
    estimator = rl.ADVANTAGES[algorithm.advantage]
    tokenizer = load_tokenizer(config.model)
    train_prompts, eval_prompts = tokenized_prompts(
        config.data, tokenizer, sampling.max_new_tokens, sampling.max_prompts, config.seed
    )
    reward, gold = _rewards(config.reward, config.watch, train_prompts + eval_prompts, rt.device)
    mini_batch = rt.train.batch_size * rt.train.grad_accum
    updates_per_epoch = _updates_per_epoch(algorithm.prompts_per_step, sampling.num_samples, rt.world_size, mini_batch)
    # One update per rollout, no critic, no KL in the reward: the old log-probs are the update's own.
    on_policy = (
        algorithm.ppo_epochs == 1
        and updates_per_epoch == 1
        and not estimator.needs_critic
        and (algorithm.kl_mode == "loss" or not algorithm.kl_coef)
    )

    policy, _ = load_model(config.model, config.peft, tokenizer)
    frozen_reference = _frozen_reference(policy, algorithm.kl_coef, rt.device)
    separate_critic = estimator.needs_critic and not config.critic.shared
    critic = _critic(config.critic, config.model, config.peft, tokenizer) if separate_critic else None
    trained = ActorCritic(policy, critic, shared_value_head=estimator.needs_critic and config.critic.shared)
    layout = response_layout(
        config.data, sampling.num_samples, [m for m in (policy, critic) if m is not None], tokenizer.pad_token_id
    )
    batches = RolloutBatches(layout, rt.device, rt.train.batch_size, rt.accelerator.autocast)
    ptx = None  # PPO-ptx: SFT rows mixed into every micro-batch
    if algorithm.ptx_coef:
        rows = ptx_rows(config.data, algorithm.ptx_data, tokenizer, config.seed)
        process_index, world_size = rt.accelerator.process_index, rt.world_size
        ptx = PtxMix(rows, algorithm.ptx_coef, tokenizer.pad_token_id, rt.train.batch_size, process_index, world_size)
    # The policy module itself generates: accelerate's prepare moves and wraps it, but the object stays the same.
    stop_ids = end_of_turn_ids(tokenizer, use_chat_template(tokenizer, config.data.template))
    engine = HFEngine(trained.policy, tokenizer, stop_ids, batch_size=sampling.batch_size)
    roles = Roles(engine, trained, frozen_reference, reward, gold)

    module = rt.setup(
        trained,
        num_rows=len(train_prompts),
        rows_per_step=algorithm.prompts_per_step,
        updates_per_step=algorithm.ppo_epochs * updates_per_epoch,
        parameter_groups=trained.parameter_groups(config.critic.lr, config.critic.max_grad_norm),
        selection=MODEL_SELECTION,
    )
    state = rt.recipe_state  # what a resumed run continues from
    kl_controller = kl_controller_for(algorithm, state)
    moments = RunningMoments(state.get("reward_moments"))
    watch = TrainingWatch(config.watch, sampling.max_new_tokens)
    if "watch" in state:
        watch.load_state_dict(state["watch"])
    if ptx is not None:
        ptx.drawn = state.get("ptx_drawn", 0)
    warnings: list[dict[str, Any]] = state.get("warnings", [])
    stopped_by: str | None = None
    settings = SamplingSettings(
        sampling.num_samples, sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k
    )
    my_eval_prompts = eval_prompts[rt.accelerator.process_index :: rt.world_size]
    rt.log(
        f"ppo: advantage {algorithm.advantage}, {algorithm.prompts_per_step} prompts x {sampling.num_samples} samples per step, "
        f"{algorithm.ppo_epochs} epoch(s) x {updates_per_epoch} update(s), kl {algorithm.kl_mode} ({algorithm.kl_estimator}, coef {kl_controller.value}), "
        f"{len(train_prompts)} training / {len(eval_prompts)} held-out prompts"
    )

    for step_prompts in rt.iterations(train_prompts):
        rollout = make_rollout(
            step_prompts,
            roles,
            settings,
            algorithm,
            kl_controller.value,
            moments,
            batches,
            rt.sum_over_processes,
            on_policy,
        )
        step_stats = Metrics().merge(rollout.metrics)  # then every micro-batch's, all reduced at once below
        for epoch in range(algorithm.ppo_epochs):
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + rt.global_step * 101 + epoch)
            order = torch.randperm(len(rollout.rows), generator=generator).tolist()
            for update in range(updates_per_epoch):
                members = order[update * mini_batch : (update + 1) * mini_batch]
                normaliser = rl.loss_normaliser(
                    rollout.mask[members], algorithm.loss_aggregation, rt.world_size, rt.sum_over_processes
                )
                for micro in range(rt.train.grad_accum):
                    chosen = members[micro * rt.train.batch_size : (micro + 1) * rt.train.batch_size]
                    loss, stats = ppo_micro_loss(
                        module, rollout, chosen, normaliser, kl_controller.value, algorithm, sampling, batches
                    )
                    if ptx is not None:
                        policy_module = rt.accelerator.unwrap_model(module).policy
                        ptx_loss, ptx_sum, ptx_tokens = ptx.next_loss(
                            policy_module, rt.train.grad_accum * rt.world_size, batches
                        )
                        loss = loss + ptx_loss
                        step_stats.token_mean("ptx_loss", ptx_sum, ptx_tokens)
                    step_stats.merge(stats)
                    rt.backward(loss)
                rt.update()
        engine.sync_weights(trained.policy)

        step_stats = rt.all_reduce(step_stats)
        step_metrics = step_stats.values()  # what the KL controller and the watch read, before the step is logged
        kl_controller.update(step_metrics.get("kl", 0.0), algorithm.prompts_per_step * sampling.num_samples)
        for warning in watch.observe(rt.global_step + 1, step_metrics):
            rt.log(f"watch: {warning.message}")
            warnings.append({"step": rt.global_step + 1, "kind": warning.kind})
            if warning.stops and stopped_by is None:
                stopped_by = warning.kind
        if ptx is not None:
            rt.recipe_state["ptx_drawn"] = ptx.drawn
        rt.recipe_state.update(
            kl_coef=kl_controller.value,
            reward_moments=moments.state_dict(),
            watch=watch.state_dict(),
            warnings=warnings,
        )
        if rt.is_main:
            _append_samples(rt.run_dir / "samples.jsonl", rt.global_step + 1, rollout)
        step_stats.last("kl_coef", kl_controller.value)
        rt.log_step(step_stats)
        if stopped_by:
            rt.stopped_early = True
            rt.log(
                f"stopping at step {rt.global_step}: the watch saw {stopped_by.replace('_', ' ')} (watch.stop_on_warning)"
            )
        if eval_prompts and rt.should_evaluate():
            rt.record_evaluation(
                held_out_evaluation(
                    my_eval_prompts, engine, reward, gold, sampling.max_new_tokens, rt.sum_over_processes, rt.device
                )
            )

    summary: dict[str, Any] = {
        "advantage": algorithm.advantage,
        "watch_warnings": warnings,
        "stopped_by_watch": stopped_by,
    }
    return rt.finish(module, tokenizer, summary)


# ---------------------------------------------------------------------------------------------------- setup
def _rewards(
    source: RewardSource, watch: WatchBlock, prompts: list[TokenizedPrompt], device: torch.device
) -> tuple[WeightedReward, Reward | None]:
    """The reward optimised (``reward``) and the gold reward the watch compares it with (``watch.gold``: a
    function, or ``watch.gold_model``: a second reward model), if any; either may need every prompt to carry a
    reference answer."""
    reward = build_reward(source, device=str(device))
    every_prompt = [row.prompt for row in prompts]
    if reward.needs_reference:
        require_references(every_prompt, "the reward")
    gold: Reward | None = None
    if watch.gold:
        gold = load_reward_function(watch.gold)
    elif watch.gold_model:
        gold = build_reward(RewardSource(model=watch.gold_model), device=str(device))
    if gold is not None and gold.needs_reference:
        require_references(every_prompt, "watch.gold")
    return reward, gold


def _updates_per_epoch(prompts_per_step: int, num_samples: int, world_size: int, mini_batch: int) -> int:
    """Optimizer updates per pass over a rollout: each process's responses over ``train.batch_size x grad_accum``."""
    if prompts_per_step % world_size:
        raise ConfigError(
            f"algorithm.prompts_per_step ({prompts_per_step}) must divide evenly over {world_size} processes"
        )
    responses_per_process = prompts_per_step // world_size * num_samples
    if responses_per_process % mini_batch:
        raise ConfigError(
            f"each process samples {responses_per_process} responses per step (algorithm.prompts_per_step / processes x "
            f"sampling.num_samples), which must be a multiple of train.batch_size x train.grad_accum ({mini_batch})"
        )
    return responses_per_process // mini_batch


def _frozen_reference(policy: Any, kl_coef: float, device: torch.device) -> Any:
    """A frozen copy of a fully fine-tuned ``policy`` to measure the KL against; None for adapters (the reference is
    the same model with the adapter switched off) and without a KL anchor: kl_coef 0 needs no reference (kl_target,
    the only way it could grow, is refused with it), so make_rollout skips its pass (TRL's GRPO does the same,
    beta 0)."""
    if kl_coef and not is_peft_model(policy):
        return copy.deepcopy(policy).eval().requires_grad_(False).to(device)
    return None


def _critic(critic: CriticBlock, model: ModelConfig, peft: PeftConfig, tokenizer: Any) -> Any:
    """A separate critic with a value head: ``critic.path`` (a reward-model run directory resolves to its model/
    folder, whose head is then loaded, not fresh), or else a copy of the policy's ``model`` with a fresh head."""
    critic_path = str(model_dir_of(critic.path)) if critic.path else model.path
    loaded, _ = load_model(model.model_copy(update={"path": critic_path}), peft, tokenizer, scalar_head=True)
    return loaded


def kl_controller_for(
    algorithm: AlgorithmBlock, state: dict[str, Any]
) -> rl.FixedKLController | rl.AdaptiveKLController:
    """The KL coefficient β: fixed, or steered to ``kl_target`` over ``kl_horizon`` responses (Ziegler et al.),
    continuing from a resumed run's ``state``."""
    if algorithm.kl_target:
        return rl.AdaptiveKLController(
            state.get("kl_coef", algorithm.kl_coef), algorithm.kl_target, algorithm.kl_horizon
        )
    return rl.FixedKLController(algorithm.kl_coef)


# ---------------------------------------------------------------------------------------------------- rollout
def make_rollout(
    prompts: list[TokenizedPrompt],
    roles: Roles,
    settings: SamplingSettings,
    algorithm: AlgorithmBlock,
    kl_coef: float,
    moments: RunningMoments,
    batches: RolloutBatches,
    sum_over_processes: SumOverProcesses,
    on_policy: bool = False,
) -> Rollout:
    """Sample, score, and compute everything the updates need (all without gradients). ``on_policy``: the rollout
    gets exactly one update, so its log-probs before the update are the update's own (``ppo_micro_loss`` takes
    them from its forward) and the separate old-policy pass is skipped. ``sum_over_processes`` sums a tensor over
    every process (``Runtime.sum_over_processes``): the reward statistics and the whitening span the whole rollout."""
    device = batches.device
    groups = roles.engine.generate([p.prompt_ids for p in prompts], settings)
    flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    responses = [r for group in groups for r in group]
    texts = [r.text for r in responses]
    finished = torch.tensor([r.finished for r in responses], device=device)
    rows = [response_row(p.prompt_ids, r.token_ids, i) for i, (p, r) in enumerate(zip(flat_prompts, responses))]
    mask = action_mask(rows, device)

    messages = [p.prompt.messages for p in flat_prompts]
    references = [p.prompt.reference for p in flat_prompts]
    breakdown = roles.reward.breakdown(messages, texts, references, finished=finished.tolist())
    raw = torch.tensor(breakdown["total"], dtype=torch.float32, device=device)
    scores = rl.optimised_scores(raw, algorithm.reward_normalize, algorithm.reward_clip, moments, sum_over_processes)

    policy, temperature = roles.trained.policy, settings.temperature
    old_logps = None if on_policy else to_actions(score_logps(policy, rows, temperature, batches), mask)
    ref_logps = None
    if roles.frozen_reference is not None:
        ref_logps = to_actions(score_logps(roles.frozen_reference, rows, temperature, batches), mask)
    elif algorithm.kl_coef:
        with reference_model(policy) as reference:
            ref_logps = to_actions(score_logps(reference, rows, temperature, batches), mask)
    values = to_actions(critic_values(roles.trained, rows, batches), mask) if roles.trained.has_critic else None
    # Without old log-probs the KL can only enter the loss (on_policy requires it); the reward then carries none.
    if old_logps is not None and ref_logps is not None:
        kl = rl.kl_estimate(old_logps, ref_logps, algorithm.kl_estimator, mask=mask)
    else:
        kl = torch.zeros_like(mask)
    advantages, returns = advantages_for(
        algorithm, settings.num_samples, scores, kl, mask, values, kl_coef, sum_over_processes
    )

    # Means per response unless said otherwise, over every process once the step reduces them.
    metrics, num_responses = Metrics(), len(rows)
    if old_logps is not None and ref_logps is not None:  # the KL to the reference is measured
        metrics.example_mean("kl", rl.kl_estimate(old_logps, ref_logps, "k1", mask=mask).sum(), num_responses)
    metrics.example_mean("reward", raw.sum(), num_responses)
    metrics.std("reward_std", raw)
    metrics.example_mean("response_length", mask.sum(), num_responses)
    metrics.example_mean("unfinished_share", (~finished).sum(), num_responses)
    metrics.example_mean("distinct_share", len(set(texts)), num_responses)
    metrics.token_mean("advantage", rl.masked_sum(advantages, mask), mask.sum())  # a token mean, like the loss
    for name, values_of_term in breakdown.items():
        if name != "total" and len(breakdown) > 2:
            metrics.example_mean(f"reward_{name}", sum(values_of_term), num_responses)
    if roles.gold is not None:
        # Recorded on every process (count 0 where no response is scorable), so the reduce lines up everywhere.
        metrics.example_mean("gold_reward", *gold_sum(roles.gold, messages, texts, references))
    if returns is not None and values is not None:
        metrics.example_mean(
            "value_explained_variance", rl.explained_variance(values, returns, mask), 1
        )  # mean over processes
    return Rollout(
        rows, flat_prompts, texts, finished, mask, old_logps, ref_logps, values, scores, advantages, returns, metrics
    )


def advantages_for(
    algorithm: AlgorithmBlock,
    num_samples: int,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None,
    kl_coef: float,
    sum_over_processes: SumOverProcesses,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages (B, R), returns (B, R) or None)`` of ``rl.ADVANTAGES[algorithm.advantage]`` (groups of
    ``num_samples``), whitened over the whole rollout when the estimator is and ``whiten_advantages`` asks for it."""
    estimator = rl.ADVANTAGES[algorithm.advantage]
    options = rl.AdvantageSettings(
        kl_coef if algorithm.kl_mode == "reward" else 0.0,
        algorithm.gamma,
        algorithm.lam,
        num_samples,
        algorithm.scale_by_std,
    )
    advantages, returns = estimator.estimate(scores, kl, mask, values, options)
    if estimator.whitened and algorithm.whiten_advantages:
        advantages = rl.whiten_over_processes(advantages, mask, sum_over_processes)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------- updates
def ppo_micro_loss(
    module: Any,
    rollout: Rollout,
    chosen: list[int],
    normaliser: float,
    kl_coef: float,
    algorithm: AlgorithmBlock,
    sampling: SamplingBlock,
    batches: RolloutBatches,
) -> tuple[torch.Tensor, Metrics]:
    """The loss of the responses ``chosen`` from ``rollout`` (one micro-batch: its share of the update's normalised
    sum) and its statistics."""
    temperature = sampling.temperature
    batch, order = batches.batch([rollout.rows[i] for i in chosen])
    mask = rollout.mask[chosen]
    mask = mask[:, : int(mask.sum(1).max())]
    width = mask.shape[1]

    def take(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[chosen][:, :width]

    with batches.autocast():
        logits, values_flat = module(
            batch["input_ids"], batch["attention_mask"], batch["targets"], position_ids=batch.get("position_ids")
        )
    logits = in_row_order(logits, order)
    values_flat = in_row_order(values_flat, order) if values_flat is not None else None
    logps = to_actions(
        token_logps(logits, in_row_order(batch["targets"][batch["targets"] != IGNORE_INDEX], order), temperature), mask
    )
    entropy = to_actions(rl.entropy_from_logits(logits.float() / temperature), mask)
    stats = Metrics()
    if rollout.old_logps is None:
        # On-policy (make_rollout's on_policy): the old log-probs are these very ones (ratio 1, the same gradient),
        # and the rollout's KL, per response like make_rollout's, comes from this forward (the one update takes
        # every response once).
        old_logps = logps.detach()
        if rollout.ref_logps is not None:
            stats.example_mean(
                "kl", rl.masked_sum(rl.kl_estimate(old_logps, take(rollout.ref_logps), "k1"), mask), len(chosen)
            )
    else:
        old_logps = take(rollout.old_logps)
    policy_token_loss, clipped = rl.policy_loss(
        logps,
        old_logps,
        take(rollout.advantages),
        mask,
        algorithm.clip_range,
        algorithm.clip_range_high,
        algorithm.dual_clip,
    )
    token_loss = policy_token_loss - algorithm.entropy_coef * entropy
    if algorithm.kl_mode == "loss" and kl_coef:
        assert rollout.ref_logps is not None, "a rollout under kl_coef > 0 always carries reference log-probs"
        token_loss = token_loss + kl_coef * rl.kl_estimate(logps, take(rollout.ref_logps), algorithm.kl_estimator)
    value_token_loss = None
    if values_flat is not None and rollout.returns is not None and rollout.values is not None:
        value_token_loss, _ = rl.value_loss(
            to_actions(values_flat, mask), take(rollout.values), take(rollout.returns), mask, algorithm.value_clip
        )
        token_loss = token_loss + algorithm.vf_coef * value_token_loss
    loss = rl.aggregate_loss(token_loss, mask, algorithm.loss_aggregation, normaliser, sampling.max_new_tokens)
    tokens = mask.sum()
    stats.token_mean("loss", rl.masked_sum(token_loss, mask).detach(), tokens)  # the whole loss per token
    stats.count_trained_tokens(tokens)
    stats.token_mean("policy_loss", rl.masked_sum(policy_token_loss, mask).detach(), tokens)
    stats.token_mean("clip_fraction", rl.masked_sum(clipped, mask), tokens)
    stats.token_mean("approx_kl", rl.masked_sum(rl.kl_estimate(old_logps, logps.detach(), "k2"), mask), tokens)
    stats.token_mean("entropy", rl.masked_sum(entropy.detach(), mask), tokens)
    if value_token_loss is not None:
        stats.token_mean("value_loss", rl.masked_sum(value_token_loss, mask).detach(), tokens)
    stats.per_second("tokens_per_s", batch["num_real_tokens"])
    return loss, stats


# ---------------------------------------------------------------------------------------------------- records
def _append_samples(path: Path, step: int, rollout: Rollout) -> None:
    """The step's first few rollouts, appended to ``samples.jsonl`` to read along with the metrics."""
    with open(path, "a", encoding="utf-8") as handle:
        for i in range(min(SAMPLES_PER_STEP_LOGGED, len(rollout.texts))):
            prompt = rollout.prompts[i].prompt
            sample = {
                "step": step,
                "prompt": prompt.messages[-1]["content"],
                "reference": prompt.reference,
                "response": rollout.texts[i],
                "reward": float(rollout.scores[i]),
                "finished": bool(rollout.finished[i]),
            }
            handle.write(json.dumps(sample) + "\n")
