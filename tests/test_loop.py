"""``posttrain loop``: the round's stages on the quick demo's SFT model (labels by the toy checker through a label
database, the reward model retrained, DPO with the reference fixed, the gate), the gate refusing a round whose
reward can be hacked, resume after SIGKILL equal to an uninterrupted loop, and the pure parts (the win-rate
interval, pairs, degrees) against hand-derived values."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO

from posttrain.config import ConfigError
from posttrain.loop import (
    build_pairs,
    degree_of,
    link_final_policy,
    load_loop_config,
    model_dir,
    read_jsonl,
    round_prompts,
    run_loop,
    validate_loop_config,
    weights_sha256,
    win_rate_interval,
)
from posttrain.tasks import score_prompt


# -- pure parts ---------------------------------------------------------------------------------------------------
def test_win_rate_interval_by_hand() -> None:
    # Outcomes 1, 1/2, 1, 1/2: mean 0.75, sample sd sqrt(4 * 0.25**2 / 3) = 0.288675, z(0.95) = 1.959964,
    # half-width 1.959964 * 0.288675 / 2 = 0.282896; the upper end is clamped at 1.
    interval = win_rate_interval([1, 0, 1, 1], [0, 0, 0, 1], confidence=0.95)
    assert interval["win_rate"] == pytest.approx(0.75)
    assert interval["lower"] == pytest.approx(0.75 - 0.282896, abs=2e-6)
    assert interval["upper"] == 1.0
    assert (interval["wins"], interval["ties"], interval["losses"]) == (2, 2, 0)
    assert win_rate_interval([1] * 8, [1] * 8, 0.9)["lower"] == 0.5  # all ties: no evidence either way
    with pytest.raises(ValueError):
        win_rate_interval([1, 2], [1], 0.9)


def test_pairs_best_against_worst_or_every_gap_over_tau() -> None:
    row = {"messages": [{"role": "user", "content": "q"}]}
    newest = [{"text": t, "reward": r} for t, r in [("a", 0.0), ("b", 1.0), ("c", 0.4)]]
    older = [{"text": "z", "reward": 2.0}]
    (pair,) = build_pairs(row, newest, newest, "best_worst", tau=0.0)
    assert (pair["chosen"], pair["rejected"]) == ("b", "a")
    (pair,) = build_pairs(row, newest, newest + older, "best_worst", tau=0.0)  # the best of every round
    assert (pair["chosen"], pair["rejected"]) == ("z", "a")
    assert build_pairs(row, newest, newest, "best_worst", tau=1.0) == []  # gap 1.0 is not over tau
    pairs = build_pairs(row, newest, newest, "threshold", tau=0.3)
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == [("b", "a"), ("b", "c"), ("c", "a")]
    assert [degree_of(g) for g in (1.0, 0.7, 0.2, 0.05)] == [1, 2, 3, 4]


def test_rounds_take_the_shuffled_prompts_in_turn() -> None:
    prompts = list(range(10))
    first, second = round_prompts(prompts, 4, 1, seed=3), round_prompts(prompts, 4, 2, seed=3)
    third = round_prompts(prompts, 4, 3, seed=3)
    assert len(set(first) | set(second)) == 8 and len(third) == 4  # disjoint, then wrapping around
    assert set(first + second + third) == set(prompts)
    assert round_prompts(prompts, 4, 1, seed=3) == first


# -- config -------------------------------------------------------------------------------------------------------
def base_config(quick_demo: dict[str, Any], out: Path, **changes: Any) -> dict[str, Any]:
    """A two-round loop small enough for the suite, on the quick demo's SFT model and toy data."""
    demo = Path(quick_demo["out"])
    raw: dict[str, Any] = {
        "out": str(out),
        "seed": 0,
        "rounds": 2,
        "policy": str(demo / "sft"),
        "prompts": str(demo / "toy" / "data" / "prompts.jsonl"),
        "heldout": str(demo / "toy" / "data" / "eval.jsonl"),
        "sampling": {"prompts_per_round": 24, "num_samples": 4, "temperature": 1.0, "max_new_tokens": 12},
        "labels": {"by": "function", "function": "toy", "pairs_per_round": 20, "test_fraction": 0.25},
        "reward_model": {
            "retrain": "always",
            "config": {"train": {"max_steps": 3, "batch_size": 4}, "data": {"max_length": 128}},
        },
        "scoring": {"by": "reward_model", "unfinished_penalty": 1.0},
        "train": {
            "config": {
                "peft": {"method": "full"},
                "data": {"max_length": 128},
                "dpo": {"beta": 0.1},
                "train": {"max_steps": 4, "batch_size": 4},
                "optim": {"lr": 1.0e-3},
                "schedule": {"name": "constant"},
                "checkpoint": {"every": 2, "keep": 2},
            }
        },
        "gate": {"prompts": 24, "max_new_tokens": 12, "judges": ["reward_model", "gold"], "min_win_rate": 0.0},
    }
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return raw


