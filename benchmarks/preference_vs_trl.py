"""Preference training throughput: posttrain's DPO and reward-model recipes against TRL's ``DPOTrainer`` and
``RewardTrainer``, on CPU, fp32.

    python benchmarks/preference_vs_trl.py --size tiny              # 2 rounds of the 5 contenders
    python benchmarks/preference_vs_trl.py --size tiny --threads 1  # on a shared machine (see below)
    python benchmarks/preference_vs_trl.py --size small --steps 20 --rounds 3

What is compared. The toy kit (``posttrain.toy.build_toy(dir, size, seed=0)``) is built once in a temporary
directory; every contender trains the SAME model directory (its tokenizer and chat template) on the SAME
``prefs.jsonl`` (``prompt``/``chosen``/``rejected`` message lists, given to TRL in its conversational format through
``datasets.Dataset.from_list``), full fine-tuning:

- ``dpo``: ``posttrain.recipes.dpo.run(build_config({"stage": "dpo", ...}))``, sigmoid loss, pairs packed
  (``data.packing: true``, the default: whole pairs in rows of up to ``2 x max_length`` tokens, restarting
  positions, no attention across sequences, each pair's prompt held once: ``data.share_prompt``, the default),
  reference log-probs computed once up front (the recipe's design).
- ``trl_dpo``: ``trl.DPOTrainer`` as it comes: a second (reference) model loaded from the same path, and a
  reference forward over every batch at every step.
- ``trl_dpo_precompute``: the same with ``precompute_ref_log_probs=True`` (TRL's own up-front reference pass).
- ``rm``: ``posttrain.recipes.reward.run(build_config({"stage": "reward", ...}))``, packed the same way.
- ``trl_rm``: ``trl.RewardTrainer``.

Matched settings: max length 256 tokens per sequence (``--max-length``; no toy sequence reaches 32, so nothing is
truncated on either side); DPO beta 0.1, lr 5e-6; reward-model lr 1e-5; AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), cosine
schedule with no warm-up over ``--steps`` steps, grad-norm clipping at 1.0, grad accumulation 1, seed 0, sdpa
attention, float32 weights and compute, no gradient checkpointing (TRL turns it on by default, and bf16: both are
set to match), dropout off (TRL's default; the toy model has none), no evaluation, no checkpoint during training,
no progress bar. Everything else is each library's default (e.g. TRL's fused AdamW, its logging every 10 steps;
posttrain's metrics.jsonl every step).

Pairs per step. posttrain's ``train.batch_size`` and TRL's ``per_device_train_batch_size`` both count pairs; both
get ``round(batch_rows x pairs per row)`` pairs a step (``--batch-rows``, default 3: about 51 pairs), the pairs per
packed row measured by laying the pairs out as the recipes do (``posttrain.data.pairs.pair_rows``, prompts
shared). Padding: TRL pads the 2B sequences of a batch to the longest (chosen
first, then rejected); ``padding_free`` is "temporarily unavailable" in TRL 1.16's DPO (it warns and pads) and does
not exist for its reward trainer, so TRL runs padded. Tokens: both sides feed identical input ids (checked for
every pair: ``trl_id_mismatches`` must be 0). posttrain scores a response as its content and the ``<|end|>``
token; TRL's completion is everything after the generation prompt, so it also scores the newline the template puts
after ``<|end|>`` (one more token per sequence, ``trl_extra_scored_tokens_per_sequence``): the same work, a
slightly different log-prob. Both reward models read the score at the last token of each sequence.

How it is measured. Each run is a fresh subprocess (so peak RSS is that run's alone) and runs alternate (dpo,
trl_dpo, trl_dpo_precompute, rm, trl_rm, dpo, ...) over ``--rounds`` rounds; per contender the headline is its
fastest round, with the median and every round beside it (``benchmarks/sft_vs_trl.py`` explains why). In every
subprocess a global ``torch.optim`` step post-hook timestamps the end of every optimizer step, and the collate
function is wrapped to count each micro-batch's pairs (and real and padded tokens).

    pairs/s = pairs of steps warmup+1 .. N / (wall time from the end of step ``warmup`` to the end of step N
                                              + amortised reference pass)

The amortised reference pass is what makes the DPO comparison fair: posttrain (and TRL with
``precompute_ref_log_probs``) run the reference model once over every training pair before the first step, where
default TRL pays a reference forward inside every step. That up-front pass is timed in the subprocess (posttrain's
``models.forward.reference_logps``, TRL's ``DPOTrainer._precompute_ref_logps``) and its cost per pair is charged to
every timed pair: ``reference seconds x timed pairs / pairs in the reference pass``, i.e. the time the steps would
take if each pair's reference forward were paid when it is trained (exactly what a one-epoch run pays). The
reward models have no reference. posttrain's per-step ``step_time_s`` and ``count`` in ``metrics.jsonl`` are read
back as a cross-check (``metrics_step_s``) and for the losses; both DPO losses must start at log 2 = 0.693 (the
policy is its reference), both reward-model losses near it (a fresh random head scores about 0 everywhere).

Threads. ``--threads`` defaults to torch's default (all cores). On a machine shared with other busy processes,
use ``--threads 1``: with 2 OpenMP threads on 2 busy cores every op waits at a barrier for a descheduled thread
(measured here: a tiny forward went from 0.16 s on one thread to 1.3 s on two), which swamps the code's own speed.

Where the difference comes from (tiny model, 2 threads): per pair both libraries do the same kind of work (one
forward and backward of the chosen and rejected sequences; DPO also one reference forward, paid up front by
posttrain and inside the step by TRL: the same FLOPs, so caching it saves the second model's memory, not time).
posttrain does less of it:

- the prompt is computed once per pair (``data.share_prompt``, on by default): a packed unit holds the prompt,
  then the chosen and the rejected response, with a 4D mask that hides one response from the other. On the toy
  pairs the prompt is about 16 of a sequence's 22 tokens, so a pair is ~30 tokens instead of ~45, in the
  reference pass too;
- no padding: TRL pads the 2B sequences of a batch to the longest (~1.35x the real tokens here);
- short tensor rows: with a dense mask, attention costs the row's length squared however little of it is
  visible, so a batch is laid out in rows of about four units (``data.packing._narrow_rows``) rather than in
  rows of ``2 x max_length`` tokens (508 here, where attention was a quarter of the step).

Before the shared prompt and the short rows the ratios were 0.97 for both (``git log`` of this file).

The LAST line printed is one JSON object: ``dpo_pairs_s``, ``trl_dpo_pairs_s``, ``dpo_ratio``,
``trl_dpo_precompute_pairs_s``, ``dpo_ratio_vs_precompute``, ``rm_pairs_s``, ``trl_rm_pairs_s``, ``rm_ratio`` (with
``_median``/``_runs`` variants), per-contender pairs and tokens per step, first and last losses, peak RSS, the
reference-pass times, and the least CPU share and largest load average seen (other processes compete for the cores
on a shared machine: see ``min_cpu_share``).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
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

CONTENDERS: tuple[str, ...] = ("dpo", "trl_dpo", "trl_dpo_precompute", "rm", "trl_rm")
DEFAULT_MAX_LENGTH = 256
DEFAULT_BATCH_ROWS = 3
DPO_BETA = 0.1
DPO_LR = 5e-6
RM_LR = 1e-5
SEED = 0
# Steps per size: within one epoch of the 2000 toy pairs (about 58 steps of ~34 pairs), the timed part several
# seconds even for the fastest contender.
DEFAULT_STEPS: dict[str, int] = {"tiny": 40, "small": 20}
DEFAULT_WARMUP = 5
LAST_LOSSES = 5  # "last loss" = mean over this many final steps


# ---------------------------------------------------------------------------------------------- in the subprocess


def pair_counters(pad_token_id: int | None = None) -> dict[str, Any]:
    """Counters of a collated micro-batch. posttrain's collate gets its examples (one a pair; its real tokens are
    both sides' whole, as TRL's are, although posttrain lays the shared prompt out once); TRL's batches are the B
    chosen then the B rejected sequences, padded, with an attention mask."""
    if pad_token_id is None:  # posttrain: collate_examples(examples, ...)
        return {
            "pairs": lambda batch, examples, *_: len(examples),
            "real_tokens": lambda batch, examples, *_: sum(
                len(side.input_ids) for example in examples for side in example.sequences
            ),
            "padded_tokens": lambda batch, *_: batch["input_ids"].numel(),
        }
    return {
        "pairs": lambda batch, *_: batch["input_ids"].shape[0] // 2,
        "real_tokens": lambda batch, *_: batch["attention_mask"].sum(),
        "padded_tokens": lambda batch, *_: batch["input_ids"].numel(),
    }


def posttrain_config(spec: dict[str, Any], stage: str) -> Any:
    from posttrain.config import build_config

    config = {
        "stage": stage,
        "output_dir": spec["output_dir"],
        "resume": False,
        "seed": SEED,
        "model": {"path": spec["model"], "dtype": "float32", "attn_implementation": "sdpa"},
        "peft": {"method": "full"},
        "data": {"train": spec["data"], "max_length": spec["max_length"], "packing": True},
        "train": {"max_steps": spec["steps"], "batch_size": spec["batch_pairs"], "grad_accum": 1, "precision": "fp32"},
        "optim": {
            "name": "adamw",
            "lr": DPO_LR if stage == "dpo" else RM_LR,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
        },
        "schedule": {"name": "cosine", "warmup_steps": 0},
        "checkpoint": {"every": None},
        "logging": {"progress": False, "report": False, "tensorboard": False},
    }
    if stage == "dpo":
        config["dpo"] = {"loss": "sigmoid", "beta": DPO_BETA}
    return build_config(config)


def run_posttrain(spec: dict[str, Any], recorder: StepRecorder) -> dict[str, Any]:
    """Our recipe; returns the up-front reference pass (seconds, pairs) and the per-step losses and step times
    of metrics.jsonl."""
    import posttrain.recipes.dpo as dpo
    import posttrain.recipes.reward as reward
    import posttrain.runtime.trainer as trainer

    recipe = dpo if spec["contender"] == "dpo" else reward
    reference = {"s": 0.0, "pairs": 0}
    # The recipes look `collate_examples` up in their module when they build their partials, and
    # Runtime.reference_tables looks up `reference_logps` in its own.
    recipe.collate_examples = recorder.wrap_collator(recipe.collate_examples, pair_counters())
    if recipe is dpo:
        compute_reference = trainer.reference_logps

        def timed_reference(*args: Any, **kwargs: Any) -> Any:
            first = recorder.batches_so_far()
            started = time.perf_counter()
            table = compute_reference(*args, **kwargs)
            reference["s"] += time.perf_counter() - started
            reference["pairs"] += args[2] // 2  # reference_logps(model, batches, num_sequences, accelerator)
            recorder.discard_batches_from(first)  # its batches are not training steps
            return table

        trainer.reference_logps = timed_reference
    recipe.run(posttrain_config(spec, "dpo" if recipe is dpo else "reward"))
    records = [json.loads(line) for line in (Path(spec["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_time_s" in r]
    return {
        "reference": reference,
        "losses": [r["loss"] for r in steps],
        "step_time_s": [r["step_time_s"] for r in steps],
    }


def preference_rows(path: str) -> list[dict[str, Any]]:
    rows = map(json.loads, Path(path).read_text().splitlines())
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]


def trl_args(config_class: Any, spec: dict[str, Any], **extra: Any) -> Any:

    return config_class(
        output_dir=spec["output_dir"],
        seed=SEED,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        max_length=spec["max_length"],
        per_device_train_batch_size=spec["batch_pairs"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        lr_scheduler_type="cosine",
        bf16=False,
        **trl_quiet_args(),
        **extra,
    )


def run_trl(spec: dict[str, Any], recorder: StepRecorder) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    dataset = Dataset.from_list(preference_rows(spec["data"]))
    reference = {"s": 0.0, "pairs": 0}
    if spec["contender"] == "trl_rm":
        from trl import RewardConfig, RewardTrainer

        args = trl_args(RewardConfig, spec, learning_rate=RM_LR)
        trainer = RewardTrainer(model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer)
    else:
        from trl import DPOConfig, DPOTrainer

        precompute = spec["contender"] == "trl_dpo_precompute"
        compute_reference = DPOTrainer._precompute_ref_logps

        def timed_reference(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = compute_reference(self, data, *args, **kwargs)
            reference["s"] += time.perf_counter() - started
            reference["pairs"] += len(data)
            return result

        DPOTrainer._precompute_ref_logps = timed_reference  # runs inside __init__ when precompute is on
        args = trl_args(
            DPOConfig,
            spec,
            learning_rate=DPO_LR,
            beta=DPO_BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=precompute,
        )
        trainer = DPOTrainer(model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.data_collator = recorder.wrap_collator(trainer.data_collator, pair_counters(tokenizer.pad_token_id))
    losses: list[Any] = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(*args: Any, **kwargs: Any) -> Any:
        out = compute_loss(*args, **kwargs)
        losses.append((out[0] if isinstance(out, tuple) else out).detach())
        return out

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return {"reference": reference, "losses": [float(loss) for loss in losses], "step_time_s": None}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run; returns its throughput, counts and losses (printed as the last line)."""
    import torch

    torch.set_num_threads(spec["threads"])
    recorder = StepRecorder()
    recorder.install_step_hook()
    started = time.perf_counter()
    ours = spec["contender"] in ("dpo", "rm")
    run = (run_posttrain if ours else run_trl)(spec, recorder)
    steps = len(recorder.step_ends)
    if steps != spec["steps"]:
        raise RuntimeError(f"{spec['contender']}: expected {spec['steps']} optimizer steps, recorded {steps}")
    warmup = spec["warmup"]
    # One micro-batch per step (grad_accum 1); a data loader may have fetched one batch past the last step.
    counts = {name: values[:steps] for name, values in recorder.counts.items()}
    timed_pairs = sum(counts["pairs"][warmup:])
    steps_s, cpu_s = recorder.window(warmup)
    reference = run["reference"]
    reference_share_s = reference["s"] * timed_pairs / reference["pairs"] if reference["pairs"] else 0.0
    timed_s = steps_s + reference_share_s
    losses = run["losses"][:steps]
    result = {
        "contender": spec["contender"],
        "steps": steps,
        "timed_steps": steps - warmup,
        "pairs_s": timed_pairs / timed_s,
        "pairs_s_steps_only": timed_pairs / steps_s,
        "timed_s": timed_s,
        "steps_s": steps_s,
        "reference_s": reference["s"],
        "reference_pairs": reference["pairs"],
        "reference_share_s": reference_share_s,
        "pairs_per_step": timed_pairs / (steps - warmup),
        "real_tokens_per_step": sum(counts["real_tokens"][warmup:]) / (steps - warmup),
        "padded_tokens_per_step": sum(counts["padded_tokens"][warmup:]) / (steps - warmup),
        "first_loss": losses[0],
        "last_loss": statistics.mean(losses[-LAST_LOSSES:]),
        "first_step_s": recorder.step_ends[0] - started,
        **process_stats(steps_s, cpu_s),
    }
    if run["step_time_s"] is not None:  # posttrain's own per-step timing (collate to optimizer step), for comparison
        result["metrics_step_s"] = sum(run["step_time_s"][warmup:steps])
    return result


