"""Typed configs: small shared blocks composed into one config per stage.

Every block rejects unknown keys (``extra="forbid"``); a typo fails before any model loads, naming the key and
the closest valid one. Field docstrings are the help text (``posttrain train --help-config STAGE``).

A config file is YAML with a ``stage`` key; ``key.sub=value`` overrides from the command line are applied on top
(values parsed as YAML, so ``train.max_steps=20`` is an int and ``peft.target_modules=[q_proj,v_proj]`` a list).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeAlias, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from posttrain import losses, rl
from posttrain.data.formats import FORMATS


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key, what was expected and how to fix it."""


def choices(*names: Iterable[str]) -> Any:
    """``Literal[...]`` of the names in ``names`` (registries' keys, in their order): the allowed values of a field
    come from the table that implements them, so adding an entry there is the whole change."""
    return Literal[tuple(name for group in names for name in group)]


# The allowed values of fields that name a registry entry. A type checker sees plain strings (it cannot read a
# Literal built at run time); pydantic, --help-config and error messages see every name.
if TYPE_CHECKING:
    FormatName: TypeAlias = str
    AdvantageName: TypeAlias = str
    KlEstimatorName: TypeAlias = str
    LossAggregationName: TypeAlias = str
    DpoLossName: TypeAlias = str
else:
    FormatName = choices(["auto"], FORMATS)
    AdvantageName = choices(rl.ADVANTAGES)
    KlEstimatorName = choices(rl.KL_ESTIMATORS)
    LossAggregationName = choices(rl.LOSS_AGGREGATIONS)
    DpoLossName = choices(losses.DPO_LOSSES)


class Block(BaseModel):
    """Base of every config block: unknown keys are errors, docstrings are help."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ModelConfig(Block):
    path: str = ""
    """Hugging Face causal-LM directory (or a hub id when online)."""
    tokenizer: str | None = None
    """Tokenizer directory or hub id; defaults to `model.path`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the weights are loaded in. Mixed precision is `train.precision`; keep float32 weights for it."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flex_attention", "flash_attention_2"] = "auto"
    """Attention kernel passed to transformers. auto: sdpa where the architecture supports it, else eager (Gemma 2);
    a kernel named here that the architecture lacks is an error."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the checkpoint."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    dropout: bool | None = None
    """Keep the model's (and LoRA's) dropout while training. null: the stage's default, on for sft and pretrain,
    off for reward, dpo, kto, rejection_sampling and ppo (their losses compare log-probs or scores of one model
    in two passes, which dropout noise would make differ with no update; TRL and OpenRLHF turn it off too)."""


PeftMethod = Literal["full", "lora", "dora", "qlora", "prompt_tuning", "p_tuning", "prefix", "freeze"]
PROMPT_LEARNING_METHODS = ("prompt_tuning", "p_tuning", "prefix")


class PeftConfig(Block):
    method: PeftMethod = "full"
    """What is trained: full | lora | dora | qlora | prompt_tuning | p_tuning | prefix | freeze."""
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names that get LoRA (e.g. [q_proj, v_proj]), or all-linear."""
    rslora: bool = False
    """Rank-stabilised LoRA scaling alpha/sqrt(r) (Kalajdzievski 2023)."""
    num_virtual_tokens: int = Field(16, ge=1)
    """Virtual tokens for prompt tuning, P-tuning and prefix tuning."""
    prompt_init_text: str | None = None
    """Prompt tuning: initialise the soft prompt from this text's embeddings instead of randomly."""
    encoder_hidden_size: int = Field(128, ge=1)
    """P-tuning: hidden size of the prompt encoder MLP."""
    freeze_trainable: list[str] = Field(default_factory=list)
    """Freeze-tuning: parameter-name substrings that stay trainable (e.g. [mlp, lm_head])."""
    freeze_last_n_layers: int | None = Field(None, ge=1)
    """Freeze-tuning: train only the last N decoder layers (combined with `freeze_trainable`)."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """QLoRA 4-bit quantisation type."""
    double_quant: bool = True
    """QLoRA: quantise the quantisation constants too."""

    @model_validator(mode="after")
    def _freeze_needs_a_target(self) -> PeftConfig:
        if self.method == "freeze" and not self.freeze_trainable and self.freeze_last_n_layers is None:
            raise ValueError(
                "peft.method=freeze trains nothing: set peft.freeze_last_n_layers (e.g. 2) "
                "and/or peft.freeze_trainable (e.g. [mlp])"
            )
        return self


class DataSource(Block):
    path: str
    """A file, folder, dataset name or hf:org/name."""
    ratio: float | None = Field(None, gt=0, le=1)
    """Share of the mixture drawn from this source (ratios of all sources must sum to 1)."""
    epochs: float | None = Field(None, gt=0)
    """Times this source is repeated per epoch (e.g. 3 to upweight a small domain set)."""


class DataConfig(Block):
    train: str | list[str | DataSource] = ""
    """Training data: a file (JSON, JSONL, Parquet, CSV, TXT), a folder, a LLaMA-Factory dataset name from
    `data.registry`, hf:org/name when online; or a list of them."""
    registry: str | None = None
    """LLaMA-Factory dataset_info.json (or its folder) that resolves dataset names; default: beside the data."""
    template: str | None = None
    """Chat template: a built-in name (llama2, llama3, chatml, qwen, baichuan2, chatglm3, mistral, default) or a
    .jinja file; default: the tokenizer's own, else `default`. Saved with the model so chat/serve use the same."""
    eval: str | None = None
    """Held-out data for the validation loss; defaults to a split of `data.train` when `eval_fraction` > 0."""
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    """Share of the training rows held out for validation when `data.eval` is not given (at least one row of each
    file when > 0; a file that would lose every row to the split is refused)."""
    max_length: int = Field(1024, ge=8)
    """Longest tokenised sequence; longer rows are truncated and counted."""
    packing: bool = True
    """Lay each micro-batch's examples out packed: several sequences per tensor row (no attention across them,
    positions restart). False pads each sequence to the micro-batch's longest. Either way a step trains the same
    examples (`train.batch_size` counts examples, not rows)."""
    share_prompt: bool = True
    """Preference pairs, KTO examples and the responses to one RL prompt: compute the prompt their sequences share
    once per unit (packed rows, sdpa attention; same log-probs, about a third fewer tokens on short chats). False:
    each sequence whole."""
    train_on_prompt: bool = False
    """Also train on system/user tokens, not only assistant turns."""
    format: FormatName = "auto"
    """Row format (``data.formats.FORMATS``); auto detects it per file (and reports it)."""
    max_truncated_share: float = Field(0.05, ge=0, le=1)
    """Preflight refuses to train when more than this share of sequences is cut at max_length."""
    on_invalid: Literal["error", "skip"] = "error"
    """error: stop at the first bad row (file:line, field); skip: drop bad rows, count and report them."""
    last_turn_only: bool = False
    """Train only the last assistant turn of each conversation (default: every assistant turn)."""
    shuffle: bool = True
    """Shuffle rows every epoch (seeded; resumable)."""

    @model_validator(mode="after")
    def _mixture_is_consistent(self) -> DataConfig:
        sources = [s for s in (self.train if isinstance(self.train, list) else []) if isinstance(s, DataSource)]
        ratios = [s.ratio for s in sources if s.ratio is not None]
        if any(s.ratio is not None and s.epochs is not None for s in sources):
            raise ValueError("a data.train source takes ratio or epochs, not both")
        if ratios and (len(ratios) != len(self.train) or abs(sum(ratios) - 1.0) > 1e-6):
            raise ValueError(f"data.train ratios must be given for every source and sum to 1 (got {ratios})")
        return self


