"""Memory plan of a stage before it runs (``posttrain estimate``): bytes per device for each component.

The model is built on the meta device from its ``config.json`` alone (no weights are read, so a 70B plan takes
seconds on a laptop), with the config's adapter attached by peft, so trainable and frozen parameters are peft's
own counts. Each line of the plan carries the formula it used.

- Model states follow the ZeRO paper (Rajbhandari et al. 2020): weights, gradients and optimizer states per
  parameter, sharded over the N data-parallel devices by ZeRO stage 1 (optimizer), 2 (+ gradients), 3 and FSDP
  (+ weights). DeepSpeed with bf16/fp16 holds 2-byte weights and gradients and fp32 master weights in the
  optimizer (K = 12 for Adam); ddp and fsdp keep every state at ``model.dtype`` (torch's optimizers store their
  states like the parameter, plus a 4-byte step counter per tensor for Adam).
- Activations count the tensors a Llama-style decoder layer saves for its backward pass (the norms' input,
  scale and output, the attention kernel's inputs and output, the gated MLP's four intermediates), per token:
  sdpa keeps a log-sum-exp per head, eager the (heads, seq, seq) probabilities. Gradient checkpointing keeps each
  layer's input and one layer's activations while it is recomputed. ``tests/test_estimate.py`` compares this with
  the bytes saved for backward on a real model.
- Logits: rows x seq x vocab in the compute dtype, their fp32 copy for the loss, the saved log-softmax and its
  gradient (the fp32 terms are why logits dominate for large vocabularies).
- Other models: DPO/KTO cache reference log-probs before training (no second model while training); PPO holds
  a critic (trained, estimator with ``needs_critic``), a frozen reference copy (full fine-tuning with a KL anchor)
  and a reward model; generation stages hold a KV cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.config import (
    PROMPT_LEARNING_METHODS,
    ConfigError,
    DpoConfig,
    KtoConfig,
    PeftConfig,
    PpoConfig,
    RejectionSamplingConfig,
    StageConfig,
    build_config,
    deep_merge,
    parse_overrides,
)
from posttrain.models.adapters import attach_adapter
from posttrain.models.loading import model_dir_of
from posttrain.rl import ADVANTAGES

GIB = 1024**3
PEAK_FORMULA = (
    "weights + optimizer + other_models + overhead + max(activations + logits (+ gradients when grad_accum > 1), "
    "gradients, kv_cache)"
)
COMPONENTS = ("weights", "gradients", "optimizer", "activations", "logits", "kv_cache", "other_models", "overhead")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Optimizer states per trainable parameter, in units of the parameter's own size (torch keeps them in its dtype).
OPTIMIZER_STATES = {"adamw": 2, "adam": 2}
# A CUDA context, cuBLAS workspaces and the allocator's rounding: the usual floor before any tensor is allocated.
RUNTIME_FLOOR_BYTES = 512 * 1024**2
# bitsandbytes NF4/FP4: two weights a byte, one fp32 absmax per 64-weight block; double quantisation stores the
# absmax in 8 bits with one fp32 constant per 256 blocks (Dettmers et al. 2023: 0.127 bit per parameter).
QUANT_BLOCK = 64


@dataclass(frozen=True)
class Line:
    """One component of the plan: bytes per device and the formula that gave them."""

    bytes: float
    formula: str


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder that memory depends on, read from ``config.json``."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> Architecture:
        text = getattr(config, "text_config", None) or config
        try:
            hidden = text.hidden_size
            heads = text.num_attention_heads
            layers = text.num_hidden_layers
            vocab = text.vocab_size
        except AttributeError as error:
            raise ConfigError(f"model config.json lacks a decoder field the plan needs: {error}") from None
        return cls(
            layers=layers,
            hidden=hidden,
            intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or hidden // heads,
            vocab=vocab,
        )


@dataclass(frozen=True)
class ParameterCount:
    """Parameters of the model as the stage trains it (peft's view: adapters attached, frozen ones marked)."""

    trainable: int
    frozen: int
    quantized: int  # frozen weights held in 4 bits (QLoRA's decoder linears)
    trainable_tensors: int
    largest_layer: int  # parameters of the largest sharding unit (a decoder layer, or the embeddings)
    adapter_elements_per_token: int  # LoRA's A outputs (r per adapted module) saved per token
    adapter_dropout_elements_per_token: int  # LoRA dropout's output and mask (d_in per adapted module) per token


@dataclass
class MemoryPlan:
    """Bytes per device by component, for ``devices`` data-parallel devices."""

    lines: dict[str, Line]
    devices: int
    notes: list[str] = field(default_factory=list)
    grad_accum: int = 1
    runtime_floor: float = 0.0  # the CUDA context and workspaces, in the overhead line: no allocator counts them

    @property
    def peak(self) -> float:
        """The most held at once: what a run is measured against and what must fit. Weights, optimizer states,
        other models and overhead stay; the rest never coexists whole. A micro-batch's forward and backward hold
        its activations and logits (and the gradients accumulated by earlier micro-batches of its group); the
        optimizer step holds the whole gradients, the activations freed; generation holds the KV cache, before
        training. With ``grad_accum`` 1 the gradients start from nothing each step (``zero_grad`` frees them)."""
        line = {name: self.lines[name].bytes for name in COMPONENTS}
        resident = line["weights"] + line["optimizer"] + line["other_models"] + line["overhead"]
        carried = line["gradients"] if self.grad_accum > 1 else 0.0
        micro_batch = line["activations"] + line["logits"] + carried
        return resident + max(micro_batch, line["gradients"], line["kv_cache"])

    @property
    def tensor_peak(self) -> float:
        """The peak less the runtime floor: what torch's allocator (``max_memory_allocated``) or the CPU meter
        counts, so what a run's measured peak is set against."""
        return self.peak - self.runtime_floor

    def per_device(self) -> dict[str, int]:
        return {**{name: int(self.lines[name].bytes) for name in COMPONENTS}, "total": int(self.peak)}

    def render(self, explain: bool = False) -> str:
        rows = [f"memory per device ({self.devices} device{'s' if self.devices > 1 else ''})"]
        for name in COMPONENTS:
            line = self.lines[name]
            rows.append(f"  {name:<13}{line.bytes / GIB:10.2f} GiB" + (f"   {line.formula}" if explain else ""))
        rows.append(f"  {'peak':<13}{self.peak / GIB:10.2f} GiB" + ("   " + PEAK_FORMULA if explain else ""))
        rows += [f"  note: {note}" for note in self.notes]
        return "\n".join(rows)


def zero_model_states(parameters: float, devices: int, stage: int, optimizer_multiplier: float = 12) -> float:
    """Bytes per device of mixed-precision model states under ZeRO (Rajbhandari et al. 2020, section 3):
    2 (fp16 weights) + 2 (fp16 gradients) + K (fp32 master weights and optimizer states) bytes per parameter,
    the optimizer share divided by N from stage 1, the gradients from stage 2, the weights at stage 3."""
    weights, gradients, optimizer = 2 * parameters, 2 * parameters, optimizer_multiplier * parameters
    return (
        (weights / devices if stage >= 3 else weights)
        + (gradients / devices if stage >= 2 else gradients)
        + (optimizer / devices if stage >= 1 else optimizer)
    )


def kv_cache_bytes(architecture: Architecture, sequences: int, tokens: int, dtype_bytes: int) -> float:
    """Keys and values of every layer: 2 x layers x kv_heads x head_dim x tokens x sequences x dtype bytes."""
    return 2 * architecture.layers * architecture.kv_heads * architecture.head_dim * tokens * sequences * dtype_bytes


@dataclass(frozen=True)
class ActivationDtypes:
    """Bytes per element of what a layer saves: ``compute`` (matmul inputs and outputs: 2 under bf16/fp16
    autocast or half weights), ``weight`` (the weights' dtype, which the norms' output takes), and whether the
    base model is frozen (adapters), so that norms and the embeddings save no tensor for their weights' gradient."""

    compute: int
    weight: int
    frozen_base: bool = False
    frozen_input: bool = False  # nothing before layer 0 trains (LoRA family): its norm's input is not saved
    frozen_linears: bool = False  # prompt learning: no linear trains or carries an adapter, so none saves its input


def norm_bytes(hidden: int, dtypes: ActivationDtypes, consumers: int) -> tuple[int, str]:
    """Per token, one HF RMSNorm and the input its ``consumers`` (the matmuls it feeds) save: the fp32 copy of its
    input (4h; RMSNorm upcasts), 1/rms (4), the normalised input at the weight dtype (w*h, for the weight's
    gradient: not saved when the weight is frozen) and the output as the matmuls save it: one shared tensor when
    they compute in the weights' dtype, one half-precision cast each under autocast."""
    normalised = 0 if dtypes.frozen_base else dtypes.weight
    if dtypes.frozen_linears:  # a frozen linear's input gradient needs only its weight: its input is not saved
        consumers = 0
    copies = consumers if dtypes.compute != dtypes.weight else min(consumers, 1)
    output = copies * dtypes.compute
    formula = f"(4{f' + {normalised}' if normalised else ''}{f' + {copies}*{dtypes.compute}' if copies else ''})h + 4"
    return (4 + normalised + output) * hidden + 4, formula


def layer_activation_bytes(
    architecture: Architecture, seq: int, attn_implementation: str, dtypes: ActivationDtypes
) -> tuple[int, str]:
    """Bytes one decoder layer saves for backward per token, and the formula: two RMSNorms (``norm_bytes``), the
    gated MLP (gate, act(gate), up, act*up: 4I), and the attention kernel's saved tensors: sdpa/flash keep q, k,
    v, the output and an fp32 log-sum-exp per head; eager keeps q, k and v repeated to every query head, the
    output and the (heads x seq) fp32 softmax (plus its cast to the compute dtype when that is not fp32)."""
    a, c = architecture, dtypes.compute
    # The attention norm feeds q, k and v; the MLP norm feeds gate and up.
    attention_norm, attention_norm_formula = norm_bytes(a.hidden, dtypes, consumers=3)
    mlp_norm, mlp_norm_formula = norm_bytes(a.hidden, dtypes, consumers=2)
    # gate's output (for SiLU), act(gate) and up (for their product), and the product (down_proj's input; not
    # saved when down_proj is frozen and carries no adapter).
    mlp = (3 if dtypes.frozen_linears else 4) * a.intermediate * c
    if attn_implementation == "eager":
        probabilities = 4 + (c if c != 4 else 0)
        attention = 4 * a.heads * a.head_dim * c + a.heads * seq * probabilities
        attention_formula = f"4*heads*head_dim*{c} + heads*seq*{probabilities}"
    else:
        attention = (2 * a.heads * a.head_dim + 2 * a.kv_heads * a.head_dim) * c + 4 * a.heads
        attention_formula = f"(2*heads*head_dim + 2*kv_heads*head_dim)*{c} + 4*heads"
    mlp_factor = 3 if dtypes.frozen_linears else 4
    formula = f"[{attention_norm_formula}] + [{mlp_norm_formula}] + {mlp_factor}I*{c} + {attention_formula}"
    return attention_norm + mlp_norm + mlp + attention, formula


def activation_bytes(
    architecture: Architecture,
    rows: int,
    seq: int,
    dtypes: ActivationDtypes,
    attn_implementation: str,
    checkpointing: bool,
    adapter_elements_per_token: int = 0,
    adapter_dropout_elements_per_token: int = 0,
) -> Line:
    """Bytes saved for backward by one forward over ``rows`` x ``seq`` tokens (``layer_activation_bytes`` per
    layer, LoRA's A outputs), plus the final norm, the token ids the embedding saves (8 bytes; none when it is
    frozen), minus layer 0's norm input when nothing before it trains, and rotary cos/sin (2 x seq x head_dim at the weights' dtype, shared by the layers). Under gradient checkpointing each layer
    keeps only its input (h) and one layer is live again while it is recomputed."""
    a, c = architecture, dtypes.compute
    tokens = rows * seq
    per_layer, layer_formula = layer_activation_bytes(a, seq, attn_implementation, dtypes)
    # LoRA saves its A output (r, compute dtype) per adapted module; lora dropout adds its output and bool mask.
    lora_bytes = adapter_elements_per_token * c + adapter_dropout_elements_per_token * (c + 1)
    lora_per_layer = lora_bytes // max(a.layers, 1)
    per_layer += lora_per_layer
    # A frozen lm_head needs only its weight for the input's gradient, so the final norm's output is not kept.
    final_norm, final_formula = norm_bytes(a.hidden, dtypes, consumers=0 if dtypes.frozen_base else 1)
    token_ids = 0 if dtypes.frozen_base else 8
    # Rotary cos/sin take the hidden states' dtype: the weights' (fp32 residual stream under autocast).
    first_input = -(4 * a.hidden + 4) if dtypes.frozen_input else 0
    fixed = tokens * (final_norm + token_ids + first_input) + 2 * seq * a.head_dim * dtypes.weight
    layer_bytes = tokens * per_layer
    lora = f" + LoRA {lora_per_layer} B" if lora_per_layer else ""
    first = " - (4h + 4) layer-0 input" if first_input else ""
    fixed_formula = f"tokens*({final_formula} final norm + {token_ids} ids{first}) + cos/sin; tokens={rows}x{seq}"
    if checkpointing:
        total = a.layers * tokens * a.hidden * c + layer_bytes + fixed
        formula = f"checkpointing: L*tokens*h*{c} + one layer tokens*({layer_formula}{lora}) + {fixed_formula}"
    else:
        total = a.layers * layer_bytes + fixed
        formula = f"L*tokens*({layer_formula}{lora}) + {fixed_formula}"
    return Line(total, formula)


def activation_dtypes(config: StageConfig) -> ActivationDtypes:
    """The activation dtypes of ``config``: half-precision autocast or half weights compute in 2 bytes."""
    weight = DTYPE_BYTES[config.model.dtype]
    # DeepSpeed under bf16/fp16 casts the model itself, so the norms' weights are half precision too.
    if config.distributed.strategy == "deepspeed" and config.train.precision != "fp32":
        weight = 2
    method = config.peft.method
    return ActivationDtypes(
        compute=_compute_bytes(config),
        weight=weight,
        frozen_base=method not in ("full", "freeze"),
        frozen_input=method in ("lora", "dora", "qlora"),
        frozen_linears=method in PROMPT_LEARNING_METHODS,
    )


@functools.lru_cache(maxsize=32)
def _count_parameters_cached(model_path: str, peft_json: str, task: str) -> tuple[ParameterCount, Architecture]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    peft_config = PeftConfig.model_validate_json(peft_json)
    try:
        hf_config = AutoConfig.from_pretrained(model_dir_of(model_path))
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.path {model_path}: cannot read its config.json ({error})") from None
    architecture = Architecture.from_config(hf_config)
    if task == "SEQ_CLS":
        hf_config.num_labels = 1
    quantize = peft_config.method == "qlora"
    if quantize:
        # bitsandbytes cannot quantise meta tensors: count the same LoRA over unquantised linears, and _count
        # prices the frozen decoder linears at 4 bits.
        peft_config = peft_config.model_copy(update={"method": "lora"})
    if peft_config.method in PROMPT_LEARNING_METHODS and peft_config.prompt_init_text:
        peft_config = peft_config.model_copy(update={"prompt_init_text": None})  # same size, needs no tokenizer
    auto = AutoModelForSequenceClassification if task == "SEQ_CLS" else AutoModelForCausalLM
    with init_empty_weights(include_buffers=True):
        model = attach_adapter(auto.from_config(hf_config), peft_config, task=task)
    return _count(model, quantize, peft_config.dropout > 0), architecture


def _count(model: torch.nn.Module, quantize: bool, lora_dropout: bool) -> ParameterCount:
    trainable = frozen = quantized = tensors = 0
    per_unit: dict[str, int] = {}
    seen: set[int] = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:  # tied embeddings count once
            continue
        seen.add(id(parameter))
        count = parameter.numel()
        unit = name.split(".layers.")[1].split(".")[0] if ".layers." in name else name
        per_unit[unit] = per_unit.get(unit, 0) + count
        if parameter.requires_grad:
            trainable += count
            tensors += 1
        elif quantize and ".layers." in name and name.endswith("base_layer.weight"):
            quantized += count  # bitsandbytes quantises the decoder's linear layers, not norms or embeddings
        else:
            frozen += count
    rank_elements = dropout_elements = 0
    for name, module in model.named_modules():
        if name.endswith("lora_A.default") and isinstance(module, torch.nn.Linear):
            rank_elements += module.out_features
            dropout_elements += module.in_features if lora_dropout else 0
    return ParameterCount(
        trainable, frozen, quantized, tensors, max(per_unit.values()), rank_elements, dropout_elements
    )


def count_parameters(config: StageConfig) -> tuple[ParameterCount, Architecture]:
    """Trainable and frozen parameters of the stage's model with its adapter, built on the meta device."""
    task = "SEQ_CLS" if config.stage == "reward" else "CAUSAL_LM"
    return _count_parameters_cached(config.model.path, config.peft.model_dump_json(), task)


def _quantized_bytes(parameters: int, double_quant: bool) -> float:
    constants = (1 / QUANT_BLOCK + 4 / (QUANT_BLOCK * 256)) if double_quant else 4 / QUANT_BLOCK
    return parameters * (0.5 + constants)


def _sequences_per_example(config: StageConfig) -> int:
    # DPO and reward models forward chosen and rejected; KTO each example with its mismatched completion.
    return 2 if config.stage in ("dpo", "reward", "kto") else 1


def _training_seq(config: StageConfig) -> int:
    # Online RL keeps prompts of at most data.max_length - sampling.max_new_tokens: a prompt and its sampled
    # response are at most data.max_length together.
    seq = config.data.max_length
    if config.peft.method in ("prompt_tuning", "p_tuning"):
        seq += config.peft.num_virtual_tokens
    return seq


def _model_states(
    config: StageConfig, counts: ParameterCount, devices: int
) -> tuple[Line, Line, Line, float, list[str]]:
    """Weights, gradients and optimizer lines per device, the gathered working set of sharded weights, notes."""
    block, train, optim = config.distributed, config.train, config.optim
    mixed = block.strategy == "deepspeed" and train.precision in ("bf16", "fp16")
    p = 2 if mixed else DTYPE_BYTES[config.model.dtype]
    states = OPTIMIZER_STATES.get(optim.name, 1 if optim.momentum else 0)
    stage = {"ddp": 0, "fsdp": 3, "deepspeed": block.zero_stage}[block.strategy]
    notes: list[str] = []
    weights: float = (counts.trainable + counts.frozen) * p + _quantized_bytes(
        counts.quantized, config.peft.double_quant
    )
    weights_formula = f"(trainable {counts.trainable:,} + frozen {counts.frozen:,}) x {p} B"
    if counts.quantized:
        weights_formula += f" + 4-bit {counts.quantized:,} x 0.5 B + quantisation constants"
    gradients: float = counts.trainable * p
    gradients_formula = f"trainable {counts.trainable:,} x {p} B"
    optimizer: float
    if mixed:
        optimizer = counts.trainable * 4 * (1 + states)
        optimizer_formula = f"trainable x (4 B fp32 master + {states} x 4 B states)"
    else:
        step_counters = 4 * counts.trainable_tensors if optim.name in OPTIMIZER_STATES else 0
        optimizer = counts.trainable * p * states + step_counters
        optimizer_formula = f"trainable x {states} states x {p} B" + (
            f" + 4 B step x {counts.trainable_tensors} tensors" if step_counters else ""
        )
    offload_optimizer = block.offload in ("optimizer", "all") and block.strategy in ("deepspeed", "fsdp")
    offload_weights = block.offload == "all" and stage >= 3
    shard = f"/{devices}"
    if stage >= 1:
        optimizer, optimizer_formula = optimizer / devices, f"({optimizer_formula}){shard}"
    if stage >= 2:
        gradients, gradients_formula = gradients / devices, f"({gradients_formula}){shard}"
    gathered = 0.0
    if stage >= 3:
        weights, weights_formula = weights / devices, f"({weights_formula}){shard}"
        if block.strategy == "fsdp" and not block.reshard_after_forward:
            gathered = (counts.trainable + counts.frozen) * p * (devices - 1) / devices
            notes.append("fsdp reshard_after_forward=false keeps the gathered weights from forward to backward")
        else:
            # DeepSpeed's model-state estimator: the largest layer's weights and gradients gathered (2 + 2 bytes).
            gathered = 4 * counts.largest_layer
    if offload_optimizer:
        notes.append(f"optimizer states on CPU: {optimizer / GIB:.2f} GiB per device")
        optimizer, optimizer_formula = 0.0, f"offloaded to CPU ({optimizer_formula})"
    if offload_weights:
        notes.append(f"weights and gradients on CPU: {(weights + gradients) / GIB:.2f} GiB per device")
        weights, weights_formula = 0.0, f"offloaded to CPU ({weights_formula})"
        gradients, gradients_formula = 0.0, f"offloaded to CPU ({gradients_formula})"
    return (
        Line(weights, weights_formula),
        Line(gradients, gradients_formula),
        Line(optimizer, optimizer_formula),
        gathered,
        notes,
    )


def _compute_bytes(config: StageConfig) -> int:
    if config.train.precision in ("bf16", "fp16"):
        return 2
    return DTYPE_BYTES[config.model.dtype]


def _attn(config: StageConfig) -> str:
    return "eager" if config.model.attn_implementation == "eager" else "sdpa"


def _logits(config: StageConfig, architecture: Architecture, rows: int, positions: int, c: int) -> Line:
    if config.stage == "reward":
        return Line(rows * c, "one score per sequence")
    fp32_copy = 4 if c != 4 else 0
    if isinstance(config, PpoConfig):
        # Measured at the end of the policy's forward (recipes/ppo.ppo_micro_loss): the logits over the sampling
        # temperature and their log-softmax (the log-probs), and the entropy's own scaled copy, softmax,
        # log-softmax and product: eight fp32 arrays beside the logits.
        extra, extra_formula = 32, "8 x 4 B log-prob and entropy intermediates"
    else:
        extra, extra_formula = 8, "4 B log-softmax + 4 B gradient"
    per_element = c + fp32_copy + extra
    return Line(
        positions * architecture.vocab * per_element,
        f"trained positions x vocab x ({c} B logits{' + 4 B fp32 copy' if fp32_copy else ''} + {extra_formula})"
        f"; {positions} x {architecture.vocab}",
    )


def _micro_batch(config: StageConfig) -> tuple[int, int, int, str]:
    """Rows and tokens per row of one training micro-batch at its longest, the positions whose logits are
    computed (``models.forward.token_logits``: trained tokens only), and a note on the layout.

    Online RL trains responses of at most ``sampling.max_new_tokens`` after prompts of at most
    ``data.max_length - max_new_tokens`` (``rollout.prompts``); with several samples a prompt is laid out once
    before all its responses (``models.scoring.response_layout``), so a micro-batch of B responses holds
    B x response + B / samples x prompt tokens."""
    batch = config.train.batch_size
    if not isinstance(config, PpoConfig):
        rows = batch * _sequences_per_example(config)
        seq = _training_seq(config)
        return rows, seq, rows * seq, ""
    response = config.sampling.max_new_tokens
    prompt = config.data.max_length - response
    samples = config.sampling.num_samples
    shared = (
        samples > 1
        and config.data.packing
        and config.data.share_prompt
        and config.model.attn_implementation in ("auto", "sdpa")
        and config.peft.method not in PROMPT_LEARNING_METHODS
    )
    if shared:
        tokens = batch * response + math.ceil(batch / samples) * prompt
        return 1, tokens, batch * response, f"prompts shared by their {samples} samples: {tokens} tokens a micro-batch"
    return batch, _training_seq(config), batch * response, ""


def _other_models(
    config: StageConfig, counts: ParameterCount, architecture: Architecture, devices: int, rows: int, seq: int
) -> tuple[Line, list[str]]:
    """Models besides the trained one: DPO/KTO cache the reference's log-probs before training (recipes/dpo.py);
    PPO keeps a critic, a frozen reference copy for full fine-tuning with a KL anchor, and a reward model."""
    notes: list[str] = []
    if isinstance(config, (DpoConfig, KtoConfig)):
        if isinstance(config, DpoConfig) and config.dpo.reference:
            notes.append("dpo.reference is loaded only to cache its log-probs, before training")
        return Line(0.0, "reference log-probs cached before training (no second model while training)"), notes
    if not isinstance(config, PpoConfig):
        return Line(0.0, "none"), notes
    p = DTYPE_BYTES[config.model.dtype]
    total, parts = 0.0, []
    algorithm = config.algorithm
    if ADVANTAGES[algorithm.advantage].needs_critic and not config.critic.shared:
        weights, gradients, optimizer, gathered, _ = _model_states(config, counts, devices)
        critic_acts = activation_bytes(
            architecture, rows, seq, activation_dtypes(config), _attn(config), config.model.gradient_checkpointing
        )
        total += weights.bytes + gradients.bytes + optimizer.bytes + gathered + critic_acts.bytes
        parts.append("critic (same model and peft: its weights, gradients, optimizer and activations)")
    if algorithm.kl_coef and config.peft.method == "full":
        reference = (counts.trainable + counts.frozen) * p
        total += reference
        parts.append(f"frozen reference copy {counts.trainable + counts.frozen:,} x {p} B")
    reward_path = config.reward.model
    if reward_path:
        try:
            reward_counts, _ = _count_parameters_cached(reward_path, PeftConfig().model_dump_json(), "SEQ_CLS")
            reward_parameters = reward_counts.trainable + reward_counts.frozen
        except ConfigError:
            reward_parameters = counts.trainable + counts.frozen
            notes.append(f"reward model {reward_path} unreadable here: priced as the policy's size")
        total += reward_parameters * p
        parts.append(f"reward model {reward_parameters:,} x {p} B")
    return Line(total, " + ".join(parts) or "none"), notes


def _kv_cache(config: StageConfig, architecture: Architecture) -> Line:
    if not isinstance(config, (PpoConfig, RejectionSamplingConfig)):
        return Line(0.0, "no generation in this stage")
    sampling = config.sampling
    tokens = config.data.max_length  # a prompt and its response (rollout.prompts keeps them within it)
    element = DTYPE_BYTES[sampling.vllm.dtype] if sampling.engine == "vllm" else DTYPE_BYTES[config.model.dtype]
    return Line(
        kv_cache_bytes(architecture, sampling.batch_size, tokens, element),
        f"2 x L {architecture.layers} x kv_heads {architecture.kv_heads} x head_dim {architecture.head_dim} x "
        f"tokens {tokens} x batch {sampling.batch_size} x {element} B",
    )


def plan_memory(
    config: StageConfig, devices: int = 1, accelerator: str = "cuda", trained_positions: int | None = None
) -> MemoryPlan:
    """The memory plan of ``config`` on ``devices`` data-parallel devices (see the module docstring); on
    ``accelerator="cpu"`` without the CUDA runtime's floor (what a CPU run's measured tensor bytes are checked
    against); ``trained_positions``: the logits' positions a micro-batch had, when known (else all of them)."""
    if devices < 1:
        raise ConfigError(f"--gpus {devices}: expected at least 1 device")
    counts, architecture = count_parameters(config)
    c = _compute_bytes(config)
    rows, seq, positions, layout = _micro_batch(config)
    positions = positions if trained_positions is None else trained_positions
    weights, gradients, optimizer, gathered, notes = _model_states(config, counts, devices)
    notes += [layout] if layout else []
    activations = activation_bytes(
        architecture,
        rows,
        seq,
        activation_dtypes(config),
        _attn(config),
        config.model.gradient_checkpointing,
        counts.adapter_elements_per_token,
        counts.adapter_dropout_elements_per_token,
    )
    other, other_notes = _other_models(config, counts, architecture, devices, rows, seq)
    autocast_cache = 0.0
    floor = RUNTIME_FLOOR_BYTES if accelerator == "cuda" else 0
    overhead_formula = f"runtime floor {floor // 1024**2} MiB"
    if (
        config.train.precision != "fp32"
        and config.distributed.strategy != "deepspeed"
        and c < DTYPE_BYTES[config.model.dtype]
    ):
        # autocast keeps a half-precision copy of every trainable weight it casts until the forward ends (it caches
        # only leaves that require grad: a frozen weight is cast anew at each use and freed).
        autocast_cache = counts.trainable * 2 / (devices if config.distributed.strategy == "fsdp" else 1)
        overhead_formula += " + autocast bf16 copies of the trainable weights 2 B x trainable"
    if gathered:
        overhead_formula += " + gathered sharding unit (4 B x largest layer)"
    lines = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "logits": _logits(config, architecture, rows, positions, c),
        "kv_cache": _kv_cache(config, architecture),
        "other_models": other,
        "overhead": Line(floor + autocast_cache + gathered, overhead_formula),
    }
    if isinstance(config, (PpoConfig, RejectionSamplingConfig)) and config.sampling.engine == "vllm":
        share = config.sampling.vllm.gpu_memory_utilization
        notes.append(f"vllm reserves {share:.0%} of each GPU it runs on; kv_cache is what this batch needs of it")
    return MemoryPlan(lines, devices, notes + other_notes, config.train.grad_accum, floor)


