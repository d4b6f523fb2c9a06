"""The DPO recipe on the micro model: the cached reference, the one-forward pair layout, exact accumulation,
resume, every loss, every adapter method and the shipped config through the command line.

The learning test (DPO raises held-out preference accuracy and the greedy answers' gold score) is in
``test_dpo_learning.py``.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from helpers import REPO, sft_config
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.config import DpoBlock
from posttrain.data.packing import collate, unit_rows
from posttrain.data.pairs import load_pairs
from posttrain.losses import DPO_LOSSES
from posttrain.models.forward import batch_sequence_logps, reference_logps
from posttrain.recipes import dpo


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_records(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if "loss" in r]


def _config(model: Path, data: Path, out: Path, **overrides):
    return sft_config(model, data, out, stage="dpo", **overrides)


def _num_pairs(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_reference_equals_policy_at_step_0_so_sigmoid_loss_is_log_2(toy, micro_model, tmp_path, method) -> None:
    config = _config(micro_model, toy.prefs, tmp_path, train__max_steps=1, peft__method=method)
    dpo.run(config)
    (first,) = _train_records(tmp_path)
    # h = 0 for every pair: −log σ(0) = log 2, rewards 0. (Ties are broken by float noise: the reference pass
    # batches differently, so the accuracy is only near 1/2.)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0


# Every adapter method, each with another loss, through the recipe with evaluation (padded: prompt learning
# prepends virtual tokens per row).
@pytest.mark.parametrize(
    "method, loss",
    [("dora", "robust"), ("freeze", "hinge"), ("prompt_tuning", "simpo"), ("p_tuning", "orpo"), ("prefix", "ipo")],
)
def test_every_method_trains_padded_with_evaluation(toy, micro_model, tmp_path, method, loss) -> None:
    extra = {"peft__freeze_last_n_layers": 1} if method == "freeze" else {}
    if loss == "robust":
        extra["dpo__label_smoothing"] = 0.1
    config = _config(
        micro_model,
        toy.prefs,
        tmp_path,
        train__max_steps=2,
        peft__method=method,
        peft__num_virtual_tokens=4,
        data__packing=False,
        data__eval_fraction=0.1,
        train__eval_every=2,
        dpo__loss=loss,
        **extra,
    )
    summary = dpo.run(config)
    records = _records(tmp_path)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    (evaluation,) = [r for r in records if "eval_accuracy" in r]
    assert 0 <= evaluation["eval_accuracy"] <= 1 and math.isfinite(evaluation["eval_loss"])
    assert summary["steps"] == 2 and summary["loss_type"] == loss and summary["eval_pairs"] == 5
    saved = "model.safetensors" if method == "freeze" else "adapter_config.json"
    assert (tmp_path / "model" / saved).exists()


def _pairs_batch(toy, micro_model, count: int, packed: bool = True):
    from transformers import AutoTokenizer

    from posttrain.config import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    pairs = load_pairs(DataConfig(train=str(toy.prefs), max_length=128), tokenizer, seed=0).train[:count]
    items = unit_rows([(p.chosen, p.rejected) for p in pairs], packed, max_length=128, seed=0)
    return items, partial(collate, pad_token_id=tokenizer.pad_token_id, packed=packed)


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


@pytest.mark.parametrize("loss", sorted(DPO_LOSSES))
def test_every_loss_lowers_itself_in_3_steps(toy, micro_model, loss) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    items, collate = _pairs_batch(toy, micro_model, 16)
    options = DpoBlock(loss=loss, beta=0.5, label_smoothing=0.1 if loss == "robust" else 0.0)
    ref_table = None
    if not DPO_LOSSES[loss].reference_free:
        ref_table = reference_logps(
            model,
            (collate(items[i : i + 4]) for i in range(0, len(items), 4)),
            num_sequences=32,
            accelerator=_accelerator(),
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = collate(items)
    history = []
    for _ in range(3):
        _, _, (per_pair, _, _) = dpo.forward_pairs(model, batch, options, ref_table)
        optimizer.zero_grad()
        per_pair.mean().backward()
        optimizer.step()
        history.append(per_pair.mean().item())
    assert history[2] < history[0] - 1e-3, history


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_equals_padded_per_pair_losses_and_gradients(toy, micro_model, share_prefix) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import DataConfig

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    pairs = load_pairs(DataConfig(train=str(toy.prefs), max_length=128), tokenizer, seed=0).train[:10]
    units = [(p.chosen, p.rejected) for p in pairs]
    options = DpoBlock(loss="sigmoid", beta=0.5)
    # A reference that differs from the policy, so the losses are not all log 2.
    ref_table = -torch.rand(2 * len(pairs), generator=torch.Generator().manual_seed(0)) * 20

    def losses_and_grads(packed: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        items = unit_rows(units, packed, max_length=128, seed=0, share_prefix=share_prefix and packed)
        batch = collate(items, tokenizer.pad_token_id, packed)
        model.zero_grad()
        _, _, (per_pair, _, _) = dpo.forward_pairs(model, batch, options, ref_table)
        per_pair.sum().backward()
        return per_pair.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_losses, padded_grads = losses_and_grads(packed=False)
    packed_losses, packed_grads = losses_and_grads(packed=True)
    packed_rows = unit_rows(units, True, 128, 0, share_prefix)
    assert len(packed_rows) < len(pairs), "packing must put several pairs in a row"
    tokens = sum(len(row.input_ids) for row in packed_rows)
    if share_prefix:  # the prompt is held once per pair: far fewer tokens than the two whole sequences
        assert tokens < 0.8 * sum(len(p.chosen.input_ids) + len(p.rejected.input_ids) for p in pairs)
    assert padded_losses.std() > 0.1
    assert_close(packed_losses, padded_losses, rtol=1e-4, atol=1e-5)
    for name in padded_grads:
        assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accumulation_1x8_equals_8x1(toy, micro_model, tmp_path, packing) -> None:
    # SGD, as in test_sft_invariance: its update is linear in the gradient. A high β makes the loss move.
    # max_length 64: packed rows of 128 tokens, enough of them for 8 per step with the prompts shared.
    common = dict(
        train__max_steps=3,
        data__packing=packing,
        data__max_length=64,
        optim__name="sgd",
        optim__lr=0.5,
        dpo__beta=2.0,
        dpo__sft_weight=0.5,
    )
    dpo.run(_config(micro_model, toy.prefs, tmp_path / "a", train__batch_size=8, train__grad_accum=1, **common))
    dpo.run(_config(micro_model, toy.prefs, tmp_path / "b", train__batch_size=1, train__grad_accum=8, **common))
    a, b = _train_records(tmp_path / "a"), _train_records(tmp_path / "b")
    assert len(a) == 3
    for key in ("loss", "rewards/margin", "rewards/chosen", "logps/chosen"):
        # rtol 1e-4: eight micro-batches sum in another order than one batch; float32 noise, amplified by lr 0.5.
        assert_close(torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b]), rtol=1e-4, atol=1e-5)
    # At step 1 every pair is a tie that float noise breaks either way; afterwards the accuracy is a real count.
    assert [r["rewards/accuracy"] for r in a[1:]] == pytest.approx([r["rewards/accuracy"] for r in b[1:]], abs=1e-6)
    assert a[-1]["loss"] != a[0]["loss"]
    weights_a, weights_b = (
        load_file(str(tmp_path / "a" / "model" / "model.safetensors")),
        load_file(str(tmp_path / "b" / "model" / "model.safetensors")),
    )
    for name in weights_a:
        # atol: float32 rounding of near-zero weights (a different summation order), amplified by lr 0.5.
        assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_and_padded_runs_train_the_same_pairs_to_the_same_weights(
    toy, micro_model, tmp_path, share_prompt
) -> None:
    """Through the recipe: ``train.batch_size`` counts pairs whatever ``data.packing``, so packed (each pair's
    prompt held once, or twice) and padded runs take the same 2 x 6 pairs in every step (logged as ``examples``),
    log the same losses and end at the same weights. SGD, high β so the loss moves; tolerances from float32's
    epsilon (the layouts differ only in summation order, amplified by lr 0.5)."""
    eps = torch.finfo(torch.float32).eps
    common = dict(
        train__max_steps=3,
        train__batch_size=6,
        train__grad_accum=2,
        data__max_length=64,
        optim__name="sgd",
        optim__lr=0.5,
        dpo__beta=2.0,
        dpo__sft_weight=0.5,
    )
    dpo.run(
        _config(
            micro_model, toy.prefs, tmp_path / "packed", data__packing=True, data__share_prompt=share_prompt, **common
        )
    )
    dpo.run(_config(micro_model, toy.prefs, tmp_path / "padded", data__packing=False, **common))
    packed, padded = _train_records(tmp_path / "packed"), _train_records(tmp_path / "padded")
    assert [r["examples"] for r in packed] == [r["examples"] for r in padded] == [12, 12, 12]
    for key in ("loss", "rewards/margin", "logps/chosen", "logps/rejected"):
        assert_close(
            torch.tensor([r[key] for r in packed]),
            torch.tensor([r[key] for r in padded]),
            rtol=256 * eps,
            atol=256 * eps,
        )
    assert packed[-1]["loss"] != packed[0]["loss"]
    weights_packed = load_file(str(tmp_path / "packed" / "model" / "model.safetensors"))
    weights_padded = load_file(str(tmp_path / "padded" / "model" / "model.safetensors"))
    for name, expected in weights_padded.items():
        assert_close(weights_packed[name], expected, rtol=256 * eps, atol=256 * eps * float(expected.abs().max()))


@pytest.mark.parametrize("method", ["lora", "prompt_tuning"])
def test_cached_reference_is_the_base_model_whatever_the_adapter_learnt(toy, micro_model, method) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.config import PeftConfig
    from posttrain.models.adapters import attach_adapter

    items, collate = _pairs_batch(toy, micro_model, 8, packed=False)
    base = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    with torch.no_grad():
        base_logps, _, ids = batch_sequence_logps(base, collate(items))
    adapted = attach_adapter(
        AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32),
        PeftConfig(method=method, num_virtual_tokens=4),
        task="CAUSAL_LM",
    )
    with torch.no_grad():  # what training or a restored checkpoint does: the adapter is no longer the identity
        for name, parameter in adapted.named_parameters():
            if parameter.requires_grad:
                parameter.normal_(generator=torch.Generator().manual_seed(len(name)))
        policy_logps, _, _ = batch_sequence_logps(adapted, collate(items))
    assert (policy_logps - base_logps).abs().max() > 1e-2, "the adapter must change the policy for this test to bite"
    cached = reference_logps(
        adapted,
        (collate(items[i : i + 3]) for i in range(0, len(items), 3)),
        num_sequences=16,
        accelerator=_accelerator(),
    )
    assert_close(cached[ids], base_logps, rtol=1e-5, atol=1e-5)


# Full fine-tuning is where the order matters: a reference computed after the checkpoint restore would be the
# step-2 weights, not the initial ones. LoRA's reference is the base model either way (test above).
@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_equals_uninterrupted(toy, micro_model, tmp_path, method) -> None:
    settings = dict(peft__method=method, checkpoint__every=2, optim__lr=1e-2, train__batch_size=2)
    dpo.run(_config(micro_model, toy.prefs, tmp_path / "once", train__max_steps=4, **settings))
    dpo.run(_config(micro_model, toy.prefs, tmp_path / "twice", train__max_steps=2, **settings))
    summary = dpo.run(_config(micro_model, toy.prefs, tmp_path / "twice", train__max_steps=4, **settings))
    assert summary["steps"] == 4
    once, twice = _train_records(tmp_path / "once"), _train_records(tmp_path / "twice")
    assert [r["step"] for r in twice] == [1, 2, 3, 4]
    assert [r["loss"] for r in once] == [r["loss"] for r in twice]
    assert once[-1]["loss"] != once[0]["loss"]
    name = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    expected, got = (
        load_file(str(tmp_path / "once" / "model" / name)),
        load_file(str(tmp_path / "twice" / "model" / name)),
    )
    for key in expected:
        assert torch.equal(expected[key], got[key]), f"{key} differs after resume"


def test_shipped_config_trains_from_the_command_line(toy, micro_model, tmp_path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "posttrain",
            "train",
            str(REPO / "configs" / "dpo.yaml"),
            f"model.path={micro_model}",
            f"data.train={toy.prefs}",
            f"output_dir={out}",
            "train.max_steps=3",
            "train.eval_every=3",
            "train.batch_size=2",
            "data.max_length=128",
            "logging.progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("eval_accuracy" in r for r in records)
    assert (out / "model" / "adapter_config.json").exists()


def test_dpo_reference_names_the_model_whose_log_probs_are_the_reference(toy, micro_model, tmp_path) -> None:
    """``dpo.reference`` (iterative DPO's reference fixed at the first policy): the policy's own directory as the
    reference is the default exactly (loss log 2 at step 0); another model moves the step-0 margins off zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    same = _config(micro_model, toy.prefs, tmp_path / "same", train__max_steps=1, dpo__reference=str(micro_model))
    dpo.run(same)
    (first,) = _train_records(tmp_path / "same")
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)

    other = tmp_path / "other_reference"
    model = AutoModelForCausalLM.from_pretrained(micro_model)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(micro_model).save_pretrained(other)
    moved = _config(micro_model, toy.prefs, tmp_path / "moved", train__max_steps=1, dpo__reference=str(other))
    summary = dpo.run(moved)
    (first,) = _train_records(tmp_path / "moved")
    assert abs(first["rewards/margin"]) > 1e-3 and abs(first["loss"] - math.log(2)) > 1e-4
    assert str(other) in summary["reference"]
