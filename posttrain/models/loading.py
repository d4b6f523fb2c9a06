"""Load any Hugging Face causal-LM directory (or hub id when online) with its tokenizer.

One resolver (``load_weights``) reads every kind of model directory the stages write: full weights, or an adapter
over the model named in its ``adapter_config.json``, which may itself be an adapter run (an SFT-LoRA run fed to
DPO-LoRA fed to PPO-LoRA). A LoRA/DoRA adapter is merged into the weights it was trained on, so a stage started
from an adapter run trains on top of that adapter and its reference (the new adapter switched off) is the
incoming model, not the base. The merged model keeps the adapter directory as its ``name_or_path``: an adapter
trained on it records that directory as its base, which is how the chain is walked back when it is loaded again.
Adapter directories are never loaded through ``from_pretrained``'s own adapter integration, which leaves
transformers' PEFT hooks attached (their save path needs a newer peft) and names the adapter ``default``, the
name a new adapter would then overwrite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from posttrain.config import ModelConfig, PeftConfig
from posttrain.models.adapters import attach_adapter
from posttrain.models.scalar_head import ScalarHeadModel, wrap_for_scalar_head

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded as configured; the message says why and what to change."""


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


def _local_or_hub(path: str | Path) -> str | Path:
    """The weights folder of a local path (run, model or adapter directory); anything that is not on disk is
    passed on as a hub id."""
    if not Path(path).exists():
        return str(path)
    try:
        return model_dir_of(path)
    except FileNotFoundError as error:
        raise ModelLoadError(str(error)) from None


def adapter_config_of(source: str | Path) -> Any:
    """The peft config of an adapter directory, or None for full weights and hub ids."""
    if not isinstance(source, Path) or not (source / "adapter_config.json").exists():
        return None
    from peft import PeftConfig as AdapterConfig

    return AdapterConfig.from_pretrained(source)


def _base_of(adapter_dir: Path, adapter: Any) -> str | Path:
    """Where an adapter's base lives: the recorded path as written (relative to the working directory, as the
    stage that trained it was given it), else relative to the adapter directory, else a hub id."""
    recorded = adapter.base_model_name_or_path
    if not recorded:
        raise ModelLoadError(
            f"{adapter_dir / 'adapter_config.json'}: base_model_name_or_path is empty; cannot find the base model"
        )
    for candidate in (Path(recorded), adapter_dir / recorded):
        if candidate.exists():
            return model_dir_of(candidate)
    return recorded


def _auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM


def model_class_for(config: Any, task: str) -> Any:
    """The transformers class that ``task`` loads for ``config`` (None for remote code). An architecture without a
    sequence-classification class of its own (Cohere, Granite) gets one built from transformers' own generic
    scorer (``GenericForSequenceClassification``: the backbone, then a bias-free ``score`` on the final hidden
    state, as Llama's and Qwen's are), registered with the auto class so reward models and critics load for it."""
    auto = _auto_class(task)
    model_class = auto._model_mapping.get(type(config), None)
    if model_class is not None or task != "SEQ_CLS":
        return model_class
    causal = _auto_class("CAUSAL_LM")._model_mapping.get(type(config), None)
    if causal is None:
        return None
    from transformers import PreTrainedModel
    from transformers.modeling_layers import GenericForSequenceClassification

    pretrained = next(
        c for c in causal.__mro__ if issubclass(c, PreTrainedModel) and c.__name__.endswith("PreTrainedModel")
    )
    name = causal.__name__.replace("ForCausalLM", "ForSequenceClassification")
    model_class = type(name, (GenericForSequenceClassification, pretrained), {"__module__": causal.__module__})
    auto.register(type(config), model_class, exist_ok=True)
    return model_class


def load_weights(
    source: str | Path, task: str = "CAUSAL_LM", keep_prompt_learning: bool = False, **kwargs: Any
) -> Any:
    """The model at ``source`` as a plain transformers model (``task``: CAUSAL_LM, or SEQ_CLS with one label):
    full weights as they are; an adapter merged into its base, recursively. ``kwargs`` go to ``from_pretrained``
    of the full weights at the root of the chain.

    A prompt-learning adapter (virtual tokens, no weight delta) cannot be merged: with ``keep_prompt_learning``
    it is returned attached (a peft model, for inference); otherwise this raises ModelLoadError."""
    source = _local_or_hub(source)
    adapter = adapter_config_of(source)
    try:
        if adapter is None:
            if task != "SEQ_CLS":
                return _auto_class(task).from_pretrained(source, **kwargs)
            from transformers import AutoConfig

            model_class_for(
                AutoConfig.from_pretrained(source, trust_remote_code=kwargs.get("trust_remote_code", False)), task
            )
            return _auto_class(task).from_pretrained(source, num_labels=1, **kwargs)
        assert isinstance(source, Path)
        if adapter.is_prompt_learning and not keep_prompt_learning:
            raise ModelLoadError(
                f"{source} holds a {adapter.peft_type.value} adapter: its virtual tokens cannot be merged into weights, "
                f"so a stage cannot train on top of it. Start this stage from its base model "
                f"(model.path={adapter.base_model_name_or_path}), or from a LoRA/DoRA or full run"
            )
        from peft import PeftModel

        base = load_weights(_base_of(source, adapter), task, **kwargs)
        if adapter.task_type != task:
            # An SFT (causal-LM) adapter under a reward model or critic: the same backbone weights, merged through
            # peft's task-neutral wrapper (the causal-LM one expects generation methods the scorer lacks).
            adapter.task_type = None
        model = PeftModel.from_pretrained(base, source, config=adapter)
        if adapter.is_prompt_learning:
            return model
        model = model.merge_and_unload()
    except OSError as error:
        raise ModelLoadError(f"cannot load model from {str(source)!r}: {error}") from None
    # An adapter trained on top records this directory as its base (peft reads ``name_or_path``).
    model.name_or_path = str(source)
    return model


