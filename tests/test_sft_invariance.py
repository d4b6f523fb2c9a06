"""Invariance tests of the SFT recipe and runtime: what smoke tests cannot catch.

- gradient accumulation: 1 micro-batch of 8 == 8 micro-batches of 1 (loss trajectory and weights);
- packing: packed rows give the same per-sample losses and gradients as padded rows, and a packed run takes the
  same sequences per step as a padded one and ends at the same weights;
- resume: a run killed with SIGKILL after a checkpoint and resumed ends bitwise equal to an uninterrupted run,
  and half-written checkpoint directories are never picked up.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import sft_config, train_in_subprocess
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.data.packing import collate, pack_rows, single_rows
from posttrain.data.reader import read_conversations
from posttrain.data.tokenize import tokenize_conversation
from posttrain.losses import IGNORE_INDEX, per_sequence_nll
from posttrain.models import token_logits
from posttrain.recipes import sft

EPS32 = torch.finfo(torch.float32).eps


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.parametrize("packing", [False, True])
def test_grad_accumulation_1x8_equals_8x1(toy, micro_model, tmp_path, packing) -> None:
    # SGD: its update is linear in the gradient, so the comparison sees the accumulation itself. (Adam divides by
    # sqrt(v): a near-zero gradient's rounding noise becomes a sign flip of a whole lr-sized update.)
    common = dict(train__max_steps=3, data__packing=packing, optim__name="sgd", optim__lr=0.5)
    one_by_eight = sft_config(micro_model, toy.sft, tmp_path / "a", train__batch_size=8, train__grad_accum=1, **common)
    eight_by_one = sft_config(micro_model, toy.sft, tmp_path / "b", train__batch_size=1, train__grad_accum=8, **common)
    sft.run(one_by_eight)
    sft.run(eight_by_one)
    losses_a, losses_b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(losses_a) == 3
    assert_close(torch.tensor(losses_a), torch.tensor(losses_b), rtol=1e-5, atol=0)
    weights_a, weights_b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    before = load_file(str(micro_model / "model.safetensors"))
    assert any(not torch.equal(weights_a[k], before[k]) for k in before), "training changed nothing"
    for name in weights_a:
        # atol: float32 rounding of near-zero weights (padding changes the summation order).
        assert_close(weights_a[name], weights_b[name], rtol=1e-5, atol=1e-7)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_packed_and_padded_runs_train_the_same_sequences_to_the_same_weights(toy, micro_model, tmp_path) -> None:
    """Through the recipe: ``train.batch_size`` counts sequences whatever ``data.packing``, so a packed and a padded
    run take the same 2 x 8 sequences in every step (logged as ``examples``), log the same losses and end at the
    same weights. SGD (linear in the gradient); tolerances from float32's epsilon: packing changes only the
    summation order, and lr 0.5 amplifies the rounding of the updates."""
    common = dict(train__max_steps=3, train__batch_size=8, train__grad_accum=2, optim__name="sgd", optim__lr=0.5)
    for packing in (True, False):
        sft.run(sft_config(micro_model, toy.sft, tmp_path / str(packing), data__packing=packing, **common))
    packed, padded = _records(tmp_path / "True"), _records(tmp_path / "False")
    assert [r["examples"] for r in packed] == [r["examples"] for r in padded] == [16, 16, 16]
    assert_close(
        torch.tensor([r["loss"] for r in packed]), torch.tensor([r["loss"] for r in padded]), rtol=64 * EPS32, atol=0
    )
    weights_packed, weights_padded = _weights(tmp_path / "True"), _weights(tmp_path / "False")
    before = load_file(str(micro_model / "model.safetensors"))
    assert any(not torch.equal(weights_packed[k], before[k]) for k in before), "training changed nothing"
    for name, expected in weights_padded.items():
        assert_close(weights_packed[name], expected, rtol=64 * EPS32, atol=64 * EPS32 * float(expected.abs().max()))


def test_packed_equals_padded(toy, micro_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    conversations = read_conversations(toy.sft)[:12]
    sequences = [tokenize_conversation(tokenizer, c, 128) for c in conversations]
    lengths = {len(s.input_ids) for s in sequences}
    assert len(lengths) > 1, "sequences of different lengths make padding matter"

    def per_sample_and_grads(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        trained = batch["targets"] != IGNORE_INDEX
        logits = token_logits(model, batch)
        nll, counts = per_sequence_nll(
            logits, batch["targets"][trained], batch["sequence_ids"][trained], len(sequences)
        )
        (nll.sum() / counts.sum()).backward()
        return nll.detach() / counts, {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = collate(single_rows(sequences), tokenizer.pad_token_id, packed=False)
    packed_rows = pack_rows(sequences, max_length=128, seed=0)
    assert len(packed_rows) < len(sequences) and max(len(set(r.sequence_ids)) for r in packed_rows) > 1
    packed = collate(packed_rows, tokenizer.pad_token_id, packed=True)
    assert "attention_mask" not in packed and packed["position_ids"][0, 0] == 0

    padded_losses, padded_grads = per_sample_and_grads(padded)
    packed_losses, packed_grads = per_sample_and_grads(packed)
    assert_close(packed_losses, padded_losses, rtol=1e-4, atol=1e-6)
    for name in padded_grads:
        assert_close(packed_grads[name], padded_grads[name], rtol=1e-4, atol=1e-6)


def test_packing_without_position_restart_would_differ(toy, micro_model) -> None:
    """Guards the test above: if sequences in a row could see each other, losses would change."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32)
    sequences = [tokenize_conversation(tokenizer, c, 128) for c in read_conversations(toy.sft)[:6]]
    packed = collate(pack_rows(sequences, 128, seed=0), tokenizer.pad_token_id, packed=True)
    leaky = dict(packed)
    leaky["position_ids"] = torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])
    with torch.no_grad():
        assert not torch.allclose(token_logits(model, packed), token_logits(model, leaky), atol=1e-4)


