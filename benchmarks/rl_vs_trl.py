"""Online-RL throughput: posttrain's GRPO (``stage: ppo``, ``algorithm.advantage: grpo``) against TRL's
``GRPOTrainer``, on CPU, fp32, generation on the transformers model on both sides (posttrain's decoding loop,
TRL's ``generate``; no vLLM).

    python benchmarks/rl_vs_trl.py --size tiny                      # 1 round of the two contenders
    python benchmarks/rl_vs_trl.py --size tiny --threads 1 --steps 6 # on a shared machine (see below)
    python benchmarks/rl_vs_trl.py --size tiny --threads 1 --steps 6 --sft-steps 0   # untrained policy
    python benchmarks/rl_vs_trl.py --size tiny --steps 4 --profile grpo   # cProfile of the timed steps

What is compared. The toy kit (``posttrain.toy.build_toy(dir, size, seed=0)``) is built once in a temporary
directory. Both contenders train the SAME policy directory (its tokenizer and chat template), with a frozen
reference model loaded from that same directory, on the SAME ``prompts.jsonl`` (``messages`` + ``reference`` rows;
TRL gets ``prompt`` = the message list, in its conversational format, and the ``reference`` column through
``datasets.Dataset.from_list``), full fine-tuning:

- ``grpo``: ``posttrain.recipes.ppo.run(build_config({"stage": "ppo", ...}))`` with ``algorithm.advantage: grpo``.
- ``trl_grpo``: ``trl.GRPOTrainer``.

The policy. By default the toy model after ``--sft-steps`` (60, the demo's SFT length) steps of posttrain's SFT
recipe on the toy ``sft.jsonl`` (lr 2e-3, batch 8; not timed), because an RL run starts from an SFT model: its
answers end with the end token after a few tokens, now and then one runs to ``max_new_tokens``, and both sides
sample from the same policy, so from the same length distribution (printed as ``policy``,
``*_mean_completion_tokens`` and ``*_finished_share``). ``--sft-steps 0`` takes the untrained toy model: it almost
never samples the end token, so nearly every response runs to ``max_new_tokens`` on
both sides. That workload has no variable lengths and measures the arithmetic per token alone; the default also
measures what each side does with lengths (posttrain drops a row from the decoding batch when it ends and packs
training rows without padding; TRL's ``generate`` runs every row until the longest ends, and its training batch
is padded to the longest completion).

Same reward: the toy gold reward, ``posttrain.tasks.score_prompt(prompt_text, response, reference)``, where
``prompt_text`` is the last user message. posttrain calls it through ``reward.function: toy`` (with
``unfinished_penalty: 0``, which TRL has no counterpart for) on the decoded response with special tokens skipped
and whitespace stripped; TRL calls ``toy_gold_reward(prompts, completions, reference)``, a wrapper that applies
the same function to each completion's text (decoded the same way by TRL; the wrapper strips it).

Matched settings (printed, and in the JSON line): ``--prompts-per-step`` prompts (default 8) x ``--num-samples``
samples (default 8: ``sampling.num_samples`` = TRL's ``num_generations``) per step, in file order on both sides
(posttrain ``data.shuffle: false``, TRL ``shuffle_dataset=False``), so both see the same prompts at every step;
``--max-new-tokens`` (default 24: ``sampling.max_new_tokens`` = ``max_completion_length``), temperature 1.0,
top-p 1, top-k off, stop at ``<|end|>``; all the step's samples in one ``generate`` call (posttrain
``sampling.batch_size`` = TRL's ``generation_batch_size`` = prompts x samples); ONE optimizer update per step on
the whole rollout (posttrain ``ppo_epochs: 1``, ``train.batch_size`` = prompts x samples, ``grad_accum: 1``; TRL
``per_device_train_batch_size`` = prompts x samples, which counts completions, ``gradient_accumulation_steps=1``,
``steps_per_generation=1``, ``num_iterations=1``); the group-normalised advantage ``(r - mean) / std`` (posttrain
``scale_by_std: true``, TRL ``scale_rewards="group"``; eps 1e-6 vs 1e-4); clip 0.2 (``clip_range`` / ``epsilon``);
KL to the reference in the loss with coefficient 0.04 and the k3 estimator (posttrain ``kl_mode: loss``,
``kl_estimator: k3``; TRL ``beta=0.04``, which is what it computes); the loss a token mean over the update's
response tokens (posttrain ``loss_aggregation: token_mean``; TRL ``loss_type="dapo"``, which divides by the
active tokens of the whole accumulated batch, the same thing; with one micro-batch ``"bnpo"`` would be too),
truncated completions kept in the loss (``mask_truncated_completions=False``), no entropy bonus; AdamW lr 2e-5
(betas 0.9/0.999, eps 1e-8, weight decay 0), constant schedule, no warm-up, grad-norm clipping at 1.0; seed 0;
sdpa attention; float32 weights and compute (TRL defaults to bf16 and gradient checkpointing: both are turned off);
no evaluation, no checkpoint during training, no progress bar. Everything else is each library's default (TRL's
fused AdamW, its logging every 10 steps; posttrain's ``metrics.jsonl`` and ``samples.jsonl`` every step).

Both skip the separate "old log-probs" forward here: with one update per rollout the sampling policy IS the
policy being updated, so the update's own (detached) log-probs serve (TRL always does this; posttrain when the
rollout gets exactly one update, ``no_grad_forwards_per_step`` = 1 on both sides).

How it is measured. Each run is a fresh subprocess; runs alternate (grpo, trl_grpo, grpo, ...) over ``--rounds``
rounds, and the headline is the MEDIAN over rounds (the fastest round and every round are beside it). In every
subprocess a global ``torch.optim`` step post-hook timestamps the end of every optimizer step (one per step on
both sides), so model loading and set-up are never timed:

    samples/s = prompts x samples x (N - warmup) / (wall time from the end of step ``warmup`` to the end of step N)
    gen tok/s = generated tokens of steps warmup+1 .. N / the same time

A step's time covers all of it: sampling, decoding, scoring, the reference (and, in posttrain, old-policy)
log-prob forwards, advantages, the update's forward and backward, the optimizer step, and each library's logging.
Generated tokens are counted at the generation call on both sides (each response up to and including its end
token, as both libraries train on it). Cross-checks: posttrain's own ``step_time_s`` from ``metrics.jsonl`` and a
TRL ``TrainerCallback`` timing ``on_step_begin`` .. ``on_step_end``, summed over the timed steps
(``*_own_step_s``). Per timed step, the phases (seconds; timed by wrapping the functions that do them):

- posttrain: ``generate`` (``HFEngine.generate``), ``reward`` (``WeightedReward.breakdown``), ``logps`` (the
  old-policy and reference forwards, ``score_logps``), ``rollout_other`` (the rest of ``make_rollout``:
  advantages, KL, metrics), ``loss_forward`` (``ppo_micro_loss``), ``backward`` (``Runtime.backward``),
  ``optimizer`` (``Runtime.update``: clip, step, zero), ``other`` (the rest of the step: ``log_step``, ``end_step``,
  the watch, ``samples.jsonl``).
- TRL: ``generate`` (``_generate``: tokenise, generate, decode), ``reward`` (``_calculate_rewards``), ``logps``
  (``_get_per_token_logps_and_entropies`` without grad: the reference forward), ``rollout_other`` (the rest of
  ``_generate_and_score_completions``), ``loss_forward`` (``compute_loss``), ``backward`` (the rest of
  ``training_step``), ``other`` (the rest of the step: clipping, optimizer, scheduler, callbacks, logging).

``--profile grpo`` (or ``trl_grpo``) runs that contender once under ``cProfile`` for the steps after the warm-up
and prints the functions with the most cumulative and own time.

Threads. ``--threads`` defaults to torch's default (all cores), the same on both sides (``torch.set_num_threads``
in each subprocess). On a machine shared with other busy processes use ``--threads 1`` (``preference_vs_trl.py``
explains why).

Where the difference comes from. Both run the same transformers model and kernels, compute-bound on one core;
posttrain does less of that work (the per-phase seconds in the summary show where):

- each prompt is computed once per group of ``num_samples`` instead of once per sample: in generation, every
  distinct prompt is prefilled once and its KV cache copied to the group's rows
  (``rollout.hf.shared_prompt_cache``); in the reference, loss and (for PPO) critic forwards and the backward,
  the responses to one prompt form one packed unit that holds the prompt once, with a 4D mask that shows each
  response the prompt and itself (``data.rollout_layout.ResponseLayout``);
- a row leaves the decoding batch when it ends (``rollout.hf.decode_batch``), and training rows hold no padding.

On the untrained policy only the first applies (every response runs to ``max_new_tokens``), so its ratio measures
the shared prompts alone: what is left is the responses' own arithmetic, the same on both sides. With the
untrained policy every reward is 0, so the advantages and the updates are 0: the arithmetic is the same dense
work whatever the values, so this does not change the timing. On GPU, vLLM generation (``rollout/vllm.py``) is not
measured here.

Figures: ``--record`` writes the summary to ``benchmarks/RESULTS.md`` (one section per command); the README quotes
them from there.

The LAST line printed is one JSON object: ``samples_s`` (posttrain's sampled responses per second, steady state)
``trl_samples_s``, ``ratio`` (= samples_s / trl_samples_s), ``gen_tok_s``, ``trl_gen_tok_s``, ``gen_tok_ratio``,
with ``_best``/``_runs`` variants, the settings, the policy used, mean completion length and finished share on each
side, the mean rewards (a sanity check: same model, same prompts, so they should be close), per-phase seconds per
step, threads, CPU share and load, peak RSS, and the torch/transformers/trl versions.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    StepRecorder,
    benchmark_parser,
    best_of_rounds,
    emit_results,
    process_stats,
    run_subprocess,
    steps_and_threads,
    trl_quiet_args,
    warn_if_contended,
)

CONTENDERS: tuple[str, ...] = ("grpo", "trl_grpo")
SEED = 0
DEFAULT_PROMPTS_PER_STEP = 8  # configs/grpo.yaml
DEFAULT_NUM_SAMPLES = 8
DEFAULT_MAX_NEW_TOKENS = 24
MAX_LENGTH = 256  # posttrain's data.max_length: prompt + response; the toy prompts are far shorter
TEMPERATURE = 1.0
LEARNING_RATE = 2e-5
KL_COEF = 0.04  # posttrain kl_coef = TRL beta; nonzero, so both sides keep and run a reference model
CLIP_RANGE = 0.2
TRL_LOSS_TYPE = "dapo"  # sum over the batch's response tokens / their count: posttrain's token_mean
DEFAULT_STEPS: dict[str, int] = {"tiny": 8, "small": 4}
DEFAULT_WARMUP = 1
SFT_LR = 2e-3  # posttrain demo's SFT settings: enough for the toy model to end its answers after ~30 steps
DEFAULT_SFT_STEPS = 60  # the demo's SFT length
PROFILE_LINES = 30


# ---------------------------------------------------------------------------------------------- in the subprocess


class Phases:
    """Wall time spent inside chosen functions, as (name, start, end) spans, to break a step down."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []

    def wrap(self, owner: Any, attribute: str, name: str, when: Callable[[], bool] = lambda: True) -> None:
        """Replace ``owner.attribute`` (a class's function or an instance's bound method) by a timed call; spans are
        recorded only when ``when()`` holds at the call."""
        original = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not when():
                return original(*args, **kwargs)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spans.append((name, started, time.perf_counter()))

        setattr(owner, attribute, timed)

    def calls(self, name: str, since: float) -> int:
        """How many calls of phase ``name`` ended after ``since``."""
        return sum(1 for span_name, _, ended in self.spans if span_name == name and ended > since)

    def totals(self, since: float) -> dict[str, float]:
        """Seconds per phase over the spans that ended after ``since``."""
        out: dict[str, float] = {}
        for name, started, ended in self.spans:
            if ended > since:
                out[name] = out.get(name, 0.0) + ended - max(started, since)
        return out


