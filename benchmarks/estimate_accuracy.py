"""How right is `posttrain estimate`? Its memory plan against measured peaks, its time against whole runs (issue 20).

    python benchmarks/estimate_accuracy.py              # the whole grid, ~15 minutes on 2 cores
    python benchmarks/estimate_accuracy.py --quick      # one size, one sequence length: a smoke run

Memory. Every point of the grid runs two optimizer steps of the real recipe in this process
(``posttrain.probe.probe_memory``, what ``posttrain estimate --probe`` runs) and sets the plan's predicted peak
against the peak its run measured: on CPU the bytes of every tensor storage alive at once
(``posttrain.runtime.memory.LiveTensorMeter``), on CUDA the allocator's peak. The grid: 3 model sizes (the toy
kit's mini, tiny and small Llama shapes on its tokenizer, randomly initialised) x full fine-tuning / LoRA (r 16,
every linear) / prompt tuning (20 virtual tokens) x sequence length 64 / 256 x micro-batch 1 / 4 x SFT and DPO,
plus GRPO (group of 4, 32 new tokens) on each size with full fine-tuning and LoRA. The data fill every sequence to
``data.max_length`` (long answers, truncated), as the plan assumes: the plan is for the longest micro-batch.
Target: every point within +-15 % (``memory_worst_error``). ``--gpu`` (a CUDA machine) runs issue 20's GPU grid
instead: a Qwen2.5-0.5B-shaped model (randomly initialised, the toy tokenizer), full fine-tuning and LoRA, SFT and
DPO, bf16 autocast, sequence 512, micro-batch 4, measured by ``torch.cuda.max_memory_allocated``; target +-10 %.
Prepared without a GPU (none lent so far): expect to fix its first run.

Time. ``posttrain estimate CONFIG --time --sample 0.05`` (``posttrain.probe.time_run``: 5 % of the steps, at
least 4, the first a warm-up), each in a fresh process as a user runs it, on the tiny model: SFT full (200 steps,
an evaluation every 50), SFT LoRA (200 steps, a checkpoint every 50), DPO full (100 steps) and GRPO LoRA (40
steps); then ``posttrain train CONFIG`` in another fresh process, whose ``wall_time_s`` the prediction is set
against. Target: within +-15 % (``time_worst_error``).

The LAST line printed is one JSON object: ``memory_worst_error``, ``time_worst_error``, whether each target was
met, and every point. ``--record`` writes the table and figures to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "2")

from _common import add_results_option, emit_results, qwen_shaped_model  # noqa: E402

MEMORY_TARGET = 0.15
GPU_MEMORY_TARGET = 0.10
TIME_TARGET = 0.15
SIZES = ("mini", "tiny", "small")
GRPO_NEW_TOKENS = 32
TIME_SAMPLE = 0.05  # of each run's steps: 10 of SFT's 200 (the first a warm-up)
METHODS = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear"},
    "prompt": {"method": "prompt_tuning", "num_virtual_tokens": 20},
}


def build_kit(root: Path, sizes: tuple[str, ...], gpu: bool = False) -> dict[str, Any]:
    """The toy kit's tokenizer and word list, one model directory per size, and long-row data files."""
    from posttrain.toy import build_model, build_toy

    toy = build_toy(root / "kit", size="mini", seed=0)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(toy.model)
    models = {}
    for size in sizes:
        directory = root / f"model-{size}"
        build_model(tokenizer, size, seed=0).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        models[size] = directory
    if gpu:
        models["qwen-0.5b"] = qwen_shaped_model(toy.model, root / "model-qwen-0.5b")
    contents = (json.loads(line)["messages"][0]["content"] for line in toy.sft.read_text().splitlines())
    words = sorted({w for content in contents for w in content.split() if w.isalpha() and w.islower()})
    return {"models": models, "tokenizer": tokenizer, "words": words, "data": root / "data", "files": {}}


