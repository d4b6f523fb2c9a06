"""Plans checked by running them: the live-tensor meter, `posttrain estimate --probe` and `--time`, the plan every run
prints and sets against its measured peak, the ETA, and a CUDA run refused before its weights load."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import sft_config

from posttrain import estimate, probe
from posttrain.cli import main
from posttrain.config import ConfigError
from posttrain.runtime.memory import LiveTensorMeter, MemoryWatch
from posttrain.runtime.metrics import events_after, remaining_seconds


def test_meter_follows_storages_by_hand() -> None:
    """Bytes alive at once, by hand: 4,000 + 4,000, one freed, then 6,000 more; a view adds nothing."""
    with LiveTensorMeter() as meter:
        base = meter.live
        a = torch.ones(1000)  # 4,000 B
        b = a * 2  # 8,000 B alive
        del a  # 4,000
        view = b.view(10, 100)  # the same storage
        d = torch.zeros(750, dtype=torch.float64)  # 10,000: the peak
        assert meter.live - base == 10_000
        del b, view, d
        assert meter.live == base
    assert meter.peak - base == 10_000
    assert torch.ones(10).sum() == 10  # the meter is off the stack: plain torch again


@pytest.fixture(scope="module")
def full_length_text(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pretraining documents long enough that every chunk is data.max_length tokens, as the plan assumes."""
    words = "sun moon star wind fire water stone tree river cloud bird fish".split()
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=600))}) + "\n" for _ in range(16)))
    return path


def pretrain_config(model: Path, data: Path, out: Path, **overrides: Any) -> Any:
    return sft_config(model, data, out, stage="pretrain", data__max_length=64, **overrides)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_probe_measures_what_the_plan_predicts(micro_model: Path, full_length_text: Path, method: str) -> None:
    config = pretrain_config(micro_model, full_length_text, Path("unused"), peft__method=method)
    # What the process held before the run (here 40 MB, a hundred times the model) is not the run's.
    leftover = torch.zeros(10_000_000)
    measured = probe.probe_memory(config)
    del leftover
    # Model states are exact; the peak (activations, logits, what coexists) within the issue's +-15 %.
    assert measured.measured_weights == measured.plan.lines["weights"].bytes
    assert measured.measured_optimizer == measured.plan.lines["optimizer"].bytes
    assert abs(measured.error) < 0.15, (measured.plan.peak, measured.measured_peak)
    assert measured.measured_by == "live tensor storages over the first 2 steps"


def test_short_data_are_also_planned_at_the_probed_micro_batch(micro_model: Path, toy: Any) -> None:
    """The toy's conversations are far shorter than data.max_length=128: the config's plan (every sequence at 128)
    is well above the measured peak; planned at the largest micro-batch the steps saw, it is close."""
    config = sft_config(micro_model, toy.sft, Path("unused"), data__packing=False)
    measured = probe.probe_memory(config)
    assert measured.error < -0.3  # the plan is for the longest micro-batch
    assert 4 <= measured.probed_tokens < 4 * 128  # 4 sequences padded to the longest
    assert measured.error_at_probed is not None and abs(measured.error_at_probed) < 0.15
    assert "planned at the largest probed micro-batch" in probe.render_probe(measured)


def test_probe_layers_plans_and_runs_a_truncated_copy(micro_model: Path, full_length_text: Path) -> None:
    config = pretrain_config(micro_model, full_length_text, Path("unused"))
    whole = estimate.plan_memory(config, accelerator="cpu")
    truncated = probe.probe_memory(config, layers=1)
    assert truncated.plan.peak < whole.peak
    assert truncated.measured_weights == truncated.plan.lines["weights"].bytes < whole.lines["weights"].bytes
    assert abs(truncated.error) < 0.15
    with pytest.raises(ConfigError, match="--probe-layers 3: expected 1 to 2"):
        probe.probe_memory(config, layers=3)


