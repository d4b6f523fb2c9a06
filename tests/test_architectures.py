"""Every common decoder architecture through every stage, on random-init small models built from the real
transformers configs (saved, then loaded through ``from_pretrained`` on the directory as a user's model would be).

Each architecture brings something the toy Llama does not: tied embeddings and qkv bias (Qwen2), q/k norm (Qwen3,
OLMo 2), sliding-window attention (Mistral, Gemma 2/3), logit soft-capping, embedding scaling and an attention that
sdpa cannot run (Gemma 2), fused qkv / gate-up projections (Phi-3), parallel blocks and dropout (Phi-2), Conv1D
projections, learned positions and dropout (GPT-2), logit_scale (Cohere) and logits_scaling (Granite), and no
sequence-classification class of their own (Cohere, Granite). What is asserted, per architecture:

- packed rows give the padded rows' log-probs (the attention implementation chosen for it keeps sequences apart);
- LoRA's ``all-linear`` wraps every projection of every decoder layer (Conv1D included);
- the shared critic's logits are the model's own (post-processing included), bit for bit;
- before the first update DPO's implicit rewards and KTO's are exactly 0, and PPO's ratio is exactly 1 with
  old == reference log-probs (KL 0), with a separate and a shared critic and for GRPO: this fails for a policy
  whose dropout is on or whose logits skip the architecture's post-processing;
- SFT (full, LoRA, prompt tuning) trains what it should; a LoRA run exports to a merged model with the adapter
  model's logits, a LoRA reward model to a sequence-classification model with the run's scores, and ``chat``
  answers greedily what transformers' ``generate`` answers.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import generate_responses
from torch.testing import assert_close

from posttrain.config import ModelConfig, PeftConfig, build_config
from posttrain.data.packing import collate, pack_rows, single_rows
from posttrain.data.reader import read_conversations
from posttrain.data.tokenize import tokenize_conversation
from posttrain.models import load_model, token_logits
from posttrain.models.actor_critic import ActorCritic

SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
# name: (transformers config class, what differs from SMALL)
ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"num_key_value_heads": 2}),
    "qwen2": ("Qwen2Config", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"num_key_value_heads": 2, "head_dim": 8}),
    "mistral": ("MistralConfig", {"num_key_value_heads": 2, "sliding_window": 8}),
    "gemma2": (
        "Gemma2Config",
        {
            "num_key_value_heads": 2,
            "head_dim": 8,
            "sliding_window": 8,
            "final_logit_softcapping": 2.0,
            "attn_logit_softcapping": 20.0,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 8, "final_logit_softcapping": 2.0},
    ),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4}),
    "phi2": ("PhiConfig", {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attention_dropout": 0.1}),
    "gpt2": ("GPT2Config", {}),
    "olmo2": ("Olmo2Config", {"num_key_value_heads": 2}),
    "cohere": ("CohereConfig", {"num_key_value_heads": 2, "logit_scale": 0.0625}),
    "granite": ("GraniteConfig", {"num_key_value_heads": 2, "logits_scaling": 4.0, "embedding_multiplier": 2.0}),
}
NAMES = list(ARCHITECTURES)


@cache
def _root() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="posttrain-archs-"))


def model_dir(name: str, tokenizer_dir: Path) -> Path:
    """The architecture ``name`` at small size with the toy tokenizer, saved once per session."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _root() / name
    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    class_name, extra = ARCHITECTURES[name]
    sizes = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256} if name == "gpt2" else {**SMALL, **extra}
    config = getattr(transformers, class_name)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(params=NAMES)
def arch(request, toy) -> tuple[str, Path]:
    return request.param, model_dir(request.param, toy.model)


@pytest.fixture(scope="module")
def data(toy, tmp_path_factory) -> dict[str, Path]:
    """The first rows of the toy kit's files: a stage's first steps see nothing more, and the reference pass of
    DPO/KTO covers the whole file."""
    out = tmp_path_factory.mktemp("arch-data")
    files = {"sft": toy.sft, "dpo": toy.prefs, "kto": toy.prefs, "reward": toy.prefs, "ppo": toy.prompts}
    for stage, source in files.items():
        (out / f"{stage}.jsonl").write_text(
            "".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:8]), encoding="utf-8"
        )
    return {stage: out / f"{stage}.jsonl" for stage in files}


def _sequences(toy, tokenizer, n: int = 6) -> list:
    return [tokenize_conversation(tokenizer, c, 96) for c in read_conversations(toy.sft)[:n]]


