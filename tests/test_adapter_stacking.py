"""A stage started from an adapter run keeps that adapter: the incoming LoRA/DoRA is merged into the weights it was
trained on, the new adapter goes on top, the reference is the incoming model (new adapter off), and every later
reader (export, chat, reward scoring) walks the chain back to the base.

The failure this guards against: transformers' ``from_pretrained`` on an adapter directory names the adapter
``default``, and peft's ``get_peft_model`` then re-initialised an adapter of that name, so DPO/PPO-LoRA on an
SFT-LoRA run trained the base model against the base model (policy and reference logits equal to the base's,
0.126 away from the SFT model's), with no error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO, sft_config
from torch.testing import assert_close

from posttrain.cli import main
from posttrain.config import ModelConfig, PeftConfig, build_config
from posttrain.data.packing import collate, single_rows
from posttrain.data.reader import read_conversations
from posttrain.data.tokenize import tokenize_conversation
from posttrain.models import load_model, token_logits
from posttrain.models.forward import reference_model
from posttrain.models.loading import ModelLoadError, load_for_inference, load_weights


def _save_adapter(base_dir: Path, out: Path, method: str = "lora", task: str = "CAUSAL_LM", seed: int = 1) -> Path:
    """An adapter over ``base_dir`` whose B matrices (DoRA: and magnitudes) are random, so it visibly changes the
    model, saved with the tokenizer as a stage would."""
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules="all-linear", use_dora=method == "dora")
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def _batch(toy, tokenizer, n: int = 4) -> dict[str, torch.Tensor]:
    sequences = [tokenize_conversation(tokenizer, c, 64) for c in read_conversations(toy.sft)[:n]]
    return collate(single_rows(sequences), tokenizer.pad_token_id, packed=False)


def _merged_sft(base_dir: Path, adapter_dir: Path) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="module")
def sft_adapter(micro_model, tmp_path_factory) -> Path:
    return _save_adapter(micro_model, tmp_path_factory.mktemp("sft_lora") / "model")


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("new_method", ["lora", "full"])
def test_next_stage_starts_from_the_adapter_and_references_it(toy, micro_model, tmp_path, method, new_method) -> None:
    adapter_dir = _save_adapter(micro_model, tmp_path / "sft" / "model", method=method)
    sft_model = _merged_sft(micro_model, adapter_dir)
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32).eval()
    policy, tokenizer = load_model(ModelConfig(path=str(tmp_path / "sft")), PeftConfig(method=new_method, r=4))
    policy.eval()
    batch = _batch(toy, tokenizer)
    with torch.no_grad():
        expected = token_logits(sft_model, batch)
        assert not torch.allclose(expected, token_logits(base_model, batch), atol=1e-2), "the adapter must matter"
        assert_close(token_logits(policy, batch), expected, rtol=0, atol=1e-5)
        with reference_model(policy) as reference:
            assert_close(token_logits(reference, batch), expected, rtol=0, atol=1e-5)
    if new_method == "lora":
        # The new adapter records the incoming adapter as its base, so the chain can be walked back.
        assert policy.peft_config["default"].base_model_name_or_path == str(adapter_dir)


def test_reward_model_from_an_adapter_run_reads_the_adapted_backbone(toy, micro_model, sft_adapter) -> None:
    scorer, tokenizer = load_model(
        ModelConfig(path=str(sft_adapter)), PeftConfig(method="lora", r=4), scalar_head=True
    )
    sft_model = _merged_sft(micro_model, sft_adapter)
    batch = _batch(toy, tokenizer)
    inner = scorer.model.get_base_model()
    with torch.no_grad(), scorer.model.disable_adapter():
        hidden = inner.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        expected = sft_model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    assert_close(hidden, expected, rtol=0, atol=1e-5)


def test_an_adapter_chain_loads_back_to_the_base(toy, micro_model, tmp_path) -> None:
    """SFT-LoRA → DPO-LoRA → PPO-LoRA: each adapter was trained on the merge of the ones before it."""
    first = _save_adapter(micro_model, tmp_path / "a" / "model", seed=1)
    policy, tokenizer = load_model(ModelConfig(path=str(first)), PeftConfig(method="lora", r=4))
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
    policy.save_pretrained(tmp_path / "b" / "model")
    tokenizer.save_pretrained(tmp_path / "b" / "model")
    policy.eval()
    batch = _batch(toy, tokenizer)
    with torch.no_grad():
        expected = token_logits(policy, batch)
        loaded, _ = load_for_inference(tmp_path / "b")
        assert_close(token_logits(loaded, batch), expected, rtol=0, atol=1e-5)
        with reference_model(policy) as reference:
            assert not torch.allclose(token_logits(reference, batch), expected, atol=1e-2), (
                "the second adapter must matter"
            )
    assert main(["export", str(tmp_path / "b"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert_close(token_logits(exported, batch), expected, rtol=0, atol=1e-5)


def test_a_prompt_learning_adapter_is_refused_as_input(toy, micro_model, tmp_path, capsys) -> None:
    config = sft_config(
        micro_model, toy.sft, tmp_path / "pt", peft__method="prompt_tuning", data__packing=False, train__max_steps=1
    )
    from posttrain.recipes import sft

    sft.run(config)
    with pytest.raises(ModelLoadError, match="PROMPT_TUNING adapter: its virtual tokens cannot be merged"):
        load_model(ModelConfig(path=str(tmp_path / "pt")), PeftConfig(method="lora"))
    # Inference keeps it attached.
    model, _ = load_for_inference(tmp_path / "pt")
    assert model.active_peft_config.is_prompt_learning
    code = main(
        [
            "train",
            str(REPO / "configs" / "dpo.yaml"),
            f"model.path={tmp_path / 'pt'}",
            f"data.train={toy.prefs}",
            f"output_dir={tmp_path / 'dpo'}",
            "peft.method=lora",
        ]
    )
    assert code == 2
    assert "cannot be merged" in capsys.readouterr().err


STAGES = {
    "sft": lambda toy: {"data": {"train": str(toy.sft), "max_length": 128}},
    "dpo": lambda toy: {"data": {"train": str(toy.prefs), "max_length": 128}},
    "kto": lambda toy: {"data": {"train": str(toy.prefs), "max_length": 128}},
    "reward": lambda toy: {"data": {"train": str(toy.prefs), "max_length": 128}},
    "ppo": lambda toy: {
        "data": {"train": str(toy.prompts), "max_length": 128},
        "algorithm": {"advantage": "grpo", "prompts_per_step": 2, "kl_mode": "loss", "kl_estimator": "k3"},
        "sampling": {"num_samples": 2, "max_new_tokens": 4},
        "reward": {"function": "toy"},
    },
    "rejection_sampling": lambda toy: {
        "data": {"train": str(toy.prompts), "max_length": 128},
        "sampling": {"num_samples": 2, "max_new_tokens": 4, "max_prompts": 4},
        "reward": {"function": "toy"},
        "rejection": {"require_finished": False},
    },
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_on_an_adapter_run_keeps_it_through_export(toy, micro_model, sft_adapter, tmp_path, stage) -> None:
    """Each stage with LoRA on the SFT-LoRA run, at a learning rate too small to move anything: the exported model
    must be the SFT model (the chain merged), not the base. A reward run exports a scorer whose backbone is the
    SFT model's."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from posttrain.recipes import RECIPES

    raw = {
        "stage": stage,
        "output_dir": str(tmp_path / stage),
        "model": {"path": str(sft_adapter)},
        "peft": {"method": "lora", "r": 4},
        "train": {"max_steps": 1, "batch_size": 2},
        "optim": {"lr": 1e-12, "name": "sgd"},
        "schedule": {"name": "constant"},
        "checkpoint": {"every": None},
        "logging": {"progress": False, "tensorboard": False, "report": False},
    } | STAGES[stage](toy)
    RECIPES[stage](build_config(raw))
    assert main(["export", str(tmp_path / stage), "--merge", "--out", str(tmp_path / "merged")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = _batch(toy, tokenizer)
    sft_model = _merged_sft(micro_model, sft_adapter)
    base_model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32).eval()
    with torch.no_grad():
        if stage == "reward":
            exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
            assert exported.config.num_labels == 1
            hidden = exported.model(input_ids=batch["input_ids"]).last_hidden_state
            assert_close(hidden, sft_model.model(input_ids=batch["input_ids"]).last_hidden_state, rtol=0, atol=1e-4)
            assert not torch.allclose(
                hidden, base_model.model(input_ids=batch["input_ids"]).last_hidden_state, atol=1e-2
            )
            return
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        logits = token_logits(exported, batch)
        assert_close(logits, token_logits(sft_model, batch), rtol=0, atol=1e-4)
        assert not torch.allclose(logits, token_logits(base_model, batch), atol=1e-2)


def test_load_weights_refuses_a_missing_base_in_one_line(tmp_path, micro_model) -> None:
    adapter_dir = _save_adapter(micro_model, tmp_path / "a")
    config = (adapter_dir / "adapter_config.json").read_text()
    (adapter_dir / "adapter_config.json").write_text(config.replace(str(micro_model), str(tmp_path / "gone")))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_weights(adapter_dir)
