"""SFT throughput: posttrain's recipe against TRL's ``SFTTrainer``, padded and packed, at the same conversations per
optimizer step, on CPU.

    python benchmarks/sft_vs_trl.py --size tiny                 # fp32 and bf16, 2 rounds
    python benchmarks/sft_vs_trl.py --size small --precision fp32 --steps 30

What is compared. The toy kit (``posttrain.toy.build_toy(dir, size, seed=0)``) is built once in a temporary
directory; every contender trains the SAME model directory on the SAME ``sft.jsonl`` (``messages`` rows):

- ``posttrain_packed``: the real recipe, ``posttrain.recipes.sft.run(build_config({...}))``, ``data.packing:
  true`` (the default), full fine-tuning, assistant-only loss (the default): each step's conversations share rows
  of up to 256 tokens.
- ``posttrain_padded``: the same with ``data.packing: false``: one conversation per row, padded to the longest of
  the batch, attention mask.
- ``trl_padded``: ``trl.SFTTrainer`` with ``packing=False``: one conversation per row, padded to the longest row of
  the batch, attention mask.
- ``trl_packed``: ``trl.SFTTrainer`` with ``packing=True`` (TRL's default ``packing_strategy="bfd"``, which turns on
  ``padding_free``: the batch is flattened into one row with restarting ``position_ids``).

Both TRL runs use ``assistant_only_loss=True``. The toy chat template has no ``{% generation %}`` markers and is
not one TRL knows how to patch, so TRL gets the same template with the assistant content and its ``<|end|>`` wrapped
in ``{% generation %}``. Before training, the benchmark checks on every conversation that this template gives
exactly posttrain's input ids and trained tokens (``trl_mask_mismatches`` in the output must be 0).

Matched settings: the same conversations per optimizer step for every contender (``EXAMPLES_PER_STEP``, large
enough that per-step overhead does not decide the comparison). posttrain's ``train.batch_size`` counts
conversations whether packed or padded, and so does TRL's ``per_device_train_batch_size`` when padded; packed, TRL
counts packed rows, so ``trl_packed`` gets ``round(EXAMPLES_PER_STEP / c)`` rows, ``c`` the mean conversations per
row of a best-fit-decreasing packing of the data into 256-token rows (TRL's ``bfd`` strategy). Every run counts the
conversations it trained per step (``examples_per_step`` in the output; position restarts for TRL's packed
rows), so the match is shown, not assumed. Max length 256,
AdamW (lr 2e-5, betas 0.9/0.999, eps 1e-8, weight decay 0), cosine schedule with no warm-up over ``--steps``
steps, grad-norm clipping at 1.0, grad accumulation 1, seed 0, sdpa attention, float32 weights, fp32 or bf16
autocast, no gradient checkpointing (TRL's SFTConfig turns it on by default and defaults to bf16; both are set
to match here), no evaluation, no checkpoint during training, no progress bar. Everything else is each library's
default (e.g. TRL's fused AdamW, its logging every 10 steps; posttrain's metrics.jsonl every step).

How it is measured. Each run is a fresh subprocess (so peak RSS is that run's alone) and runs alternate
(posttrain, trl_padded, trl_packed, posttrain, ...) over ``--rounds`` rounds. Per contender the headline is its
fastest round: other processes on a shared machine can only slow a run down, so the least-disturbed round is the
best estimate of the code's speed (``timeit``'s reasoning); the median and every round are reported beside it,
with the 1-minute load average at the end of each run (the run itself accounts for about ``--threads`` of it;
more means other processes competed for the cores). In the subprocess, the same two instruments are attached
to every contender:

- a global ``torch.optim`` step post-hook records the wall-clock time at the end of every optimizer step;
- the collate function is wrapped to count each micro-batch's non-pad input tokens (``input_ids != pad_id``;
  ``<|pad|>`` never occurs in the data), trained tokens and conversations.

Throughput = non-pad input tokens of steps ``warmup+1 .. N`` / wall time from the end of step ``warmup`` to the
end of step N. It includes everything a step costs (data loading, collation, logging, the optimizer).
Peak RSS = ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the subprocess (its whole life, including
data preparation); the largest over the rounds is reported.

MFU = tokens/s x model FLOPs per token / matmul peak, with

    FLOPs/token = 6 * N_nonembed + 6 * L * d * mean_t(n_t + 1)

where ``N_nonembed`` is the parameter count without the (tied) embedding matrix, ``L`` the layer count, ``d`` the
attention width (heads x head_dim) and ``n_t`` the length of the conversation token t belongs to: causal attention
inside one conversation costs 2 matmuls x 2d FLOPs per attended key in the forward pass, x3 for forward+backward,
and a token at position p attends p+1 keys, so a conversation of length n costs 6 L d n(n+1) and its tokens
6 L d (n+1) on average. The vocabulary projection is left out (the contenders compute it at different positions),
so this is the useful work of the standard model: the same FLOPs per token for every contender, and a lower bound.
The peak is the best of several timed ``torch.mm`` of 2048 x 2048 matrices in the run's dtype, in this process, on
the same number of threads as the training subprocesses, re-measured before every round (the best is kept).

Where the differences come from, so nobody mistakes them for a handicap of this script: on CPU, TRL's packed
(padding-free) batch is ONE row of all its packed rows' tokens; with no varlen attention kernel on CPU,
transformers turns its restarting ``position_ids`` into a block-diagonal mask over that whole row, so sdpa scores
(rows x 256)^2 pairs per head instead of posttrain's rows x 256^2 (rows kept separate). TRL's fused LM head projects
every position onto the vocabulary on CPU (it keeps only trained positions under Triton, i.e. on GPU); posttrain
projects only trained positions, packed or padded. In TRL's favour: its default fused AdamW; posttrain's runtime
uses ``torch.optim.AdamW``'s default (for-loop) implementation on CPU.

The LAST line printed is one JSON object: per contender ``<name>_tok_s`` (and median, runs, MFU, peak RSS,
tokens and examples per step); ``ratio_padded`` = posttrain_padded / trl_padded and ``ratio_packed`` =
posttrain_packed / trl_packed (the same layout on both sides), ``ratio_vs_padded`` = posttrain_packed (the
default) / trl_padded; ``mfu`` of posttrain_packed; for fp32, the same with a ``bf16_`` prefix for bf16.
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

CONTENDERS: tuple[str, ...] = ("posttrain_packed", "posttrain_padded", "trl_padded", "trl_packed")
# Conversations per optimizer step for every contender (grad accumulation 1): on the toy kit's short chats about
# seven 256-token packed rows, so the step's fixed costs (optimizer, logging, data loading) are a small share.
EXAMPLES_PER_STEP = 64
MAX_LENGTH = 256
LEARNING_RATE = 2e-5
SEED = 0
# Steps per size: enough that the timed part is several seconds for every contender, few enough that `--size tiny`
# with both precisions and two rounds (16 subprocesses) stays well under half an hour on an idle 2-core CPU.
DEFAULT_STEPS: dict[str, int] = {"tiny": 20, "small": 10}
DEFAULT_WARMUP = 3

# The toy template (posttrain.toy.CHAT_TEMPLATE) with the assistant content and its end-of-turn token inside
# {% generation %}, so TRL's assistant_only_loss trains exactly the tokens posttrain trains (content + <|end|>).
TRL_TRAINING_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('toy chat template: role ' ~ m['role'] ~ ' is not one of system, user, assistant') }}"
    "{% endif %}"
    "{% if m['role'] == 'assistant' %}"
    # "\n" as an expression: transformers renders with trim_blocks, which drops a newline right after a tag.
    "<|assistant|>\n{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


# ---------------------------------------------------------------------------------------------- in the subprocess


def token_counters(pad_token_id: int, trained: Any, examples: Any) -> dict[str, Any]:
    """Collator counters: each micro-batch's non-pad input tokens (``<|pad|>`` never occurs in the data), its
    trained tokens (``trained(batch)``) and its conversations (``examples(batch)``)."""
    return {
        "tokens": lambda batch, *_: (batch["input_ids"] != pad_token_id).sum(),
        "trained": lambda batch, *_: trained(batch),
        "examples": lambda batch, *_: examples(batch),
    }


def run_posttrain(spec: dict[str, Any], recorder: StepRecorder, packing: bool) -> None:
    import posttrain.recipes.sft as sft
    from posttrain.config import build_config
    from posttrain.losses import IGNORE_INDEX

    config = build_config(
        {
            "stage": "sft",
            "output_dir": spec["output_dir"],
            "resume": False,
            "seed": SEED,
            "model": {"path": spec["model"], "dtype": "float32", "attn_implementation": "sdpa"},
            "peft": {"method": "full"},
            "data": {"train": spec["data"], "max_length": MAX_LENGTH, "packing": packing},
            "train": {
                "max_steps": spec["steps"],
                "batch_size": EXAMPLES_PER_STEP,
                "grad_accum": 1,
                "precision": spec["precision"],
            },
            "optim": {"name": "adamw", "lr": LEARNING_RATE, "weight_decay": 0.0, "max_grad_norm": 1.0},
            "schedule": {"name": "cosine", "warmup_steps": 0},
            "checkpoint": {"every": None},
            "logging": {"progress": False, "report": False, "tensorboard": False},
        }
    )
    # The recipe looks `collate_examples` up in its module when it builds its collate function, so this wraps the
    # real one.
    sft.collate_examples = recorder.wrap_collator(
        sft.collate_examples,
        token_counters(
            spec["pad_token_id"],
            lambda batch: (batch["targets"] != IGNORE_INDEX).sum(),
            lambda batch: batch["num_examples"],
        ),
    )
    sft.run(config)


def run_trl(spec: dict[str, Any], recorder: StepRecorder, packing: bool) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.chat_template = TRL_TRAINING_TEMPLATE
    dataset = load_dataset("json", data_files=spec["data"], split="train", cache_dir=spec["output_dir"] + "/hf-cache")
    args = SFTConfig(
        output_dir=spec["output_dir"],
        seed=SEED,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"},
        max_length=MAX_LENGTH,
        packing=packing,
        assistant_only_loss=True,
        # Padded: conversations. Packed: packed rows, as many as hold about EXAMPLES_PER_STEP conversations.
        per_device_train_batch_size=spec["trl_packed_rows"] if packing else EXAMPLES_PER_STEP,
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        bf16=spec["precision"] == "bf16",
        **trl_quiet_args(),
    )
    trainer = SFTTrainer(model=spec["model"], args=args, train_dataset=dataset, processing_class=tokenizer)
    # Labels are unshifted here (the model shifts them), so the first position of every row trains nothing.
    # Padding-free packed batches are one row whose positions restart at 0 for every conversation.
    conversations = (
        (lambda batch: (batch["position_ids"] == 0).sum()) if packing else (lambda batch: batch["input_ids"].shape[0])
    )
    trainer.data_collator = recorder.wrap_collator(
        trainer.data_collator,
        token_counters(spec["pad_token_id"], lambda batch: (batch["labels"][:, 1:] != -100).sum(), conversations),
    )
    trainer.train()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run; returns its step times and token counts (printed as the last line)."""
    import torch

    torch.set_num_threads(spec["threads"])
    recorder = StepRecorder()
    recorder.install_step_hook()
    started = time.perf_counter()
    if spec["contender"].startswith("posttrain"):
        run_posttrain(spec, recorder, packing=spec["contender"] == "posttrain_packed")
    else:
        run_trl(spec, recorder, packing=spec["contender"] == "trl_packed")
    steps = len(recorder.step_ends)
    if steps != spec["steps"]:
        raise RuntimeError(f"{spec['contender']}: expected {spec['steps']} optimizer steps, recorded {steps}")
    warmup = spec["warmup"]
    # One micro-batch per step (grad_accum 1); a data loader may have fetched one batch past the last step.
    tokens = recorder.counts["tokens"][:steps]
    trained = recorder.counts["trained"][:steps]
    examples = recorder.counts["examples"][:steps]
    timed_s, cpu_s = recorder.window(warmup)
    return {
        "contender": spec["contender"],
        "precision": spec["precision"],
        "steps": steps,
        "timed_steps": steps - warmup,
        "timed_s": timed_s,
        "tok_s": sum(tokens[warmup:]) / timed_s,
        "tokens_per_step": sum(tokens[warmup:]) / (steps - warmup),
        "trained_per_step": sum(trained[warmup:]) / (steps - warmup),
        "examples_per_step": sum(examples) / steps,
        "first_step_s": recorder.step_ends[0] - started,
        # Other processes on the machine slow every contender; alternating rounds spreads that, these show it:
        # the share of `threads` cores this process had while timed (near 1 on an idle machine), the load average.
        **process_stats(timed_s, cpu_s),
    }


