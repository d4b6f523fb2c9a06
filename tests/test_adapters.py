"""Adapters: LoRA B=0 is the base model; each method learns and changes only its own parameters; trainable
counts match peft's; merged export reproduces the adapter model; QLoRA without CUDA fails before loading."""

from __future__ import annotations

import pytest
import torch
from helpers import sft_config
from torch.testing import assert_close

from posttrain.cli import main
from posttrain.config import ModelConfig, PeftConfig
from posttrain.data.packing import collate, single_rows
from posttrain.data.reader import read_conversations
from posttrain.data.tokenize import tokenize_conversation
from posttrain.losses import IGNORE_INDEX, sft_loss
from posttrain.models import count_parameters, load_model, token_logits
from posttrain.models.loading import ModelLoadError
from posttrain.recipes import sft
from posttrain.runtime.optim import build_optimizer

METHODS = {
    "full": {},
    "lora": {"r": 4, "alpha": 8},
    "dora": {"r": 4, "alpha": 8},
    "prompt_tuning": {"num_virtual_tokens": 4},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "prefix": {"num_virtual_tokens": 4},
    "freeze": {"freeze_last_n_layers": 1},
}
LEARNING_RATES = {
    "full": 3e-3,
    "freeze": 3e-3,
    "lora": 1e-2,
    "dora": 1e-2,
    "prompt_tuning": 0.3,
    "p_tuning": 0.1,
    "prefix": 0.3,
}
# Required drop of the memorisation loss after 20 steps (nats). A 2-layer random model leaves a soft prompt
# little to steer, so prompt methods move it less; without training the loss does not move at all.
REQUIRED_DROP = {
    "full": 0.6,
    "freeze": 0.6,
    "lora": 0.6,
    "dora": 0.6,
    "prompt_tuning": 0.05,
    "p_tuning": 0.05,
    "prefix": 0.2,
}


def _memorisation_batch(toy, tokenizer, n: int = 4) -> dict[str, torch.Tensor]:
    sequences = [tokenize_conversation(tokenizer, c, 64) for c in read_conversations(toy.sft)[:n]]
    return collate(single_rows(sequences), tokenizer.pad_token_id, packed=False)


def _loss(model, batch) -> torch.Tensor:
    trained = batch["targets"][batch["targets"] != IGNORE_INDEX]
    return sft_loss(token_logits(model, batch), trained, trained.numel())[0]


def test_lora_with_b_zero_reproduces_base_logits(toy, micro_model) -> None:
    base, tokenizer = load_model(ModelConfig(path=str(micro_model)))
    adapted, _ = load_model(ModelConfig(path=str(micro_model)), PeftConfig(method="lora", r=4))
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)
    batch = _memorisation_batch(toy, tokenizer)
    with torch.no_grad():
        assert_close(token_logits(adapted, batch), token_logits(base, batch), rtol=0, atol=1e-6)
        # and a non-zero B does change them (the comparison above can fail)
        lora_b[0].fill_(0.1)
        assert not torch.allclose(token_logits(adapted, batch), token_logits(base, batch), atol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_learns_and_changes_only_its_parameters(toy, micro_model, method) -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model(ModelConfig(path=str(micro_model)), PeftConfig(method=method, **METHODS[method]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names and len(trainable_names) < len(before) or method == "full"

    trainable, total = count_parameters(model)
    if hasattr(model, "get_nb_trainable_parameters"):
        assert trainable == model.get_nb_trainable_parameters()[0]
    elif method == "freeze":
        last_layer = sum(p.numel() for n, p in model.named_parameters() if ".layers.1." in n)
        assert trainable == last_layer
    else:
        assert trainable == total == sum(p.numel() for p in model.parameters())

    batch = _memorisation_batch(toy, tokenizer)
    optimizer = build_optimizer(
        model.parameters(), sft_config(micro_model, toy.sft, "x", optim__lr=LEARNING_RATES[method]).optim
    )
    first = _loss(model, batch).item()
    for _ in range(20):
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    last = _loss(model, batch).item()
    assert first - last > REQUIRED_DROP[method], f"{method}: loss {first:.3f} -> {last:.3f}"

    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        if name in trainable_names:
            continue
        assert not changed, f"{method}: frozen parameter {name} changed"
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n in trainable_names)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_merged_equals_adapter_model(toy, micro_model, tmp_path, method) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = sft_config(
        micro_model, toy.sft, tmp_path / "run", peft__method=method, peft__r=4, optim__lr=1e-2, train__max_steps=3
    )
    sft.run(config)
    assert main(["export", str(tmp_path / "run"), "--merge", "--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, tmp_path / "run" / "model")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    fresh_base = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    batch = _memorisation_batch(toy, tokenizer)
    with torch.no_grad():
        adapter_logits, merged_logits = token_logits(adapted, batch), token_logits(merged, batch)
        assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-5)
        assert not torch.allclose(merged_logits, token_logits(fresh_base, batch), atol=1e-4), "adapter learned nothing"


def test_prompt_learning_export_is_refused(toy, micro_model, tmp_path, capsys) -> None:
    config = sft_config(
        micro_model, toy.sft, tmp_path / "run", peft__method="prompt_tuning", data__packing=False, train__max_steps=1
    )
    sft.run(config)
    with pytest.raises(ValueError, match="cannot be merged"):
        from posttrain.models.export import export_run

        export_run(tmp_path / "run", tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_qlora_without_cuda_fails_before_loading(tmp_path) -> None:
    missing = tmp_path / "does-not-exist"  # never read: the check comes first
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        load_model(ModelConfig(path=str(missing)), PeftConfig(method="qlora"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_on_gpu(toy, micro_model) -> None:  # pragma: no cover - runs on the lent GPU machine
    model, tokenizer = load_model(ModelConfig(path=str(micro_model)), PeftConfig(method="qlora", r=4))
    model.cuda()
    batch = {k: v.cuda() for k, v in _memorisation_batch(toy, tokenizer).items()}
    optimizer = build_optimizer(model.parameters(), sft_config(micro_model, toy.sft, "x", optim__lr=1e-2).optim)
    first = _loss(model, batch).item()
    for _ in range(12):
        optimizer.zero_grad()
        _loss(model, batch).backward()
        optimizer.step()
    assert _loss(model, batch).item() < first