def test_unknown_keys_and_missing_paths_are_refused_at_load(quick_demo: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gate.min_winrate"):
        validate_loop_config(base_config(quick_demo, tmp_path, gate__min_winrate=0.5), "t")
    with pytest.raises(ConfigError, match="policy"):
        validate_loop_config(base_config(quick_demo, tmp_path, policy=""), "t")
    with pytest.raises(ConfigError, match="frobnicate"):  # a bad key inside the DPO stage's config, before round 1
        validate_loop_config(base_config(quick_demo, tmp_path, train__config__frobnicate=1), "t")
    with pytest.raises(ConfigError, match="labels"):
        validate_loop_config(base_config(quick_demo, tmp_path, labels__by="none"), "t")
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(base_config(quick_demo, tmp_path, rounds=0)))
    result = subprocess.run(
        [sys.executable, "-m", "posttrain", "loop", str(path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert result.returncode == 2 and "rounds" in result.stderr and len(result.stderr.strip().splitlines()) <= 3


# -- a loop -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def loop_run(quick_demo: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("loop") / "run"
    raw = base_config(quick_demo, out)
    report = run_loop(validate_loop_config(raw, "test"))
    return {"out": out, "raw": raw, "report": report}


def test_each_round_labels_on_policy_pairs_retrains_the_reward_model_and_trains_on_accumulated_pairs(
    loop_run: dict[str, Any],
) -> None:
    out = loop_run["out"]
    for number in (1, 2):
        directory = out / f"round_{number}"
        samples = read_jsonl(directory / "samples.jsonl")
        assert len(samples) == 24 and all(len(row["samples"]) == 4 for row in samples)
        # Every labelled pair is two of that round's samples of one prompt; the checker's vote picked the right one.
        texts = {json.dumps(row["messages"]): {s["text"] for s in row["samples"]} for row in samples}
        with sqlite3.connect(directory / "labels.db") as db:
            (votes,) = db.execute("SELECT COUNT(*) FROM labels").fetchone()
        labelled = read_jsonl(directory / "labels_train.jsonl") + read_jsonl(directory / "labels_test.jsonl")
        assert 2 <= len(labelled) <= votes <= 20
        references = {json.dumps(row["messages"]): row["reference"] for row in samples}
        for row in labelled:
            prompt = json.dumps(row["prompt"])
            chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
            assert prompt in texts and {chosen, rejected} <= texts[prompt]
            question = row["prompt"][-1]["content"]
            assert score_prompt(question, chosen, references[prompt]) > score_prompt(
                question, rejected, references[prompt]
            )
        manifest = json.loads((directory / "manifest.json").read_text())
        assert list(manifest["stages"]) == ["sample", "label", "reward", "pairs", "train", "gate"]
        assert all(len(h) == 64 for stage in manifest["stages"].values() for h in stage["outputs"].values())
        assert manifest["metrics"]["rm_retrained"] is True and 0 <= manifest["metrics"]["rm_accuracy"] <= 1
    # The reward model of round 2 trained on both rounds' training labels; DPO on both rounds' pairs.
    rm_rows = read_jsonl(out / "round_2" / "rm_train.jsonl")
    assert len(rm_rows) == sum(len(read_jsonl(out / f"round_{n}" / "labels_train.jsonl")) for n in (1, 2))
    dpo_rows = read_jsonl(out / "round_2" / "dpo_train.jsonl")
    assert len(dpo_rows) == sum(len(read_jsonl(out / f"round_{n}" / "pairs.jsonl")) for n in (1, 2))
    # The reference stayed the first policy: recorded in round 2's DPO config.
    dpo_config = yaml.safe_load((out / "round_2" / "policy" / "config.yaml").read_text())
    assert Path(dpo_config["dpo"]["reference"]) == Path(loop_run["raw"]["policy"]) / "model"


def test_the_report_has_every_round_and_the_gate_decided_from_its_checks(loop_run: dict[str, Any]) -> None:
    report = json.loads((loop_run["out"] / "loop.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for row in report["rounds"]:
        for key in (
            "gold_reward",
            "proxy_reward",
            "kl_to_reference",
            "length",
            "rm_accuracy",
            "max_minus_median_reward",
        ):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert set(row["win_rate"]) == {"reward_model", "gold"}
        gate = json.loads((loop_run["out"] / f"round_{row['round']}" / "gate.json").read_text())
        failed = sorted(name for name, check in gate["checks"].items() if not check["passed"])
        assert failed == sorted(row["failed_checks"]) and row["promoted"] == (not failed)
    promoted = [r["round"] for r in report["rounds"] if r["promoted"]]
    expected = loop_run["out"] / f"round_{promoted[-1]}" / "policy" if promoted else Path(loop_run["raw"]["policy"])
    assert report["final_policy"] == str(expected)
    assert report["final_policy_sha256"] == weights_sha256(expected)


def test_a_hackable_reward_is_refused_by_the_gate(quick_demo: dict[str, Any], tmp_path: Path) -> None:
    """The samples are scored by a reward that likes long answers, right or wrong: DPO learns it, the planted
    reward judges the candidate better, the held-out checker judges it worse and the answers grow: the round is
    rolled back and the policy stays the first one."""
    raw = base_config(
        quick_demo,
        tmp_path / "hack",
        rounds=1,
        labels__by="none",
        scoring={"by": "function", "function": "loop_rewards:longer_is_better"},
        reward_model={"retrain": "never"},
        gate={
            "prompts": 48,
            "max_new_tokens": 12,
            "judges": ["loop_rewards:longer_is_better", "gold"],
            "min_win_rate": 0.5,
            "max_length_growth": 0.2,
            "min_rm_accuracy": None,
        },
    )
    raw["train"]["config"]["train"] = {"max_steps": 12, "batch_size": 4}
    raw["train"]["config"]["optim"] = {"lr": 3.0e-3}
    report = run_loop(validate_loop_config(raw, "test"))
    (row,) = report["rounds"]
    assert row["win_rate"]["loop_rewards:longer_is_better"]["win_rate"] > 0.5  # the hacked reward is fooled
    assert {"win_rate[gold]", "length_growth"} <= set(row["failed_checks"]), row
    assert row["length"] > row["length_current"]
    assert not row["promoted"] and report["final_policy"] == raw["policy"]


# Runs `posttrain loop CONFIG` and, with KILL_ROUND set, SIGKILLs itself right after optimizer step KILL_STEP of
# that round's DPO run (its checkpoint at step 2 exists then; the work after it is lost).
_LOOP_AND_KILL = """
import os, signal, sys
from posttrain.cli import main
from posttrain.runtime.trainer import Runtime

end_step = Runtime.end_step

def end_step_then_kill(self, *args, **kwargs):
    end_step(self, *args, **kwargs)
    if f"round_{os.environ['KILL_ROUND']}/policy" in str(self.config.output_dir) and self.global_step == 3:
        os.kill(os.getpid(), signal.SIGKILL)

if os.environ.get("KILL_ROUND"):
    Runtime.end_step = end_step_then_kill
sys.exit(main(["loop", sys.argv[1]]))
"""


def test_a_loop_killed_in_training_resumes_to_the_same_weights(
    quick_demo: dict[str, Any], loop_run: dict[str, Any], tmp_path: Path
) -> None:
    raw = base_config(quick_demo, tmp_path / "killed")
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    killed = subprocess.run(
        [sys.executable, "-c", _LOOP_AND_KILL, str(path)],
        env={**env, "KILL_ROUND": "2"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    manifest = json.loads((tmp_path / "killed" / "round_2" / "manifest.json").read_text())
    assert list(manifest["stages"]) == ["sample", "label", "reward", "pairs"]  # killed inside "train"
    resumed = subprocess.run(
        [sys.executable, "-c", _LOOP_AND_KILL, str(path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr and "at step 2" in resumed.stderr
    report = json.loads((tmp_path / "killed" / "loop.json").read_text())
    uninterrupted = loop_run["report"]
    assert [r["promoted"] for r in report["rounds"]] == [r["promoted"] for r in uninterrupted["rounds"]]
    for number in (1, 2):
        assert weights_sha256(tmp_path / "killed" / f"round_{number}" / "policy") == weights_sha256(
            loop_run["out"] / f"round_{number}" / "policy"
        )
    # A rerun with another config is refused, naming the file that records the first.
    path.write_text(yaml.safe_dump({**raw, "rounds": 3, "seed": 1}))
    with pytest.raises(Exception, match="loop_config.yaml"):
        run_loop(load_loop_config(path))


def test_the_final_policy_is_linked_as_the_loop_stage_model(loop_run: dict[str, Any]) -> None:
    """In a pipeline, ``${loop.model}`` names ``OUT/model``: a link to the final policy's model directory."""
    final = Path(loop_run["report"]["final_policy"])
    link_final_policy(loop_run["out"], final)
    link_final_policy(loop_run["out"], final)  # a rerun replaces the link
    assert (loop_run["out"] / "model").is_symlink()
    assert (loop_run["out"] / "model").resolve() == model_dir(final).resolve()
    assert weights_sha256(loop_run["out"] / "model") == loop_run["report"]["final_policy_sha256"]


def test_a_round_can_train_with_ppo_against_the_scorer(quick_demo: dict[str, Any], tmp_path: Path) -> None:
    """train.method: ppo runs the PPO stage (here GRPO) on the round's prompts with the round's scorer as its
    reward, from the current policy; the gate judges what it made like any round."""
    raw = base_config(
        quick_demo,
        tmp_path / "ppo",
        rounds=1,
        reference="moving",
        labels__by="none",
        scoring={"by": "function", "function": "toy", "unfinished_penalty": 1.0},
        reward_model={"retrain": "never"},
        gate={"prompts": 24, "max_new_tokens": 12, "judges": ["gold"], "min_win_rate": 0.0, "min_rm_accuracy": None},
    )
    raw["train"] = {
        "method": "ppo",
        "config": {
            "peft": {"method": "full"},
            "data": {"max_length": 128},
            "sampling": {"num_samples": 4, "max_new_tokens": 12},
            "algorithm": {"advantage": "grpo", "prompts_per_step": 4, "kl_coef": 0.05},
            "train": {"max_steps": 2, "batch_size": 8},
            "optim": {"lr": 1.0e-4},
        },
    }
    report = run_loop(validate_loop_config(raw, "test"))
    (row,) = report["rounds"]
    policy = tmp_path / "ppo" / "round_1" / "policy"
    config = yaml.safe_load((policy / "config.yaml").read_text())
    assert config["stage"] == "ppo" and config["reward"]["function"] == "toy"
    assert Path(config["data"]["train"]) == tmp_path / "ppo" / "round_1" / "prompts.jsonl"
    steps = [json.loads(line) for line in (policy / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert max(r["step"] for r in steps) == 2
    assert "gold" in row["win_rate"] and row["promoted"] == (row["win_rate"]["gold"]["lower"] > 0.0)
    with pytest.raises(ConfigError, match="reference: moving"):
        validate_loop_config({**raw, "reference": "fixed"}, "test")