def test_packed_rows_give_the_padded_log_probs(arch, toy) -> None:
    name, path = arch
    model, tokenizer = load_model(ModelConfig(path=str(path)))
    model.eval()
    sequences = _sequences(toy, tokenizer)
    padded = collate(single_rows(sequences), tokenizer.pad_token_id, packed=False)
    packed = collate(pack_rows(sequences, max_length=512, seed=0), tokenizer.pad_token_id, packed=True)
    assert packed["input_ids"].shape[0] < len(sequences), "the sequences must share rows"
    with torch.no_grad():
        padded_logps = _target_logps(model, padded)
        packed_logps = _target_logps(model, packed)
    assert_close(torch.sort(packed_logps).values, torch.sort(padded_logps).values, rtol=1e-5, atol=1e-5)


def _target_logps(model, batch) -> torch.Tensor:
    keep = batch["targets"] != -100
    logits = token_logits(model, batch)
    return torch.log_softmax(logits.float(), -1).gather(-1, batch["targets"][keep].unsqueeze(-1)).squeeze(-1)


def test_lora_wraps_every_projection_of_every_layer(arch) -> None:
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    name, path = arch
    model, _ = load_model(ModelConfig(path=str(path)), PeftConfig(method="lora", r=2))
    wrapped, bare = set(), []
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            wrapped.add(module_name)
        elif isinstance(module, (torch.nn.Linear, Conv1D)) and (
            ".layers." in module_name or ".h." in module_name
        ):  # decoder layers (GPT-2: h)
            if not any(module_name.startswith(w + ".") for w in wrapped) and "lora_" not in module_name:
                bare.append(module_name)
    assert wrapped, f"{name}: LoRA found no target module"
    assert not bare, f"{name}: projections without LoRA: {bare}"
    per_layer = {
        w.split(".layers.")[-1].split(".h.")[-1].split(".", 1)[1] for w in wrapped if ".layers." in w or ".h." in w
    }
    assert len(per_layer) >= 3, f"{name}: attention and MLP projections expected, got {sorted(per_layer)}"