class TrainConfig(Block):
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to run; overrides `train.epochs` when set."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data when `max_steps` is not set."""
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch per process, whatever `data.packing` (which decides only how they lie in tensor
    rows): sequences for sft and pretrain, pairs for reward and dpo, examples for kto, sequences of the SFT round
    for rejection_sampling; for ppo, sampled responses (algorithm.prompts_per_step sets the prompts). A step
    trains batch_size x grad_accum x processes of them."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step. The loss is normalised over the whole accumulated batch
    (its trained tokens for sft/pretrain, its pairs or examples otherwise), so batch_size x grad_accum is what
    matters, not the split."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """fp32; bf16 autocast (CPU and GPU); fp16 autocast with loss scaling (GPU only)."""
    eval_every: int | None = Field(None, ge=1)
    """Validation loss every N steps (and at the end); needs eval data."""
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without improvement of the stage's model-selection metric (eval_loss,
    minimised; for ppo eval_reward, the held-out greedy reward, maximised); the best checkpoint is then the model."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """Abort after this many consecutive steps with a NaN/inf loss or gradient (each one is skipped)."""
    log_every: int = Field(1, ge=1)
    """Write metrics every N steps."""


class OptimConfig(Block):
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    """adamw (decoupled weight decay) | adam | sgd (with momentum)."""
    lr: float = Field(2e-5, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for adamw, L2 for adam/sgd)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this; null disables clipping."""


class ScheduleConfig(Block):
    name: Literal["constant", "linear", "cosine"] = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps from 0 to the peak learning rate."""
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    """Warm-up as a share of all steps (used when warmup_steps is 0)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """Floor of the decay as a share of the peak learning rate."""


class CheckpointConfig(Block):
    every: int | None = Field(100, ge=1)
    """Write a checkpoint every N optimizer steps (atomically); null writes only at the end and on signals."""
    keep: int = Field(2, ge=1)
    """Keep the newest K checkpoints (the best one by validation loss is kept besides)."""


class LoggingConfig(Block):
    tensorboard: bool = True
    """Also write TensorBoard event files under output_dir/tensorboard."""
    progress: bool = True
    """Show a progress bar with loss, tokens/s and ETA."""
    report: bool = True
    """Write plots/*.png and report.md at the end."""


class RoleBlock(Block):
    """Where one role of online RL runs under distributed.placement=ray."""

    colocate_with: Literal["policy"] | None = None
    """policy: the role shares the policy trainer's process (and device), as OpenRLHF's --colocate_actor_ref;
    none: its own Ray actor."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs Ray reserves for the actor."""
    num_gpus: float = Field(0.0, ge=0)
    """GPUs Ray reserves for the actor (fractions share a GPU)."""
    threads: int = Field(1, ge=1)
    """torch threads inside the actor (torch.set_num_threads)."""


class RolloutRoleBlock(RoleBlock):
    num_engines: int = Field(1, ge=1)
    """Rollout engines; each samples its share of the step's prompts (the samples do not depend on the count)."""


class RolesBlock(Block):
    """Placement of online RL's roles other than the policy trainer (the training process, with the critic)."""

    rollout: RolloutRoleBlock = Field(default_factory=RolloutRoleBlock)
    """The engines that sample from a copy of the policy, synced after every update."""
    reference: RoleBlock = Field(default_factory=RoleBlock)
    """The frozen reference's log-probs (only when the KL anchor is on)."""
    reward: RoleBlock = Field(default_factory=RoleBlock)
    """The reward (and the watch's gold reward)."""


