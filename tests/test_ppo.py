"""The online-RL recipe (``stage: ppo``) on the micro model: every advantage estimator trains and logs its
diagnostics, the policy starts exactly at its reference (KL 0), grad accumulation and resume are invariances,
a planted flawed reward is caught by the watch, and bad settings fail before any model loads."""

from __future__ import annotations

import contextlib
import json
import math
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import prompts_file, sft_config
from safetensors.torch import load_file

from posttrain import diagnostics, rl
from posttrain.config import ConfigError
from posttrain.data.rollout_layout import ResponseLayout, response_row
from posttrain.losses import IGNORE_INDEX
from posttrain.models import actor_critic
from posttrain.models.scoring import RolloutBatches, response_layout
from posttrain.recipes import ppo


def length_reward(prompt: str, response: str, reference: str | None) -> float:
    """A flawed reward that pays for length (characters / 10): the planted reward-hacking case."""
    return len(response) / 10.0


LENGTH_REWARD = f"{__name__}:length_reward"


def prompt_length_reward(prompt: str, response: str, reference: str | None) -> float:
    """Differs between prompts even when every response is the same (greedy rollouts of an untrained model)."""
    return len(prompt) / 10.0


def ppo_config(model: Path, data: Path, out: Path, **overrides: Any) -> Any:
    defaults = {
        "stage": "ppo",
        "sampling__num_samples": 2,
        "sampling__max_new_tokens": 6,
        "algorithm__prompts_per_step": 4,
        "train__batch_size": 4,
        "train__grad_accum": 2,
        "train__max_steps": 2,
        # The untrained micro model never scores on the toy tasks; a length reward differs between its samples.
        "reward__function": LENGTH_REWARD,
        "watch__gold": "toy",
        "optim__lr": 1e-3,
    }
    return sft_config(model, data, out, **{**defaults, **overrides})


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


