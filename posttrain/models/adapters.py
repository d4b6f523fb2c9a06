"""Attach what is trained: LoRA / DoRA / QLoRA, prompt tuning, P-tuning, prefix tuning (all via peft),
freeze-tuning (named modules / last N layers), or the full model."""

from __future__ import annotations

import re
from typing import Any

import torch

from posttrain.config import PeftConfig


def is_peft_model(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        count = parameter.numel()
        if hasattr(parameter, "quant_storage") or parameter.__class__.__name__ == "Params4bit":
            count *= 2  # 4-bit weights pack two values per byte-sized element
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def _layer_index(name: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def freeze_except(model: torch.nn.Module, trainable: list[str], last_n_layers: int | None) -> None:
    """Freeze-tuning: only parameters of the last N decoder layers and/or whose names contain a pattern train."""
    num_layers = model.config.num_hidden_layers
    first_trained_layer = num_layers - last_n_layers if last_n_layers else num_layers
    matched = 0
    for name, parameter in model.named_parameters():
        layer = _layer_index(name)
        in_last_layers = layer is not None and layer >= first_trained_layer
        parameter.requires_grad = in_last_layers or any(pattern in name for pattern in trainable)
        matched += parameter.requires_grad
    if matched == 0:
        raise ValueError(f"peft.freeze_trainable={trainable} matches no parameter name; check the module names")


def attach_adapter(model: Any, config: PeftConfig, task: str = "CAUSAL_LM") -> Any:
    """Return the model with ``config.method`` applied (peft models for adapters, ``model`` itself otherwise).

    ``task="SEQ_CLS"`` (reward models, critics): peft then also trains and saves the freshly initialised scalar
    head in full (``modules_to_save``), and freeze-tuning keeps it trainable."""
    if config.method == "full":
        return model
    if config.method == "freeze":
        head = ["score"] if task == "SEQ_CLS" else []
        freeze_except(model, [*config.freeze_trainable, *head], config.freeze_last_n_layers)
        return model

    import peft

    task_type = peft.TaskType[task]
    if config.method in ("lora", "dora", "qlora"):
        if config.method == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        adapter = peft.LoraConfig(
            task_type=task_type,
            r=config.r,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=config.target_modules,
            use_rslora=config.rslora,
            use_dora=config.method == "dora",
        )
    elif config.method == "prompt_tuning":
        init = peft.PromptTuningInit.TEXT if config.prompt_init_text else peft.PromptTuningInit.RANDOM
        adapter = peft.PromptTuningConfig(
            task_type=task_type,
            num_virtual_tokens=config.num_virtual_tokens,
            prompt_tuning_init=init,
            prompt_tuning_init_text=config.prompt_init_text,
            tokenizer_name_or_path=model.name_or_path if config.prompt_init_text else None,
        )
    elif config.method == "p_tuning":
        adapter = peft.PromptEncoderConfig(
            task_type=task_type,
            num_virtual_tokens=config.num_virtual_tokens,
            encoder_hidden_size=config.encoder_hidden_size,
        )
    elif config.method == "prefix":
        adapter = peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=config.num_virtual_tokens)
    else:  # pragma: no cover - the config's Literal makes this unreachable
        raise ValueError(f"unknown peft.method {config.method!r}")
    return peft.get_peft_model(model, adapter)


def is_prompt_learning(model: Any) -> bool:
    """A peft model whose adapter is prompt learning (prompt tuning, P-tuning, prefix tuning): virtual tokens or
    prefix keys/values that peft adds inside ``forward``."""
    return is_peft_model(model) and model.active_peft_config.is_prompt_learning


def num_prepended_tokens(model: Any) -> int:
    """Virtual tokens peft prepends to the sequence (prompt tuning, P-tuning); prefix tuning prepends none to
    the sequence (it extends the keys/values instead)."""
    if not is_prompt_learning(model):
        return 0
    peft_config = model.active_peft_config
    if peft_config.peft_type.value in ("PROMPT_TUNING", "P_TUNING"):
        return peft_config.num_virtual_tokens
    return 0
