"""Load any Hugging Face causal-LM directory (or hub id when online) with its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.config import ModelConfig, PeftConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as configured; the message says why and what to change."""


def load_tokenizer(config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    source = config.tokenizer or config.path
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_qlora_possible() -> None:
    if not torch.cuda.is_available():
        raise ModelLoadError(
            "peft.method=qlora needs a CUDA GPU (bitsandbytes 4-bit kernels); none is visible. "
            "Use peft.method=lora on this machine, or run on a GPU host."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError("peft.method=qlora needs bitsandbytes: pip install 'posttrain[qlora]'") from None


def load_model(
    model_config: ModelConfig, peft_config: PeftConfig | None = None, tokenizer: Any = None, scalar_head: bool = False
) -> tuple[Any, Any]:
    """Load model and tokenizer (unless given); attach the adapter that ``peft_config`` asks for.

    ``scalar_head``: a reward model / critic (``models.scalar_head.ScalarHeadModel``) instead of the LM head; from
    a causal-LM directory the head starts freshly initialised, from a reward-model directory it is loaded.
    QLoRA is checked before anything is read from disk, so a machine without CUDA fails in a second.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from posttrain.models.adapters import attach_adapter

    peft_config = peft_config or PeftConfig()
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[model_config.dtype],
        "attn_implementation": model_config.attn_implementation,
        "trust_remote_code": model_config.trust_remote_code,
    }
    if peft_config.method == "qlora":
        _check_qlora_possible()
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=peft_config.quant_type,
            bnb_4bit_use_double_quant=peft_config.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_config)
    try:
        if scalar_head:
            model = AutoModelForSequenceClassification.from_pretrained(model_config.path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_config.path, **kwargs)
    except OSError as error:
        raise ModelLoadError(f"cannot load model from {model_config.path!r}: {error}") from None
    if model_config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = attach_adapter(model, peft_config, task="SEQ_CLS" if scalar_head else "CAUSAL_LM")
    if scalar_head:
        from posttrain.models.scalar_head import wrap_for_scalar_head

        model = wrap_for_scalar_head(model, tokenizer)
    return model, tokenizer


def model_dir_of(path: str | Path) -> Path:
    """A run directory (``RUN/model``), a Hugging Face model directory or an adapter directory → the folder that
    holds the weights. Raises FileNotFoundError naming what was looked for."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "config.json").exists() or (candidate / "adapter_config.json").exists():
            return candidate
    raise FileNotFoundError(
        f"{path}: not a model directory (no config.json or adapter_config.json here or in {path / 'model'}); "
        "give a Hugging Face model directory or a finished run directory"
    )


def load_for_inference(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """A trained causal LM and its tokenizer, ready to generate: a run directory, a model directory, or an
    adapter over the base model named in its ``adapter_config.json`` (LoRA/DoRA merged for speed; prompt-learning
    adapters stay attached, since their virtual tokens cannot be merged). Eval mode, no gradients needed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = model_dir_of(path)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        if (directory / "adapter_config.json").exists():
            from peft import PeftConfig as AdapterConfig
            from peft import PeftModel

            adapter = AdapterConfig.from_pretrained(directory)
            base = AutoModelForCausalLM.from_pretrained(adapter.base_model_name_or_path, dtype=DTYPES[dtype])
            model = PeftModel.from_pretrained(base, directory)
            if not adapter.is_prompt_learning:
                model = model.merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype])
    except OSError as error:
        raise ModelLoadError(f"cannot load model from {directory}: {error}") from None
    model.eval()
    return model, tokenizer