ESTIMATORS = {
    "gae": {"algorithm__advantage": "gae"},
    "gae_shared_critic": {"algorithm__advantage": "gae", "critic__shared": True},
    "grpo": {"algorithm__advantage": "grpo", "algorithm__kl_mode": "loss", "algorithm__kl_estimator": "k3"},
    "rloo": {"algorithm__advantage": "rloo"},
    "reinforce++": {"algorithm__advantage": "reinforce++"},
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_trains_and_logs_its_diagnostics(name, toy, micro_model, tmp_path) -> None:
    out = tmp_path / "run"
    summary = ppo.run(ppo_config(micro_model, prompts_file(toy, tmp_path / "p.jsonl"), out, **ESTIMATORS[name]))
    steps = [r for r in records(out) if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    expected = {
        "reward",
        "reward_std",
        "gold_reward",
        "kl",
        "kl_coef",
        "clip_fraction",
        "approx_kl",
        "entropy",
        "response_length",
        "unfinished_share",
        "distinct_share",
        "policy_loss",
        "grad_norm",
    }
    if name.startswith("gae"):
        expected |= {"value_loss", "value_explained_variance"}
    for record in steps:
        assert expected <= record.keys(), expected - record.keys()
        assert all(torch.isfinite(torch.tensor(float(record[k]))) for k in expected)
        assert 0.0 <= record["unfinished_share"] <= 1.0 and 0.0 < record["distinct_share"] <= 1.0
    for sample in map(json.loads, (out / "samples.jsonl").read_text().splitlines()):
        assert sample["reward"] == pytest.approx(length_reward("", sample["response"], None))
    # The policy changed, and the critic was saved where the next stages look for it.
    before, after = weights(micro_model), weights(out / "model")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "critic").is_dir() == (name == "gae")
    assert (out / "value_head.safetensors").exists() == (name == "gae_shared_critic")
    assert summary["advantage"] == ESTIMATORS[name]["algorithm__advantage"] and summary["steps"] == 2
    assert (out / "samples.jsonl").read_text().count("\n") == 2 * diagnostics.SAMPLES_PER_STEP_LOGGED


@pytest.mark.parametrize("method", ["full", "lora"])
def test_first_step_kl_to_the_reference_is_exactly_zero(method, toy, micro_model, tmp_path) -> None:
    """Before any update the policy is its reference (a frozen copy for full tuning; the adapter switched off for
    LoRA, whose B = 0 start makes it the base), so the step-1 rollout's KL is 0 exactly, not approximately."""
    out = tmp_path / "run"
    ppo.run(
        ppo_config(
            micro_model,
            prompts_file(toy, tmp_path / "p.jsonl"),
            out,
            peft__method=method,
            algorithm__advantage="grpo",
            sampling__num_samples=2,
        )
    )
    first, second = [r for r in records(out) if "reward" in r]
    assert first["kl"] == 0.0
    assert second["kl"] != 0.0  # and the first update moved the policy away from it


def test_grad_accumulation_1x8_equals_8x1(toy, micro_model, tmp_path) -> None:
    """One update over 8 responses as one micro-batch of 8 or eight of 1: the token-mean loss is normalised by
    the update's total response tokens, so the weights after the step agree (up to float summation order)."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    results = {}
    for batch_size, accum in ((8, 1), (1, 8)):
        out = tmp_path / f"run{batch_size}x{accum}"
        # SGD, as in test_sft_invariance: the two layouts sum in another order (prompts shared within a
        # micro-batch of 8, not in micro-batches of 1), and Adam's first step would amplify that noise.
        ppo.run(
            ppo_config(
                micro_model,
                data,
                out,
                algorithm__advantage="gae",
                train__batch_size=batch_size,
                train__grad_accum=accum,
                train__max_steps=1,
                sampling__num_samples=2,
                algorithm__prompts_per_step=4,
                optim__name="sgd",
                optim__lr=0.5,
            )
        )
        results[(batch_size, accum)] = weights(out / "model")
    a, b = results[(8, 1)], results[(1, 8)]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(a[k], weights(micro_model)[k]) for k in a)


@pytest.mark.parametrize("advantage", ["gae", "grpo"])
def test_resume_equals_uninterrupted(advantage, toy, micro_model, tmp_path) -> None:
    """Two steps, stop, resume for two more == four steps in one go, bit for bit: the data position, the torch RNG
    that sampling draws from, the optimizer, the adaptive KL coefficient and the critic all come back."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    common = {"algorithm__advantage": advantage, "algorithm__kl_target": 1.0, "checkpoint__every": 2}
    ppo.run(ppo_config(micro_model, data, tmp_path / "whole", train__max_steps=4, **common))
    ppo.run(ppo_config(micro_model, data, tmp_path / "split", train__max_steps=2, **common))
    summary = ppo.run(ppo_config(micro_model, data, tmp_path / "split", train__max_steps=4, **common))
    assert summary["steps"] == 4
    whole, split = weights(tmp_path / "whole" / "model"), weights(tmp_path / "split" / "model")
    for key in whole:
        assert torch.equal(whole[key], split[key]), key
    steps = {run: [r for r in records(tmp_path / run) if "reward" in r] for run in ("whole", "split")}
    assert [r["kl_coef"] for r in steps["whole"]] == [r["kl_coef"] for r in steps["split"]]
    assert steps["whole"][-1]["kl_coef"] != 0.05  # the adaptive controller moved, and was restored


@pytest.fixture(scope="module")
def answering_model(toy, micro_model, tmp_path_factory) -> Path:
    """The micro model after a short SFT: short answers that end with the end-of-turn token."""
    from posttrain.recipes import sft

    out = tmp_path_factory.mktemp("sft")
    sft.run(sft_config(micro_model, toy.sft, out, train__max_steps=60, train__batch_size=75, optim__lr=3e-3, seed=0))
    return out / "model"


def test_planted_length_reward_trips_the_watch(toy, answering_model, tmp_path) -> None:
    """A reward that pays for length: the policy learns to stop ending its answers and the proxy reward climbs;
    the watch says the length is running away, and with ``stop_on_warning`` the run stops early and reports why.
    (The micro model's answers are too poor for the gold reward to fall measurably; the reward-hacking rule itself
    is tested on planted metric series in test_diagnostics.py.)"""
    out = tmp_path / "run"
    summary = ppo.run(
        ppo_config(
            answering_model,
            prompts_file(toy, tmp_path / "p.jsonl", rows=50),
            out,
            algorithm__advantage="grpo",
            sampling__num_samples=4,
            sampling__max_new_tokens=16,
            algorithm__prompts_per_step=8,
            train__batch_size=16,
            train__grad_accum=2,
            train__max_steps=60,
            optim__lr=5e-4,
            algorithm__kl_coef=0.0,
            watch__window=8,
            watch__kl_limit=1e6,
            watch__stop_on_warning=True,
        )
    )
    kinds = {w["kind"] for w in summary["watch_warnings"]}
    assert kinds & {"reward_hacking", "length_runaway"}, summary["watch_warnings"]
    assert summary["stopped_by_watch"] in ("reward_hacking", "length_runaway")
    assert summary["steps"] < 60
    steps = [r for r in records(out) if "reward" in r]
    # What the watch saw (measured: reward 0.47 -> 1.54, length 4.6 -> 11.2 tokens, unfinished 0 -> 56% by step 8).
    assert steps[-1]["reward"] > 2 * steps[0]["reward"]
    assert steps[-1]["response_length"] > 2 * steps[0]["response_length"]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_kl_coef_zero_keeps_and_runs_no_reference(method, toy, micro_model, tmp_path, monkeypatch) -> None:
    """``kl_coef: 0`` needs no reference: no frozen copy of a fully fine-tuned policy is made and no reference
    forward runs (the adapter is never switched off for LoRA); no KL is logged. With kl_coef 0.05 the same run
    makes its copy (full) and its reference pass. PPO with a critic (gae), so the old-policy pass runs
    either way: only the reference passes differ."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    from posttrain.roles import workers

    score_logps, reference_model, deepcopy = ppo.score_logps, workers.reference_model, actor_critic.copy.deepcopy

    def counted(kl_coef: float) -> dict[str, Any]:
        calls: dict[str, Any] = {"copies": [], "reference_passes": 0, "policy_passes": 0, "inside_reference": False}

        def copying(obj: Any, *args: Any) -> Any:
            out = deepcopy(obj, *args)
            if isinstance(obj, torch.nn.Module):
                calls["copies"].append(out)
            return out

        @contextlib.contextmanager
        def switching_off(policy: Any) -> Any:
            with reference_model(policy) as reference:
                calls["inside_reference"] = True
                try:
                    yield reference
                finally:
                    calls["inside_reference"] = False

        def scoring(model: Any, *args: Any) -> torch.Tensor:
            is_reference = calls["inside_reference"] or any(model is c for c in calls["copies"])
            calls["reference_passes" if is_reference else "policy_passes"] += 1
            return score_logps(model, *args)

        monkeypatch.setattr(actor_critic, "copy", types.SimpleNamespace(deepcopy=copying))
        monkeypatch.setattr(workers, "reference_model", switching_off)  # the reference role's passes
        monkeypatch.setattr(workers, "score_logps", scoring)
        monkeypatch.setattr(ppo, "score_logps", scoring)  # the old policy's
        out = tmp_path / f"kl{kl_coef}"
        ppo.run(
            ppo_config(micro_model, data, out, peft__method=method, algorithm__kl_coef=kl_coef, train__max_steps=1)
        )
        calls["logged_kl"] = ["kl" in r for r in records(out) if "reward" in r]
        return calls

    anchored, free = counted(0.05), counted(0.0)
    assert len(anchored["copies"]) == (1 if method == "full" else 0) and anchored["reference_passes"] == 1
    assert free["copies"] == [] and free["reference_passes"] == 0
    assert anchored["policy_passes"] == free["policy_passes"] == 1
    assert anchored["logged_kl"] == [True] and free["logged_kl"] == [False]


def test_separate_critic_gradients_never_scale_the_policy_step(toy, micro_model, tmp_path) -> None:
    """PPO with a separate critic, one SGD update, max_grad_norm 1e-4 so both clips bind: the policy's update is
    the same whatever vf_coef (0.1 or 10), since the policy and the critic are clipped apart (one global clip let
    the value loss, scaled by vf_coef, shrink the policy's step). Both norms are logged; only the critic's moves."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    common = {
        "algorithm__advantage": "gae",
        "train__max_steps": 1,
        "optim__name": "sgd",
        "optim__lr": 1.0,
        "optim__max_grad_norm": 1e-4,
    }
    runs = {}
    for vf_coef in (0.1, 10.0):
        out = tmp_path / f"vf{vf_coef}"
        ppo.run(ppo_config(micro_model, data, out, algorithm__vf_coef=vf_coef, **common))
        runs[vf_coef] = (weights(out / "model"), [r for r in records(out) if "reward" in r][0])
    (low, low_record), (high, high_record) = runs[0.1], runs[10.0]
    before = weights(micro_model)
    assert any(not torch.equal(before[k], low[k]) for k in before), "the policy trained"
    for key in low:
        torch.testing.assert_close(low[key], high[key], rtol=0, atol=1e-7, msg=key)
    assert low_record["grad_norm/policy"] == pytest.approx(high_record["grad_norm/policy"], rel=1e-5)
    assert high_record["grad_norm/critic"] == pytest.approx(100 * low_record["grad_norm/critic"], rel=1e-3)


def test_early_stopping_follows_the_held_out_reward(toy, micro_model, tmp_path, monkeypatch) -> None:
    """PPO/GRPO select models by eval_reward, maximised (there is no eval_loss in online RL). Scripted held-out
    rewards 0.1, 0.5, 0.3, 0.2 with patience 2: the run stops after step 4 and its final model is step 2's."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.9, 0.9])
    evaluated = []

    def scripted_evaluation(rows: Any, engine: Any, *args: Any) -> dict[str, float]:
        evaluated.append(weights_of(engine.model))
        return {"eval_reward": next(scripted), "eval_exact_match": 0.0}

    def weights_of(model: Any) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    monkeypatch.setattr(ppo, "held_out_evaluation", scripted_evaluation)
    out = tmp_path / "run"
    summary = ppo.run(
        ppo_config(
            micro_model,
            data,
            out,
            algorithm__advantage="grpo",
            data__eval_fraction=0.25,
            train__max_steps=6,
            train__eval_every=1,
            train__early_stopping_patience=2,
            checkpoint__every=None,
        )
    )
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["best_step"] == 2
    assert summary["best_eval_reward"] == 0.5
    final, at_step_2, at_step_4 = weights(out / "model"), evaluated[1], evaluated[3]
    assert any(not torch.equal(at_step_2[key], at_step_4[key]) for key in final)
    for key in final:
        torch.testing.assert_close(final[key], at_step_2[key], rtol=0, atol=0, msg=key)


def test_bad_settings_fail_before_training(toy, micro_model, tmp_path) -> None:
    data = prompts_file(toy, tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match="num_samples >= 2"):
        ppo_config(micro_model, data, tmp_path / "a", algorithm__advantage="grpo", sampling__num_samples=1)
    with pytest.raises(ValueError, match="temperature=0"):
        ppo_config(micro_model, data, tmp_path / "b", sampling__temperature=0.0)
    with pytest.raises(ValueError, match="ptx_data"):
        ppo_config(micro_model, data, tmp_path / "c", algorithm__ptx_coef=0.1)
    with pytest.raises(ConfigError, match="multiple of train.batch_size"):
        ppo.run(ppo_config(micro_model, data, tmp_path / "d", train__batch_size=3, train__grad_accum=1))


def test_a_prompt_without_reference_is_named(toy, micro_model, tmp_path) -> None:
    from posttrain.data.errors import DataError

    data = tmp_path / "p.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Repeat: cat"}], "reference": "cat"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Repeat: dog"}]})
        + "\n"
    )
    with pytest.raises(DataError, match=r"p.jsonl:2"):
        ppo.run(ppo_config(micro_model, data, tmp_path / "run"))


def test_ptx_mixes_the_sft_loss_in(toy, micro_model, tmp_path) -> None:
    out = tmp_path / "run"
    ppo.run(
        ppo_config(
            micro_model,
            prompts_file(toy, tmp_path / "p.jsonl"),
            out,
            algorithm__advantage="grpo",
            algorithm__ptx_coef=0.5,
            algorithm__ptx_data=str(toy.sft),
        )
    )
    steps = [r for r in records(out) if "reward" in r]
    # An untrained model's SFT loss is about ln(vocabulary size).
    assert all(4.0 < r["ptx_loss"] < 10.0 for r in steps)


def test_on_policy_shortcut_equals_the_old_policy_pass(toy, micro_model, tmp_path, monkeypatch) -> None:
    """With one update per rollout and the KL in the loss, the old log-probs are taken from the update's own
    forward instead of a separate pass (what TRL does too); forcing the separate pass gives the same training."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    # SGD, as in the shared-layout test below: Adam's first step would blow float noise up to a full step.
    grpo = {
        "algorithm__advantage": "grpo",
        "algorithm__kl_mode": "loss",
        "algorithm__kl_estimator": "k3",
        "train__max_steps": 3,
        "optim__name": "sgd",
        "optim__lr": 0.5,
    }
    ppo.run(ppo_config(micro_model, data, tmp_path / "shortcut", **grpo))
    full_pass = ppo.make_rollout
    monkeypatch.setattr(ppo, "make_rollout", lambda *args: full_pass(*args[:-1], False))
    ppo.run(ppo_config(micro_model, data, tmp_path / "separate", **grpo))
    a, b = weights(tmp_path / "shortcut" / "model"), weights(tmp_path / "separate" / "model")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    kls = [[r["kl"] for r in records(tmp_path / run) if "reward" in r] for run in ("shortcut", "separate")]
    torch.testing.assert_close(torch.tensor(kls[0]), torch.tensor(kls[1]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "gae", "gae_shared_critic"])
def test_shared_prompt_layout_trains_like_padded_rows(name, toy, micro_model, tmp_path) -> None:
    """The responses to one prompt as one unit holding the prompt once (``data.share_prompt``, the default)
    train exactly as padded rows of prompt + response: the same weights, critic included, and the same KL."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    # SGD: its update is linear in the gradient, so float summation-order noise stays noise (Adam's first step
    # is about lr x sign(gradient), which turns the noise of a near-zero gradient into a full step).
    settings = {
        **ESTIMATORS[name],
        "sampling__num_samples": 4,
        "train__batch_size": 8,
        "train__grad_accum": 2,
        "train__max_steps": 2,
        "optim__name": "sgd",
        "optim__lr": 0.5,
    }
    for share in (True, False):
        ppo.run(ppo_config(micro_model, data, tmp_path / str(share), data__share_prompt=share, **settings))
    for part in ("model", "critic"):
        if not (tmp_path / "True" / part).exists():
            continue
        a, b = weights(tmp_path / "True" / part), weights(tmp_path / "False" / part)
        if part == "model":  # the step really moved the policy
            assert any(not torch.equal(a[k], weights(micro_model)[k]) for k in a)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    kls = [[r["kl"] for r in records(tmp_path / run) if "reward" in r] for run in ("True", "False")]
    torch.testing.assert_close(torch.tensor(kls[0]), torch.tensor(kls[1]), rtol=1e-4, atol=1e-6)


def test_response_layout_shares_only_with_several_samples_and_a_dense_mask(toy, micro_model) -> None:
    from transformers import AutoModelForCausalLM

    config = ppo_config(micro_model, toy.prompts, Path("unused"))
    sdpa = AutoModelForCausalLM.from_pretrained(micro_model, attn_implementation="sdpa")
    eager = AutoModelForCausalLM.from_pretrained(micro_model, attn_implementation="eager")
    num_samples = config.sampling.num_samples
    assert num_samples > 1 and response_layout(config.data, num_samples, [sdpa], 0).share_prompt
    assert not response_layout(
        config.data, num_samples, [sdpa, eager], 0
    ).share_prompt  # every model reading the rollout
    assert not response_layout(config.data, 1, [sdpa], 0).share_prompt


def test_critic_starts_from_a_reward_model_run(toy, micro_model, tmp_path) -> None:
    """critic.path = a stage: reward run directory: the critic is that model, head included (OpenRLHF's choice),
    not a fresh head on the policy's weights."""
    from posttrain.recipes import reward

    reward.run(sft_config(micro_model, toy.prefs, tmp_path / "rm", stage="reward", train__max_steps=2))
    out = tmp_path / "ppo"
    # A critic learning rate of 1e-30 leaves its weights as loaded, so the saved critic shows where it started.
    ppo.run(
        ppo_config(
            micro_model,
            prompts_file(toy, tmp_path / "p.jsonl"),
            out,
            algorithm__advantage="gae",
            critic__path=str(tmp_path / "rm"),
            critic__lr=1e-30,
            train__max_steps=1,
        )
    )
    rm_head, critic_head = (
        load_file(str(path / "model.safetensors"))["score.weight"]
        for path in (tmp_path / "rm" / "model", out / "critic")
    )
    assert torch.equal(rm_head, critic_head)


def test_held_out_prompts_from_data_eval_are_evaluated(toy, micro_model, tmp_path) -> None:
    """data.eval (with sampling.max_prompts limiting only the training prompts): held-out prompts are answered
    greedily at each evaluation, and the summary reports the saved model's figures."""
    out = tmp_path / "run"
    held_out = prompts_file(toy, tmp_path / "eval.jsonl", rows=6)
    summary = ppo.run(
        ppo_config(
            micro_model,
            prompts_file(toy, tmp_path / "p.jsonl"),
            out,
            data__eval=str(held_out),
            sampling__max_prompts=8,
            train__eval_every=2,
        )
    )
    (evaluation,) = [r for r in records(out) if "eval_reward" in r]
    assert evaluation["step"] == 2 and 0.0 <= evaluation["eval_exact_match"] <= 1.0
    assert evaluation["eval_length"] > 0 and summary["final_eval_reward"] == evaluation["eval_reward"]


def test_data_eval_is_held_out_whole_and_eval_fraction_splits_only_data_train(toy, micro_model, tmp_path) -> None:
    """As the config's help says (and as SFT's data does): ``data.eval`` is the held-out set, every prompt of it,
    whatever ``eval_fraction`` and ``max_prompts`` (before cbbe567 a set eval_fraction also dropped a share of
    data.eval); without data.eval, eval_fraction holds out a seeded share of the training prompts, disjoint from
    the rest: 8 of 32 at 0.25."""
    from transformers import AutoTokenizer

    from posttrain.rollout.prompts import tokenized_prompts

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    data, held_out = prompts_file(toy, tmp_path / "p.jsonl"), prompts_file(toy, tmp_path / "eval.jsonl", rows=6)

    def split(**overrides: Any) -> tuple[list[Any], list[Any]]:
        config = ppo_config(micro_model, data, tmp_path / "run", **overrides)
        return tokenized_prompts(
            config.data, tokenizer, config.sampling.max_new_tokens, config.sampling.max_prompts, config.seed
        )

    train, evaluated = split(data__eval=str(held_out), data__eval_fraction=0.5, sampling__max_prompts=8)
    assert len(train) == 8 and [p.prompt.messages for p in evaluated] == [
        json.loads(line)["messages"] for line in held_out.read_text().splitlines()
    ]
    train, evaluated = split(data__eval_fraction=0.25)
    texts = [str(p.prompt.messages) for p in train + evaluated]
    assert (len(train), len(evaluated)) == (24, 8) and len(set(texts)) == len(texts) == 32


# ------------------------------------------------------------------------------------------------------------------
# The recipe's wiring of every algorithm option, hand-derived, through its own functions (no model is loaded).


def _unit_config(**overrides: Any) -> Any:
    """A PpoConfig for the recipe functions (paths are never opened): groups of 2, max_new_tokens 4."""
    options = {
        "sampling__num_samples": 2,
        "sampling__max_new_tokens": 4,
        "algorithm__whiten_advantages": False,
        **overrides,
    }
    return sft_config(Path("model"), Path("prompts.jsonl"), Path("out"), stage="ppo", **options)


def _one_process(tensor: torch.Tensor) -> torch.Tensor:
    """``Runtime.sum_over_processes`` for a run of one process."""
    return tensor


def _scores(raw: torch.Tensor, algorithm: Any, moments: Any) -> torch.Tensor:
    """The scores the recipe optimises under ``algorithm``'s reward_normalize and reward_clip, on one process."""
    return rl.optimised_scores(raw, algorithm.reward_normalize, algorithm.reward_clip, moments, _one_process)


def _unit_batches() -> Any:
    """How the recipe functions lay rollout rows out, for one process on the CPU without autocast."""
    return RolloutBatches(ResponseLayout(0), torch.device("cpu"), 4, contextlib.nullcontext)


# Four responses to two prompts (groups of 2), lengths 2, 1, 2, 2: scores, per-token KL (old vs reference),
# critic values. kl_coef 0.1 in the reward gives per-token rewards −0.1·KL plus the score on the last token:
# [−0.05, 0.9], [2.8], [0, 2], [−0.1, 2.1]; per-response KL sums 1.5, 2, 0, 0.
PLANTED_SCORES = torch.tensor([1.0, 3.0, 2.0, 2.0])
PLANTED_KL = torch.tensor([[0.5, 1.0], [2.0, 0.0], [0.0, 0.0], [1.0, -1.0]])
PLANTED_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
PLANTED_VALUES = torch.tensor([[0.5, 1.0], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]])


def _advantages(**overrides: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    config = _unit_config(**overrides)
    values = PLANTED_VALUES if config.algorithm.advantage == "gae" else None
    return ppo.advantages_for(
        config.algorithm,
        config.sampling.num_samples,
        PLANTED_SCORES,
        PLANTED_KL,
        PLANTED_MASK,
        values,
        0.1,
        _one_process,
    )


def test_advantage_dispatch_hand_derived() -> None:
    """Every estimator on the planted rollout, γ = λ = 1, no whitening, KL in the reward (coefficient 0.1):
    gae: returns-to-go G = [0.85, 0.9], [2.8], [2, 2], [2.0, 2.1]; A = G − V = [0.35, −0.1], [1.8], [2, 2], [1.5, 1.6].
    reinforce++: G itself, no returns. Critic-free baselines on the scores minus 0.1·KL sums, [0.85, 2.8 | 2, 2]:
    grpo without std (Dr. GRPO) [−0.975, 0.975 | 0, 0]; with the Bessel std (1.95/√2) ±1/√2 | 0 (the equal
    group exactly 0); rloo r − the other: [−1.95, 1.95 | 0, 0]; each the same on every token of its response."""
    returns_to_go = torch.tensor([[0.85, 0.9], [2.8, 0.0], [2.0, 2.0], [2.0, 2.1]])
    advantages, returns = _advantages(algorithm__advantage="gae", algorithm__lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[0.35, -0.1], [1.8, 0.0], [2.0, 2.0], [1.5, 1.6]]))
    torch.testing.assert_close(returns, returns_to_go)
    advantages, returns = _advantages(algorithm__advantage="reinforce++")
    torch.testing.assert_close(advantages, returns_to_go)
    assert returns is None

    def broadcast(*per_response: float) -> torch.Tensor:
        return torch.tensor(per_response)[:, None] * PLANTED_MASK

    dr_grpo = _advantages(algorithm__advantage="grpo", algorithm__scale_by_std=False)[0]
    torch.testing.assert_close(dr_grpo, broadcast(-0.975, 0.975, 0.0, 0.0))
    grpo = _advantages(algorithm__advantage="grpo")[0]
    torch.testing.assert_close(grpo, broadcast(-(0.5**0.5), 0.5**0.5, 0.0, 0.0), atol=1e-5, rtol=0)
    assert torch.equal(grpo[2:], torch.zeros(2, 2))
    rloo, returns = _advantages(algorithm__advantage="rloo")
    torch.testing.assert_close(rloo, broadcast(-1.95, 1.95, 0.0, 0.0))
    assert returns is None