def test_every_run_prints_its_plan_and_reports_the_measured_peak(
    micro_model: Path, full_length_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.recipes import RECIPES

    config = pretrain_config(
        micro_model, full_length_text, tmp_path / "run", logging__report=True, logging__progress=True
    )
    summary = RECIPES["pretrain"](config)
    plan = estimate.plan_memory(config, accelerator="cpu")
    printed = capsys.readouterr().err
    assert f"memory plan: predicted peak {plan.peak / 2**20:.1f} MiB per device" in printed
    assert "eta=00:0" in printed and "4/4 [" in printed  # the progress bar's ETA (remaining_seconds), minutes:seconds
    assert summary["memory_predicted_peak_mib"] == round(plan.peak / 2**20, 1)
    measured = summary["memory_measured_peak_mib_per_process"][0]
    assert summary["memory_plan_error"] == round(measured / (plan.peak / 2**20) - 1, 4)
    assert abs(summary["memory_plan_error"]) < 0.15
    report = (tmp_path / "run" / "report.md").read_text()
    assert f"| memory_measured_peak_mib_per_process | [{measured}] |" in report
    # Where the time went: 4 steps (the first apart), the final checkpoint, no held-out data.
    assert summary["steps_per_epoch"] >= 4 and len(summary["time_checkpoints_s"]) == 1
    assert summary["time_steps_s"] > summary["time_first_step_s"] > 0 and summary["time_evaluations_s"] == []


def test_events_and_remaining_seconds_by_hand() -> None:
    assert events_after(0, 10, 4) == 3  # steps 4, 8 and the last (10)
    assert events_after(4, 10, 4) == 2  # 8 and 10
    assert events_after(0, 8, 4) == 2  # 4 and 8, which is the last
    assert events_after(0, 10, None) == 1  # the last only
    assert events_after(10, 10, 4) == 0
    # After step 4 of 10: 6 steps x 2 s, evaluations at 8 and 10 x 10 s, checkpoints at 5 and 10 x 1 s.
    assert remaining_seconds(4, 10, 2.0, 4, 10.0, 5, 1.0) == 6 * 2.0 + 2 * 10.0 + 2 * 1.0


def test_time_samples_the_run_and_counts_its_steps_as_the_run_does(
    micro_model: Path, full_length_text: Path, tmp_path: Path
) -> None:
    from posttrain.recipes import RECIPES

    config = pretrain_config(micro_model, full_length_text, tmp_path / "whole", train__max_steps=None)
    predicted = probe.time_run(config, sample=0.25)
    whole = RECIPES["pretrain"](config)
    assert predicted.total_steps == whole["steps"] > 4
    assert predicted.sampled_steps == max(4, -(-whole["steps"] // 4))  # ceil(25 %), at least 4
    assert predicted.checkpoints == 1 and predicted.evaluations == 0
    assert predicted.total_s == pytest.approx(
        predicted.fixed_s - predicted.step_s + predicted.total_steps * predicted.step_s + predicted.checkpoint_s
    )
    assert predicted.flops_per_token == 6 * whole["total_parameters"]  # full fine-tuning: 6N


def test_estimate_cli_probe_and_time(
    micro_model: Path, full_length_text: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["estimate", "pretrain", f"model.path={micro_model}", f"data.train={full_length_text}"]
    argv += ["data.max_length=64", "train.batch_size=2", "train.max_steps=8"]
    assert main([*argv, "--probe", "--time", "--sample", "0.5", "--json", "--peak-tflops", "1"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(printed["probe"]["error"]) < 0.15
    # The plan printed is for a GPU; the CPU probe's is the same less the CUDA runtime's floor.
    floor = estimate.RUNTIME_FLOOR_BYTES
    assert printed["per_device"]["total"] - printed["probe"]["predicted_peak"] == pytest.approx(floor, abs=2)
    assert printed["time"]["total_steps"] == 8 and printed["time"]["sampled_steps"] == 4
    assert 0 < printed["time"]["mfu"] < 1
    assert main([*argv, "--sample", "0.5"]) == 2
    assert "--sample applies to --time" in capsys.readouterr().err


def test_a_cuda_run_that_cannot_fit_stops_before_loading_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 7B full fine-tune on a pretend 24 GiB GPU: refused with the advice, from config.json alone."""
    from transformers import LlamaConfig

    model = tmp_path / "llama7b"
    LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32
    ).save_pretrained(model)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: type("P", (), {"total_memory": 24 * 2**30}))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _: "pretend GPU")
    watch = MemoryWatch(sft_config(model, Path("x.jsonl"), tmp_path / "run"), 1, torch.device("cuda"))
    with pytest.raises(ConfigError, match=r"needs \d+\.\d+ GiB per device and pretend GPU has 24\.00 GiB") as error:
        watch.refuse_if_it_cannot_fit()
    advice = str(error.value).splitlines()
    assert advice[0].endswith("stopped before loading weights.") and advice[1].startswith("does not fit")
    assert any("distributed.offload=all" in line and "(fits;" in line for line in advice)
