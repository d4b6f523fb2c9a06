"""PPO and GRPO raise held-out exact match over their SFT start on the toy's count / upper-case / copy tasks.

Set-up (the micro model of conftest on a toy kit of 1,500 demonstrations, 1,500 prompts and 300 held-out
prompts, restricted to those three tasks: 750 / 750 / 150 rows): 60 SFT steps (batch 16, lr 3e-3) give a start
that answers in the right format and is right 4-17 % of the time; then 300 RL steps at lr 1e-3 with the toy's
graded gold reward, 16 new tokens at temperature 1, KL 0.05 in the reward:

- PPO: GAE with a separate critic (lr 3e-3), 16 prompts x 4 samples per step, 2 epochs x 2 updates.
- GRPO: 8 prompts x 8 samples per step, 2 epochs x 2 updates.

Measured held-out exact match (greedy, 150 prompts), SFT → RL:

| seed | SFT | PPO | GRPO |
|---|---|---|---|
| 0 | 0.040 | 0.333 (+0.293) | 0.260 (+0.220) |
| 1 | 0.173 | 0.333 (+0.160) | 0.267 (+0.093) |
| 2 | 0.107 | 0.240 (+0.133) | 0.227 (+0.120) |

(Seeds 1 and 2 vary the kit, the micro model, SFT and RL alike. Measured with each prompt computed once per group,
in generation and training; an earlier kit and the padded layout gave +0.113 to +0.147.)

Shorter budgets were not robust: with 150 RL steps PPO gained +0.187 / +0.113 / +0.006, and from a 120-step SFT
start both lost a little on seed 1 (0.340 → 0.333). The test runs seed 0 (deterministic on CPU) and asserts
+0.08, below the smallest gain measured over the three seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import save_micro_model, sft_config
from posttrain.demo.toy import build_toy
from posttrain.eval.verifiable import evaluate_verifiable, read_prompts
from posttrain.recipes import ppo, sft

TASKS = ("count", "upper", "copy")


def keep_tasks(source: Path, target: Path) -> Path:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    target.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("task") in TASKS))
    return target


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict[str, Path]:
    """The kit restricted to three tasks, and the micro model after 60 SFT steps."""
    root = tmp_path_factory.mktemp("rl_learning")
    kit = build_toy(root / "kit", size="tiny", seed=0, sft=1500, prefs=10, prompts=1500, eval=300, pretrain=10)
    save_micro_model(kit.model, root / "init")
    paths = {name: keep_tasks(getattr(kit, name), root / f"{name}.jsonl") for name in ("sft", "prompts", "eval")}
    sft.run(sft_config(root / "init", paths["sft"], root / "sft", train__max_steps=60, train__batch_size=16, optim__lr=3e-3, seed=0))
    return {**paths, "model": root / "sft" / "model", "root": root}


def exact_match(model_dir: Path, eval_file: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return evaluate_verifiable(model, AutoTokenizer.from_pretrained(model_dir), read_prompts(eval_file), max_new_tokens=16)["exact_match"]


SETTINGS = {
    "ppo": dict(
        algorithm__advantage="gae", reward__function="toy", sampling__num_samples=4, algorithm__prompts_per_step=16,
        train__batch_size=16, train__grad_accum=2, algorithm__ppo_epochs=2, critic__lr=3e-3,
    ),
    "grpo": dict(
        algorithm__advantage="grpo", reward__function="toy", sampling__num_samples=8, algorithm__prompts_per_step=8,
        train__batch_size=16, train__grad_accum=2, algorithm__ppo_epochs=2,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_rl_raises_held_out_exact_match_over_sft(name, start) -> None:
    out = start["root"] / name
    ppo.run(sft_config(
        start["model"], start["prompts"], out, stage="ppo", train__max_steps=300, optim__lr=1e-3, seed=0,
        sampling__max_new_tokens=16, resume=False, **SETTINGS[name],
    ))
    before, after = exact_match(start["model"], start["eval"]), exact_match(out / "model", start["eval"])
    print(f"{name}: held-out exact match {before:.3f} -> {after:.3f}")
    assert after > before + MARGIN[name], (before, after)


MARGIN = {"ppo": 0.08, "grpo": 0.08}  # the smallest measured gains over seeds 0-2: PPO +0.133, GRPO +0.093