def plan_at_micro_batch(
    config: StageConfig, tokens: int, trained_positions: int, devices: int = 1, accelerator: str = "cuda"
) -> MemoryPlan:
    """The plan of ``config`` had its longest micro-batch held ``tokens`` token ids with ``trained_positions``
    trained ones (what a run saw) instead of every sequence at ``data.max_length``, every position trained: the
    same rows, each ``tokens / rows`` long. Not for online RL, whose micro-batches are rollouts."""
    if isinstance(config, PpoConfig):
        raise ConfigError("a plan at a measured micro-batch is for the offline stages, not ppo")
    rows = config.train.batch_size * _sequences_per_example(config)
    shaped = with_overrides(config, [f"data.max_length={max(8, math.ceil(tokens / rows))}"])
    return plan_memory(shaped, devices, accelerator, trained_positions)


def with_overrides(config: StageConfig, overrides: list[str]) -> StageConfig:
    """``config`` with dotted overrides applied and validated again."""
    merged = deep_merge(config.model_dump(by_alias=True), parse_overrides(overrides))
    return build_config(merged, "estimate", without_data=not config.data.train)


@dataclass(frozen=True)
class Switch:
    """One change of the advice, with the plan's total after it (and every change before it)."""

    overrides: tuple[str, ...]
    why: str
    total: float