def data_file(kit: dict[str, Any], kind: str, seq: int) -> Path:
    """Rows of ``kind`` (sft, prefs, prompts) whose every sequence is as long as fits in ``seq`` tokens with its
    end-of-turn token (the plan's longest micro-batch; nothing truncated, so preflight accepts the data)."""
    key = (kind, seq)
    if key in kit["files"]:
        return kit["files"][key]
    tokenizer, rng = kit["tokenizer"], random.Random(seq)

    def text(n: int) -> str:
        return " ".join(rng.choice(kit["words"]) for _ in range(n))

    def longest_answer(prompt: list[dict[str, str]]) -> str:
        words = text(seq).split()
        low, high = 1, len(words)  # the most words whose whole conversation fits in seq tokens
        while low < high:
            middle = (low + high + 1) // 2
            messages = [*prompt, {"role": "assistant", "content": " ".join(words[:middle])}]
            if len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]) <= seq:
                low = middle
            else:
                high = middle - 1
        return " ".join(words[:low])

    rows: list[dict[str, Any]] = []
    for _ in range(48):
        prompt = [{"role": "user", "content": "Repeat: " + text(6)}]
        if kind == "sft":
            rows.append({"messages": [*prompt, {"role": "assistant", "content": longest_answer(prompt)}]})
        elif kind == "prefs":
            chosen, rejected = longest_answer(prompt), longest_answer(prompt)
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:  # the toy's copy task (its reward function scores it), as long as fits with the response
            words = text(seq).split()
            low, high = 1, len(words)
            while low < high:
                middle = (low + high + 1) // 2
                messages = [{"role": "user", "content": "Repeat: " + " ".join(words[:middle])}]
                ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
                low, high = (middle, high) if len(ids) <= seq - GRPO_NEW_TOKENS else (low, middle - 1)
            content = "Repeat: " + " ".join(words[:low])
            rows.append({"messages": [{"role": "user", "content": content}], "reference": content[8:], "task": "copy"})
    kit["data"].mkdir(exist_ok=True)
    path = kit["files"][key] = kit["data"] / f"{kind}-{seq}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage_config(kit: dict[str, Any], stage: str, size: str, method: str, seq: int, batch: int, **extra: Any) -> Any:
    from posttrain.config import build_config

    raw: dict[str, Any] = {
        "stage": {"grpo": "ppo"}.get(stage, stage),
        "model": {"path": str(kit["models"][size])},
        "peft": METHODS[method],
        "data": {"train": str(data_file(kit, "prefs" if stage == "dpo" else "sft", seq)), "max_length": seq},
        "train": {"batch_size": batch, "precision": "fp32"},
        "optim": {"name": "adamw", "lr": 1e-4},
        "checkpoint": {"every": 1000},
    }
    if stage in ("sft", "dpo"):
        raw["data"]["packing"] = False  # prompt tuning needs it; the plan's rows are then the batch's sequences
    if stage == "grpo":
        raw["data"] = {"train": str(data_file(kit, "prompts", seq)), "max_length": seq}
        raw["sampling"] = {"num_samples": 4, "max_new_tokens": GRPO_NEW_TOKENS, "batch_size": 16, "temperature": 1.0}
        raw["reward"] = {"function": "toy"}
        raw["algorithm"] = {"advantage": "grpo", "prompts_per_step": 2, "kl_coef": 0.04}
        raw["train"]["batch_size"] = 8
    for block, values in extra.items():
        raw[block] = {**raw.get(block, {}), **values}
    return build_config(raw)


def gpu_points() -> list[tuple[str, str, str, int, int]]:
    """Issue 20's GPU grid: a ~0.5B model, full and LoRA, SFT and DPO (bf16 autocast, set in run_memory)."""
    return [(stage, "qwen-0.5b", method, 512, 4) for stage in ("sft", "dpo") for method in ("full", "lora")]


def memory_points(quick: bool) -> list[tuple[str, str, str, int, int]]:
    sizes = ("tiny",) if quick else SIZES
    seqs = (128,) if quick else (64, 256)
    points = [
        (stage, size, method, seq, batch)
        for stage in ("sft", "dpo")
        for size in sizes
        for method in METHODS
        for seq in seqs
        for batch in (1, 4)
    ]
    points += [("grpo", size, method, 64, 8) for size in sizes for method in ("full", "lora")]
    return points


