"""Online RL from prompts (``stage: ppo``): PPO with a critic, and the critic-free GRPO, RLOO and REINFORCE++.

Every step: sample ``sampling.num_samples`` responses to each of ``algorithm.prompts_per_step`` prompts from
the current policy, score them, compute the sampled tokens' log-probs under the policy and the reference (and
the critic's values), turn rewards into advantages, then run ``algorithm.ppo_epochs`` passes of clipped-surrogate
updates over the rollout. Choices (each explained, with its source, in docs/rl.md):

- log-probs recomputed by an eval-mode forward on the sampled ids at the sampling temperature (top-p/top-k not
  applied); with one update per rollout the update's own forward gives the old ones;
- the reference is the policy as loaded (adapter switched off, or a frozen copy); none at ``kl_coef: 0``;
- the KL in the reward (k1, fixed or adaptive coefficient; InstructGPT) or in the loss (k3; GRPO);
- advantages from ``rl.ADVANTAGES`` (gae over a critic, grpo, rloo, reinforce++), whitened where the estimator is;
- loss: clipped surrogate − entropy bonus (+ KL) + clipped value loss, aggregated by ``rl.LOSS_AGGREGATIONS``
  over the mini-batch's global count, so grad accumulation is exact; optional PPO-ptx;
- rewards from ``rewards.build_reward``, optionally normalised and clipped; groups never cross processes;
- diagnostics and the training watch every step (``diagnostics.py``); resume continues the KL coefficient, the
  reward statistics and the watch.

Run directory: the usual files, the policy in ``model/``, a separate critic in ``critic/`` (a shared value head
in ``value_head.safetensors``), and ``samples.jsonl`` with a few rollouts per step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from posttrain import rl
from posttrain.config import AlgorithmBlock, PpoConfig, SamplingBlock
from posttrain.data.dataset import end_of_turn_ids, use_chat_template
from posttrain.data.packing import Row
from posttrain.data.records import Prompt
from posttrain.data.rollout_layout import action_mask, in_row_order, mini_batches_per_epoch, response_row, to_actions
from posttrain.diagnostics import TrainingWatch, append_samples, rollout_metrics
from posttrain.eval.verifiable import gold_sum, held_out_evaluation
from posttrain.losses import IGNORE_INDEX
from posttrain.models import load_model, load_tokenizer
from posttrain.models.actor_critic import ActorCritic, frozen_reference, load_critic
from posttrain.models.ptx import PtxMix, ptx_rows
from posttrain.models.scoring import RolloutBatches, critic_values, response_layout, score_logps, token_logps
from posttrain.rewards import reward_and_gold
from posttrain.rl import RunningMoments, SumOverProcesses
from posttrain.roles import Roles, Sampled, local_roles, placed_roles
from posttrain.rollout import SamplingSettings, build_engine
from posttrain.rollout.hf import sample_key
from posttrain.rollout.prompts import TokenizedPrompt, tokenized_prompts
from posttrain.runtime import Metrics, ModelSelection, Runtime

# There is no held-out loss in online RL: the best checkpoint, and early stopping, follow the mean reward of greedy
# answers to the held-out prompts (eval.verifiable.held_out_sums), maximised.
MODEL_SELECTION = ModelSelection("eval_reward", maximize=True)


@dataclass
class Rollout:
    """One step's sampled responses on this process, in action space (``(B, R)``, right-padded)."""

    rows: list[Row]  # prompt + response as training rows (targets: the response tokens)
    prompts: list[Prompt]  # one per response
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
    every_prompt = [p.prompt for p in train_prompts + eval_prompts]
    placement, placed = config.distributed.placement, config.distributed.roles

    def in_this_process(role: Any) -> bool:
        return placement == "local" or role.colocate_with == "policy"

    reward, gold = None, None  # built in the reward role's actor instead when it has one
    if in_this_process(placed.reward):
        reward, gold = reward_and_gold(
            config.reward, config.watch.gold, config.watch.gold_model, every_prompt, str(rt.device)
        )
    mini_batch = rt.train.batch_size * rt.train.grad_accum
    updates_per_epoch = mini_batches_per_epoch(
        algorithm.prompts_per_step, sampling.num_samples, rt.world_size, mini_batch
    )
    # One update per rollout, no critic, no KL in the reward: the old log-probs are the update's own. Not in
    # asynchronous mode: there the rollout comes from the weights before the last update.
    on_policy = (
        not algorithm.async_
        and algorithm.ppo_epochs == 1
        and updates_per_epoch == 1
        and not estimator.needs_critic
        and (algorithm.kl_mode == "loss" or not algorithm.kl_coef)
    )

    policy, _ = load_model(config.model, config.peft, tokenizer)
    frozen_copy = frozen_reference(policy, algorithm.kl_coef, rt.device) if in_this_process(placed.reference) else None
    separate_critic = estimator.needs_critic and not config.critic.shared
    critic = load_critic(config.critic.path, config.model, config.peft, tokenizer) if separate_critic else None
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
    engine = build_engine(
        sampling, config.model, config.peft, trained.policy, tokenizer, stop_ids, config.seed, config.data.max_length
    )
    here = local_roles(trained.policy, engine, frozen_copy, algorithm.kl_coef, batches, reward, gold)

    module = rt.setup(
        trained,
        num_rows=len(train_prompts),
        rows_per_step=algorithm.prompts_per_step,
        updates_per_step=algorithm.ppo_epochs * updates_per_epoch,
        # A function of the model: under FSDP its parameters are only known once it is sharded.
        parameter_groups=lambda model: model.parameter_groups(config.critic.lr, config.critic.max_grad_norm),
        selection=MODEL_SELECTION,
    )
    state = rt.recipe_state  # what a resumed run continues from
    kl_controller = rl.kl_controller(
        algorithm.kl_coef, algorithm.kl_target, algorithm.kl_horizon, state.get("kl_coef")
    )
    moments = RunningMoments(state.get("reward_moments"))
    watch = TrainingWatch(config.watch, sampling.max_new_tokens)
    if "watch" in state:
        watch.load_state_dict(state["watch"])
    if ptx is not None:
        ptx.drawn = state.get("ptx_drawn", 0)
    warnings: list[dict[str, Any]] = state.get("warnings", [])
    settings = SamplingSettings(
        sampling.num_samples, sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k
    )
    rt.log(
        f"ppo: advantage {algorithm.advantage}, {algorithm.prompts_per_step} prompts x {sampling.num_samples} samples per step, "
        f"{algorithm.ppo_epochs} epoch(s) x {updates_per_epoch} update(s), kl {algorithm.kl_mode} ({algorithm.kl_estimator}, coef {kl_controller.value}), "
        f"{len(train_prompts)} training / {len(eval_prompts)} held-out prompts"
    )

    with placed_roles(config, every_prompt, here, rt.run_dir, rt.log, rt.world_size) as roles:
        with rt.full_weights(module):
            roles.sync(trained.policy, rt.global_step)  # the engines start from the trainer's weights
        summary = _train(
            config,
            rt,
            module,
            trained,
            roles,
            train_prompts,
            eval_prompts,
            settings,
            batches,
            ptx,
            kl_controller,
            moments,
            watch,
            warnings,
            updates_per_epoch,
            on_policy,
        )
    return rt.finish(module, tokenizer, summary)


