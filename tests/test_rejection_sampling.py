"""Rejection sampling: selection against hand-computed cases, the written dataset against the rewards, the reward
model path, the SFT round and its resume, reward-function errors, and the sampling switches."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers import generate_responses, prompts_file, sft_config

from posttrain.config import RewardSource
from posttrain.data.errors import DataError
from posttrain.recipes import rejection_sampling as rs
from posttrain.rewards import WeightedReward, build_reward, last_user_text, load_reward_function


def length_reward(prompt: str, response: str, reference: str | None) -> float:
    """Pays for characters: deterministic, and different for different samples of a random model."""
    return float(len(response))


LENGTH_REWARD = f"{__name__}:length_reward"


def rs_config(model: Path, data: Path, out: Path, **overrides: Any) -> Any:
    defaults = {
        "stage": "rejection_sampling",
        "sampling__num_samples": 4,
        "sampling__max_new_tokens": 8,
        "sampling__batch_size": 16,
        "rejection__train_after": False,
        "reward__function": LENGTH_REWARD,
        # The micro model is untrained and rarely ends a reply within 8 tokens; selection itself is tested here.
        "rejection__require_finished": False,
    }
    return sft_config(model, data, out, **{**defaults, **overrides})


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- (a) selection ------------------------------------------------------------------------------------------


def test_select_best_hand_computed() -> None:
    rewards = [
        [0.1, 0.7, 0.3],  # best is index 1
        [0.5, 0.5, 0.2],  # a tie: the earliest sample
        [-1.0, -0.2, -3.0],  # negative rewards: still the largest
        [0.9, 0.0, 0.4],  # index 0 is best but not eligible (say empty): index 2
    ]
    eligible = [[True] * 3, [True] * 3, [True] * 3, [False, True, True]]
    assert rs.select_best(rewards, eligible=eligible) == [1, 0, 1, 2]
    # Threshold 0.45: the bests are 0.7, 0.5, -0.2, 0.4, so the last two prompts are dropped.
    assert rs.select_best(rewards, threshold=0.45, eligible=eligible) == [1, 0, None, None]
    assert rs.select_best([[0.2, 0.2]], threshold=0.2) == [0]  # the threshold is inclusive
    assert rs.select_best([[1.0]], eligible=[[False]]) == [None]


def test_summary_best_of_n_at_least_mean_of_n() -> None:
    rows = [
        {
            "samples": [
                {"text": "a", "reward": 0.1, "finished": True, "num_tokens": 2},
                {"text": "b", "reward": 0.7, "finished": False, "num_tokens": 4},
            ]
        },
        {
            "samples": [
                {"text": "c", "reward": 0.5, "finished": True, "num_tokens": 3},
                {"text": "c", "reward": 0.5, "finished": True, "num_tokens": 3},
            ]
        },
    ]
    summary = rs.summarize(rows, [1, None])
    # mean-of-n (0.1 + 0.7 + 0.5 + 0.5) / 4 = 0.45; best-of-n (0.7 + 0.5) / 2 = 0.6; one prompt kept, its 0.7.
    assert summary["mean_of_n_reward"] == pytest.approx(0.45)
    assert (
        summary["best_of_n_reward"] == pytest.approx(0.6)
        and summary["best_of_n_reward"] >= summary["mean_of_n_reward"]
    )
    assert summary["kept"] == 1 and summary["kept_share"] == 0.5 and summary["kept_mean_reward"] == pytest.approx(0.7)
    assert (
        summary["mean_tokens"] == 3.0 and summary["finished_share"] == 0.75 and summary["kept_finished_share"] == 0.0
    )
    assert summary["distinct_per_prompt"] == 1.5


# ---- (b) the dataset holds each prompt's best sample --------------------------------------------------------


def test_selected_dataset_holds_the_highest_reward_sample(toy, micro_model, tmp_path) -> None:
    data = prompts_file(toy, tmp_path / "p.jsonl", 6)
    summary = rs.run(rs_config(micro_model, data, tmp_path / "o", sampling__temperature=1.0))
    samples = read_jsonl(tmp_path / "o" / "samples.jsonl")
    selected = read_jsonl(tmp_path / "o" / "selected.jsonl")
    prompts = read_jsonl(data)
    assert len(samples) == len(selected) == 6 and summary["kept"] == 6
    assert summary["distinct_per_prompt"] > 2  # temperature 1: the n samples really differ
    for prompt, row, chosen in zip(prompts, samples, selected):
        assert len(row["samples"]) == 4
        for sample in row["samples"]:
            assert sample["reward"] == len(sample["text"])  # rewards are the function's, per sample
        best = max(row["samples"], key=lambda s: s["reward"])
        assert chosen["messages"] == [*prompt["messages"], {"role": "assistant", "content": best["text"]}]
        assert chosen["reward"] == best["reward"] == max(len(s["text"]) for s in row["samples"])
    assert summary["best_of_n_reward"] > summary["mean_of_n_reward"]
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["kept"] == 6


def test_require_finished_never_keeps_a_cut_off_response(toy, micro_model, tmp_path) -> None:
    data = prompts_file(toy, tmp_path / "p.jsonl", 6)
    config = rs_config(micro_model, data, tmp_path / "o", sampling__temperature=1.0, rejection__require_finished=True)
    summary = rs.run(config)
    samples = read_jsonl(tmp_path / "o" / "samples.jsonl")
    selected = {
        json.dumps(r["messages"][:-1]): r["messages"][-1]["content"]
        for r in read_jsonl(tmp_path / "o" / "selected.jsonl")
    }
    unfinished_prompts = 0
    for row in samples:
        finished = [s for s in row["samples"] if s["finished"] and s["text"].strip()]
        kept = selected.get(json.dumps(row["messages"]))
        if not finished:
            unfinished_prompts += 1
        if kept is not None:
            assert kept in [s["text"] for s in finished]
    assert summary["kept"] == len(samples) - unfinished_prompts
    assert unfinished_prompts > 0, "the untrained micro model should fail to finish some replies within 8 tokens"


# ---- (c) a reward model ---------------------------------------------------------------------------------------


def tiny_reward_model(micro_model: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(micro_model, num_labels=1)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(micro_model).save_pretrained(out)
    return out


def test_reward_model_picks_its_highest_scoring_sample(toy, micro_model, tmp_path) -> None:
    from posttrain.eval.reward_model import RewardScorer

    reward_dir = tiny_reward_model(micro_model, tmp_path / "rm")
    data = prompts_file(toy, tmp_path / "p.jsonl", 4)
    rs.run(rs_config(micro_model, data, tmp_path / "o", sampling__temperature=1.0, reward={"model": str(reward_dir)}))
    scorer = RewardScorer(reward_dir, device="cpu")
    for row, chosen in zip(
        read_jsonl(tmp_path / "o" / "samples.jsonl"), read_jsonl(tmp_path / "o" / "selected.jsonl")
    ):
        conversations = [[*row["messages"], {"role": "assistant", "content": s["text"]}] for s in row["samples"]]
        scores = scorer.score(conversations)
        assert [s["reward"] for s in row["samples"]] == pytest.approx(scores, abs=1e-4)
        assert len(set(round(s, 5) for s in scores)) > 1
        assert chosen["reward"] == pytest.approx(max(scores), abs=1e-4)
        assert chosen["messages"][-1]["content"] == row["samples"][scores.index(max(scores))]["text"]


def test_model_and_function_rewards_sum_with_weights(micro_model, tmp_path) -> None:
    reward_dir = tiny_reward_model(micro_model, tmp_path / "rm")
    reward = build_reward(
        RewardSource(model=str(reward_dir), function=LENGTH_REWARD, model_weight=2.0, function_weight=0.5)
    )
    prompts = [[{"role": "user", "content": "Repeat: cat"}]] * 2
    parts = reward.breakdown(prompts, ["cat", "dog dog"], [None, None])
    assert parts["function"] == [3.0, 7.0]
    assert parts["total"] == pytest.approx([2.0 * m + 0.5 * f for m, f in zip(parts["model"], parts["function"])])


# ---- (d) the SFT round, and a rerun that does not sample again -------------------------------------------------


def test_train_after_writes_the_model_and_a_rerun_reuses_the_samples(toy, micro_model, tmp_path, monkeypatch) -> None:
    import yaml
    from transformers import AutoModelForCausalLM

    data = prompts_file(toy, tmp_path / "p.jsonl", 12)
    config = rs_config(
        micro_model,
        data,
        tmp_path / "o",
        rejection__train_after=True,
        train__max_steps=2,
        train__batch_size=2,
        sampling__temperature=1.0,
    )
    summary = rs.run(config)
    run = tmp_path / "o"
    assert summary["sft"]["steps"] == 2
    AutoModelForCausalLM.from_pretrained(run / "model")
    assert yaml.safe_load((run / "config.yaml").read_text())["stage"] == "rejection_sampling"
    sft_round = yaml.safe_load((run / "sft_config.yaml").read_text())
    assert sft_round["stage"] == "sft" and sft_round["data"]["train"] == str(run / "selected.jsonl")
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1, 2]

    before = (run / "samples.jsonl").stat().st_mtime_ns, (run / "samples.jsonl").read_bytes()

    def no_sampling(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a rerun sampled again")

    monkeypatch.setattr(rs, "build_engine", no_sampling)
    again = rs.run(config)  # resume=auto: the samples and the finished SFT round are reused
    assert ((run / "samples.jsonl").stat().st_mtime_ns, (run / "samples.jsonl").read_bytes()) == before
    assert again["best_of_n_reward"] == summary["best_of_n_reward"] and again["sft"]["steps"] == 2

    changed = rs_config(micro_model, data, run, sampling__temperature=0.5, rejection__train_after=False)
    with pytest.raises(ValueError, match="different sampling"):
        rs.run(changed)


# ---- (e) reward functions and data errors -----------------------------------------------------------------------


def test_load_reward_function_errors_name_the_spec() -> None:
    with pytest.raises(ValueError, match="'nope'.*built-in.*module:function"):
        load_reward_function("nope")
    with pytest.raises(ValueError, match="no_such_module_xyz:f.*cannot import module 'no_such_module_xyz'"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="posttrain.tasks:nope.*no attribute 'nope'"):
        load_reward_function("posttrain.tasks:nope")
    with pytest.raises(ValueError, match="posttrain.tasks:TASKS.*not a function"):
        load_reward_function("posttrain.tasks:TASKS")
    with pytest.raises(ValueError, match="compares with a reference answer, but prompt 1 has none"):
        load_reward_function("exact_match")([[{"role": "user", "content": "q"}]] * 2, ["a", "b"], ["a", None])


def test_builtin_and_imported_reward_functions() -> None:
    prompts = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."}]] * 3
    assert last_user_text(prompts[0]) == "Add 2 and 3."
    assert load_reward_function("exact_match")(prompts, ["5", " 5 ", "6"], ["5"] * 3) == [1.0, 1.0, 0.0]
    toy = load_reward_function("toy")(prompts, ["5", "6", "x"], ["5"] * 3)
    assert toy[0] == 1.0 and 0.0 < toy[1] < 1.0 and toy[2] == 0.0
    seen = load_reward_function("posttrain.tasks:score_prompt")(prompts[:1], ["5"], ["5"])
    assert seen == [1.0]  # the function got the last user message as its prompt
    assert isinstance(build_reward(RewardSource(function="toy")), WeightedReward)


def test_rows_without_reference_and_bad_rows_fail_with_file_and_line(micro_model, tmp_path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Repeat: cat"}], "reference": "cat"})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Repeat: dog"}]})
        + "\n"
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(data))}:2: field 'reference'.*exact_match"):
        rs.run(rs_config(micro_model, data, tmp_path / "o", reward__function="exact_match"))
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "x"}]})
        + "\n"
    )
    with pytest.raises(DataError, match=rf"{re.escape(str(data))}:2: .*role"):
        rs.run(rs_config(micro_model, data, tmp_path / "o"))
    assert not (tmp_path / "o" / "samples.jsonl").exists()


# ---- (f) the sampling switches ------------------------------------------------------------------------------------


def test_temperature_zero_repeats_and_top_k_one_is_greedy(micro_model) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout import sample_responses

    model = AutoModelForCausalLM.from_pretrained(micro_model)
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    prompts = [[{"role": "user", "content": "Repeat: cat dog"}], [{"role": "user", "content": "Add 2 and 3."}]]
    eos = tokenizer.eos_token_id
    greedy = sample_responses(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=12, batch_size=4, temperature=0.0
    )
    for group in greedy:
        assert len({tuple(r.token_ids) for r in group}) == 1
        for r in group:
            assert r.finished == (eos in r.token_ids) and r.num_tokens <= 12
            assert not r.finished or r.token_ids.index(eos) == r.num_tokens - 1  # cut right after the stop token
    torch.manual_seed(0)
    top1 = sample_responses(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=12, batch_size=4, temperature=1.0, top_k=1
    )
    assert [[r.token_ids for r in g] for g in top1] == [[r.token_ids for r in g] for g in greedy]
    torch.manual_seed(0)
    sampled = sample_responses(
        model, tokenizer, prompts, num_samples=3, max_new_tokens=12, batch_size=4, temperature=1.0
    )
    assert any(len({tuple(r.token_ids) for r in group}) > 1 for group in sampled)
    assert generate_responses(model, tokenizer, prompts, max_new_tokens=12) == [g[0].text for g in greedy]


def test_stop_tokens_mark_finished_responses(micro_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.rollout import sample_responses

    model = AutoModelForCausalLM.from_pretrained(micro_model)
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    prompts = [[{"role": "user", "content": "Repeat: cat"}]]
    first = sample_responses(model, tokenizer, prompts, max_new_tokens=6, stop_token_ids=[])[0][0]
    assert not first.finished and first.num_tokens == 6
    # Make a token of the greedy path a stop token: the reply ends right after it and counts as finished.
    cut = next((k for k in range(1, 6) if first.token_ids[k] not in first.token_ids[:k]), 0)
    stopped = sample_responses(model, tokenizer, prompts, max_new_tokens=6, stop_token_ids=[first.token_ids[cut]])[0][
        0
    ]
    assert stopped.finished and stopped.token_ids == first.token_ids[: cut + 1]
