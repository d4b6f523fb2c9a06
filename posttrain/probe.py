"""Check a plan by running it: ``posttrain estimate CONFIG --probe`` and ``--time``.

Both run the stage's own recipe, in this process, for a few optimizer steps into a temporary directory (the
config's ``output_dir`` is never touched) and read what the run measured about itself:

- ``--probe`` (:func:`probe_memory`): the run's :class:`~posttrain.runtime.memory.MemoryWatch` sets the plan's
  predicted peak against the measured one (the CUDA allocator's peak, or on CPU the live tensor bytes), and the
  measured weights and optimizer states against their plan lines. ``layers=N`` first builds a randomly initialised
  copy of the model with N decoder layers from its ``config.json`` (no weights read), so a model too large for
  this machine is probed truncated, and its plan is the truncated model's.
- ``--time`` (:func:`time_run`): the run's step, evaluation and checkpoint times over a sample of the steps
  (default 1 %, at least a warm-up step and three measured ones), extrapolated to the whole run
  (:func:`~posttrain.runtime.metrics.remaining_seconds`, which the progress line's ETA also uses).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, StageConfig
from posttrain.estimate import MemoryPlan, plan_at_micro_batch, plan_memory, with_overrides
from posttrain.models.loading import model_dir_of
from posttrain.recipes import RECIPES
from posttrain.runtime.metrics import events_after, remaining_seconds


def run_briefly(config: StageConfig, steps: int, out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """Run ``config`` for ``steps`` optimizer steps into ``out``; its summary."""
    brief = with_overrides(
        config,
        [
            f"output_dir={out}",
            "resume=false",
            f"train.max_steps={steps}",
            "logging.report=false",
            "logging.tensorboard=false",
            "logging.progress=false",
            *(extra or []),
        ],
    )
    return RECIPES[brief.stage](brief)


def truncated_model(config: StageConfig, layers: int, out: Path) -> StageConfig:
    """``config`` on a randomly initialised copy of its model with ``layers`` decoder layers (built from
    ``config.json`` alone, the tokenizer copied beside it)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = model_dir_of(config.model.path)
    model_config = AutoConfig.from_pretrained(source)
    text = getattr(model_config, "text_config", None) or model_config
    if layers < 1 or layers > text.num_hidden_layers:
        raise ConfigError(f"--probe-layers {layers}: expected 1 to {text.num_hidden_layers} (the model's layers)")
    text.num_hidden_layers = layers
    if isinstance(getattr(text, "layer_types", None), list):  # Gemma 2's per-layer sliding/full pattern
        text.layer_types = text.layer_types[:layers]
    model = AutoModelForCausalLM.from_config(model_config)  # loaded by the run at its model.dtype
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return with_overrides(config, [f"model.path={out}"])


@dataclass(frozen=True)
class MemoryProbe:
    """The plan of the probed config and what its run measured (bytes per device, the largest process's)."""

    plan: MemoryPlan
    measured_peak: float
    measured_weights: float
    measured_optimizer: float
    measured_by: str
    # The plan at the largest micro-batch the probed steps saw (offline stages), and its token count: data whose
    # sequences are shorter than data.max_length use less than the config's plan, which is for the longest.
    plan_at_probed: MemoryPlan | None = None
    probed_tokens: int = 0

    @property
    def error_at_probed(self) -> float | None:
        return self.measured_peak / self.plan_at_probed.tensor_peak - 1 if self.plan_at_probed else None

    @property
    def error(self) -> float:
        """Measured peak over predicted, minus one: -0.05 means 5 % less was used than planned."""
        return self.measured_peak / self.plan.tensor_peak - 1


def probe_memory(config: StageConfig, steps: int = 2, layers: int | None = None) -> MemoryProbe:
    """Run ``steps`` steps of ``config`` (on a ``layers``-layer copy of its model if given) and set the measured
    peak against the plan."""
    with tempfile.TemporaryDirectory(prefix="posttrain-probe-") as scratch:
        if layers is not None:
            config = truncated_model(config, layers, Path(scratch) / "model")
        summary = run_briefly(config, steps, Path(scratch) / "run")
    if "memory_measured_peak_mib_per_process" not in summary:
        raise ConfigError(f"the probe run measured no memory: {summary.get('memory_plan', 'no plan')}")
    import torch

    accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    plan = plan_memory(config, 1, accelerator)
    probed_tokens = summary.get("memory_measured_micro_batch_tokens", 0)
    trained = summary.get("memory_measured_micro_batch_trained_positions", 0)
    at_probed = plan_at_micro_batch(config, probed_tokens, trained, 1, accelerator) if probed_tokens else None
    mib = 2**20
    return MemoryProbe(
        plan_at_probed=at_probed,
        probed_tokens=probed_tokens,
        plan=plan,
        measured_peak=max(summary["memory_measured_peak_mib_per_process"]) * mib,
        measured_weights=summary["memory_measured_weights_bytes"],
        measured_optimizer=summary["memory_measured_optimizer_bytes"],
        measured_by=summary["memory_measured_by"],
    )


