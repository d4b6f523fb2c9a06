"""The reward model learns verifiable preferences: held-out pairwise accuracy ≥ 0.88.

Pairs are the toy kit's: the chosen answer is the task's correct one, the rejected one a plausible corruption
(`posttrain.tasks.corrupt`: a number off by a few, a swapped pair, a forgotten upper-casing). Tasks whose
mistakes a 2-layer, 64-wide model can learn to verify from ~1,700 training pairs: upper (case), count (a number checked
against the words), sort (order and multiset). Reversal, copying and addition need more model or data than a unit
test has (measured: 0.41–0.61 after the same budget on all six tasks), and are not claimed here.

Set-up: the kit (4,000 pairs, the three tasks kept: ~2,000), a micro model of the kit's own tokenizer, 300 steps
of 64 pairs, lr 3e-3 cosine with 10 warm-up steps, 15 % held out (~300 pairs). The seed varies the kit, the micro
model and training alike. Measured with ``POSTTRAIN_LEARNING_SEED=N OMP_NUM_THREADS=1 pytest -s
tests/test_reward_learning.py`` (N = 0…4), final held-out accuracy and reward gap:

| seed | accuracy | reward gap |
|---|---|---|
| 0 | 0.933 | 8.43 |
| 1 | 0.947 | 9.55 |
| 2 | 0.953 | 8.88 |
| 3 | 0.920 | 7.65 |
| 4 | 0.923 | 8.79 |

The threshold, 0.88, is the smallest of the five (0.920) less 0.04: about 2.5 standard errors of an accuracy near
0.92 on ~300 held-out pairs (sqrt(0.92·0.08/300) = 0.016), the noise between seeds and CPUs, while a model that
learnt nothing scores 0.5. (The old 0.90 bound sat 0.02 under its seed's value and failed at 0.883 on a busy
machine.) The reward gap bound, 1.0, is far under the smallest gap (7.65).
"""

from __future__ import annotations

import json

import pytest

from conftest import LEARNING_SEED, save_micro_model, sft_config
from posttrain.toy import build_toy
from posttrain.recipes import reward

TASKS = ("upper", "count", "sort")
MIN_ACCURACY = 0.88  # the five seeds' minimum (0.920) less a 0.04 margin: see the module docstring


@pytest.mark.slow
def test_reward_model_learns_verifiable_preferences_held_out(tmp_path) -> None:
    kit = build_toy(tmp_path / "kit", size="tiny", seed=LEARNING_SEED, sft=10, prefs=4000, prompts=10, eval=10, pretrain=10)
    # The kit's tokenizer is trained on this kit's text: a micro model (as in conftest) of its vocabulary.
    micro_model = save_micro_model(kit.model, tmp_path / "init", seed=LEARNING_SEED)
    rows = [json.loads(line) for line in kit.prefs.read_text().splitlines()]
    rows = [row for row in rows if row["task"] in TASKS]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert len(rows) > 1900

    config = sft_config(
        micro_model, data, tmp_path / "rm", stage="reward", seed=LEARNING_SEED, data__max_length=64, data__eval_fraction=0.15,
        train__max_steps=300, train__batch_size=64, train__eval_every=100, optim__lr=3e-3, schedule__name="cosine",
        schedule__warmup_steps=10,
    )
    summary = reward.run(config)
    print(f"seed {LEARNING_SEED}: held-out accuracy {summary['final_eval_accuracy']:.3f}, reward gap {summary['final_eval_reward_gap']:.3f}")
    assert summary["final_eval_accuracy"] >= MIN_ACCURACY, summary
    assert summary["final_eval_reward_gap"] > 1.0
    evals = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines() if "eval_accuracy" in line]
    assert evals[0]["eval_accuracy"] < summary["final_eval_accuracy"], "accuracy should rise during training"