def test_gamma_lambda_whitening_and_kl_mode_change_the_advantages_as_derived() -> None:
    """Each option against the dispatch test's values. γ 0.5 (gae, λ 1): row 4 A₁ = 2.1 − 0.5 = 1.6,
    A₀ = −0.1 + 0.5·2.1 − 0.5 = 0.45. λ 0 (γ 1): A_t = δ_t: row 1 [−0.05 + 1 − 0.5, 0.9 − 1] = [0.45, −0.1],
    row 4 [−0.1 + 0.5 − 0.5, 1.6]. reinforce++ γ 0.5: [0.4, 0.9], [2.8], [1, 2], [0.95, 2.1]. Whitening: (A − mean)
    / sqrt(unbiased var + 1e-8) over the 7 response tokens (numpy). kl_mode loss: the reward carries no KL, so
    Dr. GRPO's baseline acts on the raw scores [1, 3 | 2, 2]: [−1, 1 | 0, 0]."""
    advantages = _advantages(algorithm__advantage="gae", algorithm__gamma=0.5, algorithm__lam=1.0)[0]
    torch.testing.assert_close(advantages[3], torch.tensor([0.45, 1.6]))
    advantages = _advantages(algorithm__advantage="gae", algorithm__lam=0.0)[0]
    torch.testing.assert_close(advantages[0], torch.tensor([0.45, -0.1]))
    torch.testing.assert_close(advantages[3], torch.tensor([-0.1, 1.6]))
    advantages = _advantages(algorithm__advantage="reinforce++", algorithm__gamma=0.5)[0]
    torch.testing.assert_close(advantages, torch.tensor([[0.4, 0.9], [2.8, 0.0], [1.0, 2.0], [0.95, 2.1]]))
    for advantage in ("gae", "reinforce++"):
        plain = _advantages(algorithm__advantage=advantage, algorithm__lam=1.0)[0]
        whitened = _advantages(algorithm__advantage=advantage, algorithm__lam=1.0, algorithm__whiten_advantages=True)[
            0
        ]
        tokens = np.array(plain[PLANTED_MASK.bool()].tolist(), dtype=np.float64)
        expected = (tokens - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
        np.testing.assert_allclose(whitened[PLANTED_MASK.bool()].numpy(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(whitened[~PLANTED_MASK.bool()], torch.zeros(1))
    in_loss = _advantages(algorithm__advantage="grpo", algorithm__scale_by_std=False, algorithm__kl_mode="loss")[0]
    torch.testing.assert_close(in_loss, torch.tensor([-1.0, 1.0, 0.0, 0.0])[:, None] * PLANTED_MASK)


def test_reward_normalisation_and_clipping_hand_derived() -> None:
    """Rewards [1, 2, 3, 6]: mean 3, Σ(r − 3)² = 14, unbiased std √(14/3) → normalised [−2, −1, 0, 3]/√(14/3);
    reward_clip 1 caps the last at 1; reward_clip 2.5 alone clips the raw rewards to [1, 2, 2.5, 2.5]."""
    raw = torch.tensor([1.0, 2.0, 3.0, 6.0])
    std = (14 / 3) ** 0.5
    config = _unit_config(algorithm__reward_normalize=True)
    normalised = _scores(raw, config.algorithm, rl.RunningMoments())
    torch.testing.assert_close(normalised, torch.tensor([-2.0, -1.0, 0.0, 3.0]) / std)
    config = _unit_config(algorithm__reward_normalize=True, algorithm__reward_clip=1.0)
    clipped = _scores(raw, config.algorithm, rl.RunningMoments())
    torch.testing.assert_close(clipped, torch.tensor([-2.0 / std, -1.0 / std, 0.0, 1.0]))
    config = _unit_config(algorithm__reward_clip=2.5)
    torch.testing.assert_close(
        _scores(raw, config.algorithm, rl.RunningMoments()),
        torch.tensor([1.0, 2.0, 2.5, 2.5]),
    )
    assert torch.equal(_scores(raw, _unit_config().algorithm, rl.RunningMoments()), raw)


def test_running_reward_moments_equal_numpy_over_split_batches() -> None:
    """Batches of 5, 1, 12 and 7 rewards through the recipe's normalisation: after each, the running mean and
    (unbiased) std equal numpy's over every reward so far, and the batch is normalised by them; the state
    survives a checkpoint round trip."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=generator) * 3 + 1 for n in (5, 1, 12, 7)]
    config = _unit_config(algorithm__reward_normalize=True)
    moments, seen = rl.RunningMoments(), []
    for batch in batches:
        scores = _scores(batch, config.algorithm, moments)
        seen.extend(batch.tolist())
        everything = np.array(seen, dtype=np.float32).astype(np.float64)
        assert moments.count == len(seen)
        assert moments.mean == pytest.approx(everything.mean(), rel=1e-6, abs=1e-7)
        assert moments.std == pytest.approx(everything.std(ddof=1) if len(seen) > 1 else 0.0, rel=1e-6, abs=1e-7)
        torch.testing.assert_close(
            scores, ((batch.double() - everything.mean()) / everything.std(ddof=1)).float(), rtol=1e-5, atol=1e-6
        )
        moments = rl.RunningMoments(json.loads(json.dumps(moments.state_dict())))


def _kl_controller(algorithm: Any, resumed_coef: float | None = None) -> Any:
    """The recipe's KL controller for ``algorithm``'s settings (``rl.kl_controller``, as ``ppo.run`` calls it)."""
    return rl.kl_controller(algorithm.kl_coef, algorithm.kl_target, algorithm.kl_horizon, resumed_coef)


def test_kl_horizon_and_target_steer_the_coefficient_as_derived() -> None:
    """Adaptive β (kl_target 1): a measured KL of 2 is a +100% error, clipped to +0.2, so after 10 responses
    β = 0.05·(1 + 0.2·10/horizon): 0.051 with kl_horizon 100, 0.0501 with 1000. Without kl_target β stays 0.05,
    even with a resumed β; a resumed adaptive β is continued."""
    for horizon, expected in ((100, 0.051), (1000, 0.0501)):
        controller = _kl_controller(_unit_config(algorithm__kl_target=1.0, algorithm__kl_horizon=horizon).algorithm)
        controller.update(2.0, 10)
        assert controller.value == pytest.approx(expected, rel=1e-12)
    fixed = _kl_controller(_unit_config().algorithm)
    fixed.update(2.0, 10)
    assert fixed.value == 0.05
    assert _kl_controller(_unit_config().algorithm, 0.3).value == 0.05
    assert _kl_controller(_unit_config(algorithm__kl_target=1.0).algorithm, 0.3).value == 0.3


class PlantedPolicyAndCritic(torch.nn.Module):
    """Stands in for the ActorCritic: logits [0, 0] over a 2-token vocabulary at every response position (each
    sampled token, id 1, has log-prob −ln 2, entropy ln 2) and planted critic values."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.planted_values = values

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor, position_ids: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(int((targets != IGNORE_INDEX).sum()), 2), self.planted_values


def _micro_loss(**overrides: Any) -> float:
    """One update's loss through the recipe (``rl.loss_normaliser``, ``rl.kl_controller``, ``ppo_micro_loss``) on two
    planted responses of 2 and 1 tokens: ratios ρ = [1.5, 0.5 | 3.0], advantages [1, −1 | −1], new values
    [1, 0 | 2], old values 0, returns [2, 1 | 0], reference log-probs ln 2 below the policy's."""
    config = _unit_config(**{"algorithm__advantage": "gae", **overrides})
    rows = [response_row([5, 6], [1, 1], 0), response_row([5], [1], 1)]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logp = -math.log(2.0)
    old_logps = torch.tensor([[logp - math.log(1.5), logp - math.log(0.5)], [logp - math.log(3.0), 0.0]])
    rollout = ppo.Rollout(
        rows,
        [None, None],
        ["", ""],
        torch.tensor([True, True]),
        mask,
        old_logps,
        torch.full((2, 2), 2 * logp) * mask,
        torch.zeros(2, 2),
        torch.zeros(2),
        torch.tensor([[1.0, -1.0], [-1.0, 0.0]]),
        torch.tensor([[2.0, 1.0], [0.0, 0.0]]),
        {},
    )
    normaliser = rl.loss_normaliser(rollout.mask[[0, 1]], config.algorithm.loss_aggregation, 1, _one_process)
    kl_coef = _kl_controller(config.algorithm).value
    module = PlantedPolicyAndCritic(torch.tensor([1.0, 0.0, 2.0]))
    loss, _ = ppo.ppo_micro_loss(
        module, rollout, [0, 1], normaliser, kl_coef, config.algorithm, config.sampling, _unit_batches()
    )
    return float(loss)


LN2 = math.log(2.0)
# Per token, clip 0.2: policy max(−Aρ, −A·clip(ρ)) = [−1.2, 0.8 | 3.0]; value ½max((V − R)², (clipped V − R)²) with
# value_clip 0.2 = [½·3.24, ½·1 | ½·4] = [1.62, 0.5 | 2.0]; vf_coef 0.5. Token mean over 3 tokens unless noted.
OPTION_LOSSES = {
    "defaults": ({}, (2.6 + 0.5 * 4.12) / 3),
    "clip_range": ({"algorithm__clip_range": 0.1}, (-1.1 + 0.9 + 3.0 + 0.5 * 4.12) / 3),
    "clip_range_high": ({"algorithm__clip_range_high": 0.6}, (-1.5 + 0.8 + 3.0 + 0.5 * 4.12) / 3),
    "dual_clip": ({"algorithm__dual_clip": 2.0}, (-1.2 + 0.8 + 2.0 + 0.5 * 4.12) / 3),
    "value_clip": ({"algorithm__value_clip": None}, (2.6 + 0.5 * (0.5 + 0.5 + 2.0)) / 3),
    "vf_coef": ({"algorithm__vf_coef": 2.0}, (2.6 + 2.0 * 4.12) / 3),
    "entropy_coef": ({"algorithm__entropy_coef": 0.1}, (2.6 + 0.5 * 4.12 - 3 * 0.1 * LN2) / 3),
    # k3 of log π_ref − log π = −ln 2: e^(−ln 2) + ln 2 − 1 = ln 2 − 1/2 per token.
    "kl_in_loss": (
        {"algorithm__kl_mode": "loss", "algorithm__kl_coef": 0.5},
        (2.6 + 0.5 * 4.12 + 3 * 0.5 * (LN2 - 0.5)) / 3,
    ),
    "kl_in_reward": ({"algorithm__kl_mode": "reward", "algorithm__kl_coef": 0.5}, (2.6 + 0.5 * 4.12) / 3),
    # Per-token totals [−0.39, 1.05 | 4.0]: response means 0.33 and 4.0 over 2 responses; sums 0.66 and 4.0 over
    # 2 responses x max_new_tokens 4.
    "sequence_mean": ({"algorithm__loss_aggregation": "sequence_mean"}, (0.33 + 4.0) / 2),
    "sum_over_max_tokens": ({"algorithm__loss_aggregation": "sum_over_max_tokens"}, (0.66 / 4 + 4.0 / 4) / 2),
}


@pytest.mark.parametrize("name", list(OPTION_LOSSES))
def test_each_loss_option_changes_the_loss_as_derived(name: str) -> None:
    overrides, expected = OPTION_LOSSES[name]
    assert _micro_loss(**overrides) == pytest.approx(expected, rel=1e-5)
    if name not in ("defaults", "kl_in_reward"):
        assert _micro_loss(**overrides) != pytest.approx(OPTION_LOSSES["defaults"][1], rel=1e-3)


def test_ptx_moves_the_weights_in_proportion_to_its_coefficient(toy, micro_model, tmp_path) -> None:
    """PPO-ptx is in the update: one SGD step (no momentum, no clipping) with ptx_coef 0, c and 2c from the same
    rollout: the weights move by −lr·c·∇SFT beyond the c = 0 run, so the c and 2c displacements are non-zero and
    the second is twice the first."""
    data = prompts_file(toy, tmp_path / "p.jsonl")
    common = {
        "algorithm__advantage": "grpo",
        "train__max_steps": 1,
        "optim__name": "sgd",
        "optim__lr": 0.5,
        "optim__momentum": 0.0,
        "optim__max_grad_norm": None,
        "algorithm__ptx_data": str(toy.sft),
    }
    after = {}
    for coef in (0.0, 0.25, 0.5):
        out = tmp_path / f"ptx{coef}"
        ppo.run(ppo_config(micro_model, data, out, algorithm__ptx_coef=coef, **common))
        after[coef] = weights(out / "model")
    once = torch.cat([(after[0.25][k] - after[0.0][k]).flatten() for k in after[0.0]])
    twice = torch.cat([(after[0.5][k] - after[0.0][k]).flatten() for k in after[0.0]])
    assert float(once.norm()) > 1e-4
    torch.testing.assert_close(twice, 2 * once, rtol=1e-3, atol=1e-6)