# ---------------------------------------------------------------------------------------------- in the parent


def describe_workload(model_dir: Path, data_path: Path, batch_rows: int, max_length: int) -> dict[str, Any]:
    """posttrain's packed layout of the pairs (pairs per row, hence TRL's batch size), and a check that TRL's
    tokenisation (``trl.data_utils._tokenize``, what its trainers call) gives posttrain's input ids for both sides
    of every pair, with how many more tokens TRL's DPO completion scores than posttrain's trained targets."""
    from transformers import AutoTokenizer
    from trl.data_utils import _tokenize

    from posttrain.data.pairs import load_pairs, pair_rows
    from posttrain.losses import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    spec = {
        "output_dir": "unused",
        "model": str(model_dir),
        "data": str(data_path),
        "steps": 1,
        "batch_rows": batch_rows,
        "batch_pairs": 1,  # only the config's data block is read here
        "max_length": max_length,
    }
    config = posttrain_config(spec, "dpo")
    pairs = load_pairs(config.data, tokenizer, SEED)
    # The recipes' layout: packed, each pair's prompt held once (sdpa, data.share_prompt's default).
    rows = pair_rows(pairs.train, config.data, SEED, share_prefix=config.data.share_prompt)
    mismatches, extra_scored = 0, []
    records = preference_rows(str(data_path))
    if len(records) != len(pairs.train):
        raise RuntimeError(f"posttrain kept {len(pairs.train)} of {len(records)} pairs; the check needs all of them")
    for record, pair in zip(records, pairs.train):  # load_pairs keeps file order with no held-out split
        prompt_ids = _tokenize(tokenizer, record["prompt"], add_generation_prompt=True)["input_ids"]
        for side, ours in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            ids = _tokenize(tokenizer, record["prompt"] + record[side])["input_ids"]
            if ids != ours.input_ids or ids[: len(prompt_ids)] != prompt_ids:
                mismatches += 1
            extra_scored.append(len(ids) - len(prompt_ids) - sum(t != IGNORE_INDEX for t in ours.targets))
    pairs_per_row = len(pairs.train) / len(rows)
    sides = [s for p in pairs.train for s in (p.chosen, p.rejected)]
    return {
        "pairs": len(pairs.train),
        "packed_rows": len(rows),
        "pairs_per_packed_row": round(pairs_per_row, 3),
        "longest_sequence_tokens": max(len(s.input_ids) for s in sides),
        "truncated_pairs": sum(p.truncated for p in pairs.train),
        "batch_pairs": round(batch_rows * pairs_per_row),
        "mean_sequence_tokens": round(statistics.mean(len(s.input_ids) for s in sides), 2),
        "trl_id_mismatches": mismatches,
        "trl_extra_scored_tokens_per_sequence": round(statistics.mean(extra_scored), 3),
        "pad_token_id": tokenizer.pad_token_id,
    }


