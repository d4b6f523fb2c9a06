"""The KTO recipe on the micro model: the hand-computable first loss, learning the desirable/undesirable split,
the padded prompt-learning path and the shipped config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, sft_config
from posttrain.cli import main
from posttrain.recipes import kto


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_loss_is_half_the_mean_weight_then_desirable_rises_above_undesirable(toy, micro_model, tmp_path) -> None:
    # 50 pairs → 50 desirable + 50 undesirable examples, all in one padded micro-batch. At step 0 the policy is the
    # reference: r = 0 and z0 = 0, so every example costs λ·(1 − σ(0)) = λ/2 and the mean is (2·50 + 1·50)/2/100.
    config = sft_config(
        micro_model, toy.prefs, tmp_path, stage="kto", data__packing=False, train__batch_size=100, train__max_steps=6,
        kto__beta=0.5, kto__desirable_weight=2.0, kto__undesirable_weight=1.0, data__eval=str(toy.prefs),
        train__eval_every=6, optim__lr=3e-3,
    )
    summary = kto.run(config)
    records = _records(tmp_path)
    first = records[0]
    assert first["loss"] == pytest.approx(0.75, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/desirable"] == pytest.approx(0.0, abs=1e-6)
    assert summary["desirable_examples"] == 50 and summary["undesirable_examples"] == 50
    last = [r for r in records if "loss" in r][-1]
    assert last["loss"] < first["loss"]
    desirable, undesirable = last["rewards/desirable"], last["rewards/undesirable"]
    assert desirable > undesirable + 0.05, (desirable, undesirable)
    (evaluation,) = [r for r in records if "eval_reward_gap" in r]
    assert evaluation["eval_reward_gap"] > 0.05


def test_prompt_tuning_trains_padded(toy, micro_model, tmp_path) -> None:
    config = sft_config(
        micro_model, toy.prefs, tmp_path, stage="kto", data__packing=False, train__max_steps=2,
        peft__method="prompt_tuning", peft__num_virtual_tokens=4,
    )
    assert kto.run(config)["steps"] == 2
    assert (tmp_path / "model" / "adapter_config.json").exists()


def test_shipped_config_trains_from_the_command_line(toy, micro_model, tmp_path) -> None:
    out = tmp_path / "run"
    code = main([
        "train", str(REPO / "configs" / "kto.yaml"), f"model.path={micro_model}", f"data.train={toy.prefs}",
        f"output_dir={out}", "train.max_steps=3", "train.eval_every=3", "train.batch_size=2", "data.max_length=128",
        "logging.progress=false",
    ])
    assert code == 0
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("eval_reward_gap" in r for r in records)
    assert (out / "model" / "adapter_config.json").exists()