# ---------------------------------------------------------------------------------------------- in the parent


def matmul_peak_flops(dtype_name: str, threads: int, size: int = 2048, repeats: int = 8) -> float:
    """Best FLOP/s of a ``size``-cubed ``torch.mm`` in ``dtype_name`` on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def describe_workload(model_dir: Path, data_path: Path) -> tuple[float, dict[str, Any]]:
    """Model FLOPs per token, ``6 N_nonembed + 6 L d mean_t(n_t + 1)`` (see the module docstring), from the model
    and posttrain's tokenisation of the data; also checks that TRL's training template yields exactly posttrain's
    input ids and trained tokens for every conversation (``trl_mask_mismatches`` must be 0)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.packing import pack_rows
    from posttrain.data.reader import read_conversations
    from posttrain.data.tokenize import tokenize_conversation
    from posttrain.losses import IGNORE_INDEX

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    total = sum(p.numel() for p in model.parameters())  # the tied lm_head is counted once, as the embedding
    nonembed = total - embedding
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths, trained, mismatches, sequences = [], 0, 0, []
    for messages in read_conversations(str(data_path)):
        sequence = tokenize_conversation(tokenizer, messages, MAX_LENGTH)
        sequences.append(sequence)
        lengths.append(len(sequence.input_ids))
        trained += sequence.num_targets
        rendered = tokenizer.apply_chat_template(
            messages,
            chat_template=TRL_TRAINING_TEMPLATE,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        # TRL truncates ids and labels to max_length; its labels are unshifted (the model shifts them), posttrain's
        # targets are shifted.
        trl_ids = rendered["input_ids"][:MAX_LENGTH]
        trl_labels = [t if m else IGNORE_INDEX for t, m in zip(trl_ids, rendered["assistant_masks"])]
        if trl_ids != sequence.input_ids or trl_labels[1:] + [IGNORE_INDEX] != sequence.targets:
            mismatches += 1
    mean_attended = sum(n * (n + 1) for n in lengths) / sum(lengths)  # mean over tokens of (n + 1)
    width = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = 6 * config.num_hidden_layers * width * mean_attended
    flops = 6 * nonembed + attention
    return flops, {
        "params_total": total,
        "params_nonembed": nonembed,
        "flops_per_token": round(flops),
        "attention_flops_share": round(attention / flops, 4),
        "sequences": len(lengths),
        "mean_sequence_tokens": round(sum(lengths) / len(lengths), 2),
        "trained_tokens": trained,
        "trl_mask_mismatches": mismatches,
        "pad_token_id": tokenizer.pad_token_id,
        "conversations_per_packed_row": round(len(sequences) / len(pack_rows(sequences, MAX_LENGTH, SEED)), 3),
    }


def run_contender(spec: dict[str, Any]) -> dict[str, Any]:
    return run_subprocess(__file__, spec, f"{spec['contender']} ({spec['precision']})")


def summarise(results: list[dict[str, Any]], peak: float, flops_per_token: float) -> dict[str, dict[str, Any]]:
    """Per contender: the fastest round (other processes on the machine can only slow a run down, so the
    least-disturbed round is the best estimate of the code's speed, as ``timeit`` takes the minimum), the median,
    every round, and the largest peak RSS."""
    summary = {}
    for contender in CONTENDERS:
        mine = [r for r in results if r["contender"] == contender]
        rounds = best_of_rounds(r["tok_s"] for r in mine)
        best = rounds["best"]
        summary[contender] = {
            "tok_s": best,
            "tok_s_median": rounds["median"],
            "tok_s_runs": rounds["runs"],
            "mfu": best * flops_per_token / peak,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            "trained_per_step": statistics.mean(r["trained_per_step"] for r in mine),
            "tokens_per_step": statistics.mean(r["tokens_per_step"] for r in mine),
            "examples_per_step": statistics.mean(r["examples_per_step"] for r in mine),
        }
    return summary


def main() -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0],
        DEFAULT_WARMUP,
        2,
        "optimizer steps per run",
        "alternating rounds of the four contenders",
    )
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from posttrain.toy import build_toy

    steps, threads = steps_and_threads(parser, args, DEFAULT_STEPS)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    began = time.perf_counter()
    out: dict[str, Any] = {
        "size": args.size,
        "steps": steps,
        "warmup_steps": args.warmup,
        "torch_threads": threads,
        "rounds": args.rounds,
        "examples_per_step": EXAMPLES_PER_STEP,
        "max_length": MAX_LENGTH,
    }
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl_") as tmp:
        toy = build_toy(Path(tmp) / "toy", size=args.size, seed=SEED)
        flops_per_token, model_info = describe_workload(toy.model, toy.sft)
        print(f"model {args.size}: {json.dumps(model_info)}", file=sys.stderr)
        if model_info["trl_mask_mismatches"]:
            mismatches = model_info["trl_mask_mismatches"]
            print(f"WARNING: TRL's tokens or loss mask differ from posttrain's on {mismatches} rows", file=sys.stderr)
        out.update(
            {
                k: model_info[k]
                for k in ("params_total", "params_nonembed", "trl_mask_mismatches", "conversations_per_packed_row")
            }
        )
        trl_packed_rows = max(1, round(EXAMPLES_PER_STEP / model_info["conversations_per_packed_row"]))
        out["trl_packed_rows_per_step"] = trl_packed_rows
        loads: list[float] = []
        shares: list[float] = []
        for precision in precisions:
            peak, results = 0.0, []
            for round_index in range(args.rounds):
                # The peak is re-measured every round and the best kept: a busy machine would understate it.
                peak = max(peak, matmul_peak_flops(precision, threads))
                for contender in CONTENDERS:
                    spec = {
                        "contender": contender,
                        "precision": precision,
                        "steps": steps,
                        "warmup": args.warmup,
                        "threads": threads,
                        "model": str(toy.model),
                        "data": str(toy.sft),
                        "pad_token_id": model_info["pad_token_id"],
                        "trl_packed_rows": trl_packed_rows,
                        "output_dir": str(Path(tmp) / f"{contender}-{precision}-{round_index}"),
                    }
                    result = run_contender(spec)
                    results.append(result)
                    loads.append(result["load_avg_1min"])
                    shares.append(result["cpu_share"])
                    print(
                        f"[{precision} round {round_index + 1}] {contender:10s} {result['tok_s']:8.1f} tok/s  "
                        f"{result['examples_per_step']:5.1f} conv/step  "
                        f"{result['tokens_per_step']:6.1f} tok/step ({result['trained_per_step']:.1f} trained)  "
                        f"peak RSS {result['peak_rss_mib']:.0f} MiB  timed {result['timed_s']:.1f} s  "
                        f"cpu share {result['cpu_share']:.2f}  load {result['load_avg_1min']:.1f}",
                        file=sys.stderr,
                    )
            summary = summarise(results, peak, flops_per_token)
            prefix = "" if precision == "fp32" else "bf16_"
            for contender in CONTENDERS:
                mine = summary[contender]
                out[f"{prefix}{contender}_tok_s"] = round(mine["tok_s"], 1)
                out[f"{prefix}{contender}_tok_s_median"] = round(mine["tok_s_median"], 1)
                out[f"{prefix}{contender}_tok_s_runs"] = mine["tok_s_runs"]
                out[f"{prefix}{contender}_mfu"] = round(mine["mfu"], 4)
                out[f"{prefix}{contender}_peak_rss_mib"] = round(mine["peak_rss_mib"], 1)
                out[f"{prefix}{contender}_trained_tokens_per_step"] = round(mine["trained_per_step"], 1)
                out[f"{prefix}{contender}_tokens_per_step"] = round(mine["tokens_per_step"], 1)
                out[f"{prefix}{contender}_examples_per_step"] = round(mine["examples_per_step"], 1)
            ratios = {
                "ratio_padded": ("posttrain_padded", "trl_padded"),
                "ratio_packed": ("posttrain_packed", "trl_packed"),
                "ratio_vs_padded": ("posttrain_packed", "trl_padded"),
            }
            for name, (ours, theirs) in ratios.items():
                out[f"{prefix}{name}"] = round(summary[ours]["tok_s"] / summary[theirs]["tok_s"], 3)
                out[f"{prefix}{name}_median"] = round(
                    summary[ours]["tok_s_median"] / summary[theirs]["tok_s_median"], 3
                )
            out[f"{prefix}mfu"] = round(summary["posttrain_packed"]["mfu"], 4)
            out[f"{prefix}matmul_peak_gflops"] = round(peak / 1e9, 1)
    out["flops_per_token"] = round(flops_per_token)
    out["max_load_avg_1min"] = round(max(loads), 2)
    out["min_cpu_share"] = round(min(shares), 3)
    warn_if_contended(shares, threads)
    out["wall_s"] = round(time.perf_counter() - began, 1)
    emit_results(out, args.record)


if __name__ == "__main__":
    main()