class DistributedBlock(Block):
    """How the model is spread over the processes of a multi-process run (``posttrain train ... --nproc N``, or
    ``torchrun``/``deepspeed``). One process trains the same whatever the strategy."""

    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    """ddp: every process holds the whole model, gradients are all-reduced; fsdp: torch FSDP2 (fully_shard), each
    process holds 1/N of the parameters, gradients and optimizer states; deepspeed: DeepSpeed ZeRO at
    distributed.zero_stage."""
    zero_stage: int = Field(0, ge=0, le=3)
    """deepspeed only: 0 (replicated, like ddp), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters)."""
    offload: Literal["none", "optimizer", "all"] = "none"
    """Move state to CPU memory: deepspeed `optimizer` (ZeRO-Offload, zero_stage >= 1) or `all` (optimizer and
    parameters, zero_stage 3); fsdp `all` (FSDP2 CPUOffloadPolicy: parameters, gradients and the optimizer step
    on CPU)."""
    reshard_after_forward: bool = True
    """fsdp only: free each layer's gathered parameters after its forward (ZeRO-3-like memory, gathered again for
    the backward); false keeps them until the backward (ZeRO-2-like: more memory, one all-gather less)."""
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """fsdp only, under train.precision=bf16: the dtype gradients are reduce-scattered in (float32 is exact to
    the one-process run; bfloat16 halves the traffic)."""
    wrap: Literal["decoder_layer", "model"] = "decoder_layer"
    """fsdp only: the sharding unit. decoder_layer: each decoder layer is its own unit (gathered one at a time,
    the memory saving of FSDP), then the rest of the model; model: one unit for the whole model."""
    placement: Literal["local", "ray"] = "local"
    """stage ppo: where the roles run. local: all in the training process. ray: the rollout engines, the
    reference and the reward as Ray actors (distributed.roles), the weights synced to the engines with a version
    after every update; the samples, and so the training, are the same as local."""
    ray_address: str | None = None
    """placement=ray: a running Ray cluster to join (auto, host:6379, ray://host:10001); none starts a local one on
    127.0.0.1, without dashboard, with its temporary files and HOME inside the run directory."""
    roles: RolesBlock = Field(default_factory=RolesBlock)
    """placement=ray: each role's actor (resources, threads) or colocation with the policy."""
    call_timeout_s: float = Field(600.0, gt=0)
    """placement=ray: longest wait for any remote call (a rollout, a scoring); past it the run fails naming the role."""
    sync_timeout_s: float = Field(60.0, gt=0)
    """placement=ray: longest wait for a weight sync to an engine."""
    restarts: int = Field(0, ge=0)
    """placement=ray: times a dead role (actor) is restarted, from the last synced weights, before the run fails;
    0 fails at the first death, naming the role."""

    @model_validator(mode="after")
    def _options_belong_to_the_strategy(self) -> DistributedBlock:
        defaults = DistributedBlock.model_construct()
        fsdp_only = [
            key
            for key in ("reshard_after_forward", "reduce_dtype", "wrap")
            if getattr(self, key) != getattr(defaults, key)
        ]
        if self.strategy != "fsdp" and fsdp_only:
            raise ValueError(
                f"distributed.{fsdp_only[0]} is an FSDP option; it does nothing with "
                f"distributed.strategy={self.strategy} (set strategy=fsdp or remove it)"
            )
        if self.placement == "local":
            placed = [
                key
                for key in ("ray_address", "roles", "call_timeout_s", "sync_timeout_s", "restarts")
                if getattr(self, key) != getattr(defaults, key)
            ]
            if placed:
                raise ValueError(
                    f"distributed.{placed[0]} places roles on Ray; it does nothing with distributed.placement=local "
                    "(set placement=ray or remove it)"
                )
        if self.strategy != "deepspeed" and self.zero_stage:
            raise ValueError(
                f"distributed.zero_stage={self.zero_stage} is a DeepSpeed option (strategy={self.strategy}); set "
                "distributed.strategy=deepspeed, or use strategy=fsdp, which shards like ZeRO-3"
            )
        if self.strategy == "ddp" and self.offload != "none":
            raise ValueError(
                f"distributed.offload={self.offload} needs a sharded strategy: strategy=deepspeed (zero_stage >= 1) or "
                "strategy=fsdp (offload=all)"
            )
        if self.strategy == "fsdp" and self.offload == "optimizer":
            raise ValueError(
                "distributed.offload=optimizer: FSDP2 offloads parameters, gradients and the optimizer step together; "
                "use offload=all, or strategy=deepspeed for optimizer-only offload"
            )
        if self.strategy == "deepspeed" and self.offload == "optimizer" and self.zero_stage < 1:
            raise ValueError("distributed.offload=optimizer (ZeRO-Offload) needs distributed.zero_stage >= 1")
        if self.strategy == "deepspeed" and self.offload == "all" and self.zero_stage != 3:
            raise ValueError(
                f"distributed.offload=all offloads parameters, which only ZeRO-3 shards: set distributed.zero_stage=3 "
                f"(got {self.zero_stage}), or offload=optimizer"
            )
        return self