def main() -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0],
        DEFAULT_WARMUP,
        2,
        "optimizer steps per run",
        "alternating rounds of the five contenders",
    )
    parser.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, help="posttrain packed rows a step")
    parser.add_argument(
        "--max-length",
        type=int,
        default=DEFAULT_MAX_LENGTH,
        help="tokens per sequence, both sides (posttrain packs pairs into rows of twice this)",
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset to run (profiling)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from posttrain.toy import build_toy

    steps, threads = steps_and_threads(parser, args, DEFAULT_STEPS)
    contenders = [c for c in CONTENDERS if c in args.contenders.split(",")]
    if not contenders or set(args.contenders.split(",")) - set(CONTENDERS):
        parser.error(f"--contenders takes a comma-separated subset of {','.join(CONTENDERS)}")
    began = time.perf_counter()
    out: dict[str, Any] = {
        "size": args.size,
        "steps": steps,
        "warmup_steps": args.warmup,
        "torch_threads": threads,
        "rounds": args.rounds,
        "max_length": args.max_length,
        "batch_rows": args.batch_rows,
        "dpo_beta": DPO_BETA,
        "dpo_lr": DPO_LR,
        "rm_lr": RM_LR,
    }
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="preference_vs_trl_") as tmp:
        toy = build_toy(Path(tmp) / "toy", size=args.size, seed=SEED)
        workload = describe_workload(toy.model, toy.prefs, args.batch_rows, args.max_length)
        print(f"workload {args.size}: {json.dumps(workload)}", file=sys.stderr)
        if workload["trl_id_mismatches"]:
            mismatches = workload["trl_id_mismatches"]
            print(f"WARNING: TRL's input ids differ from posttrain's on {mismatches} sequences", file=sys.stderr)
        out.update(
            {
                k: workload[k]
                for k in (
                    "pairs",
                    "pairs_per_packed_row",
                    "batch_pairs",
                    "mean_sequence_tokens",
                    "longest_sequence_tokens",
                    "truncated_pairs",
                    "trl_id_mismatches",
                    "trl_extra_scored_tokens_per_sequence",
                )
            }
        )
        for round_index in range(args.rounds):
            for contender in contenders:
                spec = {
                    "contender": contender,
                    "steps": steps,
                    "warmup": args.warmup,
                    "threads": threads,
                    "model": str(toy.model),
                    "data": str(toy.prefs),
                    "batch_rows": args.batch_rows,
                    "max_length": args.max_length,
                    "batch_pairs": workload["batch_pairs"],
                    "output_dir": str(Path(tmp) / f"{contender}-{round_index}"),
                }
                result = run_subprocess(__file__, spec, contender, extra_env={"TQDM_DISABLE": "1"})
                results.append(result)
                reference = ""
                if result["reference_pairs"]:
                    reference = (
                        f"  reference {result['reference_s']:.1f} s ({result['reference_share_s']:.1f} s charged)"
                    )
                print(
                    f"[round {round_index + 1}] {contender:18s} {result['pairs_s']:7.1f} pairs/s  "
                    f"{result['pairs_per_step']:5.1f} pairs/step  {result['real_tokens_per_step']:6.0f} tok/step "
                    f"({result['padded_tokens_per_step']:.0f} padded)  loss {result['first_loss']:.4f} -> "
                    f"{result['last_loss']:.4f}  steps {result['steps_s']:.1f} s{reference}  peak RSS "
                    f"{result['peak_rss_mib']:.0f} MiB  cpu share {result['cpu_share']:.2f}  "
                    f"load {result['load_avg_1min']:.1f}",
                    file=sys.stderr,
                )
    summary = {}
    for contender in contenders:
        mine = [r for r in results if r["contender"] == contender]
        rounds = best_of_rounds(r["pairs_s"] for r in mine)
        summary[contender] = rounds
        out[f"{contender}_pairs_s"] = round(rounds["best"], 2)
        out[f"{contender}_pairs_s_median"] = round(rounds["median"], 2)
        out[f"{contender}_pairs_s_runs"] = rounds["runs"]
        out[f"{contender}_pairs_s_steps_only"] = round(max(r["pairs_s_steps_only"] for r in mine), 2)
        out[f"{contender}_pairs_per_step"] = round(statistics.mean(r["pairs_per_step"] for r in mine), 2)
        out[f"{contender}_real_tokens_per_step"] = round(statistics.mean(r["real_tokens_per_step"] for r in mine), 1)
        out[f"{contender}_padded_tokens_per_step"] = round(
            statistics.mean(r["padded_tokens_per_step"] for r in mine), 1
        )
        out[f"{contender}_first_loss"] = round(mine[0]["first_loss"], 5)
        out[f"{contender}_last_loss"] = round(mine[0]["last_loss"], 5)
        out[f"{contender}_peak_rss_mib"] = round(max(r["peak_rss_mib"] for r in mine), 1)
        if mine[0]["reference_pairs"]:
            out[f"{contender}_reference_s"] = round(min(r["reference_s"] for r in mine), 2)
        if "metrics_step_s" in mine[0]:  # cross-check: posttrain's own step_time_s over the timed steps
            out[f"{contender}_metrics_step_s_runs"] = [round(r["metrics_step_s"], 2) for r in mine]
            out[f"{contender}_steps_s_runs"] = [round(r["steps_s"], 2) for r in mine]
    comparisons = (
        ("dpo", "trl_dpo", "dpo_ratio"),
        ("dpo", "trl_dpo_precompute", "dpo_ratio_vs_precompute"),
        ("rm", "trl_rm", "rm_ratio"),
    )
    for ours, theirs, name in comparisons:
        if ours not in summary or theirs not in summary:
            continue
        out[name] = round(summary[ours]["best"] / summary[theirs]["best"], 3)
        out[f"{name}_median"] = round(summary[ours]["median"] / summary[theirs]["median"], 3)
    shares = [r["cpu_share"] for r in results]
    out["max_load_avg_1min"] = round(max(r["load_avg_1min"] for r in results), 2)
    out["min_cpu_share"] = round(min(shares), 3)
    out["cpu_share_runs"] = {c: [round(r["cpu_share"], 2) for r in results if r["contender"] == c] for c in contenders}
    warn_if_contended(shares, threads)
    out["wall_s"] = round(time.perf_counter() - began, 1)
    emit_results(out, args.record)


if __name__ == "__main__":
    main()