class Generations:
    """Per generation call: responses sampled, tokens generated, responses that ended with a stop token."""

    def __init__(self) -> None:
        self.calls: list[dict[str, int]] = []
        self.ends: list[float] = []

    def record(self, lengths: list[int], finished: list[bool]) -> None:
        self.calls.append({"responses": len(lengths), "tokens": sum(lengths), "finished": sum(finished)})
        self.ends.append(time.perf_counter())

    def since(self, moment: float) -> dict[str, int]:
        timed = [call for call, ended in zip(self.calls, self.ends) if ended > moment]
        return {key: sum(call[key] for call in timed) for key in ("responses", "tokens", "finished")}


def posttrain_config(spec: dict[str, Any]) -> Any:
    from posttrain.config import build_config

    responses_per_step = spec["prompts_per_step"] * spec["num_samples"]
    return build_config(
        {
            "stage": "ppo",
            "output_dir": spec["output_dir"],
            "resume": False,
            "seed": SEED,
            "model": {"path": spec["model"], "dtype": "float32", "attn_implementation": "sdpa"},
            "peft": {"method": "full"},
            "data": {"train": spec["data"], "max_length": MAX_LENGTH, "shuffle": False},
            "sampling": {
                "num_samples": spec["num_samples"],
                "temperature": TEMPERATURE,
                "top_p": 1.0,
                "top_k": 0,
                "max_new_tokens": spec["max_new_tokens"],
                "batch_size": responses_per_step,
            },
            "reward": {"function": "toy", "unfinished_penalty": 0.0},
            "algorithm": {
                "advantage": "grpo",
                "prompts_per_step": spec["prompts_per_step"],
                "ppo_epochs": 1,
                "scale_by_std": True,
                "clip_range": CLIP_RANGE,
                "kl_coef": KL_COEF,
                "kl_mode": "loss",
                "kl_estimator": "k3",
                "loss_aggregation": "token_mean",
                "entropy_coef": 0.0,
            },
            "train": {
                "max_steps": spec["steps"],
                "batch_size": responses_per_step,
                "grad_accum": 1,
                "precision": "fp32",
            },
            "optim": {"name": "adamw", "lr": LEARNING_RATE, "weight_decay": 0.0, "max_grad_norm": 1.0},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "checkpoint": {"every": None},
            "logging": {"progress": False, "report": False, "tensorboard": False},
        }
    )