class StageConfig(Block):
    """Fields every stage shares."""

    dropout_by_default: ClassVar[bool] = False
    """What `model.dropout: null` means for this stage."""

    stage: str
    """Which recipe runs this config."""
    output_dir: str = "runs/run"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, model/, plots/, report.md."""
    resume: Literal["auto"] | Literal[False] | str = "auto"
    """auto: continue the newest complete checkpoint in output_dir if there is one; a checkpoint path; or false."""
    seed: int = 42
    """Seed for initialisation, data order and dropout."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model to train."""
    peft: PeftConfig = Field(default_factory=PeftConfig)
    """What part of the model is trained."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Datasets and tokenisation."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    """Loop length, batch, precision, evaluation."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """Learning-rate schedule."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Metrics, progress bar, report."""
    distributed: DistributedBlock = Field(default_factory=DistributedBlock)
    """Multi-process strategy (ddp, fsdp, deepspeed) and its options. fsdp and deepspeed apply to a one-process run
    too (a process group of one), so a config behaves the same at any process count."""

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_is_explicit(cls, value: Any) -> Any:
        if value is True:  # YAML `true`: be explicit rather than guess
            raise ValueError("resume must be auto, false or a checkpoint path (got true)")
        return value

    @model_validator(mode="after")
    def _check_required_paths(self, info: ValidationInfo) -> StageConfig:
        if self.model.dropout is None:
            self.model.dropout = self.dropout_by_default
        if not self.model.path:
            raise ValueError("model.path is required (a Hugging Face model directory), e.g. model.path=./toy/model")
        if not self.data.train and not (info.context or {}).get("without_data"):
            raise ValueError("data.train is required (a JSONL file), e.g. data.train=./toy/data/sft.jsonl")
        if self.data.packing and self.peft.method in PROMPT_LEARNING_METHODS:
            # Virtual tokens are prepended once per row; with packing only the first sequence of a row would
            # see them, which silently trains something else than what is served.
            raise ValueError(
                f"peft.method={self.peft.method} prepends virtual tokens to each row, which packing would share "
                "across sequences; set data.packing=false"
            )
        if self.train.precision == "fp16" and self.model.dtype != "float32":
            raise ValueError("train.precision=fp16 needs float32 master weights: set model.dtype=float32")
        if self.distributed.placement != "local" and self.stage != "ppo":
            raise ValueError(
                f"distributed.placement={self.distributed.placement} places the roles of online RL; stage "
                f"{self.stage} has none (use --nproc and distributed.strategy for several processes)"
            )
        strategy = self.distributed.strategy
        if strategy == "fsdp" and self.train.precision == "fp16":
            raise ValueError(
                "train.precision=fp16 with distributed.strategy=fsdp: FSDP2's loss scaling is not wired; use bf16 "
                "(no loss scaling needed), or strategy=deepspeed"
            )
        if strategy != "ddp" and self.peft.method == "qlora":
            raise ValueError(
                f"peft.method=qlora with distributed.strategy={strategy}: 4-bit base weights cannot be sharded here; "
                "use strategy=ddp, or peft.method=lora with a sharded strategy"
            )
        return self


class SftConfig(StageConfig):
    dropout_by_default: ClassVar[bool] = True

    stage: Literal["sft"] = "sft"
    """sft: train on chat data (assistant turns by default)."""


class PretrainConfig(SftConfig):
    stage: Literal["pretrain"] = "pretrain"  # type: ignore[assignment]
    """pretrain: continued pretraining on plain text (every token trained)."""


ADAPTER_METHODS_FOR_HEADS = ("full", "lora", "dora", "qlora", "freeze")


class RewardBlock(Block):
    """Reward-model training (Bradley–Terry pairwise loss on preference pairs)."""

    use_margin: bool = True
    """Subtract each pair's margin inside the loss (Llama 2's graded preferences) when rows carry one."""


class RewardConfig(StageConfig):
    stage: Literal["reward"] = "reward"
    """reward: a scalar-head reward model trained on preference pairs."""
    reward: RewardBlock = Field(default_factory=RewardBlock)
    """Loss options."""

    @model_validator(mode="after")
    def _head_needs_weights(self) -> RewardConfig:
        if self.peft.method not in ADAPTER_METHODS_FOR_HEADS:
            raise ValueError(
                f"peft.method={self.peft.method} adds virtual tokens, which a reward model's scalar head cannot "
                f"use; choose one of {', '.join(ADAPTER_METHODS_FOR_HEADS)}"
            )
        return self


class DpoBlock(Block):
    """Direct preference optimisation: the loss and its strength."""

    loss: DpoLossName = "sigmoid"
    """sigmoid (DPO), ipo, hinge (SLiC), robust (label-noise unbiased), simpo (reference-free, length-normalised),
    orpo (reference-free, odds ratio + SFT term)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the preference term (DPO's β, IPO's τ, ORPO's λ). Unset: the loss's own default, 0.1, or 2.0
    for simpo (its paper's range, 2–10); the run's config.yaml records the value used."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Assumed share of flipped labels: conservative DPO with loss=sigmoid, robust DPO with loss=robust."""
    simpo_gamma_beta_ratio: float = 0.5
    """SimPO's target margin γ as a multiple of β."""
    sft_weight: float = Field(0.0, ge=0)
    """Weight of an extra NLL term on the chosen response (RPO); 0 turns it off. ORPO always has its own."""
    reference: str | None = None
    """The reference π_ref as another model (a run, model or adapter directory, with the policy's tokenizer);
    unset: the model as loaded (the base under an adapter, the initial weights otherwise). Iterative DPO sets it to
    the first policy, so each round starts from the last one while the reference stays fixed."""

    @model_validator(mode="before")
    @classmethod
    def _beta_follows_the_loss(cls, data: Any) -> Any:
        # β means different things per loss, so each entry of losses.DPO_LOSSES carries its own default. Fills only
        # an unset β (a β the user wrote is kept as written); an unknown loss is left for the Literal.
        if isinstance(data, dict) and data.get("beta") is None:
            loss = data.get("loss", "sigmoid")
            if loss in losses.DPO_LOSSES:
                data = {**data, "beta": losses.DPO_LOSSES[loss].default_beta}
        return data


