"""2-process DDP on CPU (gloo, launched with torchrun) equals the 1-process run: same token-normalised losses
and the same weights. Each process sees its half of every accumulated batch; the loss is normalised by the
whole batch's token count, so the all-reduced gradient is the single-process gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from helpers import sft_config
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.recipes import sft


def test_two_process_ddp_equals_one_process(toy, micro_model, tmp_path) -> None:
    settings = dict(train__max_steps=3, optim__name="sgd", optim__lr=0.5, train__grad_accum=2)
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "one", train__batch_size=4, **settings))
    config = sft_config(micro_model, toy.sft, tmp_path / "two", train__batch_size=2, **settings)
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "posttrain", "train", str(config_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    losses = {
        name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for name in ("one", "two")
    }
    assert len(losses["two"]) == 3
    assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), rtol=1e-5, atol=0)
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for name in one:
        assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)


def test_two_process_rl_equals_one_process(toy, micro_model, tmp_path) -> None:
    """Online RL under DDP: each process samples its own prompts and the advantages are whitened, and the loss
    normalised, over every process's tokens, so 2 processes equal 1. Sampling with top_k=1 makes the rollouts the
    same in both runs (temperature stays 1); reinforce++ with a reward that differs between prompts gives them different advantages."""
    from posttrain.recipes import ppo

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(toy.prompts.read_text().splitlines(keepends=True)[:16]))
    settings = dict(
        stage="ppo",
        train__max_steps=2,
        optim__name="sgd",
        optim__lr=0.5,
        train__grad_accum=2,
        algorithm__advantage="reinforce++",
        algorithm__prompts_per_step=4,
        sampling__num_samples=2,
        sampling__max_new_tokens=6,
        sampling__top_k=1,
        reward__function="test_ppo:prompt_length_reward",
    )
    ppo.run(sft_config(micro_model, prompts, tmp_path / "one", train__batch_size=4, **settings))
    config = sft_config(micro_model, prompts, tmp_path / "two", train__batch_size=2, **settings)
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "posttrain", "train", str(config_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = {
        name: [
            r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines()) if "reward" in r
        ]
        for name in ("one", "two")
    }
    for key in ("reward", "response_length", "kl", "loss"):
        assert_close(
            torch.tensor([r[key] for r in records["two"]]),
            torch.tensor([r[key] for r in records["one"]]),
            rtol=1e-5,
            atol=1e-6,
        )
    one = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert any(not torch.equal(one[name], load_file(str(micro_model / "model.safetensors"))[name]) for name in one)
    for name in one:
        assert_close(two[name], one[name], rtol=1e-5, atol=1e-6)
