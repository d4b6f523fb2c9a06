"""``posttrain export RUN_DIR --merge --out DIR``: a plain Hugging Face model directory from a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from posttrain.config import ModelConfig


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = True) -> Path:
    """Write ``out_dir`` as a standalone model: LoRA/DoRA merged into the base weights, or the trained full
    model copied. Prompt-learning adapters cannot be merged (they are extra inputs, not weight deltas)."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    model_dir = run_dir / "model"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} not found: is {run_dir} a finished run directory?")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not (model_dir / "adapter_config.json").exists():
        if out_dir.resolve() != model_dir.resolve():
            shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        return out_dir
    adapter_config = PeftConfig.from_pretrained(model_dir)
    if adapter_config.is_prompt_learning:
        raise ValueError(
            f"{run_dir} holds a {adapter_config.peft_type.value} adapter: virtual tokens cannot be merged into "
            "weights. Serve it as an adapter instead."
        )
    if not merge:
        raise ValueError("the run holds an adapter: export --merge to write a standalone model")
    run_config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    model_config = ModelConfig.model_validate(run_config["model"])
    base = AutoModelForCausalLM.from_pretrained(model_config.path, dtype="float32", trust_remote_code=model_config.trust_remote_code)
    merged = PeftModel.from_pretrained(base, model_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
