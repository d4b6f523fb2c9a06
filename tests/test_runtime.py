"""The shared runtime, tested once: schedules, clipping, NaN guard, early stopping, checkpoint retention,
precision, gradient checkpointing, metrics and the end-of-run artefacts."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from helpers import sft_config
from safetensors.torch import load_file
from torch.testing import assert_close

from posttrain.config import ScheduleConfig, build_config
from posttrain.recipes import sft
from posttrain.runtime import ModelSelection, NonFiniteLossError, Runtime
from posttrain.runtime import checkpoint as ckpt
from posttrain.runtime.optim import lr_multiplier


def test_schedules_hand_derived() -> None:
    """warm-up 2 of 10 steps: multipliers 1/3, 2/3, then decay over the remaining 8 steps.
    Cosine at step 6: progress (6-2)/8 = 1/2 → 0.5·(1+cos(π/2)) = 0.5; with min_lr_ratio 0.1: 0.1 + 0.9·0.5.
    Linear at step 4: 1 − 2/8 = 0.75. At step 10 (the end) cosine reaches the floor."""
    cosine = ScheduleConfig(name="cosine", warmup_steps=2)
    assert [lr_multiplier(s, 10, cosine) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_multiplier(6, 10, cosine) == pytest.approx(0.5)
    assert lr_multiplier(6, 10, ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1)) == pytest.approx(0.55)
    assert lr_multiplier(10, 10, ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1)) == pytest.approx(0.1)
    assert lr_multiplier(4, 10, ScheduleConfig(name="linear", warmup_steps=2)) == pytest.approx(0.75)
    assert lr_multiplier(7, 10, ScheduleConfig(name="constant", warmup_ratio=0.2)) == 1.0


# ------------------------------------------------------------------------------------------------------------------
# A bare runtime around a linear model: the mechanics without a language model.


@dataclass
class Item:
    x: float
    num_targets: int = 1


def _collate(items: list[Item]) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([[i.x] for i in items])}


def _runtime(tmp_path, **train) -> tuple[Runtime, torch.nn.Module]:
    raw = {
        "stage": "sft",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": "unused"},
        "data": {"train": "unused", "shuffle": False},
        "train": {"batch_size": 1, "max_steps": 10, **train},
        "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
        "schedule": {"name": "constant"},
        "checkpoint": {"every": None, "keep": 1},
        "logging": {"progress": False, "tensorboard": False, "report": False},
    }
    for key in list(train):
        if key in ("every", "keep"):
            raw["checkpoint"][key] = raw["train"].pop(key)
    torch.manual_seed(0)
    return Runtime(build_config(raw)), torch.nn.Linear(1, 1)


def test_nan_steps_are_skipped_counted_and_abort_after_k(tmp_path) -> None:
    rt, model = _runtime(tmp_path, max_nonfinite_steps=3, every=1)
    model = rt.setup(model, num_rows=20)
    poisoned = {3, 5, 6, 7}  # step 3 alone (skipped), then 5, 6, 7 in a row (abort)
    weights_before_step: dict[int, torch.Tensor] = {}
    with pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        for batch in rt.batches([Item(float(i)) for i in range(20)], _collate):
            step = rt.global_step + 1
            weights_before_step[step] = model.weight.detach().clone()
            loss = model(batch["x"]).pow(2).mean()
            rt.step(loss * float("nan") if step in poisoned else loss)
    assert rt.global_step == 7 and rt.nonfinite_total == 4
    assert torch.equal(model.weight, weights_before_step[5]), "a skipped step must not change the weights"
    assert torch.equal(weights_before_step[4], weights_before_step[3]), "step 3 was skipped"
    assert not torch.equal(weights_before_step[3], weights_before_step[2]), "finite steps do train"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped_nonfinite" in r] == [3, 5, 6, 7]
    # The abort happens before step 7 could write anything; the last checkpoint holds the good weights.
    saved = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert saved[-1].name == "step-000006"
    assert json.loads((saved[-1] / "state.json").read_text())["nonfinite_total"] == 3
    assert torch.equal(load_file(str(saved[-1] / "weights.safetensors"))["weight"], weights_before_step[5])


def test_clipping_bounds_the_update(tmp_path) -> None:
    """SGD with lr 1 and clip 1e-3: the weight moves by exactly the clipped gradient, norm 1e-3."""
    rt, model = _runtime(tmp_path, max_steps=1)
    rt.config.optim.lr = 1.0
    rt.config.optim.max_grad_norm = 1e-3
    model = rt.setup(model, num_rows=4)
    before = [p.detach().clone() for p in model.parameters()]
    for batch in rt.batches([Item(100.0)] * 4, _collate):
        rt.step(model(batch["x"]).pow(2).mean())
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert moved.item() == pytest.approx(1e-3, rel=1e-4)
    grad_norm = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
    assert grad_norm > 1.0, "the logged norm is the one before clipping"


def test_each_parameter_group_is_clipped_to_its_own_norm(tmp_path) -> None:
    """Two named groups, SGD with lr 1 on the loss (w·100 + b)², both gradients far above their limits: the weight
    (group "policy", optim.max_grad_norm 1e-3) moves by exactly 1e-3 and the bias (group "critic", its own
    max_grad_norm 1e-2) by exactly 1e-2, where one global clip would have moved them in proportion to their
    gradients (w's is 100 times b's). Each norm before clipping is logged as grad_norm/NAME, and grad_norm is
    their root sum of squares."""
    rt, model = _runtime(tmp_path, max_steps=1)
    rt.config.optim.lr = 1.0
    rt.config.optim.max_grad_norm = 1e-3
    groups = [
        {"params": [model.weight], "name": "policy"},
        {"params": [model.bias], "name": "critic", "max_grad_norm": 1e-2},
    ]
    model = rt.setup(model, num_rows=4, parameter_groups=groups)
    weight, bias = model.weight.item(), model.bias.item()
    for batch in rt.batches([Item(100.0)] * 4, _collate):
        rt.step(model(batch["x"]).pow(2).mean())
    assert abs(model.weight.item() - weight) == pytest.approx(1e-3, rel=1e-4)
    assert abs(model.bias.item() - bias) == pytest.approx(1e-2, rel=1e-4)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    residual = 2 * (weight * 100 + bias)  # d/db of (100w + b)²; d/dw is 100 times it
    assert record["grad_norm/critic"] == pytest.approx(abs(residual), rel=1e-5)
    assert record["grad_norm/policy"] == pytest.approx(100 * abs(residual), rel=1e-5)
    assert record["grad_norm"] == pytest.approx(
        math.hypot(record["grad_norm/policy"], record["grad_norm/critic"]), rel=1e-6
    )


def test_early_stopping_keeps_the_best_checkpoint(tmp_path) -> None:
    rt, model = _runtime(tmp_path, eval_every=1, early_stopping_patience=2, keep=1)
    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    model = rt.setup(model, num_rows=20)
    for batch in rt.batches([Item(1.0)] * 20, _collate):
        rt.step(model(batch["x"]).pow(2).mean())
        if rt.should_evaluate():
            rt.record_evaluation({"eval_loss": next(scripted)})
    assert rt.stopped_early and rt.global_step == 4 and rt.best_step == 2
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert names == ["step-000002"], "keep=1 prunes the rest but never the best"


def test_early_stopping_follows_the_named_metric_and_direction(tmp_path) -> None:
    """A stage that selects by a reward (maximised): scripted eval_reward 1.0, 2.0, 1.5, 1.9 with patience 2 peaks
    at step 2 and stops at step 4, keeping step 2. (Read as eval_loss, which this evaluation never returns, every
    evaluation counted as no improvement and the run stopped at step 2 with no best step.)"""
    rt, model = _runtime(tmp_path, eval_every=1, early_stopping_patience=2, keep=1)
    scripted = iter([1.0, 2.0, 1.5, 1.9, 3.0, 3.0])
    model = rt.setup(model, num_rows=20, selection=ModelSelection("eval_reward", maximize=True))
    for batch in rt.batches([Item(1.0)] * 20, _collate):
        rt.step(model(batch["x"]).pow(2).mean())
        if rt.should_evaluate():
            rt.record_evaluation({"eval_reward": next(scripted)})
    assert rt.stopped_early and rt.global_step == 4 and rt.best_step == 2 and rt.best_eval == 2.0
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000002"]


def test_an_evaluation_without_the_selection_metric_is_an_error(tmp_path) -> None:
    rt, model = _runtime(tmp_path, eval_every=1, early_stopping_patience=2)
    model = rt.setup(model, num_rows=20)
    with pytest.raises(
        ValueError,
        match=r"selects models by eval_loss, which its evaluation did not return \(it returned eval_reward\)",
    ):
        for batch in rt.batches([Item(1.0)] * 20, _collate):
            rt.step(model(batch["x"]).pow(2).mean())
            if rt.should_evaluate():
                rt.record_evaluation({"eval_reward": 1.0})


def test_checkpoint_retention_and_leftovers(tmp_path) -> None:
    rt, model = _runtime(tmp_path, max_steps=5, every=1, keep=2)
    model = rt.setup(model, num_rows=20)
    leftover = tmp_path / "run" / "checkpoints" / ".tmp-step-000001-99999"
    leftover.mkdir(parents=True)
    for batch in rt.batches([Item(1.0)] * 20, _collate):
        rt.step(model(batch["x"]).pow(2).mean())
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000004", "step-000005"]
    assert not leftover.exists()
    assert set(p.name for p in (tmp_path / "run" / "checkpoints" / "step-000005").iterdir()) == {
        "weights.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "state.json",
    }


# ------------------------------------------------------------------------------------------------------------------
# Through the SFT recipe on the micro model.


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_bf16_autocast_runs_on_cpu_and_stays_close(toy, micro_model, tmp_path) -> None:
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "fp32", train__max_steps=2))
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "bf16", train__max_steps=2, train__precision="bf16"))
    fp32, bf16 = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert fp32 != bf16, "bf16 autocast did not engage"
    assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2e-2, atol=0)


def test_gradient_checkpointing_changes_memory_not_math(toy, micro_model, tmp_path) -> None:
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "plain", train__max_steps=3))
    sft.run(
        sft_config(micro_model, toy.sft, tmp_path / "ckpt", train__max_steps=3, model__gradient_checkpointing=True)
    )
    assert_close(
        torch.tensor(_losses(tmp_path / "ckpt")), torch.tensor(_losses(tmp_path / "plain")), rtol=1e-5, atol=0
    )
    a, b = (
        load_file(str(tmp_path / "plain/model/model.safetensors")),
        load_file(str(tmp_path / "ckpt/model/model.safetensors")),
    )
    for name in a:
        assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_run_directory_holds_metrics_plots_report(toy, micro_model, tmp_path) -> None:
    config = sft_config(
        micro_model,
        toy.sft,
        tmp_path / "run",
        train__max_steps=4,
        train__eval_every=2,
        data__eval=str(toy.sft),
        logging__report=True,
        logging__tensorboard=True,
        checkpoint__every=2,
    )
    summary = sft.run(config)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all(
        math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["lr"] > 0 and "grad_norm" in r for r in train_records
    )
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    for name in ("loss", "eval_loss", "lr", "grad_norm"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "report.md").read_text()
    assert "final_train_loss" in report and "plots/loss.png" in report
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").exists() and (run / "model" / "model.safetensors").exists()
    assert (run / "model" / "tokenizer.json").exists()
    assert summary["steps"] == 4 and summary["best_step"] in (2, 4)
