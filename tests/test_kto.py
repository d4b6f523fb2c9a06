"""The KTO recipe on the micro model: the hand-computable first loss, learning the desirable/undesirable split
(evaluated on held-out pairs), packed == padded (per-example losses and gradients, and whole runs), what gradient
accumulation keeps exact, the padded prompt-learning path and the shipped config. Resume after kill -9:
test_resume.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, assert_weights_close, sft_config
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain import losses
from posttrain.cli import main
from posttrain.recipes import kto


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_loss_is_half_the_mean_weight_then_desirable_rises_above_undesirable(toy, micro_model, tmp_path) -> None:
    # 50 pairs → 50 desirable + 50 undesirable examples, all in one padded micro-batch. At step 0 the policy is the
    # reference: r = 0 and z0 = 0, so every example costs λ·(1 − σ(0)) = λ/2 and the mean is (2·50 + 1·50)/2/100.
    config = sft_config(
        micro_model,
        toy.prefs,
        tmp_path,
        stage="kto",
        data__packing=False,
        train__batch_size=100,
        train__max_steps=6,
        kto__beta=0.5,
        kto__desirable_weight=2.0,
        kto__undesirable_weight=1.0,
        data__eval=str(toy.eval_prefs),
        train__eval_every=6,
        optim__lr=3e-3,
    )
    summary = kto.run(config)
    records = _records(tmp_path)
    first = records[0]
    assert first["loss"] == pytest.approx(0.75, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/desirable"] == pytest.approx(0.0, abs=1e-6)
    assert summary["desirable_examples"] == 50 and summary["undesirable_examples"] == 50
    last = [r for r in records if "loss" in r][-1]
    assert last["loss"] < first["loss"]
    desirable, undesirable = last["rewards/desirable"], last["rewards/undesirable"]
    assert desirable > undesirable + 0.05, (desirable, undesirable)
    # Held-out pairs (the kit's eval_prefs, none of them in the training file): the split generalises.
    (evaluation,) = [r for r in records if "eval_reward_gap" in r]
    assert summary["eval_examples"] == 2 * len(toy.eval_prefs.read_text().splitlines())
    assert evaluation["eval_reward_gap"] > EVAL_GAP, evaluation


EVAL_GAP = 0.05


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _logp_atol(records: list[dict]) -> float:
    """Absolute tolerance for z0 and the rewards, differences of sequence log-probs: two layouts sum each
    log-prob's tokens in another order, so they agree to float32 rounding at the log-probs' own size (tens of
    nats: about 1e-6), not at the size of the difference (0 at step 1)."""
    logp_scale = max(abs(r[k]) for r in records for k in ("logps/desirable", "logps/undesirable"))
    return 32 * torch.finfo(torch.float32).eps * logp_scale


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_equals_padded_per_example_losses_and_gradients(toy, micro_model, share_prefix) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import DataConfig
    from posttrain.data.packing import collate_examples, examples_of
    from posttrain.data.pairs import load_unpaired
    from posttrain.models.forward import batch_sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    examples = load_unpaired(DataConfig(train=str(toy.prefs), max_length=128), tokenizer, seed=0).train[:12]
    items = examples_of(kto.example_units(examples))
    labels = torch.tensor([e.extra["label"] for e in examples])
    assert labels.any() and (~labels).any()
    # A reference below the policy by 0-2 nats per sequence: log-ratios in (0, 2), so z0 > 0 (not clamped) and
    # β·(r − z0) stays where the sigmoid is not flat.
    with torch.no_grad():
        policy_logps, _, ids = batch_sequence_logps(
            model, collate_examples(items, tokenizer.pad_token_id, False, 128, 0)
        )
    ref_table = torch.empty(2 * len(examples))
    ref_table[ids] = policy_logps - 2 * torch.rand(len(ids), generator=torch.Generator().manual_seed(0))

    def losses_and_grads(packed: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        batch = collate_examples(
            items, tokenizer.pad_token_id, packed, max_length=128, seed=0, share_prefix=share_prefix and packed
        )
        if packed:
            assert batch["input_ids"].shape[0] < len(items), "packing must put several examples in a row"
        model.zero_grad()
        logps, ref_logps, kl_ratios, index = kto.forward_examples(model, batch, ref_table)
        per_example, _ = losses.kto_loss(logps, ref_logps, labels[index], kl_ratios.mean(), beta=0.5)
        per_example.sum().backward()
        order = torch.argsort(index)
        return per_example.detach()[order], kl_ratios.mean(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded_losses, padded_z0, padded_grads = losses_and_grads(packed=False)
    packed_losses, packed_z0, packed_grads = losses_and_grads(packed=True)
    assert padded_losses.std() > 0.01 and padded_z0 > 0
    assert_close(packed_z0, padded_z0, rtol=1e-5, atol=1e-5)
    assert_close(packed_losses, padded_losses, rtol=1e-4, atol=1e-6)
    for name in padded_grads:
        assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6)


def test_packed_and_padded_runs_end_at_the_same_weights(toy, micro_model, tmp_path) -> None:
    """train.batch_size counts examples whatever the layout: three SGD steps packed (prompts shared) and padded
    take the same examples and end at the same weights, up to float32 summation order."""
    # SGD without clipping (a clipped update has a fixed norm, blind to a wrongly scaled gradient).
    common = dict(
        stage="kto",
        train__max_steps=3,
        train__batch_size=8,
        optim__name="sgd",
        optim__lr=0.5,
        optim__max_grad_norm=None,
        kto__beta=2.0,
    )
    kto.run(sft_config(micro_model, toy.prefs, tmp_path / "padded", data__packing=False, **common))
    kto.run(sft_config(micro_model, toy.prefs, tmp_path / "packed", data__packing=True, **common))
    padded, packed = _records(tmp_path / "padded"), _records(tmp_path / "packed")
    atol = _logp_atol(padded)
    for key in ("loss", "kl", "rewards/desirable", "logps/undesirable"):
        assert_close(
            torch.tensor([r[key] for r in packed]), torch.tensor([r[key] for r in padded]), rtol=1e-4, atol=atol
        )
    weights_padded, weights_packed = _weights(tmp_path / "padded"), _weights(tmp_path / "packed")
    initial = load_file(str(micro_model / "model.safetensors"))
    assert any(not torch.equal(weights_padded[k], v) for k, v in initial.items())
    assert_weights_close(weights_packed, weights_padded, initial)


def test_grad_accumulation_is_exact_when_z0_is_fixed_and_only_then(toy, micro_model, tmp_path, monkeypatch) -> None:
    """What holds: the loss is a sum over examples divided by the accumulated group's example count, so with the
    reference point z0 held fixed, 1 micro-batch of 8 == 8 micro-batches of 1 (losses and weights, SGD). What does
    not: the recipe's z0 is each micro-batch's mean mismatched log-ratio (as in TRL), so 8×1 takes eight one-example
    estimates, clamped at 0 each, where 1×8 takes one. At step 1 the policy is the reference (every log-ratio 0,
    z0 = 0 in both), so that step agrees; once the policy moves, each example's z0, and so the loss, differs
    between the layouts."""
    common = dict(
        stage="kto",
        data__packing=False,
        train__max_steps=2,
        optim__name="sgd",
        optim__lr=0.5,
        optim__max_grad_norm=None,
        kto__beta=2.0,
    )

    def run_pair(tag: str) -> tuple[list[dict], list[dict], dict, dict]:
        kto.run(
            sft_config(
                micro_model, toy.prefs, tmp_path / f"{tag}1x8", train__batch_size=8, train__grad_accum=1, **common
            )
        )
        kto.run(
            sft_config(
                micro_model, toy.prefs, tmp_path / f"{tag}8x1", train__batch_size=1, train__grad_accum=8, **common
            )
        )
        return (
            _records(tmp_path / f"{tag}1x8"),
            _records(tmp_path / f"{tag}8x1"),
            _weights(tmp_path / f"{tag}1x8"),
            _weights(tmp_path / f"{tag}8x1"),
        )

    a, b, weights_a, weights_b = run_pair("own_z0_")
    assert a[0]["kl"] == pytest.approx(0.0, abs=1e-6) and b[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-5)
    # Step 2: each one-example micro-batch uses its own log-ratio as z0 (their mean, the logged kl, can equal the
    # 8-example z0 when none is clamped), so the losses differ.
    assert abs(a[1]["loss"] - b[1]["loss"]) > 1e-3 * abs(a[1]["loss"]), (a[1], b[1])

    fixed_z0 = 0.3
    kto_loss = losses.kto_loss
    monkeypatch.setattr(
        losses,
        "kto_loss",
        lambda logps, ref, labels, kl_estimate, *args: kto_loss(logps, ref, labels, fixed_z0, *args),
    )
    a, b, weights_a, weights_b = run_pair("fixed_z0_")
    assert a[-1]["loss"] != a[0]["loss"]
    for key in ("loss", "rewards/desirable", "rewards/undesirable", "logps/desirable"):
        # rtol: eight micro-batches sum in another order than one batch; float32 noise, amplified by lr 0.5.
        assert_close(
            torch.tensor([r[key] for r in a]), torch.tensor([r[key] for r in b]), rtol=1e-4, atol=_logp_atol(a)
        )
    assert_weights_close(weights_b, weights_a, load_file(str(micro_model / "model.safetensors")))


def test_prompt_tuning_trains_padded(toy, micro_model, tmp_path) -> None:
    config = sft_config(
        micro_model,
        toy.prefs,
        tmp_path,
        stage="kto",
        data__packing=False,
        train__max_steps=2,
        peft__method="prompt_tuning",
        peft__num_virtual_tokens=4,
    )
    assert kto.run(config)["steps"] == 2
    assert (tmp_path / "model" / "adapter_config.json").exists()


def test_shipped_config_trains_from_the_command_line(toy, micro_model, tmp_path) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(REPO / "configs" / "kto.yaml"),
            f"model.path={micro_model}",
            f"data.train={toy.prefs}",
            f"output_dir={out}",
            "train.max_steps=3",
            "train.eval_every=3",
            "train.batch_size=2",
            "data.max_length=128",
            "logging.progress=false",
        ]
    )
    assert code == 0
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert any("eval_reward_gap" in r for r in records)
    assert (out / "model" / "adapter_config.json").exists()
