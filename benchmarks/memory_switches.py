"""Memory-saving switches, measured: peak memory per process and tokens/s of SFT on the toy model under each of the
seeds' switches, side by side with one baseline run.

    python benchmarks/memory_switches.py                       # small toy model (8 layers x 512), 3 steps per row
    python benchmarks/memory_switches.py --size tiny --steps 4 --batch-size 16
    python benchmarks/memory_switches.py --gpu                 # on a CUDA machine: also flash-attention 2 and QLoRA

What runs. The toy kit (``posttrain toy DIR --size SIZE``) is built once; every row is one
``posttrain train sft ...`` subprocess (``--nproc 2`` for the multi-process rows) on its ``sft.jsonl``, with the
baseline's overrides and then the row's own. Baseline: full fine-tuning, fp32, AdamW, sdpa attention, packed
micro-batches of ``--batch-size`` conversations in rows of ``--max-length`` tokens, gradient accumulation 1,
``--steps`` optimizer steps, no evaluation, checkpoint only at the end (the runtime always writes one there), no
report. Rows, in the seeds' order of the switches (SFT tricks document, section 13):

- precision: ``train.precision=bf16`` (autocast; the weights and optimizer states stay fp32);
- attention: ``model.attn_implementation=eager`` (the attention matrix materialised, against the baseline's sdpa),
  and on CUDA ``flash_attention_2``;
- micro-batch: ``train.batch_size=B/4 train.grad_accum=4`` (the same conversations per optimizer step);
- context: ``data.max_length=L/4``. The micro-batch is packed, so the same conversations lie in 4x shorter rows:
  the tokens are the same (the note says how many sequences the shorter limit truncated), the attention spans less;
- ``model.gradient_checkpointing=true``; ``peft.method=lora`` (and on CUDA ``qlora``);
- on 2 processes (``--nproc 2``, each with the baseline's micro-batch, so a step trains twice the conversations):
  ddp, ``distributed.strategy=fsdp``, DeepSpeed ZeRO-1, ZeRO-2, ZeRO-2 with ``offload=optimizer``, ZeRO-3, ZeRO-3
  with ``offload=all``. On a CPU the offloaded state moves from CPU memory to CPU memory: those rows show what the
  engine's offload machinery costs here, not the saving it brings on a GPU.

Rows that need CUDA are listed as skipped without it (``--gpu`` runs them anyway, to see their error); a row whose
run fails is listed as failed with the first line of its error (and its output's tail goes to stderr).

What is measured. Every run writes ``summary.json``, whose ``peak_memory_mib_per_process`` is, per process, CUDA's
``torch.cuda.max_memory_allocated`` or on a CPU the resident set's high-water mark (``ru_maxrss``), over the whole
run: imports, data preparation, the steps, and the end (the final checkpoint and the saved model, gathered from
the shards where the strategy shards). On a CPU that resident set includes a large floor that no switch touches:
the import floor is measured once, in a fresh process that imports what a training process imports (torch, the
model's transformers code, accelerate, peft, deepspeed, posttrain's CLI and SFT recipe) and runs one small matmul
(torch's thread pool), and each row also gets ``peak - floor``: what training added. Ratios against the baseline are
of ``peak - floor`` (of the peak on CUDA). On Linux a new process's ``ru_maxrss`` starts from its parent's (and this
script's process has built the toy model), so every measured process is started through a small relay
(``_common.run_with_own_peak``), with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``) so that memory
freed by tensors leaves the resident set as it does CUDA's allocated bytes (``MEASURING_ENV``; a default run's peak
also holds what the allocator kept, and varies more). Tokens/s is the mean of ``metrics.jsonl``'s per-step ``tokens_per_s``
(every process's tokens) over the steps after ``--warmup``. 1-process rows run on ``--threads`` torch threads,
2-process rows on half as many each, so every row has the same cores.

The machine may be shared: during every row, the CPU time the whole machine spent busy (``/proc/stat``) minus
this run's own (its finished subprocesses' ``rusage``) is the ``others' CPU`` column, the share of the machine's
cores other processes took. Memory does not depend on it; tokens/s does, and the script warns when a row had less
than 80 % of the cores.

The LAST line printed is one JSON object: the settings, ``import_floor_mib``, and per row its overrides,
processes, per-process peaks, ``peak_mib`` (max over processes), ``training_mib`` (peak - floor), ``tokens_per_s``
and the two ratios, or its ``failed``/``skipped`` reason; ``--record`` writes the table and the figures to
RESULTS.md.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    RUSAGE_UNITS_PER_MIB,
    benchmark_parser,
    best_of_rounds,
    emit_results,
    machine_description,
    offline_env,
    run_subprocess,
    run_with_own_peak,
    steps_and_threads,
    warn_if_contended,
)

SEED = 0
# Steps per size: one warm-up step, then the timed ones; the whole script (12 rows on a CPU, seven of them on two
# processes) then stays well within 10 minutes on an idle 2-core machine at the default batch and context.
DEFAULT_STEPS: dict[str, int] = {"tiny": 6, "small": 4}
DEFAULT_BATCH_SIZE = 32  # conversations per micro-batch: ~900 tokens, activations of the order of the model states
DEFAULT_MAX_LENGTH = 256  # packed row length; the toy conversations are 14-76 tokens
MULTI_PROCESS = 2
# glibc's malloc raises its mmap threshold as large blocks are freed and from then on keeps freed tensors' memory in
# its heap: the resident peak would count memory no tensor uses, differently from run to run (by tens of MiB for the
# same baseline). A fixed threshold hands every freed block of 128 KiB or more back at once, so the peak follows the
# memory in use, as CUDA's max_memory_allocated does, and repeats within a MiB. (Other C libraries ignore it.)
MEASURING_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


@dataclass(frozen=True)
class Row:
    name: str
    overrides: tuple[str, ...]
    processes: int = 1
    needs_cuda: str | None = None  # why the row cannot run without CUDA


def rows(batch_size: int, max_length: int) -> list[Row]:
    """The baseline, then one row per switch (its overrides on top of the baseline's)."""
    zero = ("distributed.strategy=deepspeed",)
    return [
        Row("baseline", ()),
        Row("bf16", ("train.precision=bf16",)),
        Row("eager attention", ("model.attn_implementation=eager",)),
        Row(
            "flash-attention 2",
            ("model.attn_implementation=flash_attention_2",),
            needs_cuda="flash-attention kernels are CUDA only",
        ),
        Row(
            f"micro-batch {batch_size // 4} x accumulation 4",
            (f"train.batch_size={batch_size // 4}", "train.grad_accum=4"),
        ),
        Row(f"context {max_length // 4}", (f"data.max_length={max_length // 4}",)),
        Row("gradient checkpointing", ("model.gradient_checkpointing=true",)),
        Row("LoRA", ("peft.method=lora",)),
        Row("QLoRA", ("peft.method=qlora",), needs_cuda="bitsandbytes 4-bit kernels need CUDA"),
        Row("DDP", (), MULTI_PROCESS),
        Row("FSDP2", ("distributed.strategy=fsdp",), MULTI_PROCESS),
        Row("ZeRO-1", (*zero, "distributed.zero_stage=1"), MULTI_PROCESS),
        Row("ZeRO-2", (*zero, "distributed.zero_stage=2"), MULTI_PROCESS),
        Row(
            "ZeRO-2 + offload optimizer",
            (*zero, "distributed.zero_stage=2", "distributed.offload=optimizer"),
            MULTI_PROCESS,
        ),
        Row("ZeRO-3", (*zero, "distributed.zero_stage=3"), MULTI_PROCESS),
        Row("ZeRO-3 + offload all", (*zero, "distributed.zero_stage=3", "distributed.offload=all"), MULTI_PROCESS),
    ]


def baseline_overrides(
    model: Path, data: Path, output_dir: Path, steps: int, batch_size: int, max_length: int
) -> list[str]:
    return [
        f"model.path={model}",
        f"data.train={data}",
        f"output_dir={output_dir}",
        "resume=false",
        f"seed={SEED}",
        "model.dtype=float32",
        "model.attn_implementation=sdpa",
        "model.gradient_checkpointing=false",
        "peft.method=full",
        f"data.max_length={max_length}",
        "data.packing=true",
        "data.eval_fraction=0",
        f"train.max_steps={steps}",
        f"train.batch_size={batch_size}",
        "train.grad_accum=1",
        "train.precision=fp32",
        "train.eval_every=null",
        "optim.name=adamw",
        "checkpoint.every=null",
        "logging.progress=false",
        "logging.report=false",
        "logging.tensorboard=false",
    ]


# ---------------------------------------------------------------------------------------------- in the subprocess


def import_floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The resident set of a process that has imported what a training process imports, before any training."""
    import accelerate  # noqa: F401
    import deepspeed  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import posttrain.cli  # noqa: F401
    import posttrain.recipes.sft  # noqa: F401

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(spec["model"]))]  # imports the model's modelling code
    torch.set_num_threads(spec["threads"])
    torch.mm(torch.ones(256, 256), torch.ones(256, 256))  # starts the thread pool, as the first training op does
    return {"import_floor_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / RUSAGE_UNITS_PER_MIB}


# ---------------------------------------------------------------------------------------------- in the parent


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux ``/proc/stat``); None elsewhere."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        )
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_children_cpu_seconds() -> float:
    """CPU seconds of this process's finished subprocesses (theirs, and their waited-for children's: the ranks)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def first_error_line(output: str) -> str:
    """The first line that states the error: posttrain's one-line ``error: ...``, an exception's ``Name: message``
    (a traceback's last line), or else the output's last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:") or re.match(r"^[\w.]*(Error|Exception|Interrupt)\b:?", line):
            return line
    return lines[-1] if lines else "no output"


def run_row(row: Row, base: list[str], output_dir: Path, threads: int, warmup: int) -> dict[str, Any]:
    """One ``posttrain train sft`` run of ``row``: its peaks and tokens/s, or why it failed."""
    launcher = ["--nproc", str(row.processes)] if row.processes > 1 else []
    command = [sys.executable, "-m", "posttrain", "train", "sft", *base, *row.overrides, *launcher]
    env = offline_env(str(output_dir), {**MEASURING_ENV, "OMP_NUM_THREADS": str(max(1, threads // row.processes))})
    busy, ours, started = busy_cpu_seconds(), own_children_cpu_seconds(), time.perf_counter()
    proc = run_with_own_peak(command, env)
    wall = time.perf_counter() - started
    record: dict[str, Any] = {"processes": row.processes, "wall_s": round(wall, 1)}
    busy_after = busy_cpu_seconds()
    if busy is not None and busy_after is not None:
        others = (busy_after - busy) - (own_children_cpu_seconds() - ours)
        record["others_cpu_share"] = round(min(1.0, max(0.0, others / (wall * (os.cpu_count() or 1)))), 3)
    summary_path = output_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        error = first_error_line(proc.stderr + proc.stdout)
        shown = " ".join(["posttrain train sft", *row.overrides, *launcher])
        sys.stderr.write(f"\n--- {row.name} failed (exit {proc.returncode}): {shown}\n{proc.stderr[-6000:]}\n---\n")
        return {**record, "failed": error, "exit_code": proc.returncode}
    summary = json.loads(summary_path.read_text())
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m][warmup:]
    if not rates:
        return {**record, "failed": f"no tokens_per_s after {warmup} warm-up step(s) in metrics.jsonl"}
    peaks = summary["peak_memory_mib_per_process"]
    return {
        **record,
        "peak_mib_per_process": peaks,
        "peak_mib": max(peaks),
        "tokens_per_s": statistics.mean(rates),
        "truncated_sequences": summary.get("truncated_sequences", 0),
    }


def combine_rounds(records: list[dict[str, Any]], floor_mib: float) -> dict[str, Any]:
    """One row's figures over its rounds: the largest peak, the best tokens/s (a busy machine only slows a run) with
    the median and every round; failed if any round failed."""
    failed = [r for r in records if "failed" in r]
    if failed:
        return failed[0]
    peak = max(r["peak_mib"] for r in records)
    rounds = best_of_rounds(r["tokens_per_s"] for r in records)
    return {
        "processes": records[0]["processes"],
        "peak_mib_per_process": max((r["peak_mib_per_process"] for r in records), key=max),
        "peak_mib": round(peak, 1),
        "training_mib": round(peak - floor_mib, 1),
        "tokens_per_s": round(rounds["best"], 1),
        "tokens_per_s_median": round(rounds["median"], 1),
        "tokens_per_s_runs": rounds["runs"],
        "truncated_sequences": records[0]["truncated_sequences"],
        "others_cpu_share": max((r["others_cpu_share"] for r in records if "others_cpu_share" in r), default=None),
        "wall_s": round(sum(r["wall_s"] for r in records), 1),
    }


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    base = results["baseline"]
    if "failed" in base:
        return
    for result in results.values():
        if "training_mib" in result:
            result["training_mib_vs_baseline"] = round(result["training_mib"] / base["training_mib"], 3)
            result["tokens_per_s_vs_baseline"] = round(result["tokens_per_s"] / base["tokens_per_s"], 3)


def markdown_table(row_list: list[Row], results: dict[str, dict[str, Any]], cuda: bool, floor_mib: float) -> list[str]:
    if cuda:
        memory = "peak MiB (torch.cuda.max_memory_allocated, max over processes)"
        training = "training MiB (= peak on CUDA)"
    else:
        memory = "peak MiB (ru_maxrss, max over processes)"
        training = f"training MiB (peak - import floor of {floor_mib:.0f} MiB)"
    lines = [
        f"| switch | overrides on the baseline | processes | {memory} | {training} | vs baseline | tokens/s "
        "(all processes) | vs baseline | others' CPU | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in row_list:
        result = results[row.name]
        overrides = " ".join(f"`{o}`" for o in row.overrides) or "(none)"
        if row.processes > 1:
            overrides += f" `--nproc {row.processes}`"
        if "skipped" in result or "failed" in result:
            note = f"skipped: {result['skipped']}" if "skipped" in result else f"failed: {result['failed']}"
            lines.append(f"| {row.name} | {overrides} | {row.processes} | | | | | | | {note} |")
            continue
        notes = []
        if result["truncated_sequences"]:
            notes.append(f"{result['truncated_sequences']} sequences truncated")
        if row.processes > 1:
            notes.append(f"per-process micro-batch as the baseline: {row.processes}x the conversations per step")
        others = result["others_cpu_share"]
        lines.append(
            f"| {row.name} | {overrides} | {row.processes} | {result['peak_mib']:.0f} | {result['training_mib']:.0f} "
            f"| {result.get('training_mib_vs_baseline', '')} | {result['tokens_per_s']:.0f} "
            f"| {result.get('tokens_per_s_vs_baseline', '')} | {'' if others is None else f'{others:.0%}'} "
            f"| {'; '.join(notes)} |"
        )
    return lines


def main() -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0],
        1,
        1,
        "optimizer steps per row",
        "rounds over all rows (tokens/s: the best round; memory: the largest peak)",
    )
    parser.set_defaults(size="small")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="baseline conversations per micro-batch (a multiple of 4)",
    )
    parser.add_argument(
        "--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="baseline packed row length in tokens"
    )
    parser.add_argument(
        "--gpu", action="store_true", help="also run the CUDA-only rows (the default when CUDA is available)"
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(import_floor(json.loads(args.worker))))
        return
    if args.batch_size < 4 or args.batch_size % 4:
        parser.error(
            f"--batch-size must be a positive multiple of 4 (the accumulation row uses a quarter), got {args.batch_size}"
        )

    import torch

    from posttrain.toy import build_toy

    steps, threads = steps_and_threads(parser, args, DEFAULT_STEPS)
    cuda = torch.cuda.is_available()
    run_cuda_rows = args.gpu or cuda
    row_list = rows(args.batch_size, args.max_length)
    began = time.perf_counter()
    out: dict[str, Any] = {
        "size": args.size,
        "steps": steps,
        "warmup_steps": args.warmup,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "threads": threads,
        "device": "cuda" if cuda else "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="memory_switches_") as tmp:
        toy = build_toy(Path(tmp) / "toy", size=args.size, seed=SEED)
        floor_mib = 0.0
        if not cuda:
            spec = {"output_dir": str(Path(tmp) / "floor"), "model": str(toy.model), "threads": threads}
            floor_mib = run_subprocess(__file__, spec, "import floor", MEASURING_ENV)["import_floor_mib"]
            print(f"import floor: {floor_mib:.0f} MiB", file=sys.stderr)
        out["import_floor_mib"] = round(floor_mib, 1)
        records: dict[str, list[dict[str, Any]]] = {row.name: [] for row in row_list}
        skipped: dict[str, str] = {}
        for round_index in range(args.rounds):
            for row in row_list:
                if row.needs_cuda and not run_cuda_rows:
                    skipped[row.name] = f"no CUDA here ({row.needs_cuda}); --gpu on a CUDA machine runs it"
                    continue
                if cuda and row.processes > torch.cuda.device_count():
                    skipped[row.name] = f"needs {row.processes} GPUs, {torch.cuda.device_count()} visible"
                    continue
                output_dir = Path(tmp) / f"run-{round_index}-{row_list.index(row)}"
                base = baseline_overrides(toy.model, toy.sft, output_dir, steps, args.batch_size, args.max_length)
                record = run_row(row, base, output_dir, threads, args.warmup)
                records[row.name].append(record)
                shown = record.get("failed") or (
                    f"peak {record['peak_mib']:.0f} MiB per process (max of {record['processes']}), "
                    f"{record['tokens_per_s']:.0f} tok/s"
                )
                print(
                    f"[round {round_index + 1}] {row.name:28s} {shown}  wall {record['wall_s']:.0f} s  "
                    f"others' CPU {record.get('others_cpu_share', 'n/a')}",
                    file=sys.stderr,
                )
    results = {
        row.name: {"skipped": skipped[row.name]}
        if row.name in skipped
        else combine_rounds(records[row.name], floor_mib)
        for row in row_list
    }
    add_ratios(results)
    for row in row_list:
        results[row.name] = {"overrides": list(row.overrides), **results[row.name]}
    shares = [r["others_cpu_share"] for r in results.values() if r.get("others_cpu_share") is not None]
    table = [
        f"A shared machine: other processes took up to {max(shares, default=0):.0%} of its CPUs during a row (others' "
        "CPU). Memory does not depend on that; tokens/s does.",
        "",
        *markdown_table(row_list, results, cuda, floor_mib),
    ]
    print("\n".join(["", machine_description(), "", *table, ""]), file=sys.stderr)
    if shares:
        # warn_if_contended takes the share of its cores each run had: here, what the other processes left.
        warn_if_contended([1 - share for share in shares], threads)
        out["max_others_cpu_share"] = max(shares)
    out["failed"] = [name for name, r in results.items() if "failed" in r]
    out["skipped"] = [name for name, r in results.items() if "skipped" in r]
    out["rows"] = results
    out["wall_s"] = round(time.perf_counter() - began, 1)
    emit_results(out, args.record, table)


if __name__ == "__main__":
    main()