def _train(
    config: PpoConfig,
    rt: Runtime,
    module: Any,
    trained: ActorCritic,
    roles: Roles,
    train_prompts: list[TokenizedPrompt],
    eval_prompts: list[TokenizedPrompt],
    settings: SamplingSettings,
    batches: RolloutBatches,
    ptx: PtxMix | None,
    kl_controller: Any,
    moments: RunningMoments,
    watch: TrainingWatch,
    warnings: list[dict[str, Any]],
    updates_per_epoch: int,
    on_policy: bool,
) -> dict[str, Any]:
    """The steps: rollout, epochs of updates, weight sync, the KL controller, the watch, records, evaluation.
    Asynchronous mode (``algorithm.async``) asks for step t+1's rollout as soon as step t's has arrived, from
    the weights before step t's update, so sampling and training overlap (staleness 1, checked by the engines)."""
    algorithm, sampling = config.algorithm, config.sampling
    mini_batch = rt.train.batch_size * rt.train.grad_accum
    stopped_by: str | None = None
    my_eval_prompts = eval_prompts[rt.accelerator.process_index :: rt.world_size]
    behaviour_temperature = sampling.temperature if algorithm.async_ else None

    def ask_for_rollout(step: int, prompts: list[TokenizedPrompt], min_version: int) -> Any:
        keys = [sample_key(config.seed, step, p.index) for p in prompts]
        return roles.submit_rollout(
            [p.prompt_ids for p in prompts], settings, keys, min_version, behaviour_temperature
        )

    pending = None
    for step_prompts in rt.iterations(train_prompts):
        step = rt.global_step
        waiting = time.perf_counter()
        if pending is None:  # synchronous, or the first step of an asynchronous run
            with rt.full_weights(module):  # a sharded policy is gathered for the rollout: each process samples alone
                sampled = ask_for_rollout(step, step_prompts, step).result()
        else:
            sampled = pending.result()
            pending = None
        waited = time.perf_counter() - waiting
        if algorithm.async_:
            following = rt.rows_of_step(train_prompts, step + 1)
            if following is not None:  # sampled now, on the weights before this step's update (version step)
                pending = ask_for_rollout(step + 1, following, step)
        with rt.full_weights(module):
            rollout = make_rollout(
                step_prompts,
                sampled,
                trained,
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
        step_stats.last("rollout_version_lag", step - sampled.version)  # 1 in asynchronous mode, else 0
        # The step's time on the rollout's critical path (all of sampling when synchronous, what the update did not
        # hide when asynchronous) and on the weight sync, the two costs the anchors' users find out too late.
        step_stats.last("rollout_wait_s", waited)
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
                        policy_module = rt.unwrap(module).policy
                        ptx_loss, ptx_sum, ptx_tokens = ptx.next_loss(
                            policy_module, rt.train.grad_accum * rt.world_size, batches
                        )
                        loss = loss + ptx_loss
                        step_stats.token_mean("ptx_loss", ptx_sum, ptx_tokens)
                    step_stats.merge(stats)
                    rt.backward(loss)
                rt.update()
        with rt.full_weights(module):
            roles.sync(trained.policy, step + 1)
        step_stats.last("weight_sync_s", roles.sync_seconds[-1])

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
            scores, finished = rollout.scores.tolist(), rollout.finished.tolist()
            append_samples(
                rt.run_dir / "samples.jsonl", rt.global_step + 1, rollout.prompts, rollout.texts, scores, finished
            )
        step_stats.last("kl_coef", kl_controller.value)
        rt.log_step(step_stats)
        if stopped_by:
            rt.stopped_early = True
            rt.log(
                f"stopping at step {rt.global_step}: the watch saw {stopped_by.replace('_', ' ')} (watch.stop_on_warning)"
            )
        if eval_prompts and rt.should_evaluate():
            with rt.full_weights(module):
                results = held_out_evaluation(
                    my_eval_prompts,
                    roles.engine(),
                    roles.reward,
                    roles.gold,
                    sampling.max_new_tokens,
                    rt.sum_over_processes,
                    rt.device,
                )
            rt.record_evaluation(results)

    summary: dict[str, Any] = {
        "advantage": algorithm.advantage,
        "watch_warnings": warnings,
        "stopped_by_watch": stopped_by,
    }
    if config.distributed.placement == "ray":
        syncs = roles.sync_seconds
        summary["placement"] = {
            "roles": roles.describe(),
            "restarts": roles.restarts(),
            "weight_sync_s_mean": sum(syncs) / max(len(syncs), 1),
        }
    return summary


# ---------------------------------------------------------------------------------------------------- rollout
def make_rollout(
    prompts: list[TokenizedPrompt],
    sampled: Sampled,
    trained: ActorCritic,
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
    every process (``Runtime.sum_over_processes``): the reward statistics and the whitening span the whole rollout.
    ``sampled``: the engines' responses to ``prompts`` (with the behaviour log-probs in asynchronous mode: the
    weights that sampled them are one update behind ``trained``'s)."""
    device = batches.device
    groups = sampled.groups
    flat_prompts = [p for p, group in zip(prompts, groups) for _ in group]
    responses = [r for group in groups for r in group]
    texts = [r.text for r in responses]
    finished = torch.tensor([r.finished for r in responses], device=device)
    rows = [response_row(p.prompt_ids, r.token_ids, i) for i, (p, r) in enumerate(zip(flat_prompts, responses))]
    mask = action_mask(rows, device)

    records = [p.prompt for p in flat_prompts]
    messages, references = [r.messages for r in records], [r.reference for r in records]
    breakdown = roles.reward.breakdown(messages, texts, references, finished=finished.tolist())
    raw = torch.tensor(breakdown["total"], dtype=torch.float32, device=device)
    scores = rl.optimised_scores(raw, algorithm.reward_normalize, algorithm.reward_clip, moments, sum_over_processes)

    policy, temperature = trained.policy, settings.temperature
    old_logps: torch.Tensor | None
    if sampled.behaviour_logps is not None:
        old_logps = to_actions(sampled.behaviour_logps.to(device), mask)
    else:
        old_logps = None if on_policy else to_actions(score_logps(policy, rows, temperature, batches), mask)
    ref_logps = None
    if roles.reference is not None:
        ref_logps = to_actions(roles.reference_logps(rows, temperature).to(device), mask)
    values = to_actions(critic_values(trained, rows, batches), mask) if trained.has_critic else None
    # Without old log-probs the KL can only enter the loss (on_policy requires it); the reward then carries none.
    if old_logps is not None and ref_logps is not None:
        kl = rl.kl_estimate(old_logps, ref_logps, algorithm.kl_estimator, mask=mask)
    else:
        kl = torch.zeros_like(mask)
    advantages, returns = advantages_for(
        algorithm, settings.num_samples, scores, kl, mask, values, kl_coef, sum_over_processes
    )

    gold = gold_sum(roles.gold, messages, texts, references) if roles.gold is not None else None
    metrics = rollout_metrics(
        raw, breakdown, texts, finished, mask, advantages, old_logps, ref_logps, gold, values, returns
    )
    return Rollout(
        rows, records, texts, finished, mask, old_logps, ref_logps, values, scores, advantages, returns, metrics
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