class DpoConfig(StageConfig):
    stage: Literal["dpo"] = "dpo"
    """dpo: the DPO family on preference pairs (reference log-probs cached up front)."""
    dpo: DpoBlock = Field(default_factory=DpoBlock)
    """Loss choice and options."""

    @model_validator(mode="after")
    def _smoothing_applies(self) -> DpoConfig:
        if self.dpo.label_smoothing and not losses.DPO_LOSSES[self.dpo.loss].takes_label_smoothing:
            takers = " or ".join(name for name, loss in losses.DPO_LOSSES.items() if loss.takes_label_smoothing)
            raise ValueError(f"dpo.label_smoothing applies to loss {takers}, not {self.dpo.loss}")
        if self.dpo.reference and losses.DPO_LOSSES[self.dpo.loss].reference_free:
            raise ValueError(f"dpo.reference: loss {self.dpo.loss} uses no reference")
        return self


class KtoBlock(Block):
    """KTO on unpaired desirable / undesirable examples."""

    beta: float = Field(0.1, gt=0)
    """Strength of the value function around the reference point."""
    desirable_weight: float = Field(1.0, gt=0)
    """λ_D: weight of desirable examples (raise it when they are rarer than undesirable ones)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """λ_U: weight of undesirable examples."""


class KtoConfig(StageConfig):
    stage: Literal["kto"] = "kto"
    """kto: Kahneman–Tversky optimisation on unpaired examples (or preference pairs split in two)."""
    kto: KtoBlock = Field(default_factory=KtoBlock)
    """Loss options."""


class VllmBlock(Block):
    """The vLLM engine's settings (sampling.engine=vllm, on a CUDA GPU)."""

    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs each engine's model is split over."""
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Fraction of the GPU's memory vLLM takes (weights and KV cache); small when the trainer shares the GPU."""
    sleep: bool = False
    """Between rollouts, offload the engine's weights to CPU and free its KV cache (vLLM sleep mode), giving the
    GPU back to a colocated trainer; it wakes for the next weight sync."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """The engine's weights and compute dtype."""


class SamplingBlock(Block):
    """How responses are sampled from the policy."""

    engine: Literal["hf", "vllm"] = "hf"
    """hf: posttrain's decoding loop on the transformers model (CPU or GPU); vllm: vLLM (CUDA GPU, the vllm extra),
    with sampling.vllm's settings."""
    vllm: VllmBlock = Field(default_factory=VllmBlock)
    """sampling.engine=vllm only."""

    num_samples: int = Field(8, ge=1)
    """Responses per prompt (n of best-of-n)."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature; 0 is greedy (then every sample is the same)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest token set with this probability mass."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens; 0 turns it off."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest response; one that reaches it without an end-of-turn token counts as not finished."""
    batch_size: int = Field(64, ge=1)
    """Prompts × samples generated per batch."""
    max_prompts: int | None = Field(None, ge=1)
    """Use only the first N prompts of data.train (a quick round, or a CPU budget); none uses all."""

    @model_validator(mode="after")
    def _vllm_settings_need_vllm(self) -> SamplingBlock:
        if self.engine != "vllm" and self.vllm != VllmBlock():
            raise ValueError("sampling.vllm configures the vLLM engine; it does nothing with sampling.engine=hf")
        return self