def run_posttrain(spec: dict[str, Any], phases: Phases, generations: Generations) -> dict[str, Any]:
    """Our recipe, with its phases timed; returns the per-step records of metrics.jsonl."""
    import posttrain.recipes.ppo as ppo
    from posttrain.rewards import WeightedReward
    from posttrain.runtime import Runtime

    original_generate = ppo.HFEngine.generate

    def counting_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
        groups = original_generate(self, *args, **kwargs)
        responses = [r for group in groups for r in group]
        generations.record([r.num_tokens for r in responses], [r.finished for r in responses])
        return groups

    ppo.HFEngine.generate = counting_generate
    phases.wrap(ppo.HFEngine, "generate", "generate")
    phases.wrap(WeightedReward, "breakdown", "reward")
    phases.wrap(ppo, "score_logps", "logps")  # make_rollout looks these up in the module at every call
    phases.wrap(ppo, "make_rollout", "rollout")
    phases.wrap(ppo, "ppo_micro_loss", "loss_forward")
    phases.wrap(Runtime, "backward", "backward")
    phases.wrap(Runtime, "update", "optimizer")
    ppo.run(posttrain_config(spec))
    records = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return {"records": [r for r in records if "step_time_s" in r]}


def prompt_records(path: str) -> list[dict[str, Any]]:
    rows = map(json.loads, Path(path).read_text().splitlines())
    return [{"prompt": row["messages"], "reference": row["reference"]} for row in rows]


