"""The reward model learns verifiable preferences: held-out pairwise accuracy ≥ 90 %.

Pairs are the toy kit's: the chosen answer is the task's correct one, the rejected one a plausible corruption
(`posttrain.demo.tasks.corrupt`: a number off by a few, a swapped pair, a forgotten upper-casing). Tasks whose
mistakes a 2-layer, 64-wide model can learn to verify from ~1,700 training pairs: upper (case), count (a number checked
against the words), sort (order and multiset). Reversal, copying and addition need more model or data than a unit
test has (measured: 0.41–0.61 after the same budget on all six tasks), and are not claimed here.

Measured (micro model, 300 steps of 64 pairs, lr 3e-3 cosine, 15 % held out, seed 0): with this kit (~2,000 pairs
of the three tasks) held-out accuracy 0.877 / 0.920 / 0.913 at steps 100 / 200 / 300; 32 pairs a step (about what
8 packed rows held when train.batch_size counted rows) reached 0.753 / 0.807 / 0.847. Earlier, with 8 packed rows a
step: 0.837 / 0.930 / 0.920 (each pair's prompt held once; 0.843 / 0.897 / 0.953 with the two sequences whole);
with half the pairs 0.940 / 0.926 / 0.926 over seeds 0, 1, 2 on one kit but 0.86 on another (sort is the hard
task: 0.8), hence the larger kit.
"""

from __future__ import annotations

import json

import pytest

from conftest import sft_config
from posttrain.demo.toy import build_toy
from posttrain.recipes import reward

TASKS = ("upper", "count", "sort")


@pytest.mark.slow
def test_reward_model_reaches_90_percent_held_out_accuracy(micro_model, tmp_path) -> None:
    kit = build_toy(tmp_path / "kit", size="tiny", seed=0, sft=10, prefs=4000, prompts=10, eval=10, pretrain=10)
    rows = [json.loads(line) for line in kit.prefs.read_text().splitlines()]
    rows = [row for row in rows if row["task"] in TASKS]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert len(rows) > 1900

    config = sft_config(
        micro_model, data, tmp_path / "rm", stage="reward", seed=0, data__max_length=64, data__eval_fraction=0.15,
        train__max_steps=300, train__batch_size=64, train__eval_every=100, optim__lr=3e-3, schedule__name="cosine",
        schedule__warmup_steps=10,
    )
    summary = reward.run(config)
    assert summary["final_eval_accuracy"] >= 0.90, summary
    assert summary["final_eval_reward_gap"] > 1.0
    evals = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    assert evals[0]["eval_accuracy"] < summary["final_eval_accuracy"], "accuracy should rise during training"