class RewardSource(Block):
    """Where rewards come from: a trained reward model, a Python function, an HTTP reward service, or a weighted
    sum of several of them; optionally minus a penalty for responses that never stopped."""

    model: str | None = None
    """A reward-model run directory (or its model/ folder) from stage: reward."""
    function: str | None = None
    """A Python function ``reward(prompt, response, reference) -> float`` as module:name (e.g.
    posttrain.tasks:score_prompt), or a built-in name: exact_match, toy, toy_format."""
    http: str | None = None
    """URL (http:// or https://) of a reward service that scores JSON batches; the protocol is in the
    posttrain.rewards module docstring."""
    model_weight: float = 1.0
    """Weight of the reward model's score when two or more sources are given (with one it is not applied)."""
    function_weight: float = 1.0
    """Weight of the function's reward when two or more sources are given (with one it is not applied)."""
    http_weight: float = 1.0
    """Weight of the HTTP service's score when two or more sources are given (with one it is not applied)."""
    http_timeout: float = Field(30.0, gt=0)
    """Seconds to wait for one request to the reward service before it counts as failed (and is retried)."""
    http_retries: int = Field(3, ge=0)
    """Retries of a request after a connection error, a timeout, HTTP 5xx or 429 (0: try once); other 4xx
    answers are not retried."""
    unfinished_penalty: float = Field(0.0, ge=0)
    """Subtracted from the reward of a response that reached max_new_tokens without an end-of-turn token (a
    policy that never stops); 0 turns it off."""

    @field_validator("http")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(
                f"reward.http {value!r} is not an http:// or https:// URL (e.g. http://localhost:8000/score)"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> RewardSource:
        if not self.model and not self.function and not self.http:
            raise ValueError(
                "give reward.model (a reward-model run), reward.function (module:name) or reward.http (a reward "
                "service URL); with two or more, their weighted scores are summed"
            )
        return self


class RejectionBlock(Block):
    """Best-of-n selection."""

    threshold: float | None = None
    """Keep a prompt's best response only when its reward reaches this value; none keeps every best."""
    train_after: bool = True
    """Run one SFT round on the selected responses (with this config's model/peft/train/optim blocks)."""
    require_finished: bool = True
    """Keep only responses that ended with an end-of-turn token: one cut at max_new_tokens would be trained as if
    it were complete."""


class RejectionSamplingConfig(StageConfig):
    stage: Literal["rejection_sampling"] = "rejection_sampling"
    """rejection_sampling: sample n responses per prompt, keep the best by reward, fine-tune on them."""
    sampling: SamplingBlock = Field(default_factory=SamplingBlock)
    """Sampling from the policy (model.path)."""
    reward: RewardSource = Field(default_factory=lambda: RewardSource(function="exact_match"))
    """How responses are scored."""
    rejection: RejectionBlock = Field(default_factory=RejectionBlock)
    """Selection and the SFT round."""


# The KL estimator an unset algorithm.kl_estimator takes, per kl_mode (AlgorithmBlock explains why).
KL_ESTIMATOR_BY_MODE: dict[str, str] = {"reward": "k1", "loss": "k3"}


class AlgorithmBlock(Block):
    """The online-RL algorithm: advantage estimator, PPO clipping, KL anchor, epochs over each rollout."""

    # `async` is a Python keyword: the field is async_, spelled async in configs and in the saved config.
    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=True,
        validate_by_name=True,
        serialize_by_alias=True,
    )

    advantage: AdvantageName = "gae"
    """gae: PPO with a critic (Schulman et al. 2017); grpo: group-normalised rewards (Shao et al. 2024); rloo:
    leave-one-out baseline (Ahmadian et al. 2024); reinforce++: batch-whitened returns (Hu 2025). The last three
    need no critic; grpo and rloo need sampling.num_samples >= 2."""
    prompts_per_step: int = Field(16, ge=1)
    """Prompts sampled per step (over all processes); each gets sampling.num_samples responses."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes over each rollout. Each pass makes rollout / (train.batch_size x train.grad_accum x processes)
    optimizer updates."""
    gamma: float = Field(1.0, ge=0, le=1)
    """Discount over response tokens (gae, reinforce++)."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalise advantages over the rollout (gae, reinforce++); grpo and rloo are already centred per group."""
    scale_by_std: bool = True
    """grpo: divide by the group's reward std (false: Dr. GRPO, Liu et al. 2025)."""
    clip_range: float = Field(0.2, gt=0, lt=1)
    """PPO ratio clip epsilon."""
    clip_range_high: float | None = Field(None, gt=0)
    """Upper clip epsilon when it differs (DAPO's clip-higher); null uses clip_range."""
    dual_clip: float | None = Field(None, gt=1)
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens (Ye et al. 2020); null: off."""
    value_clip: float | None = Field(0.2, gt=0)
    """Clip the critic's new values to old ± this (gae); null: unclipped value loss."""
    vf_coef: float = Field(0.5, ge=0)
    """Weight of the value loss (matters when the critic shares the policy's parameters)."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus weight."""
    kl_coef: float = Field(0.05, ge=0)
    """KL anchor to the reference policy (beta); 0 turns it off: no reference model is kept (no frozen copy)
    and no reference pass is run, and no KL is logged."""
    kl_mode: Literal["reward", "loss"] = "reward"
    """reward: per-token -beta*KL added to the reward (InstructGPT); loss: beta*KL added to the loss (GRPO)."""
    kl_estimator: KlEstimatorName = "k1"
    """Per-token KL estimator (Schulman 2020): k1 = log ratio (unbiased, the usual in-reward choice), k2, k3
    (non-negative, low variance, GRPO's in-loss choice). Unset: k1 with kl_mode=reward, k3 with kl_mode=loss;
    k1 with kl_mode=loss is refused (its expected gradient is zero)."""
    kl_target: float | None = Field(None, gt=0)
    """Adaptive KL controller target per response (Ziegler et al. 2019); null keeps kl_coef fixed."""
    kl_horizon: int = Field(10000, ge=1)
    """Adaptive controller horizon, in responses."""
    reward_normalize: bool = False
    """Normalise rewards by running mean and std before advantages."""
    reward_clip: float | None = Field(None, gt=0)
    """Clip (normalised) rewards to ± this; null: no clipping."""
    loss_aggregation: LossAggregationName = "token_mean"
    """token_mean: every response token weighs the same, the loss divided by the update's response tokens
    (DAPO); sequence_mean: every response weighs the same, each its token mean (the GRPO paper);
    sum_over_max_tokens: each response's token sum divided by the constant sampling.max_new_tokens, averaged over
    responses (Dr. GRPO, Liu et al. 2025; TRL's dr_grpo, verl's seq-mean-token-sum-norm): no length bias and
    no batch-dependent normaliser. Dr. GRPO is this with scale_by_std=false."""
    async_: bool = Field(False, alias="async")
    """Asynchronous RL (distributed.placement=ray): the rollout of step t+1 is sampled while step t updates, from
    the weights before that update (one step off-policy, as OpenRLHF's --async_train); the behaviour policy's
    log-probs, computed by the engine that sampled, enter the importance ratio."""
    ptx_coef: float = Field(0.0, ge=0)
    """PPO-ptx (InstructGPT): weight of an SFT loss on algorithm.ptx_data mixed into every update; 0: off."""
    ptx_data: str | None = None
    """SFT data (any chat format data.train accepts) for the ptx term."""

    @model_validator(mode="before")
    @classmethod
    def _estimator_follows_the_mode(cls, data: Any) -> Any:
        # An unset estimator defaults per mode rather than to one value: k1 is right in the reward (unbiased, and
        # its value is what matters there) but as a loss its expected gradient is zero, so a user who only sets
        # kl_mode=loss would get a KL anchor that adds noise and no pull. k3 is GRPO's in-loss choice (TRL,
        # DeepSeekMath). A k1 the user wrote is not rewritten: _kl_loss_has_a_gradient refuses it.
        if isinstance(data, dict) and data.get("kl_estimator") is None:
            data = {**data, "kl_estimator": KL_ESTIMATOR_BY_MODE[data.get("kl_mode", "reward")]}
        return data

    @model_validator(mode="after")
    def _ptx_has_data(self) -> AlgorithmBlock:
        if self.ptx_coef and not self.ptx_data:
            raise ValueError("algorithm.ptx_coef > 0 needs algorithm.ptx_data (an SFT file)")
        return self

    @model_validator(mode="after")
    def _kl_loss_has_a_gradient(self) -> AlgorithmBlock:
        if self.kl_mode == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "algorithm.kl_mode=loss with kl_estimator=k1 adds a KL term whose expected gradient is zero "
                "(∇ log π averages to 0 under sampling), so it would not anchor the policy; use kl_estimator=k3 "
                "(GRPO's choice, the default with kl_mode=loss) or k2, or kl_mode=reward for k1"
            )
        return self

    @model_validator(mode="after")
    def _kl_target_needs_a_coefficient(self) -> AlgorithmBlock:
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError(
                "algorithm.kl_target steers kl_coef multiplicatively, so from kl_coef=0 it stays 0 and does "
                "nothing; set a starting kl_coef > 0 (e.g. 0.05) or remove kl_target"
            )
        return self


