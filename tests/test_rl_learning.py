"""PPO and GRPO raise held-out exact match over their SFT start on the toy's count / upper-case / copy tasks.

Set-up (the micro model on a toy kit of 1,500 demonstrations, 1,500 prompts and 300 held-out prompts, restricted
to those three tasks): 60 SFT steps (80 sequences a step, lr 3e-3) give a start that answers in the right format
but is mostly wrong; then 300 RL steps (lr 1e-3 for PPO, 5e-4 for GRPO) with the toy's graded gold reward, 16 new
tokens at temperature 1, KL 0.05 in the reward:

- PPO: GAE with a separate critic (lr 3e-3), 16 prompts x 4 samples per step, 2 epochs x 2 updates.
- GRPO: 8 prompts x 8 samples per step, 2 epochs x 2 updates.

Why these budgets: with half the RL steps PPO's gain all but vanished on some seeds; GRPO at lr 1e-3 lost exact
match on one seed of five (its 8 prompts a step give a noisy gradient that a high rate follows); from a longer
SFT start the RL stages had too little left to gain to be measured. Why these margins (``MARGIN``): each sits
below the smallest gain measured over seeds 0-4, with room for the sampler's random stream, which alone moves a
seed's gain a lot. The suite runs seed 0 (deterministic on CPU);
``python benchmarks/learning_seeds.py tests/test_rl_learning.py --seeds 0 1 2 3 4 --jobs 2 --record`` runs the
others (the seed varies the kit, the micro model, SFT and RL alike) and records each seed's held-out exact match,
SFT and RL, in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import LEARNING_SEED, evaluate_verifiable, report_learning_figures, save_micro_model, sft_config

from posttrain.eval.common import load_prompts
from posttrain.recipes import ppo, sft
from posttrain.toy import build_toy

TASKS = ("count", "upper", "copy")


def keep_tasks(source: Path, target: Path) -> Path:
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    target.write_text("".join(json.dumps(r) + "\n" for r in rows if r.get("task") in TASKS))
    return target


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> dict[str, Path]:
    """The kit restricted to three tasks, and the micro model after 60 SFT steps."""
    root = tmp_path_factory.mktemp("rl_learning")
    kit = build_toy(
        root / "kit", size="tiny", seed=LEARNING_SEED, sft=1500, prefs=10, prompts=1500, eval=300, pretrain=10
    )
    save_micro_model(kit.model, root / "init", seed=LEARNING_SEED)
    paths = {name: keep_tasks(getattr(kit, name), root / f"{name}.jsonl") for name in ("sft", "prompts", "eval")}
    sft.run(
        sft_config(
            root / "init",
            paths["sft"],
            root / "sft",
            train__max_steps=60,
            train__batch_size=80,
            optim__lr=3e-3,
            seed=LEARNING_SEED,
        )
    )
    return {**paths, "model": root / "sft" / "model", "root": root}


def exact_match(model_dir: Path, eval_file: Path) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    return evaluate_verifiable(
        model, AutoTokenizer.from_pretrained(model_dir), load_prompts(eval_file), max_new_tokens=16
    )["exact_match"]


SETTINGS = {
    "ppo": dict(
        algorithm__advantage="gae",
        reward__function="toy",
        sampling__num_samples=4,
        algorithm__prompts_per_step=16,
        train__batch_size=16,
        train__grad_accum=2,
        algorithm__ppo_epochs=2,
        critic__lr=3e-3,
    ),
    "grpo": dict(
        algorithm__advantage="grpo",
        reward__function="toy",
        sampling__num_samples=8,
        algorithm__prompts_per_step=8,
        train__batch_size=16,
        train__grad_accum=2,
        algorithm__ppo_epochs=2,
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_rl_raises_held_out_exact_match_over_sft(name, start) -> None:
    out = start["root"] / name
    ppo.run(
        sft_config(
            start["model"],
            start["prompts"],
            out,
            stage="ppo",
            train__max_steps=300,
            optim__lr=LEARNING_RATE[name],
            seed=LEARNING_SEED,
            sampling__max_new_tokens=16,
            resume=False,
            **SETTINGS[name],
        )
    )
    before, after = exact_match(start["model"], start["eval"]), exact_match(out / "model", start["eval"])
    report_learning_figures(name, sft_exact_match=before, rl_exact_match=after, gain=after - before)
    assert after > before + MARGIN[name], (before, after)


LEARNING_RATE = {"ppo": 1e-3, "grpo": 5e-4}
MARGIN = {"ppo": 0.08, "grpo": 0.03}  # below the smallest gains over seeds 0-4, 0.107 and 0.060 (RESULTS.md)