def render_probe(probe: MemoryProbe) -> str:
    plan = probe.plan
    rows = [
        f"probe ({probe.measured_by}):",
        f"  {'':<13}{'predicted':>12}{'measured':>12}",
        f"  {'weights':<13}{plan.lines['weights'].bytes / 2**20:9.1f} MiB{probe.measured_weights / 2**20:9.1f} MiB",
        f"  {'optimizer':<13}{plan.lines['optimizer'].bytes / 2**20:9.1f} MiB"
        f"{probe.measured_optimizer / 2**20:9.1f} MiB",
        f"  {'peak':<13}{plan.tensor_peak / 2**20:9.1f} MiB{probe.measured_peak / 2**20:9.1f} MiB   ({probe.error:+.1%};"
        " the plan is for every sequence at data.max_length)",
    ]
    if probe.plan_at_probed is not None and probe.error_at_probed is not None:
        rows.append(
            f"  {'peak':<13}{probe.plan_at_probed.tensor_peak / 2**20:9.1f} MiB{probe.measured_peak / 2**20:9.1f} MiB"
            f"   ({probe.error_at_probed:+.1%}; planned at the largest probed micro-batch, {probe.probed_tokens} tokens)"
        )
    return "\n".join(rows)


def probe_json(probe: MemoryProbe) -> dict[str, Any]:
    return {
        "predicted_peak": int(probe.plan.tensor_peak),
        "measured_peak": int(probe.measured_peak),
        "measured_weights": int(probe.measured_weights),
        "measured_optimizer": int(probe.measured_optimizer),
        "measured_by": probe.measured_by,
        "error": round(probe.error, 4),
        **(
            {
                "probed_micro_batch_tokens": probe.probed_tokens,
                "predicted_peak_at_probed": int(probe.plan_at_probed.tensor_peak),
                "error_at_probed": round(probe.error_at_probed, 4),
            }
            if probe.plan_at_probed is not None and probe.error_at_probed is not None
            else {}
        ),
    }


# ---------------------------------------------------------------------------------------------------- time
@dataclass(frozen=True)
class TimeEstimate:
    """A whole run's time extrapolated from a sample of its steps."""

    total_steps: int
    sampled_steps: int
    step_s: float  # mean time of a step after the first (a warm-up)
    eval_s: float  # mean time of one evaluation (0 without held-out data)
    eval_every: int | None
    checkpoint_s: float  # mean time of one checkpoint
    checkpoint_every: int | None
    fixed_s: float  # start and end: loading, data, reference tables, the first step, the final model's save
    tokens_per_s: float
    flops_per_token: float  # forward 2N, backward 2N (inputs) + 2 x trainable (weights): 6N fully trained

    @property
    def evaluations(self) -> int:
        return events_after(0, self.total_steps, self.eval_every) if self.eval_s else 0

    @property
    def checkpoints(self) -> int:
        return events_after(0, self.total_steps, self.checkpoint_every)

    @property
    def total_s(self) -> float:
        """``fixed_s`` holds the first step, so one mean step less than the remaining time from step 0."""
        whole = remaining_seconds(
            0, self.total_steps, self.step_s, self.eval_every, self.eval_s, self.checkpoint_every, self.checkpoint_s
        )
        return self.fixed_s - self.step_s + whole

    def mfu(self, peak_flops: float | None) -> float | None:
        return self.tokens_per_s * self.flops_per_token / peak_flops if peak_flops else None


