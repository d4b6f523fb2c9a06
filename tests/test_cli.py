"""The command line as users run it: the console script, the toy kit, and every shipped config training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

REPO = Path(__file__).resolve().parents[1]
# Stage configs; pipeline files (a `stages:` mapping, e.g. configs/demo.yaml) are validated in test_pipeline.py.
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if "stages" not in yaml.safe_load(p.read_text()))


def test_console_script_writes_a_loadable_toy_kit(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bin_dir = Path(sys.executable).parent
    script = bin_dir / "posttrain"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "posttrain"]
    result = subprocess.run([*command, "toy", str(tmp_path / "t")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"toy model: {tmp_path / 't' / 'model'}" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "t" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "t" / "model")
    assert model.config.hidden_size == 256 and model.config.num_hidden_layers == 4
    assert tokenizer.chat_template
    for name in ("sft", "prefs", "prompts", "eval", "pretrain"):
        first = json.loads((tmp_path / "t" / "data" / f"{name}.jsonl").read_text().splitlines()[0])
        assert first


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_trains(toy, micro_model, tmp_path, config, capsys) -> None:
    raw = yaml.safe_load(config.read_text())
    if raw.get("peft", {}).get("method") == "qlora":
        import torch

        if not torch.cuda.is_available():
            code = main(["train", str(config), f"model.path={micro_model}", f"data.train={toy.sft}", f"output_dir={tmp_path}"])
            assert code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
            return
    data = {"pretrain": toy.pretrain, "reward": toy.prefs, "dpo": toy.prefs, "kto": toy.prefs, "rejection_sampling": toy.prompts, "ppo": toy.prompts}
    # The micro model is untrained: its 8-token replies seldom end, and rejection sampling keeps only finished ones.
    stage_overrides = {
        "rejection_sampling": ["sampling.num_samples=2", "sampling.max_new_tokens=8", "rejection.require_finished=false"],
        "ppo": ["sampling.max_new_tokens=8"],
        # 50 toy pairs with their prompts shared fill about 6 packed rows of 256 tokens.
        **{stage: ["train.batch_size=2"] for stage in ("dpo", "kto", "reward")},
    }
    out = tmp_path / "run"
    code = main([
        "train", str(config), f"model.path={micro_model}", f"data.train={data.get(raw['stage'], toy.sft)}", f"output_dir={out}",
        "train.max_steps=3", "train.eval_every=3", "data.max_length=128", "logging.progress=false",
        *stage_overrides.get(raw["stage"], []),
    ])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any(("eval_reward" if raw["stage"] == "ppo" else "eval_loss") in r for r in records)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["model"]["path"] == str(micro_model)
    is_adapter = raw.get("peft", {}).get("method", "full") not in ("full", "freeze")
    assert (out / "model" / ("adapter_config.json" if is_adapter else "model.safetensors")).exists()
    assert (out / "report.md").exists() and (out / "plots" / "loss.png").exists()
