"""posttrain estimate: the literature's figures from config files alone, and predictions against live tensors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain import estimate
from posttrain.cli import main
from posttrain.config import StageConfig, build_config

LLAMA_2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
)
LLAMA_2_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    max_position_embeddings=512,
)


def config_dir(tmp_path: Path, name: str, **shape: int) -> Path:
    """A model directory holding only config.json (no weights: the plan must not need them)."""
    directory = tmp_path / name
    LlamaConfig(**shape).save_pretrained(directory)
    return directory


def stage(model_dir: Path, stage_name: str = "sft", **blocks: dict) -> StageConfig:
    raw: dict = {"stage": stage_name, "model": {"path": str(model_dir)}, "data": {"train": "unused.jsonl"}}
    for block, values in blocks.items():
        raw[block] = {**raw.get(block, {}), **values}
    return build_config(raw)


def model_states(plan: estimate.MemoryPlan) -> float:
    return sum(plan.lines[name].bytes for name in ("weights", "gradients", "optimizer"))


@pytest.mark.parametrize(("zero_stage", "expected_gb"), [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_example(tmp_path: Path, zero_stage: int, expected_gb: float) -> None:
    """ZeRO paper, section 3 / figure 1: 7.5B parameters, N=64, mixed-precision Adam (2 + 2 + 12 bytes a
    parameter): 120 GB replicated; 4Ψ + 12Ψ/64 = 31.4; 2Ψ + 14Ψ/64 = 16.6; 16Ψ/64 = 1.9 GB."""
    assert round(estimate.zero_model_states(7.5e9, 64, zero_stage) / 1e9, 1) == expected_gb
    # The plan of a real config at the same strategy prices its own parameters with the same formula.
    model = config_dir(tmp_path, "llama7b", **LLAMA_2_7B)
    config = stage(
        model,
        train={"precision": "bf16"},
        distributed={"strategy": "deepspeed", "zero_stage": zero_stage},
    )
    counts, _ = estimate.count_parameters(config)
    plan = estimate.plan_memory(config, devices=64)
    assert model_states(plan) == pytest.approx(estimate.zero_model_states(counts.trainable, 64, zero_stage))


def test_llama2_7b_kv_cache_from_config_alone(tmp_path: Path) -> None:
    """2 (k, v) x 32 layers x 32 kv heads x 128 head_dim x 2048 tokens x 1 sequence x 2 bytes = 1.07 GB."""
    model = config_dir(tmp_path, "llama7b", **LLAMA_2_7B)
    config = stage(
        model,
        "rejection_sampling",
        model={"dtype": "float16"},
        data={"max_length": 2048},
        sampling={"batch_size": 1, "max_new_tokens": 512},
    )
    plan = estimate.plan_memory(config)
    assert round(plan.lines["kv_cache"].bytes / 1e9, 2) == 1.07
    assert estimate.count_parameters(config)[0].trainable == 6_738_415_616  # Llama-2-7B's published count


def test_70b_plan_from_config_alone(tmp_path: Path) -> None:
    """A 70B plan is built on the meta device: parameters counted, ZeRO-3 over 8 devices shards the states."""
    model = config_dir(tmp_path, "llama70b", **LLAMA_2_70B)
    config = stage(model, train={"precision": "bf16"}, distributed={"strategy": "deepspeed", "zero_stage": 3})
    counts, _ = estimate.count_parameters(config)
    assert counts.trainable == 68_976_648_192  # Llama-2-70B
    plan = estimate.plan_memory(config, devices=8)
    assert model_states(plan) == pytest.approx(16 * counts.trainable / 8)
    assert plan.lines["activations"].bytes > 0 and plan.lines["logits"].bytes > 0


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny") / "model"
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("method", ["lora", "dora", "prompt_tuning", "freeze"])
def test_adapter_counts_equal_peft_on_a_real_model(tiny_model: Path, method: str) -> None:
    from posttrain.config import PeftConfig
    from posttrain.models.adapters import attach_adapter, count_parameters

    peft_block: dict = {"method": method, "r": 4}
    if method == "freeze":
        peft_block["freeze_last_n_layers"] = 1
    data = {"packing": False} if method == "prompt_tuning" else {}
    config = stage(tiny_model, peft=peft_block, data=data)
    real = attach_adapter(LlamaForCausalLM.from_pretrained(tiny_model), PeftConfig(**peft_block))
    trainable, total = count_parameters(real)
    counts, _ = estimate.count_parameters(config)
    assert (counts.trainable, counts.trainable + counts.frozen) == (trainable, total)
    full = estimate.plan_memory(stage(tiny_model))
    adapted = estimate.plan_memory(config)
    assert adapted.lines["gradients"].bytes == 4 * trainable < full.lines["gradients"].bytes


def live_bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize(("method", "optimizer"), [("full", "adamw"), ("lora", "adamw"), ("full", "sgd")])
def test_model_states_equal_live_tensors_after_one_step(tiny_model: Path, method: str, optimizer: str) -> None:
    from posttrain.config import OptimConfig, PeftConfig
    from posttrain.models.adapters import attach_adapter
    from posttrain.runtime.optim import build_optimizer

    config = stage(tiny_model, peft={"method": method}, optim={"name": optimizer})
    model = attach_adapter(LlamaForCausalLM.from_pretrained(tiny_model), PeftConfig(method=method))
    optim = build_optimizer(model.parameters(), OptimConfig(name=optimizer))
    ids = torch.randint(0, TINY["vocab_size"], (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optim.step()
    parameters = list({id(p): p for p in model.parameters()}.values())
    gradients = [p.grad for p in parameters if p.grad is not None]
    states = [v for state in optim.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    plan = estimate.plan_memory(config)
    assert plan.lines["weights"].bytes == live_bytes(parameters)
    assert plan.lines["gradients"].bytes == live_bytes(gradients)
    assert plan.lines["optimizer"].bytes == live_bytes(states)


def saved_for_backward(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves during one forward."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in parameter_storages:
            storages[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids)
    return sum(storages.values())


@pytest.mark.parametrize(
    ("attn", "method", "precision"),
    [
        ("sdpa", "full", "fp32"),
        ("eager", "full", "fp32"),
        ("sdpa", "lora", "fp32"),
        ("sdpa", "prompt_tuning", "fp32"),
        ("sdpa", "full", "bf16"),
    ],
)
@pytest.mark.parametrize(("batch", "seq"), [(1, 64), (2, 256)])
def test_activations_match_bytes_saved_for_backward(
    tiny_model: Path, attn: str, method: str, precision: str, batch: int, seq: int
) -> None:
    """Eager's (heads, seq, seq) probabilities grow with seq^2, sdpa's do not; LoRA's frozen base saves less
    (no norm outputs for frozen weights) plus its A outputs and dropout; bf16 autocast saves a bf16 cast per
    matmul input and the cast weights (which the plan counts in its overhead: 2 bytes a parameter)."""
    from posttrain.config import PeftConfig
    from posttrain.models.adapters import attach_adapter

    peft = {"method": method, "dropout": 0.1} if method == "lora" else {"method": method}
    config = stage(
        tiny_model,
        model={"attn_implementation": attn},
        data={"max_length": seq, "packing": method != "prompt_tuning"},
        train={"batch_size": batch, "precision": precision},
        peft=peft,
    )
    base = LlamaForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    model = attach_adapter(base, PeftConfig(**peft)).train()
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        measured = saved_for_backward(model, ids)
    predicted = estimate.plan_memory(config).lines["activations"].bytes
    if precision == "bf16":
        counts, _ = estimate.count_parameters(config)
        predicted += 2 * counts.trainable  # autocast's cached casts: trainable weights only
    assert predicted == pytest.approx(measured, rel=0.15)


@pytest.mark.parametrize(("batch", "seq"), [(1, 64), (2, 256)])
def test_checkpointed_activations_match_bytes_saved_for_backward(tiny_model: Path, batch: int, seq: int) -> None:
    """Under gradient checkpointing the forward keeps each layer's input; the plan adds one layer's activations,
    alive only while the backward recomputes it, which the forward's saved bytes do not hold."""
    config = stage(
        tiny_model, model={"gradient_checkpointing": True}, data={"max_length": seq}, train={"batch_size": batch}
    )
    model = LlamaForCausalLM.from_pretrained(tiny_model).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    measured = saved_for_backward(model, torch.randint(0, TINY["vocab_size"], (batch, seq)))
    _, architecture = estimate.count_parameters(config)
    recomputed_layer, _ = estimate.layer_activation_bytes(
        architecture, seq, "sdpa", estimate.activation_dtypes(config)
    )
    predicted = estimate.plan_memory(config).lines["activations"].bytes - batch * seq * recomputed_layer
    assert predicted == pytest.approx(measured, rel=0.15)