def time_run(config: StageConfig, sample: float = 0.01, min_steps: int = 4) -> TimeEstimate:
    """Run ``sample`` of ``config``'s steps (at least ``min_steps``: the first is a warm-up) and extrapolate the
    whole run's time from their mean step, evaluation and checkpoint times (:func:`remaining_seconds`). Best
    called in a fresh process (``posttrain estimate --time``): the first run's start-up stands for the whole
    run's."""
    if not 0 < sample <= 1:
        raise ConfigError(f"--sample {sample}: expected a fraction of the run in (0, 1]")
    with tempfile.TemporaryDirectory(prefix="posttrain-time-") as scratch:
        extra = ["train.log_every=1"]
        total_steps = config.train.max_steps or 0
        if total_steps:
            sampled = min(total_steps, max(min_steps, math.ceil(sample * total_steps)))
            cold = summary = run_briefly(config, sampled, Path(scratch) / "sample", extra)
        else:  # an epochs-based run: its step count comes from the data, which a first short run reads
            cold = run_briefly(config, min_steps, Path(scratch) / "first", extra)
            total_steps = max(1, math.ceil(config.train.epochs * cold["steps_per_epoch"]))
            sampled = min(total_steps, max(min_steps, math.ceil(sample * total_steps)))
            summary = (
                cold if sampled == cold["steps"] else run_briefly(config, sampled, Path(scratch) / "sample", extra)
            )
    first_s, steps_s = summary["time_first_step_s"] or 0.0, summary["time_steps_s"]
    evaluations_s, checkpoints_s = summary["time_evaluations_s"], summary["time_checkpoints_s"]
    sampled = summary["steps"]
    step_s = (steps_s - first_s) / (sampled - 1) if sampled > 1 else steps_s
    eval_s = sum(evaluations_s) / len(evaluations_s) if evaluations_s else 0.0
    checkpoint_s = sum(checkpoints_s) / len(checkpoints_s) if checkpoints_s else 0.0
    # Start and end: the first run's wall time besides its steps, evaluations and checkpoints, plus its first step.
    # That run was the process's first (libraries imported, kernels compiled, caches filled in it), as a fresh run
    # of the whole is; a second run in this process would start faster.
    spent = cold["time_steps_s"] + sum(cold["time_evaluations_s"]) + sum(cold["time_checkpoints_s"])
    fixed_s = cold["wall_time_s"] - spent + (cold["time_first_step_s"] or 0.0)
    tokens_s = summary.get("tokens_trained", 0) / steps_s if steps_s else 0.0
    return TimeEstimate(
        total_steps=total_steps,
        sampled_steps=sampled,
        step_s=step_s,
        eval_s=eval_s,
        eval_every=config.train.eval_every,
        checkpoint_s=checkpoint_s,
        checkpoint_every=config.checkpoint.every,
        fixed_s=max(fixed_s, 0.0),
        tokens_per_s=tokens_s,
        flops_per_token=4.0 * summary["total_parameters"] + 2.0 * summary["trainable_parameters"],
    )


def render_time(estimate: TimeEstimate, peak_flops: float | None) -> str:
    mfu = estimate.mfu(peak_flops)
    return "\n".join(
        [
            f"time: {estimate.total_s / 60:.1f} min for {estimate.total_steps} steps "
            f"(from {estimate.sampled_steps} sampled steps)",
            f"  steps        {estimate.total_steps} x {estimate.step_s:.3f} s",
            f"  evaluations  {estimate.evaluations} x {estimate.eval_s:.2f} s",
            f"  checkpoints  {estimate.checkpoints} x {estimate.checkpoint_s:.2f} s",
            f"  start, end   {estimate.fixed_s:.1f} s",
            f"  {estimate.tokens_per_s:,.0f} tokens/s, {estimate.tokens_per_s * estimate.flops_per_token / 1e12:.3f} "
            "TFLOP/s achieved" + (f", MFU {mfu:.1%}" if mfu is not None else " (MFU: give --peak-tflops)"),
        ]
    )


def time_json(estimate: TimeEstimate, peak_flops: float | None) -> dict[str, Any]:
    return {
        "total_s": round(estimate.total_s, 2),
        "total_steps": estimate.total_steps,
        "sampled_steps": estimate.sampled_steps,
        "step_s": estimate.step_s,
        "eval_s": estimate.eval_s,
        "evaluations": estimate.evaluations,
        "checkpoint_s": estimate.checkpoint_s,
        "checkpoints": estimate.checkpoints,
        "fixed_s": estimate.fixed_s,
        "tokens_per_s": estimate.tokens_per_s,
        "mfu": estimate.mfu(peak_flops),
    }