def trl_args(spec: dict[str, Any]) -> Any:
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=spec["output_dir"],
        seed=SEED,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        per_device_train_batch_size=spec["prompts_per_step"] * spec["num_samples"],  # completions, not prompts
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_iterations=1,
        num_generations=spec["num_samples"],
        max_completion_length=spec["max_new_tokens"],
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        shuffle_dataset=False,
        beta=KL_COEF,
        epsilon=CLIP_RANGE,
        loss_type=TRL_LOSS_TYPE,
        scale_rewards="group",
        mask_truncated_completions=False,
        use_vllm=False,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_steps=spec["steps"],
        bf16=False,
        **trl_quiet_args(),
    )


TRL_SETTINGS: tuple[str, ...] = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "generation_batch_size",
    "steps_per_generation",
    "num_iterations",
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "beta",
    "epsilon",
    "loss_type",
    "scale_rewards",
    "mask_truncated_completions",
    "shuffle_dataset",
    "learning_rate",
    "lr_scheduler_type",
    "max_grad_norm",
    "optim",
    "bf16",
    "gradient_checkpointing",
    "use_vllm",
    "logging_steps",
)


def run_trl(spec: dict[str, Any], phases: Phases, generations: Generations) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from posttrain.rewards import last_user_text
    from posttrain.tasks import score_prompt

    rewards: list[float] = []

    def toy_gold_reward(prompts: list[Any], completions: list[Any], reference: list[str], **_: Any) -> list[float]:
        # posttrain's response text is the decoded reply with special tokens skipped, stripped.
        scores = [
            score_prompt(last_user_text(prompt), completion[0]["content"].strip(), answer)
            for prompt, completion, answer in zip(prompts, completions, reference, strict=True)
        ]
        rewards.extend(scores)
        return scores

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.began = 0.0
            self.durations: list[float] = []

        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            self.durations.append(time.perf_counter() - self.began)

    timer = StepTimer()
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    args = trl_args(spec)
    trainer = GRPOTrainer(
        model=spec["model"],
        reward_funcs=toy_gold_reward,
        args=args,
        train_dataset=Dataset.from_list(prompt_records(spec["data"])),
        processing_class=tokenizer,
        callbacks=[timer],
    )
    eos_ids = set(trainer.eos_token_ids)
    original_generate = trainer._generate

    def counting_generate(prompts: list[Any]) -> Any:
        out = original_generate(prompts)
        completion_ids = out[1]
        lengths = [len(ids) for ids in completion_ids]
        generations.record(lengths, [bool(ids) and ids[-1] in eos_ids for ids in completion_ids])
        return out

    trainer._generate = counting_generate
    phases.wrap(trainer, "_generate", "generate")
    phases.wrap(trainer, "_calculate_rewards", "reward")
    phases.wrap(trainer, "_get_per_token_logps_and_entropies", "logps", when=lambda: not torch.is_grad_enabled())
    phases.wrap(trainer, "_generate_and_score_completions", "rollout")
    phases.wrap(trainer, "compute_loss", "loss_forward")
    phases.wrap(trainer, "training_step", "training_step")
    trainer.train()
    steps = spec["prompts_per_step"] * spec["num_samples"]
    reward_per_step = [statistics.mean(rewards[i : i + steps]) for i in range(0, len(rewards), steps)]
    return {
        "own_step_s": timer.durations,
        "reward_per_step": reward_per_step,
        "settings": {name: getattr(args, name) for name in TRL_SETTINGS},
        "eos_token_ids": sorted(eos_ids),
    }