@dataclass(frozen=True)
class Advice:
    """Whether the plan fits ``budget`` bytes a device, the switches that make it fit, the largest micro-batch."""

    fits: bool
    total: float
    budget: float
    switches: list[Switch]
    largest_micro_batch: int | None  # with the switches' other settings; None when even 1 does not fit
    grad_accum_for_it: int | None
    global_batch: int  # batch_size x grad_accum of the config, which the micro-batch advice keeps


def _candidate_switches(config: StageConfig) -> list[tuple[list[str], str]]:
    """The seeds' memory-saving switches in priority order, each as overrides on top of the ones before it."""
    candidates: list[tuple[list[str], str]] = []
    if config.train.precision == "fp32":
        candidates.append((["train.precision=bf16"], "bf16 autocast: half-size activations and logits"))
    candidates.append(([], "smaller micro-batch"))  # filled in by _micro_batch_switch
    if not config.model.gradient_checkpointing:
        candidates.append((["model.gradient_checkpointing=true"], "recompute activations: ~1/3 more compute"))
    ladder = [
        (["distributed.strategy=deepspeed", "distributed.zero_stage=1"], "ZeRO-1: shard optimizer states"),
        (["distributed.strategy=deepspeed", "distributed.zero_stage=2"], "ZeRO-2: + gradients"),
        (["distributed.zero_stage=2", "distributed.offload=optimizer"], "ZeRO-2 + optimizer offload (slower)"),
        (["distributed.zero_stage=3", "distributed.offload=none"], "ZeRO-3: + weights"),
        (["distributed.zero_stage=3", "distributed.offload=all"], "ZeRO-3 + full offload (slowest)"),
    ]
    current = (config.distributed.strategy, config.distributed.zero_stage)
    rank = {("deepspeed", 1): 1, ("deepspeed", 2): 2, ("deepspeed", 3): 4, ("fsdp", 0): 4}.get(current, 0)
    candidates += ladder[rank:]
    if config.peft.method == "full":
        candidates.append((["peft.method=lora"], "LoRA: train adapters only (a different method, with caution)"))
    return candidates


