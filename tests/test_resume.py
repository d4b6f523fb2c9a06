"""Resume after ``kill -9`` == the uninterrupted run, for every trainer recipe, under one unchanged config.

Each case trains a tiny run three times in fresh processes (``helpers.train_in_subprocess``): once
uninterrupted; once SIGKILLed right after a step that follows a checkpoint (so the work after the checkpoint is
lost, its metrics line included); and once more with ``resume=auto``. The resumed run must log each step once, with
the same learning rate and the same metrics as the uninterrupted one at every step, and end at bitwise the same
weights. The schedule is cosine with warm-up, so the learning rate differs at every step: a resume that restarted
the schedule (or the warm-up) from step 0 fails here; a constant schedule could not tell.

The SFT case with half-written checkpoint directories is ``test_sft_invariance.test_resume_after_sigkill_is_bitwise_equal``.

The same holds between any two fresh processes with the same seed: ``PYTHONHASHSEED`` (which reorders sets and
dicts of strings) and the intra-op thread count (``OMP_NUM_THREADS``, which splits CPU reductions) must not
change the toy kit or a run's metrics and weights.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import REPO, assert_weights_close, sft_config, train_in_subprocess
from safetensors.torch import load_file

SCHEDULE = {"schedule__name": "cosine", "schedule__warmup_steps": 2, "schedule__min_lr_ratio": 0.1}
MAX_STEPS, EVERY, KILL_AFTER = 6, 2, 3
# Metrics that measure the machine, not the training.
TIMING = ("step_time_s", "tokens_per_s", "samples_per_s", "wall_time_s", "rollout_wait_s", "weight_sync_s")


def length_reward(prompt: str, response: str, reference: str | None) -> float:
    """Differs between an untrained model's samples (the toy tasks' gold reward would be 0 for all of them)."""
    return len(response) / 10.0


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    """Every saved tensor of a run: the policy (``model/``) and, for PPO, the critic (``critic/``)."""
    files = sorted((run / "model").glob("*.safetensors")) + sorted((run / "critic").glob("*.safetensors"))
    assert files, f"no weights in {run / 'model'}"
    return {f"{f.parent.name}/{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def assert_kill_and_resume_equal_uninterrupted(
    make_config: Callable[[Path], Any], tmp_path: Path
) -> list[dict[str, Any]]:
    """The whole check, for a recipe whose config ``make_config(output_dir)`` builds; returns the uninterrupted
    run's metric records."""
    whole = train_in_subprocess(make_config(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_config = make_config(tmp_path / "killed")
    killed = train_in_subprocess(killed_config, kill_after_step=KILL_AFTER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert [p.name for p in sorted(checkpoints.glob("step-*"))] == [f"step-{EVERY:06d}"]
    assert not (tmp_path / "killed" / "model").exists()
    assert [r["step"] for r in records(tmp_path / "killed") if "lr" in r][-1] == KILL_AFTER  # lost work: step 3

    resumed = train_in_subprocess(killed_config, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step-{EVERY:06d} at step {EVERY}" in resumed.stderr

    expected, got = records(tmp_path / "whole"), records(tmp_path / "killed")
    assert [r["step"] for r in got] == [r["step"] for r in expected], "each step (and evaluation) logged once"
    train_steps = [r for r in expected if "lr" in r]
    assert [r["step"] for r in train_steps] == list(range(1, MAX_STEPS + 1))
    assert len({r["lr"] for r in train_steps}) == MAX_STEPS, "the schedule must change the lr at every step"
    for want, have in zip(expected, got):
        assert want.keys() == have.keys(), want["step"]
        for key in want:
            if key not in TIMING:
                assert have[key] == want[key], f"step {want['step']}: {key} {have[key]} != {want[key]}"
    expected_weights, got_weights = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert expected_weights.keys() == got_weights.keys()
    for name in expected_weights:
        assert torch.equal(expected_weights[name], got_weights[name]), f"{name} differs after resume"
    return expected


def common(**overrides: Any) -> dict[str, Any]:
    return {"train__max_steps": MAX_STEPS, "checkpoint__every": EVERY, "optim__lr": 1e-2, **SCHEDULE, **overrides}


def first_rows(source: Path, target: Path, count: int) -> Path:
    """The first ``count`` rows of a JSONL file: small runs (fewer reference log-probs), and the 6 steps then
    cross an epoch boundary, which the resumed data position must get right too."""
    # The preference recipes below run padded (one pair or example per row): what state a resume restores
    # does not depend on the layout, and the runs stay the same size whatever train.batch_size counts.
    target.write_text("".join(source.read_text().splitlines(keepends=True)[:count]))
    return target


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reward_model(toy, micro_model, tmp_path, method) -> None:
    """LoRA: the score head travels with the adapter and must come back too."""
    pairs = first_rows(toy.prefs, tmp_path / "pairs.jsonl", 8)
    assert_kill_and_resume_equal_uninterrupted(
        lambda out: sft_config(
            micro_model,
            pairs,
            out,
            stage="reward",
            data__max_length=64,
            data__packing=False,
            train__batch_size=2,
            peft__method=method,
            **common(),
        ),
        tmp_path,
    )


def test_dpo(toy, micro_model, tmp_path) -> None:
    """Full tuning: the cached reference must be the initial weights, computed before the restore, not the
    step-2 ones. (A LoRA reference is the base whatever the adapter holds: test_dpo.py.)"""
    pairs = first_rows(toy.prefs, tmp_path / "pairs.jsonl", 8)
    assert_kill_and_resume_equal_uninterrupted(
        lambda out: sft_config(
            micro_model, pairs, out, stage="dpo", data__packing=False, train__batch_size=2, **common()
        ),
        tmp_path,
    )


def test_kto_with_held_out_evaluation(toy, micro_model, tmp_path) -> None:
    """Full tuning: the reference log-probs are cached before the restore, as in DPO; the held-out evaluation
    at steps 4 and 6 is the same too."""
    pairs = first_rows(toy.prefs, tmp_path / "pairs.jsonl", 8)
    held_out = first_rows(toy.eval_prefs, tmp_path / "held_out.jsonl", 4)
    expected = assert_kill_and_resume_equal_uninterrupted(
        lambda out: sft_config(
            micro_model,
            pairs,
            out,
            stage="kto",
            data__packing=False,
            train__batch_size=4,
            data__eval=str(held_out),
            train__eval_every=4,
            **common(),
        ),
        tmp_path,
    )
    assert [r["step"] for r in expected if "eval_loss" in r] == [4, 6]


def test_ppo(toy, micro_model, tmp_path) -> None:
    """GAE with a separate critic: the data position, the torch RNG that sampling draws from, both optimizers'
    states, the adaptive KL coefficient and the running reward statistics all come back. (GRPO keeps a subset
    of this state; test_ppo.py resumes it by growing max_steps.)"""
    prompts = first_rows(toy.prompts, tmp_path / "prompts.jsonl", 16)
    settings = {
        "stage": "ppo",
        "algorithm__advantage": "gae",
        "sampling__num_samples": 2,
        "sampling__max_new_tokens": 6,
        "algorithm__prompts_per_step": 4,
        "train__batch_size": 4,
        "train__grad_accum": 2,
        "algorithm__kl_target": 1.0,
        "reward__function": f"{__name__}:length_reward",
        "algorithm__reward_normalize": True,
    }
    expected = assert_kill_and_resume_equal_uninterrupted(
        lambda out: sft_config(micro_model, prompts, out, **settings, **common(optim__lr=1e-3)), tmp_path
    )
    steps = [r for r in expected if "reward" in r]
    assert steps[-1]["kl_coef"] != steps[0]["kl_coef"], "the adaptive KL controller must move for the test to bite"
    assert any(name.startswith("critic/") for name in weights(tmp_path / "whole")), "the critic is compared too"


def test_ppo_grad_accumulation_1x8_equals_8x1_for_policy_and_critic(toy, micro_model, tmp_path) -> None:
    """test_ppo.py compares the policy's weights after one 1×8 vs 8×1 update; the separate critic, trained on
    the same micro-batches by its own loss, must agree too (its value loss normalised by the update's total
    response tokens, like the policy's). SGD without clipping, so the update is linear in the gradient."""
    from posttrain.recipes import ppo

    prompts = first_rows(toy.prompts, tmp_path / "prompts.jsonl", 16)
    runs = {}
    for batch_size, accum in ((8, 1), (1, 8)):
        out = tmp_path / f"run{batch_size}x{accum}"
        ppo.run(
            sft_config(
                micro_model,
                prompts,
                out,
                stage="ppo",
                algorithm__advantage="gae",
                sampling__num_samples=2,
                sampling__max_new_tokens=6,
                algorithm__prompts_per_step=4,
                train__batch_size=batch_size,
                train__grad_accum=accum,
                train__max_steps=1,
                reward__function=f"{__name__}:length_reward",
                optim__name="sgd",
                optim__lr=0.5,
                critic__lr=0.5,
                # No clipping: a clipped update has a fixed norm, blind to a wrongly scaled loss.
                optim__max_grad_norm=None,
                critic__max_grad_norm=None,
            )
        )
        runs[(batch_size, accum)] = weights(out)
    one_by_eight, eight_by_one = runs[(8, 1)], runs[(1, 8)]
    critic = {name for name in one_by_eight if name.startswith("critic/")}
    assert critic, "a separate critic is saved in critic/"
    initial = {
        f"{folder}/model.safetensors:{k}": v
        for folder in ("model", "critic")
        for k, v in load_file(str(micro_model / "model.safetensors")).items()
    }
    assert any(not torch.equal(one_by_eight[n], initial[n]) for n in critic if n in initial), (
        "the critic must have trained"
    )
    assert_weights_close(eight_by_one, one_by_eight, initial)


# --------------------------------------------------------------------------------------------- fresh processes
FRESH_PROCESSES = [{"PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "1"}, {"PYTHONHASHSEED": "2", "OMP_NUM_THREADS": "3"}]


def test_the_toy_kit_is_the_same_in_any_fresh_process(tmp_path) -> None:
    """Tokenizer training, task sampling and file writing: byte-identical under other hash seeds and threads."""
    build = "import sys; from posttrain.toy import build_toy; build_toy(sys.argv[1], size='tiny', seed=0, sft=100, prefs=20, prompts=20, eval=10, pretrain=50)"
    digests = []
    for i, env in enumerate(FRESH_PROCESSES):
        out = tmp_path / f"kit{i}"
        result = subprocess.run(
            [sys.executable, "-c", build, str(out)],
            cwd=REPO,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        digests.append(
            {
                str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest()
                for f in sorted(out.rglob("*"))
                if f.is_file()
            }
        )
    assert digests[0] and digests[0] == digests[1]


def test_same_seed_same_run_in_any_fresh_process(toy, micro_model, tmp_path) -> None:
    """PPO touches the most state (sampling from the torch RNG, a reward function, a critic, data order): two
    fresh processes with other hash seeds and thread counts log the same metrics and end at the same weights."""
    prompts = first_rows(toy.prompts, tmp_path / "prompts.jsonl", 16)
    settings = {
        "stage": "ppo",
        "algorithm__advantage": "gae",
        "sampling__num_samples": 2,
        "sampling__max_new_tokens": 6,
        "algorithm__prompts_per_step": 4,
        "train__batch_size": 4,
        "train__grad_accum": 2,
        "train__max_steps": 3,
        "reward__function": f"{__name__}:length_reward",
        "optim__lr": 1e-3,
    }
    runs = []
    for i, env in enumerate(FRESH_PROCESSES):
        result = train_in_subprocess(sft_config(micro_model, prompts, tmp_path / f"run{i}", **settings), env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(tmp_path / f"run{i}")
    first, second = records(runs[0]), records(runs[1])
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in first] == [
        {k: v for k, v in r.items() if k not in TIMING} for r in second
    ]
    expected, got = weights(runs[0]), weights(runs[1])
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# --------------------------------------------------------------------------------------------- best checkpoint
def test_early_stopping_saves_the_best_steps_weights(toy, micro_model, tmp_path, monkeypatch) -> None:
    """Scripted held-out losses 3.0, 2.0, 2.5, 2.6 with patience 2: the run stops after step 4 with step 2 the
    best, and the model it saves must be step 2's, bitwise: the weights of the same run stopped by max_steps=2
    (constant schedule, so the first two steps are the same in both). Saving the last step's weights instead
    (the restore skipped) fails here."""
    from posttrain.recipes import sft

    scripted = itertools.chain([3.0, 2.0, 2.5, 2.6], itertools.repeat(2.0))  # then 2.0 for any later evaluation
    monkeypatch.setattr(sft, "evaluate_loss", lambda model, **_: {"eval_loss": next(scripted)})
    held_out = first_rows(toy.sft, tmp_path / "held_out.jsonl", 8)  # never read: the evaluation is scripted
    settings = dict(train__batch_size=8, optim__lr=3e-3, data__eval=str(held_out), checkpoint__keep=1)
    summary = sft.run(
        sft_config(
            micro_model,
            toy.sft,
            tmp_path / "stopped",
            train__max_steps=10,
            train__eval_every=1,
            train__early_stopping_patience=2,
            **settings,
        )
    )
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["best_step"] == 2, summary
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "two_steps", train__max_steps=2, **settings))
    best, saved = weights(tmp_path / "two_steps"), weights(tmp_path / "stopped")
    assert best.keys() == saved.keys()
    for name in best:
        assert torch.equal(saved[name], best[name]), f"{name}: the saved model is not step 2's"