def test_the_shared_critic_reads_the_models_own_logits(arch, toy) -> None:
    name, path = arch
    policy, tokenizer = load_model(ModelConfig(path=str(path)), PeftConfig(method="lora", r=2))
    module = ActorCritic(policy, shared_value_head=True).eval()
    batch = collate(single_rows(_sequences(toy, tokenizer, 3)), tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        logits, values = module(batch["input_ids"], batch["attention_mask"], batch["targets"])
        assert torch.equal(logits, token_logits(policy, batch))
        assert values is not None and values.shape == logits.shape[:1]


def _run(stage: str, path: Path, out: Path, files: dict[str, Path], **blocks: dict[str, Any]) -> list[dict[str, Any]]:
    from posttrain.recipes import RECIPES

    raw: dict[str, Any] = {
        "stage": stage,
        "output_dir": str(out),
        "model": {"path": str(path)},
        "data": {"train": str(files[stage]), "max_length": 96},
        "train": {"max_steps": 2, "batch_size": 2},
        "optim": {"lr": 1e-2},
        "schedule": {"name": "constant"},
        "checkpoint": {"every": None},
        "logging": {"progress": False, "tensorboard": False, "report": False},
    }
    for block, values in blocks.items():
        raw[block] = {**raw.get(block, {}), **values}
    RECIPES[stage](build_config(raw))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step"' in line]


def test_preference_stages_start_at_the_reference(arch, data, tmp_path) -> None:
    """Implicit rewards are log-ratios to the reference: before any update they are exactly 0."""
    name, path = arch
    dpo = _run("dpo", path, tmp_path / "dpo", data, peft={"method": "lora", "r": 2})
    # Not bitwise: the reference pass lays the pairs out in other rows than the first step (float32 summation
    # order, ~1e-7 of these ~20-nat log-probs); a policy that is not the reference is off by 1e-2 or more.
    first = {k: dpo[0][k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margin")}
    assert all(abs(v) < 1e-5 for v in first.values()), f"{name}: DPO rewards before any update: {first}"
    assert dpo[-1]["rewards/margin"] != 0.0, f"{name}: DPO did not move the policy"
    kto = _run("kto", path, tmp_path / "kto", data, peft={"method": "full"}, optim={"lr": 1e-3})
    first = {k: v for k, v in kto[0].items() if k.startswith("rewards/")}
    assert first and all(abs(v) < 1e-5 for v in first.values()), f"{name}: KTO rewards before any update: {first}"


@pytest.mark.parametrize("variant", ["gae_separate", "gae_shared", "grpo"])
def test_online_rl_ratio_is_one_before_the_first_update(arch, data, tmp_path, variant) -> None:
    """One update from one rollout: its ratio is new/old log-probs of unchanged weights, so exactly 1 (no clipping,
    approx-KL 0), and the old log-probs equal the reference's (KL 0). GRPO with the KL in the reward takes its old
    log-probs from a separate pass too, like PPO."""
    name, path = arch
    algorithm = {"advantage": "grpo" if variant == "grpo" else "gae", "prompts_per_step": 2}
    first = _run(
        "ppo",
        path,
        tmp_path / variant,
        data,
        peft={"method": "lora", "r": 2},
        algorithm=algorithm,
        sampling={"num_samples": 2, "max_new_tokens": 4},
        reward={"function": "toy"},
        critic={"shared": variant == "gae_shared"},
        train={"max_steps": 1, "batch_size": 4},
    )[0]
    assert first["kl"] == 0.0, f"{name}: old and reference log-probs differ before any update"
    assert first["approx_kl"] == 0.0 and first["clip_fraction"] == 0.0, f"{name}: ratio != 1 before an update: {first}"


def test_sft_methods_chat_and_export(arch, toy, data, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.cli import main
    from posttrain.rollout.hf import SamplingSettings
    from posttrain.serve.chat import load_session

    name, path = arch
    full = _run("sft", path, tmp_path / "full", data, optim={"lr": 3e-3}, train={"max_steps": 4, "batch_size": 4})
    assert full[-1]["loss"] < full[0]["loss"], f"{name}: full SFT did not lower the loss"
    prompt = _run(
        "sft",
        path,
        tmp_path / "prompt",
        data,
        peft={"method": "prompt_tuning", "num_virtual_tokens": 2},
        data={"packing": False},
    )
    assert all(r["loss"] == r["loss"] for r in prompt)
    _run("sft", path, tmp_path / "lora", data, peft={"method": "lora", "r": 2}, train={"max_steps": 3})

    assert main(["export", str(tmp_path / "lora"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    tokenizer_batch = collate(
        single_rows(_sequences(toy, load_session(tmp_path / "lora").tokenizer, 3)), 0, packed=False
    )
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "lora" / "model").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = token_logits(adapted, tokenizer_batch)
        assert_close(token_logits(merged, tokenizer_batch), expected, rtol=1e-4, atol=1e-4)
        with adapted.disable_adapter():
            assert not torch.allclose(token_logits(adapted, tokenizer_batch), expected, atol=1e-3), (
                "the adapter learned nothing"
            )

    # chat answers with transformers' generate; online RL and rejection sampling with posttrain's own decoding
    # loop (rows leave the batch, shared prompt cache): greedy, both must give the same reply on every architecture.
    session = load_session(tmp_path / "lora", settings=SamplingSettings(max_new_tokens=8))
    question = read_conversations(toy.sft)[0][0]["content"]
    reply = session.generate_reply(question)
    assert (
        reply
        == generate_responses(
            session.model, session.tokenizer, [[{"role": "user", "content": question}]], max_new_tokens=8
        )[0]
    )


def test_reward_model_trains_and_exports_as_a_scorer(arch, toy, data, tmp_path) -> None:
    from posttrain.cli import main
    from posttrain.eval.reward_model import RewardScorer
    from posttrain.models.loading import load_weights

    name, path = arch
    rows = _run("reward", path, tmp_path / "rm", data, peft={"method": "lora", "r": 2})
    assert rows[0]["loss"] == rows[0]["loss"]
    assert main(["export", str(tmp_path / "rm"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    exported = load_weights(tmp_path / "merged", "SEQ_CLS").eval()
    assert exported.config.num_labels == 1
    scorer = RewardScorer(tmp_path / "rm", device="cpu")
    conversations = [c for c in read_conversations(toy.sft)[:3]]
    expected = scorer.score(conversations)
    ids = [tokenize_conversation(scorer.tokenizer, c, 1 << 30).input_ids for c in conversations]
    with torch.no_grad():
        got = [exported(torch.tensor([row])).logits[0, 0].item() for row in ids]
    assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_dropout_follows_the_stage_default(toy) -> None:
    """SFT keeps the model's dropout; the stages that compare two passes of one model turn it off (LoRA's too),
    whatever mode a later ``train()``/``eval()`` call leaves the model in; ``model.dropout=true`` turns it back on,
    except for PPO, where it would make the ratio differ from 1 with no update."""
    from posttrain.config import ConfigError

    path = model_dir("gpt2", toy.model)

    def rates(stage: str, **model: Any) -> set[float]:
        config = build_config({"stage": stage, "model": {"path": str(path), **model}, "data": {"train": "x"}})
        loaded, _ = load_model(config.model, PeftConfig(method="lora", r=2, dropout=0.1))
        assert loaded.training
        loaded.train()
        return {m.p for m in loaded.modules() if isinstance(m, torch.nn.Dropout)}

    assert rates("sft") == {0.1}
    for stage in ("dpo", "kto", "reward", "ppo"):
        assert rates(stage) == {0.0}, stage
    assert rates("dpo", dropout=True) == {0.1}
    with pytest.raises((ConfigError, ValueError), match="dropout"):
        build_config({"stage": "ppo", "model": {"path": str(path), "dropout": True}, "data": {"train": "x"}})