def _micro_batch_switch(config: StageConfig, budget: float, devices: int) -> list[str]:
    """Halve the micro-batch until it fits (or reaches 1), raising grad_accum to keep the global batch."""
    global_batch = config.train.batch_size * config.train.grad_accum
    batch = config.train.batch_size
    while batch > 1:
        batch = max(1, batch // 2)
        overrides = [f"train.batch_size={batch}", f"train.grad_accum={math.ceil(global_batch / batch)}"]
        if plan_memory(with_overrides(config, overrides), devices).peak <= budget:
            break
    return [f"train.batch_size={batch}", f"train.grad_accum={math.ceil(global_batch / batch)}"]


def largest_micro_batch(config: StageConfig, budget: float, devices: int) -> int | None:
    """The largest train.batch_size up to the global batch (batch_size x grad_accum) whose plan fits ``budget``
    bytes (activations and logits grow with it); None when even 1 does not fit."""

    def fits(batch: int) -> bool:
        return plan_memory(with_overrides(config, [f"train.batch_size={batch}"]), devices).peak <= budget

    if not fits(1):
        return None
    low, high = 1, config.train.batch_size * config.train.grad_accum + 1  # low fits; high is past the search
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def advise(config: StageConfig, devices: int, device_gib: float) -> Advice:
    """Fits or not on ``devices`` of ``device_gib`` GiB; if not, the seeds' switches in order (each applied on top
    of the previous ones) until the plan fits; and the largest micro-batch that fits with those switches."""
    if device_gib <= 0:
        raise ConfigError(f"--gpu-mem {device_gib}: expected a positive size in GiB")
    budget = device_gib * GIB
    total = plan_memory(config, devices).peak
    switches: list[Switch] = []
    current = config
    if total > budget:
        for overrides, why in _candidate_switches(config):
            if not overrides:
                overrides = _micro_batch_switch(current, budget, devices)
                if current.train.batch_size == 1:
                    continue
            try:
                current = with_overrides(current, overrides)
            except ConfigError:
                continue  # a switch this config cannot take (e.g. a sharded strategy with qlora)
            switches.append(Switch(tuple(overrides), why, plan_memory(current, devices).peak))
            if switches[-1].total <= budget:
                break
    # The largest micro-batch under the switches above, except the micro-batch switch itself.
    micro = largest_micro_batch(current, budget, devices)
    global_batch = config.train.batch_size * config.train.grad_accum
    grad_accum = math.ceil(global_batch / micro) if micro else None
    return Advice(total <= budget, total, budget, switches, micro, grad_accum, global_batch)


def render_advice(advice: Advice) -> str:
    verdict = "fits" if advice.fits else "does not fit"
    rows = [f"{verdict}: {advice.total / GIB:.2f} GiB of {advice.budget / GIB:.2f} GiB per device"]
    for switch in advice.switches:
        mark = "fits" if switch.total <= advice.budget else "not yet"
        rows.append(f"  + {' '.join(switch.overrides)}   -> {switch.total / GIB:.2f} GiB ({mark}; {switch.why})")
    if advice.largest_micro_batch:
        rows.append(
            f"largest micro-batch that fits{' with the switches above' if advice.switches else ''}: "
            f"train.batch_size={advice.largest_micro_batch} "
            f"train.grad_accum={advice.grad_accum_for_it} (global batch {advice.global_batch} per device)"
        )
    else:
        rows.append("even train.batch_size=1 does not fit with every switch above")
    return "\n".join(rows)


def advice_json(advice: Advice) -> dict[str, Any]:
    return {
        "fits": advice.fits,
        "budget": int(advice.budget),
        "switches": [{"overrides": list(s.overrides), "why": s.why, "total": int(s.total)} for s in advice.switches],
        "largest_micro_batch": advice.largest_micro_batch,
        "grad_accum": advice.grad_accum_for_it,
    }


def plan_json(plan: MemoryPlan) -> dict[str, Any]:
    """The plan as ``posttrain estimate --json`` prints it: bytes per device, the formulas, the notes."""
    return {
        "devices": plan.devices,
        "per_device": plan.per_device(),
        "formulas": {name: plan.lines[name].formula for name in COMPONENTS},
        "notes": plan.notes,
    }