def test_checkpointing_and_sharding_shrink_the_plan(tiny_model: Path) -> None:
    base = estimate.plan_memory(stage(tiny_model), devices=4)
    checkpointed = estimate.plan_memory(stage(tiny_model, model={"gradient_checkpointing": True}), devices=4)
    assert checkpointed.lines["activations"].bytes < base.lines["activations"].bytes
    fsdp = estimate.plan_memory(stage(tiny_model, distributed={"strategy": "fsdp"}), devices=4)
    for name in ("weights", "gradients", "optimizer"):
        assert fsdp.lines[name].bytes == pytest.approx(base.lines[name].bytes / 4, rel=0.01)
    offloaded = estimate.plan_memory(
        stage(tiny_model, distributed={"strategy": "deepspeed", "zero_stage": 2, "offload": "optimizer"}), devices=4
    )
    assert offloaded.lines["optimizer"].bytes == 0 and offloaded.notes


def test_ppo_counts_critic_reference_and_kv_cache(tiny_model: Path) -> None:
    gae = estimate.plan_memory(stage(tiny_model, "ppo", algorithm={"advantage": "gae"}))
    grpo = estimate.plan_memory(
        stage(tiny_model, "ppo", algorithm={"advantage": "grpo", "kl_coef": 0.0}, sampling={"num_samples": 4})
    )
    critic_and_reference = gae.lines["other_models"].bytes
    policy_states = model_states(gae)
    reference = gae.lines["weights"].bytes
    assert critic_and_reference > policy_states + reference  # critic states and activations, a frozen copy
    assert grpo.lines["other_models"].bytes == 0
    assert gae.lines["kv_cache"].bytes > 0


