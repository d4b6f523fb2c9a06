"""The command line as users run it: the console script, the toy kit, and every shipped config training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.cli import SHIPPED_CONFIGS, main

# Stage configs; pipeline files (a `stages:` mapping, e.g. demo.yaml) are validated in test_pipeline.py.
CONFIGS = sorted(p for p in SHIPPED_CONFIGS.glob("*.yaml") if "stages" not in yaml.safe_load(p.read_text()))


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


def _first_rows(path: Path, count: int, out: Path) -> Path:
    lines = path.read_text().splitlines()
    assert len(lines) >= count, f"{path} has {len(lines)} rows"
    out.write_text("\n".join(lines[:count]) + "\n")
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_trains_a_50_example_file(toy, micro_model, tmp_path, config, capsys) -> None:
    """Each shipped config, its batch sizes as shipped, trains on a 50-row file in its stage's format (50 examples:
    what seed guidance calls enough for many business tasks); only the model, its length and the run's length
    are overridden. Every step takes batch_size x grad_accum examples, logged as ``examples``."""
    raw = yaml.safe_load(config.read_text())
    if raw.get("peft", {}).get("method") == "qlora":
        import torch

        if not torch.cuda.is_available():
            code = main(
                ["train", str(config), f"model.path={micro_model}", f"data.train={toy.sft}", f"output_dir={tmp_path}"]
            )
            assert code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
            return
    source = {
        "pretrain": toy.pretrain,
        "reward": toy.prefs,
        "dpo": toy.prefs,
        "kto": toy.prefs,
        "rejection_sampling": toy.prompts,
        "ppo": toy.prompts,
    }
    data = _first_rows(source.get(raw["stage"], toy.sft), 50, tmp_path / "data.jsonl")
    # The micro model is untrained: its 8-token replies seldom end, and rejection sampling keeps only finished ones.
    stage_overrides = {
        "rejection_sampling": [
            "sampling.num_samples=2",
            "sampling.max_new_tokens=8",
            "rejection.require_finished=false",
        ],
        "ppo": ["sampling.max_new_tokens=8"],
    }
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(config),
            f"model.path={micro_model}",
            f"data.train={data}",
            f"output_dir={out}",
            "train.max_steps=3",
            "train.eval_every=3",
            "data.max_length=128",
            "logging.progress=false",
            *stage_overrides.get(raw["stage"], []),
        ]
    )
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    if raw["stage"] != "ppo":  # ppo's batch_size counts responses; its step is algorithm.prompts_per_step prompts
        per_step = raw["train"]["batch_size"] * raw["train"].get("grad_accum", 1)
        assert [r["examples"] for r in records if "loss" in r] == [per_step] * 3
    assert any(("eval_reward" if raw["stage"] == "ppo" else "eval_loss") in r for r in records)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["model"]["path"] == str(micro_model)
    is_adapter = raw.get("peft", {}).get("method", "full") not in ("full", "freeze")
    assert (out / "model" / ("adapter_config.json" if is_adapter else "model.safetensors")).exists()
    assert (out / "report.md").exists() and (out / "plots" / "loss.png").exists()


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/nonexistent", "model.path=/nonexistent: no such directory"),
        ("./typo/model", "model.path=./typo/model: no such directory"),
        # Looks like a hub id; offline it cannot be fetched and must not become a hub traceback.
        (
            "not-a-real/model-id",
            "model.path=not-a-real/model-id: no such local directory, and this hub id is not in the Hugging Face cache",
        ),
        ("EMPTY_DIR", "the directory has no config.json or adapter_config.json"),
    ],
)
def test_a_missing_or_mistyped_model_path_is_one_line_and_exit_2(toy, tmp_path, path, expected) -> None:
    """Through the console entry point, offline (HF_HUB_OFFLINE=1): one line on stderr naming the field and what
    was expected, exit 2, before any data or weights are read."""
    import os

    if path == "EMPTY_DIR":
        (tmp_path / "empty").mkdir()
        path, expected = str(tmp_path / "empty"), f"model.path={tmp_path / 'empty'}: {expected}"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "posttrain",
            "train",
            str(SHIPPED_CONFIGS / "sft_lora.yaml"),
            f"model.path={path}",
            f"data.train={toy.sft}",
            f"output_dir={tmp_path / 'run'}",
            "logging.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "expected a Hugging Face model directory" in lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_file_whose_rows_all_go_to_the_held_out_split_says_so(micro_model, tmp_path, capsys) -> None:
    """One row and data.eval_fraction 0.02 (sft_full.yaml's): the split holds out at least one row per file, so
    every row is held out. The error says that, not "no training sequences"."""
    data = tmp_path / "one.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n"
    )
    code = main(
        [
            "train",
            str(SHIPPED_CONFIGS / "sft_full.yaml"),
            f"model.path={micro_model}",
            f"data.train={data}",
            f"output_dir={tmp_path / 'run'}",
            "logging.progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"all 1 rows of {data} went to the held-out split (data.eval_fraction=0.02" in err
    assert "no training sequences" not in err


def test_a_dolly_file_trains_as_it_is(micro_model, tmp_path, capsys) -> None:
    """A databricks-dolly-15k-shaped file (instruction, context, response, category) trains with a shipped SFT
    config and no format or column options: the response is what is trained."""
    categories = ["closed_qa", "open_qa", "brainstorming", "classification"]
    rows = [
        {
            "instruction": f"What is {i} plus {i}?",
            "context": f"We are adding {i} and {i}." if i % 2 else "",
            "response": str(2 * i),
            "category": categories[i % 4],
        }
        for i in range(20)
    ]
    data = tmp_path / "dolly.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(SHIPPED_CONFIGS / "sft_lora.yaml"),
            f"model.path={micro_model}",
            f"data.train={data}",
            f"output_dir={out}",
            "train.max_steps=2",
            "data.max_length=128",
            "logging.progress=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{data}: format dolly, 20 rows → 20 conversation records, 0 skipped" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["examples"] for r in records if "loss" in r] == [8, 8]
    assert (out / "model" / "adapter_config.json").exists()


def test_a_stage_name_trains_from_the_stage_defaults_without_a_yaml(toy, micro_model, tmp_path, capsys) -> None:
    """``posttrain train dpo model.path=… data.train=…``: the stage's defaults (as ``trl dpo``), no file; the saved
    config is the DpoConfig defaults plus the overrides."""
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "dpo",
            f"model.path={micro_model}",
            f"data.train={toy.prefs}",
            f"output_dir={out}",
            "train.max_steps=2",
            "data.max_length=64",
            "logging.progress=false",
        ]
    )
    assert code == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["stage"] == "dpo" and saved["dpo"]["beta"] == 0.1 and saved["train"]["max_steps"] == 2
    assert (out / "model").is_dir()


def test_train_refuses_a_name_that_is_neither_a_file_nor_a_stage(capsys) -> None:
    assert main(["train", "sft_lora", "model.path=x"]) == 2
    err = capsys.readouterr().err
    assert "sft_lora: no such config file, and not a stage name" in err and "sft, pretrain, reward" in err


def test_the_shipped_demo_pipeline_is_found_by_name(tmp_path, capsys) -> None:
    assert main(["pipeline", "demo", f"out={tmp_path}", "--quick", "--dry-run"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[0] == "toy" and {"sft", "reward", "ppo", "grpo", "dpo", "rejection_sampling"} <= set(printed)