def breakdown(contender: str, totals: dict[str, float], timed_s: float, timed_steps: int) -> dict[str, float]:
    """Seconds per timed step in each phase; the phases add up to the step."""
    get = totals.get
    if contender == "grpo":
        parts = {
            "generate": get("generate", 0.0),
            "reward": get("reward", 0.0),
            "logps": get("logps", 0.0),
            "rollout_other": get("rollout", 0.0) - get("generate", 0.0) - get("reward", 0.0) - get("logps", 0.0),
            "loss_forward": get("loss_forward", 0.0),
            "backward": get("backward", 0.0),
            "optimizer": get("optimizer", 0.0),
        }
    else:
        rollout = get("rollout", 0.0)
        parts = {
            "generate": get("generate", 0.0),
            "reward": get("reward", 0.0),
            "logps": get("logps", 0.0),
            "rollout_other": rollout - get("generate", 0.0) - get("reward", 0.0) - get("logps", 0.0),
            "loss_forward": get("loss_forward", 0.0),
            # training_step = _prepare_inputs (the rollout, at the step that generates) + compute_loss + backward
            "backward": get("training_step", 0.0) - rollout - get("loss_forward", 0.0),
        }
    parts["other"] = timed_s - sum(parts.values())
    return {name: round(value / timed_steps, 4) for name, value in parts.items()}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run; returns its throughput, counts and phase times (printed as the last line)."""
    import torch

    torch.set_num_threads(spec["threads"])
    recorder = StepRecorder()
    recorder.install_step_hook()
    phases, generations = Phases(), Generations()
    warmup = spec["warmup"]
    profiler = cProfile.Profile() if spec.get("profile") else None
    if profiler is not None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def toggle_profiling(*_: Any) -> None:  # registered after the recorder's hook, so it sees this step counted
            if len(recorder.step_ends) == warmup:
                profiler.enable()
            elif len(recorder.step_ends) == spec["steps"]:  # the timed steps only, not the final save
                profiler.disable()

        register_optimizer_step_post_hook(toggle_profiling)
    started = time.perf_counter()
    ours = spec["contender"] == "grpo"
    run = (run_posttrain if ours else run_trl)(spec, phases, generations)
    if profiler is not None:
        profiler.disable()
    steps = len(recorder.step_ends)
    if steps != spec["steps"]:
        raise RuntimeError(f"{spec['contender']}: expected {spec['steps']} optimizer steps, recorded {steps}")
    calls = len(generations.calls)
    if calls != steps:
        raise RuntimeError(f"{spec['contender']}: expected one generation call per step, counted {calls}")
    timed_s, cpu_s = recorder.window(warmup)
    window_start = recorder.step_ends[warmup - 1]
    counted = generations.since(window_start)
    timed_steps = steps - warmup
    expected = timed_steps * spec["prompts_per_step"] * spec["num_samples"]
    if counted["responses"] != expected:
        timed_responses = counted["responses"]
        raise RuntimeError(f"{spec['contender']}: {timed_responses} responses in the timed steps, not {expected}")
    everything = generations.since(0.0)
    result: dict[str, Any] = {
        "contender": spec["contender"],
        "steps": steps,
        "timed_steps": timed_steps,
        "timed_s": timed_s,
        "samples_s": counted["responses"] / timed_s,
        "gen_tok_s": counted["tokens"] / timed_s,
        "step_s": timed_s / timed_steps,
        "mean_completion_tokens": everything["tokens"] / everything["responses"],
        "finished_share": everything["finished"] / everything["responses"],
        "phases_s_per_step": breakdown(spec["contender"], phases.totals(window_start), timed_s, timed_steps),
        # posttrain: old policy + reference; TRL: the reference only (it skips the old policy's when on-policy)
        "no_grad_forwards_per_step": phases.calls("logps", window_start) / timed_steps,
        "first_step_s": recorder.step_ends[0] - started,
        **process_stats(timed_s, cpu_s),
    }
    if ours:
        records = run["records"][:steps]
        result["own_step_s"] = sum(r["step_time_s"] for r in records[warmup:])
        result["mean_reward"] = statistics.mean(r["reward"] for r in records)
        result["metrics_mean_completion_tokens"] = statistics.mean(r["response_length"] for r in records)
    else:
        result["own_step_s"] = sum(run["own_step_s"][warmup:steps])
        result["mean_reward"] = statistics.mean(run["reward_per_step"][:steps])
        result["trl_settings"] = run["settings"]
        result["trl_eos_token_ids"] = run["eos_token_ids"]
    if profiler is not None:
        for order in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(PROFILE_LINES)
            result[f"profile_{order}"] = text.getvalue()
    return result


# ---------------------------------------------------------------------------------------------- in the parent


def describe_workload(model_dir: Path, prompts_path: Path, max_new_tokens: int) -> dict[str, Any]:
    """The prompts as each side tokenises them (posttrain's ``render_prompt_ids``; TRL's
    ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``, what ``GRPOTrainer._tokenize_prompts``
    calls) with the count that differ, and each side's stop tokens."""
    from transformers import AutoTokenizer, GenerationConfig

    from posttrain.data.dataset import end_of_turn_ids, use_chat_template
    from posttrain.rollout import render_prompt_ids

    records = prompt_records(str(prompts_path))
    ours_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = use_chat_template(ours_tokenizer, None)  # as the recipe does before rendering its prompts
    ours = [render_prompt_ids(ours_tokenizer, record["prompt"]) for record in records]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # TRL's: as saved with the model
    theirs = tokenizer.apply_chat_template(
        [record["prompt"] for record in records], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    trl_stop = sorted(eos if isinstance(eos, list) else [eos])
    return {
        "prompts": len(records),
        "mean_prompt_tokens": round(statistics.mean(len(ids) for ids in ours), 2),
        "longest_prompt_tokens": max(len(ids) for ids in ours),
        "prompts_too_long": sum(len(ids) > MAX_LENGTH - max_new_tokens for ids in ours),
        "trl_prompt_id_mismatches": sum(a != list(b) for a, b in zip(ours, theirs, strict=True)),
        "stop_token_ids": sorted(end_of_turn_ids(ours_tokenizer, template)),
        "trl_stop_token_ids": trl_stop,
    }


def sft_policy(toy: Any, out_dir: Path, steps: int) -> Path:
    """The toy model after ``steps`` SFT steps on the toy demonstrations (posttrain's recipe, not timed)."""
    from posttrain.config import build_config
    from posttrain.recipes import sft

    config = build_config(
        {
            "stage": "sft",
            "output_dir": str(out_dir),
            "resume": False,
            "seed": SEED,
            "model": {"path": str(toy.model), "dtype": "float32"},
            "peft": {"method": "full"},
            "data": {"train": str(toy.sft), "max_length": MAX_LENGTH, "packing": True},
            "train": {"max_steps": steps, "batch_size": 8, "grad_accum": 1, "precision": "fp32"},
            "optim": {"name": "adamw", "lr": SFT_LR, "weight_decay": 0.0, "max_grad_norm": 1.0},
            "schedule": {"name": "cosine", "warmup_steps": min(20, steps // 2), "min_lr_ratio": 0.05},
            "checkpoint": {"every": None},
            "logging": {"progress": False, "report": False, "tensorboard": False},
        }
    )
    sft.run(config)
    return out_dir / "model"


def settings_line(out: dict[str, Any]) -> str:
    return (
        f"{out['prompts_per_step']} prompts x {out['num_samples']} samples per step, max_new_tokens "
        f"{out['max_new_tokens']}, temperature {TEMPERATURE}, one update per step on all {out['responses_per_step']} "
        f"responses, lr {LEARNING_RATE}, KL coef {KL_COEF} (k3, in the loss), clip {CLIP_RANGE}, token-mean loss "
        f"(TRL loss_type={TRL_LOSS_TYPE!r}), fp32, CPU, {out['threads']} thread(s), {out['steps']} steps "
        f"({out['warmup_steps']} warm-up)"
    )


def main() -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0],
        DEFAULT_WARMUP,
        1,
        "steps (= updates) per run",
        "alternating rounds of the two contenders",
    )
    parser.add_argument("--prompts-per-step", type=int, default=DEFAULT_PROMPTS_PER_STEP)
    parser.add_argument(
        "--num-samples", type=int, default=DEFAULT_NUM_SAMPLES, help="group size (TRL num_generations)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument(
        "--sft-steps",
        type=int,
        default=DEFAULT_SFT_STEPS,
        help="SFT the toy model this many steps first (0: none, the untrained model)",
    )
    parser.add_argument("--profile", choices=CONTENDERS, default=None, help="cProfile one run of this contender")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import torch
    import transformers
    import trl

    from posttrain.toy import build_toy

    steps, threads = steps_and_threads(parser, args, DEFAULT_STEPS)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (GRPO compares the samples of a prompt)")
    began = time.perf_counter()
    out: dict[str, Any] = {
        "size": args.size,
        "steps": steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "threads": threads,
        "prompts_per_step": args.prompts_per_step,
        "num_samples": args.num_samples,
        "responses_per_step": args.prompts_per_step * args.num_samples,
        "max_new_tokens": args.max_new_tokens,
        "temperature": TEMPERATURE,
        "lr": LEARNING_RATE,
        "kl_coef": KL_COEF,
        "kl_estimator": "k3",
        "clip_range": CLIP_RANGE,
        "trl_loss_type": TRL_LOSS_TYPE,
        "precision": "fp32",
        "device": "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rl_vs_trl_") as tmp:
        toy = build_toy(Path(tmp) / "toy", size=args.size, seed=SEED)
        policy = toy.model
        out["policy"] = "untrained toy model (responses almost never end before max_new_tokens)"
        if args.sft_steps:
            print(f"SFT of the toy model, {args.sft_steps} steps (not timed)", file=sys.stderr)
            policy = sft_policy(toy, Path(tmp) / "sft", args.sft_steps)
            out["policy"] = f"toy model after {args.sft_steps} SFT steps (lr {SFT_LR})"
        workload = describe_workload(policy, toy.prompts, args.max_new_tokens)
        print(f"workload {args.size}: {json.dumps(workload)}", file=sys.stderr)
        for key in ("trl_prompt_id_mismatches", "prompts_too_long"):
            if workload[key]:
                print(f"WARNING: {key} = {workload[key]}: the sides do not sample the same prompts", file=sys.stderr)
        if workload["stop_token_ids"] != workload["trl_stop_token_ids"]:
            print("WARNING: the two sides stop generation at different tokens", file=sys.stderr)
        out.update(workload)
        print(f"policy: {out['policy']}", file=sys.stderr)
        print(f"settings: {settings_line(out)}", file=sys.stderr)
        contenders = [args.profile] if args.profile else list(CONTENDERS)
        for round_index in range(1 if args.profile else args.rounds):
            for contender in contenders:
                spec = {
                    "contender": contender,
                    "steps": steps,
                    "warmup": args.warmup,
                    "threads": threads,
                    "model": str(policy),
                    "data": str(toy.prompts),
                    "prompts_per_step": args.prompts_per_step,
                    "num_samples": args.num_samples,
                    "max_new_tokens": args.max_new_tokens,
                    "output_dir": str(Path(tmp) / f"{contender}-{round_index}"),
                    "profile": bool(args.profile),
                }
                result = run_subprocess(__file__, spec, contender, extra_env={"TQDM_DISABLE": "1"})
                results.append(result)
                if "trl_settings" in result and "trl_settings" not in out:
                    print(f"TRL GRPOConfig: {json.dumps(result['trl_settings'])}", file=sys.stderr)
                    out["trl_settings"] = result["trl_settings"]
                print(
                    f"[round {round_index + 1}] {contender:9s} {result['samples_s']:6.2f} samples/s  "
                    f"{result['gen_tok_s']:7.1f} gen tok/s  {result['step_s']:.2f} s/step (own timer "
                    f"{result['own_step_s'] / result['timed_steps']:.2f})  mean completion "
                    f"{result['mean_completion_tokens']:.1f} tok, {result['finished_share']:.0%} ended  mean reward "
                    f"{result['mean_reward']:.3f}  peak RSS {result['peak_rss_mib']:.0f} MiB  cpu share "
                    f"{result['cpu_share']:.2f}  load {result['load_avg_1min']:.1f}",
                    file=sys.stderr,
                )
                print(f"           phases, s/step: {json.dumps(result['phases_s_per_step'])}", file=sys.stderr)
                for order in ("cumulative", "tottime"):
                    if f"profile_{order}" in result:
                        text = result[f"profile_{order}"]
                        print(f"cProfile of {contender}, timed steps, by {order}:\n{text}", file=sys.stderr)
    prefixes = {"grpo": "", "trl_grpo": "trl_"}
    summary: dict[str, dict[str, Any]] = {}
    for contender in contenders:
        mine = [r for r in results if r["contender"] == contender]
        prefix = prefixes[contender]
        summary[contender] = {
            "samples_s": best_of_rounds(r["samples_s"] for r in mine),
            "gen_tok_s": best_of_rounds(r["gen_tok_s"] for r in mine),
        }
        for metric in ("samples_s", "gen_tok_s"):
            rounds = summary[contender][metric]
            out[f"{prefix}{metric}"] = round(rounds["median"], 3)
            out[f"{prefix}{metric}_best"] = round(rounds["best"], 3)
            out[f"{prefix}{metric}_runs"] = [round(r[metric], 3) for r in mine]
        out[f"{prefix}step_s"] = round(statistics.median(r["step_s"] for r in mine), 3)
        out[f"{prefix}own_step_s_runs"] = [round(r["own_step_s"] / r["timed_steps"], 3) for r in mine]
        out[f"{prefix}mean_completion_tokens"] = round(statistics.mean(r["mean_completion_tokens"] for r in mine), 2)
        out[f"{prefix}finished_share"] = round(statistics.mean(r["finished_share"] for r in mine), 4)
        out[f"{prefix}mean_reward"] = round(statistics.mean(r["mean_reward"] for r in mine), 4)
        out[f"{prefix}phases_s_per_step"] = {
            name: round(statistics.median(r["phases_s_per_step"][name] for r in mine), 4)
            for name in mine[0]["phases_s_per_step"]
        }
        out[f"{prefix}no_grad_forwards_per_step"] = mine[0]["no_grad_forwards_per_step"]
        out[f"{prefix}peak_rss_mib"] = round(max(r["peak_rss_mib"] for r in mine), 1)
    if len(summary) == 2:
        for metric, name in (("samples_s", "ratio"), ("gen_tok_s", "gen_tok_ratio")):
            out[name] = round(summary["grpo"][metric]["median"] / summary["trl_grpo"][metric]["median"], 3)
            out[f"{name}_best"] = round(summary["grpo"][metric]["best"] / summary["trl_grpo"][metric]["best"], 3)
    shares = [r["cpu_share"] for r in results]
    out["max_load_avg_1min"] = round(max(r["load_avg_1min"] for r in results), 2)
    out["min_cpu_share"] = round(min(shares), 3)
    warn_if_contended(shares, threads)
    out["wall_s"] = round(time.perf_counter() - began, 1)
    if "ratio" in out:
        print(
            f"posttrain GRPO {out['samples_s']:.2f} samples/s ({out['gen_tok_s']:.1f} gen tok/s), TRL GRPOTrainer "
            f"{out['trl_samples_s']:.2f} samples/s ({out['trl_gen_tok_s']:.1f} gen tok/s): ratio {out['ratio']:.2f} "
            f"(median of {args.rounds} round(s)); {out['policy']}",
            file=sys.stderr,
        )
    emit_results(out, args.record)


if __name__ == "__main__":
    main()
