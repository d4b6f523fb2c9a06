"""``posttrain export RUN_DIR --merge --out DIR``: a plain Hugging Face model directory from a run."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from posttrain.models.loading import adapter_config_of, load_weights, model_dir_of


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = True) -> Path:
    """Write ``out_dir`` as a standalone model: a LoRA/DoRA adapter merged into the weights it was trained on (the
    whole chain when a stage started from another adapter run), or the trained full model copied. A reward-model
    adapter (peft task SEQ_CLS) becomes a sequence-classification model with its score head, as the reward stage's
    full runs are. Prompt-learning adapters cannot be merged (they are extra inputs, not weight deltas)."""
    from transformers import AutoTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    try:
        model_dir = model_dir_of(run_dir)
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_dir / 'model'} not found: is {run_dir} a finished run directory?") from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter = adapter_config_of(model_dir)
    if adapter is None:
        if out_dir.resolve() != model_dir.resolve():
            shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)
        return out_dir
    if adapter.is_prompt_learning:
        raise ValueError(
            f"{run_dir} holds a {adapter.peft_type.value} adapter: virtual tokens cannot be merged into "
            "weights. Serve it as an adapter instead."
        )
    if not merge:
        raise ValueError("the run holds an adapter: export --merge to write a standalone model")
    run_config_path = model_dir.parent / "config.yaml"
    run_config = yaml.safe_load(run_config_path.read_text(encoding="utf-8")) if run_config_path.exists() else {}
    trust_remote_code = bool((run_config or {}).get("model", {}).get("trust_remote_code", False))
    task = "SEQ_CLS" if adapter.task_type == "SEQ_CLS" else "CAUSAL_LM"
    merged = load_weights(model_dir, task, dtype="float32", trust_remote_code=trust_remote_code)
    if task == "SEQ_CLS":
        # HF's own pooling of a sequence-classification model looks for the pad token.
        merged.config.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