class CriticBlock(Block):
    """The value model of algorithm.advantage=gae."""

    path: str | None = None
    """Initial weights: a reward-model run (OpenRLHF's choice) or a causal LM; null: model.path with a fresh value
    head. Trained with the same peft method as the policy."""
    shared: bool = False
    """true: a value head on the policy's own backbone (one model, one forward; with LoRA the adapter is shared)."""
    lr: float | None = Field(None, gt=0)
    """Critic learning rate; null: optim.lr."""
    max_grad_norm: float | None = Field(None, gt=0)
    """Clip the critic's gradient norm to this, apart from the policy's (which optim.max_grad_norm clips), so the
    value loss never shrinks the policy's step; null: optim.max_grad_norm (still clipped apart). Both norms are
    logged, as grad_norm/policy and grad_norm/critic."""

    @model_validator(mode="after")
    def _shared_has_no_path(self) -> CriticBlock:
        if self.shared and self.path:
            raise ValueError(
                "critic.shared=true puts the value head on the policy; critic.path is then unused, remove it"
            )
        return self


class WatchBlock(Block):
    """Diagnostics that say when an RL run goes wrong (reward hacking, KL or length running away, collapse)."""

    gold: str | None = None
    """A reward function (module:name or a built-in such as toy, exact_match) that is the truth, logged as
    gold_reward each step on the rollouts that have a reference; the hacking watch compares the proxy reward
    with it."""
    gold_model: str | None = None
    """A held-out second reward model used as the gold signal (when no verifiable reward exists)."""
    window: int = Field(16, ge=4)
    """Steps over which trends are compared (the first half against the second); longer windows catch slower
    trends at the same false-alarm rate."""
    kl_limit: float = Field(10.0, gt=0)
    """Warn when the KL to the reference passes this many nats per response."""
    negative_kl_tolerance: float = Field(0.05, ge=0)
    """Warn when the mean KL per response is below minus this (an estimate that should be >= 0)."""
    length_growth: float = Field(2.0, gt=1)
    """Warn when the mean response length grows beyond this factor of the first window's."""
    min_distinct_share: float = Field(0.1, ge=0, le=1)
    """Warn when fewer than this share of a step's responses are distinct (the same answer for every prompt)."""
    stop_on_warning: bool = False
    """Stop training (checkpoint, then exit non-zero) at a reward-hacking, KL or length warning."""

    @model_validator(mode="after")
    def _one_gold(self) -> WatchBlock:
        if self.gold and self.gold_model:
            raise ValueError("give watch.gold (a function) or watch.gold_model (a reward model), not both")
        return self