def load_tokenizer(config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    source = config.tokenizer or _local_or_hub(config.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)
    except OSError as error:
        raise ModelLoadError(f"cannot load the tokenizer from {str(source)!r}: {error}") from None
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer: Any) -> Any:
    """The tokenizer, given EOS as its pad token when it has none (batches need one)."""
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


def attention_implementation(
    source: str | Path, asked: str, task: str = "CAUSAL_LM", trust_remote_code: bool = False
) -> str:
    """The attention kernel for the model at ``source``: ``auto`` picks sdpa where the architecture supports it
    (packed rows and shared prefixes then use its dense masks), else eager (Gemma 2: its attention logit
    soft-capping has no sdpa path). A kernel asked for by name that the architecture does not support is an
    error here, in one line, not a traceback from deep inside transformers."""
    from transformers import AutoConfig

    while (adapter := adapter_config_of(source)) is not None:
        assert isinstance(source, Path)
        source = _base_of(source, adapter)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load model from {str(source)!r}: {error}") from None
    model_class = model_class_for(config, task)
    if model_class is None:
        return "eager" if asked == "auto" else asked  # remote code: the class decides for itself
    supported = {
        "sdpa": model_class._supports_sdpa,
        "flex_attention": model_class._supports_flex_attn,
        "flash_attention_2": model_class._supports_flash_attn,
        "eager": True,
    }
    if asked == "auto":
        return "sdpa" if supported["sdpa"] else "eager"
    if not supported[asked]:
        usable = ", ".join(name for name, ok in supported.items() if ok)
        raise ModelLoadError(
            f"{model_class.__name__} does not support model.attn_implementation={asked}; use one of: auto, {usable}"
        )
    return asked


def set_dropout(model: torch.nn.Module, enabled: bool) -> None:
    """Dropout off (``enabled=False``): every ``nn.Dropout`` (LoRA's included) gets p = 0 and attention modules'
    functional dropout rate (``attention_dropout``) 0, so train and eval mode compute the same function and
    log-probs taken in either mode agree (PPO's ratio is exactly 1 before an update; DPO's policy matches its
    cached reference). Mode switches cannot undo it, unlike ``model.eval()``, which would also turn off
    transformers' gradient checkpointing (it runs only in training mode). ``enabled=True`` leaves the model's
    own rates."""
    if enabled:
        return
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def load_model(
    model_config: ModelConfig, peft_config: PeftConfig | None = None, tokenizer: Any = None, scalar_head: bool = False
) -> tuple[Any, Any]:
    """Load model and tokenizer (unless given); attach the adapter that ``peft_config`` asks for, on top of the
    incoming model (an adapter run is merged first: ``load_weights``).

    ``scalar_head``: a reward model / critic (``models.scalar_head.ScalarHeadModel``) instead of the LM head; from
    a causal-LM directory the head starts freshly initialised, from a reward-model directory it is loaded.
    QLoRA is checked before anything is read from disk, so a machine without CUDA fails in a second. The model is
    returned in training mode, its dropout set by ``model.dropout``.
    """
    peft_config = peft_config or PeftConfig()
    if peft_config.method == "qlora":
        _check_qlora_possible()
    task = "SEQ_CLS" if scalar_head else "CAUSAL_LM"
    source = _local_or_hub(model_config.path)
    kwargs: dict[str, Any] = {
        "dtype": DTYPES[model_config.dtype],
        "attn_implementation": attention_implementation(
            source, model_config.attn_implementation, task, model_config.trust_remote_code
        ),
        "trust_remote_code": model_config.trust_remote_code,
    }
    if peft_config.method == "qlora":
        if adapter_config_of(source) is not None:
            raise ModelLoadError(
                f"{source} is an adapter run; QLoRA quantises the base as it loads, so the adapter cannot be merged "
                f"first. Write the merged model with `posttrain export {model_config.path} --out MERGED` and train on MERGED"
            )
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=peft_config.quant_type,
            bnb_4bit_use_double_quant=peft_config.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["dtype"] = torch.bfloat16
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_config)
    model = load_weights(source, task, **kwargs)
    if model_config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = attach_adapter(model, peft_config, task=task)
    set_dropout(model, bool(model_config.dropout))
    model.train()
    if scalar_head:
        model = wrap_for_scalar_head(model, tokenizer)
    return model, tokenizer


def load_for_inference(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """A trained causal LM and its tokenizer, ready to generate: a run directory, a model directory, or an
    adapter (chain) over its base (LoRA/DoRA merged for speed; prompt-learning adapters stay attached, since
    their virtual tokens cannot be merged). Eval mode, no gradients needed."""
    from transformers import AutoTokenizer

    directory = model_dir_of(path)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(directory))
    model = load_weights(directory, keep_prompt_learning=True, dtype=DTYPES[dtype])
    model.eval()
    return model, tokenizer


def load_scorer_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[ScalarHeadModel, Any]:
    """Load a trained reward model (full weights, or a LoRA/DoRA adapter (chain) over the base named in its
    ``adapter_config.json``, merged for speed: :func:`load_weights`) with its tokenizer, in eval mode."""
    from transformers import AutoTokenizer

    directory = model_dir_of(path)
    tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(directory))
    model = load_weights(directory, "SEQ_CLS", dtype=dtype)
    if getattr(model.config, "num_labels", 1) != 1:
        raise ValueError(f"{directory} has {model.config.num_labels} output labels; a reward model has 1")
    scorer = wrap_for_scalar_head(model, tokenizer)
    scorer.eval()
    return scorer, tokenizer