def run_memory(kit: dict[str, Any], points: list[tuple[str, str, str, int, int]]) -> list[dict[str, Any]]:
    from posttrain.probe import probe_memory

    rows = []
    for stage, size, method, seq, batch in points:
        precision = {"train": {"precision": "bf16"}} if size == "qwen-0.5b" else {}
        config = stage_config(kit, stage, size, method, seq, batch, **precision)
        probe = probe_memory(config)
        gc.collect()
        row = {
            "stage": stage,
            "size": size,
            "method": method,
            "seq": seq,
            "batch": batch,
            "predicted_mib": round(probe.plan.tensor_peak / 2**20, 2),
            "measured_mib": round(probe.measured_peak / 2**20, 2),
            "error": round(probe.error, 4),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def run_time(kit: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    """Each case as a user runs it: ``posttrain estimate CONFIG --time`` in a fresh process, then ``posttrain train
    CONFIG`` in another, whose summary's ``wall_time_s`` the prediction is set against."""
    from posttrain.config import save_config

    cases = [
        (
            "sft",
            "full",
            stage_config(
                kit,
                "sft",
                "tiny",
                "full",
                128,
                4,
                train={"max_steps": 200, "eval_every": 50},
                data={"eval_fraction": 0.1},
            ),
        ),
        (
            "sft",
            "lora",
            stage_config(kit, "sft", "tiny", "lora", 128, 4, train={"max_steps": 200}, checkpoint={"every": 50}),
        ),
        ("dpo", "full", stage_config(kit, "dpo", "tiny", "full", 128, 2, train={"max_steps": 100})),
        ("grpo", "lora", stage_config(kit, "grpo", "tiny", "lora", 64, 8, train={"max_steps": 40})),
    ]
    posttrain = str(Path(sys.executable).parent / "posttrain")
    rows = []
    for index, (stage, method, config) in enumerate(cases):
        path = root / f"time-{index}.yaml"
        save_config(config, path)
        estimate = subprocess.run(
            [posttrain, "estimate", str(path), "--time", "--sample", str(TIME_SAMPLE), "--json"],
            capture_output=True,
            text=True,
            check=True,
        )
        predicted = json.loads(estimate.stdout.strip().splitlines()[-1])["time"]
        out = root / f"whole-{index}"
        subprocess.run(
            [posttrain, "train", str(path), f"output_dir={out}"], capture_output=True, text=True, check=True
        )
        actual = json.loads((out / "summary.json").read_text())["wall_time_s"]
        row = {
            "stage": stage,
            "method": method,
            "steps": predicted["total_steps"],
            "sampled_steps": predicted["sampled_steps"],
            "predicted_s": predicted["total_s"],
            "actual_s": actual,
            "error": round(predicted["total_s"] / actual - 1, 4),
        }
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one size and sequence length, no time runs")
    parser.add_argument("--only", choices=("memory", "time"), help="run one half (time wants an idle machine)")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="on a CUDA machine: the GPU grid (a Qwen2.5-0.5B-shaped model, bf16, full and LoRA, SFT and DPO; "
        "+-10 %%) instead of the CPU one",
    )
    add_results_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="estimate-accuracy-") as scratch:
        root = Path(scratch)
        if args.gpu:
            import torch

            if not torch.cuda.is_available():
                parser.error("--gpu needs a CUDA device")
        kit = build_kit(root, ("tiny",) if args.quick or args.only == "time" or args.gpu else SIZES, args.gpu)
        points = gpu_points() if args.gpu else memory_points(args.quick)
        memory = [] if args.only == "time" else run_memory(kit, points)
        timing = [] if args.quick or args.gpu or args.only == "memory" else run_time(kit, root)
    memory_worst = max((abs(r["error"]) for r in memory), default=None)
    time_worst = max((abs(r["error"]) for r in timing), default=None)
    table = [
        "| stage | size | method | seq | micro-batch | predicted MiB | measured MiB | error |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {r['stage']} | {r['size']} | {r['method']} | {r['seq']} | {r['batch']} | {r['predicted_mib']} | "
            f"{r['measured_mib']} | {r['error']:+.1%} |"
            for r in memory
        ),
        "",
        "| time: stage | method | steps | sampled | predicted s | actual s | error |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['stage']} | {r['method']} | {r['steps']} | {r['sampled_steps']} | {r['predicted_s']} | "
            f"{r['actual_s']} | {r['error']:+.1%} |"
            for r in timing
        ),
    ]
    out = {
        "memory_points": len(memory),
        "memory_worst_error": memory_worst,
        "memory_target": GPU_MEMORY_TARGET if args.gpu else MEMORY_TARGET,
        "memory_target_met": memory_worst is not None
        and memory_worst <= (GPU_MEMORY_TARGET if args.gpu else MEMORY_TARGET),
        "time_worst_error": time_worst,
        "time_target_met": time_worst is not None and time_worst <= TIME_TARGET,
        "memory": memory,
        "time": timing,
    }
    print("\n".join(table), file=sys.stderr)
    emit_results(out, args.record, table)


if __name__ == "__main__":
    main()