class PpoConfig(StageConfig):
    stage: Literal["ppo"] = "ppo"
    """ppo: online RL from prompts (PPO with a critic, or the critic-free grpo/rloo/reinforce++)."""
    sampling: SamplingBlock = Field(default_factory=lambda: SamplingBlock(num_samples=1, max_new_tokens=64))
    """Rollout sampling (num_samples is the group size of grpo/rloo)."""
    reward: RewardSource = Field(default_factory=lambda: RewardSource(function="exact_match"))
    """How responses are scored."""
    algorithm: AlgorithmBlock = Field(default_factory=AlgorithmBlock)
    """Advantage estimator, clipping, KL anchor."""
    critic: CriticBlock = Field(default_factory=CriticBlock)
    """Value model (algorithm.advantage=gae only)."""
    watch: WatchBlock = Field(default_factory=WatchBlock)
    """Diagnostics and the reward-hacking watch."""

    @model_validator(mode="after")
    def _rl_is_consistent(self) -> PpoConfig:
        advantage, samples = self.algorithm.advantage, self.sampling.num_samples
        if rl.ADVANTAGES[advantage].needs_groups and samples < 2:
            raise ValueError(
                f"algorithm.advantage={advantage} compares responses to the same prompt: set sampling.num_samples >= 2"
            )
        if self.sampling.temperature == 0:
            raise ValueError(
                "sampling.temperature=0 samples the same response every time, so RL cannot explore; use > 0 (e.g. 1.0)"
            )
        if self.model.dropout:
            raise ValueError(
                "model.dropout=true in stage ppo: the PPO ratio compares the update's log-probs with the rollout's, and "
                "dropout noise makes them differ with no update (TRL and OpenRLHF turn it off); remove model.dropout"
            )
        if self.peft.method in PROMPT_LEARNING_METHODS and rl.ADVANTAGES[advantage].needs_critic:
            # Shared: the value head reads hidden states that prompt learning does not expose. Separate: the
            # critic is a scalar-head model that calls its base model directly, so peft never inserts the
            # virtual tokens and only the head trains (a linear probe on a frozen backbone); RewardConfig
            # refuses prompt learning for scalar heads for the same reason.
            critic_free = ", ".join(name for name, estimator in rl.ADVANTAGES.items() if not estimator.needs_critic)
            raise ValueError(
                f"peft.method={self.peft.method} cannot train a critic (algorithm.advantage={advantage}): a shared "
                "critic reads hidden states prompt learning does not expose, and a separate critic's scalar head never "
                "sees the virtual tokens, so only its head would train; use a critic-free algorithm.advantage "
                f"({critic_free}) or peft.method lora"
            )
        if self.sampling.engine == "vllm" and self.peft.method in PROMPT_LEARNING_METHODS:
            raise ValueError(
                f"sampling.engine=vllm cannot sample from a peft.method={self.peft.method} policy (vLLM has no virtual "
                "tokens); use sampling.engine=hf"
            )
        placement, roles = self.distributed.placement, self.distributed.roles
        if self.algorithm.async_ and (placement != "ray" or roles.rollout.colocate_with is not None):
            raise ValueError(
                "algorithm.async=true overlaps the next rollout with this update, which needs the rollout engines in "
                "their own processes: set distributed.placement=ray (and leave distributed.roles.rollout.colocate_with "
                "unset)"
            )
        if placement == "ray" and self.distributed.strategy != "ddp":
            # Not built yet: syncing the engines from sharded parameters (FSDP, ZeRO-3) gathered on one process.
            raise ValueError(
                "distributed.placement=ray syncs the engines from whole parameters: use distributed.strategy=ddp "
                f"(got {self.distributed.strategy})"
            )
        if placement == "ray" and roles.rollout.colocate_with is not None and roles.rollout.num_engines > 1:
            raise ValueError(
                "distributed.roles.rollout.num_engines > 1 with colocate_with=policy: a colocated engine is the "
                "policy itself, there is one"
            )
        return self


STAGE_CONFIGS: dict[str, type[StageConfig]] = {
    "sft": SftConfig,
    "pretrain": PretrainConfig,
    "reward": RewardConfig,
    "dpo": DpoConfig,
    "kto": KtoConfig,
    "rejection_sampling": RejectionSamplingConfig,
    "ppo": PpoConfig,
}


# ----------------------------------------------------------------------------------------------------------------
# Loading, overrides, errors


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.max_steps=20)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a block")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# Names users bring from HF TrainingArguments / LLaMA-Factory / TRL, mapped to ours for "did you mean".
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "num_train_epochs": "epochs",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "max_grad_norm": "max_grad_norm",
    "lr_scheduler_type": "name",
    "cutoff_len": "max_length",
    "max_seq_length": "max_length",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target": "target_modules",
    "finetuning_type": "method",
    "save_steps": "every",
    "save_total_limit": "keep",
    "model_name_or_path": "path",
    "dataset": "train",
}


def _suggest(key: str, valid: list[str]) -> str | None:
    if FAMILIAR_NAMES.get(key) in valid:
        return FAMILIAR_NAMES[key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def _block_at(cls: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that holds the field at ``loc`` (for suggestions)."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *get_args(annotation)] if get_origin(annotation) else [annotation]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        cls = nested[0]
    return cls


def _explain(error: ValidationError, cls: type[BaseModel], source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            parent = _block_at(cls, loc[:-1])
            valid = list(parent.model_fields) if parent else []
            close = _suggest(str(loc[-1]), valid)
            prefix = ".".join(str(p) for p in loc[:-1])
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close}?" if close else ""
            lines.append(f"  unknown key {dotted}{hint} (valid here: {', '.join(valid)})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            given = item.get("input")
            shown = "" if isinstance(given, dict) or given is None else f" (got {given!r})"
            lines.append(f"  {dotted}: {message}{shown}")
    return "\n".join(lines)


def build_config(raw: dict[str, Any], source: str = "config", without_data: bool = False) -> StageConfig:
    """Validate a raw dict into the config class of its ``stage``; ``without_data``: ``data.train`` may be empty
    (a memory plan, which reads no data)."""
    stage = raw.get("stage")
    if stage not in STAGE_CONFIGS:
        close = difflib.get_close_matches(str(stage), list(STAGE_CONFIGS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"invalid config ({source}): stage {stage!r} is not one of {sorted(STAGE_CONFIGS)}{hint}")
    cls = STAGE_CONFIGS[stage]
    try:
        return cls.model_validate(raw, context={"without_data": without_data})
    except ValidationError as error:
        raise ConfigError(_explain(error, cls, source)) from None


def read_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty: ``{}``); ConfigError naming the file otherwise."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return loaded or {}


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, without_data: bool = False
) -> StageConfig:
    """Read a YAML config, apply dotted overrides, validate (``build_config``). Raises ConfigError with a readable
    message."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(path)
    if overrides:
        raw = deep_merge(raw, parse_overrides(overrides))
    return build_config(raw, source, without_data)


def save_config(config: StageConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


def describe_fields(cls: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf field, for --help-config."""
    rows: list[tuple[str, str, str, str]] = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, key + "."))
            continue
        type_name = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        default = field.get_default(call_default_factory=True)
        rows.append((key, type_name, repr(default), (field.description or "").replace("\n", " ")))
    return rows