def test_advice_switches_until_it_fits(tmp_path: Path) -> None:
    model = config_dir(tmp_path, "llama7b", **LLAMA_2_7B)
    config = stage(model, train={"batch_size": 8, "grad_accum": 64})
    advice = estimate.advise(config, devices=8, device_gib=80)
    assert not advice.fits
    totals = [switch.total for switch in advice.switches]
    assert totals == sorted(totals, reverse=True) and totals[-1] <= advice.budget < totals[0]
    assert advice.switches[0].overrides == ("train.precision=bf16",)
    # The largest micro-batch is a boundary: it fits and one more does not, with the switches applied.
    switched = config
    for switch in advice.switches:
        switched = estimate.with_overrides(switched, list(switch.overrides))
    micro = advice.largest_micro_batch
    assert micro is not None and micro < 8 * 64 and advice.grad_accum_for_it == math.ceil(8 * 64 / micro)
    fits = estimate.plan_memory(estimate.with_overrides(switched, [f"train.batch_size={micro}"]), 8).peak
    over = estimate.plan_memory(estimate.with_overrides(switched, [f"train.batch_size={micro + 1}"]), 8).peak
    assert fits <= advice.budget < over


def test_cli_json_and_bad_input(tiny_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["estimate", "sft", f"model.path={tiny_model}", "data.train=x.jsonl", "--gpus", "2", "--json"]
    assert main([*argv, "--gpu-mem", "1"]) == 0
    printed = json.loads(capsys.readouterr().out)
    per_device = printed["per_device"]
    assert set(per_device) == {*estimate.COMPONENTS, "total"}
    # The peak: what stays, plus the largest of what never coexists (grad_accum 1: no gradients carried).
    d = per_device
    resident = d["weights"] + d["optimizer"] + d["other_models"] + d["overhead"]
    assert d["total"] == pytest.approx(
        resident + max(d["activations"] + d["logits"], d["gradients"], d["kv_cache"]), abs=8
    )
    assert printed["advice"]["fits"] is True
    assert main(["estimate", "sft", "model.path=/nonexistent", "data.train=x.jsonl"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "/nonexistent" in error and "\n" not in error
    assert main(["estimate", "sft", f"model.path={tiny_model}", "data.train=x.jsonl", "--gpu-mem", "-1"]) == 2


SHIPPED_STAGE_CONFIGS = sorted(
    path for path in (Path(__file__).parents[1] / "posttrain" / "configs").glob("*.yaml") if "demo" not in path.stem
)


@pytest.mark.parametrize("config_file", SHIPPED_STAGE_CONFIGS, ids=lambda path: path.stem)
def test_every_shipped_config_has_a_plan(
    tiny_model: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every stage and adapter the configs ship is priced: model states from peft's counts, a positive total."""
    overrides = [f"model.path={tiny_model}", "data.train=unused.jsonl"]
    assert main(["estimate", str(config_file), *overrides, "--json", "--explain"]) == 0
    per_device = json.loads(capsys.readouterr().out)["per_device"]
    assert per_device["weights"] > 0 and per_device["activations"] > 0
    assert 0 < per_device["gradients"] <= per_device["weights"]