def _write_config(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _run_cli(config_path: Path, *overrides: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "posttrain", "train", str(config_path), *overrides],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_resume_after_sigkill_is_bitwise_equal(toy, micro_model, tmp_path) -> None:
    """Cosine schedule with warm-up, so a resume that restarted the schedule would log another lr. The killed run
    SIGKILLs itself right after step 6 (step 5 checkpointed, step 6's work lost): an exact crash point however
    loaded the machine is (helpers.train_in_subprocess); the kill -9 cases of the other recipes are in
    test_resume.py."""
    settings = dict(
        train__max_steps=10,
        train__batch_size=8,
        data__max_length=256,
        checkpoint__every=5,
        optim__lr=3e-3,
        schedule__name="cosine",
        schedule__warmup_steps=3,
    )
    reference = sft_config(micro_model, toy.sft, tmp_path / "uninterrupted", **settings)
    whole = train_in_subprocess(reference)
    assert whole.returncode == 0, whole.stderr[-3000:]

    config = sft_config(micro_model, toy.sft, tmp_path / "killed", **settings)
    killed = train_in_subprocess(config, kill_after_step=6)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert [p.name for p in checkpoints.glob("step-*")] == ["step-000005"]
    assert not (tmp_path / "killed" / "model").exists()

    # What a crash in the middle of a save looks like: a temporary directory and a directory without state.json.
    (checkpoints / ".tmp-step-000008-4242").mkdir()
    (checkpoints / ".tmp-step-000008-4242" / "weights.safetensors").write_bytes(b"half")
    (checkpoints / "step-000009").mkdir()
    (checkpoints / "step-000009" / "weights.safetensors").write_bytes(b"half")

    resumed = train_in_subprocess(config, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step-000005 at step 5" in resumed.stderr
    expected, got = _weights(tmp_path / "uninterrupted"), _weights(tmp_path / "killed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"
    records = {
        run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("uninterrupted", "killed")
    }
    assert [r["step"] for r in records["killed"]] == list(range(1, 11)), "metrics must hold each step once"
    for key in ("lr", "loss", "grad_norm"):
        assert [r[key] for r in records["killed"]] == [r[key] for r in records["uninterrupted"]], key
    assert len({r["lr"] for r in records["uninterrupted"]}) == 10, "warm-up and cosine change the lr every step"


def test_sigterm_writes_a_resumable_checkpoint(toy, micro_model, tmp_path) -> None:
    config = sft_config(micro_model, toy.sft, tmp_path / "run", train__max_steps=400, checkpoint__every=None)
    config_path = _write_config(tmp_path / "cfg.yaml", config)
    process = _run_cli(config_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, process.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stderr and "resume=auto" in stderr
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and (saved[0] / "state.json").exists()
    stopped_at = json.loads((saved[0] / "state.json").read_text())["step"]
    assert 0 < stopped_at < 400

    finished = _run_cli(config_path, "train.max_steps=" + str(stopped_at + 2))
    _, stderr = finished.communicate(timeout=300)
    assert finished.returncode == 0, stderr
    assert f"at step {stopped_at}" in stderr
    state = json.loads(
        sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text()
    )
    assert state["step"] == stopped_at + 2
