"""``posttrain demo`` / ``make demo``: the embedded default, end to end on a laptop CPU.

Builds the toy kit (a tiny Llama and verifiable synthetic tasks), fine-tunes it with the SFT recipe, and measures
what SFT exists to move: exact match of greedy answers on held-out prompts, before and after. (The full RLHF
pipeline — reward model, PPO/GRPO, DPO, rejection sampling — joins this demo as those stages land.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from posttrain.config import build_config


def demo_sft_config(toy_root: Path, out: Path, quick: bool, seed: int) -> Any:
    return build_config(
        {
            "stage": "sft",
            "output_dir": str(out / "sft"),
            "seed": seed,
            "resume": False,
            "model": {"path": str(toy_root / "model")},
            "peft": {"method": "full"},
            "data": {"train": str(toy_root / "data" / "sft.jsonl"), "eval_fraction": 0.02, "max_length": 256, "packing": True},
            "train": {"epochs": 1 if quick else 8, "max_steps": 30 if quick else None, "batch_size": 8, "eval_every": 50},
            "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.0},
            "schedule": {"name": "cosine", "warmup_steps": 20, "min_lr_ratio": 0.05},
            "checkpoint": {"every": 100, "keep": 1},
        },
        source="demo",
    )


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Toy kit → SFT → held-out exact match, base vs SFT. Returns and writes ``eval.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.demo.toy import build_toy
    from posttrain.eval.verifiable import evaluate_verifiable, read_prompts
    from posttrain.recipes import sft

    out = Path(out)
    started = time.time()
    print(f"[1/3] building the toy kit (tiny Llama, BPE tokenizer, synthetic tasks) in {out / 'toy'}", file=sys.stderr)
    toy = build_toy(out / "toy", size="tiny", seed=seed)
    config = demo_sft_config(toy.root, out, quick, seed)
    print(f"[2/3] supervised fine-tuning -> {config.output_dir}", file=sys.stderr)
    sft.run(config)

    print("[3/3] held-out exact match, greedy decoding", file=sys.stderr)
    prompts = read_prompts(toy.eval)[: 48 if quick else None]
    results: dict[str, Any] = {}
    for name, path in (("base", toy.model), ("sft", Path(config.output_dir) / "model")):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        results[name] = evaluate_verifiable(model, tokenizer, prompts, max_new_tokens=24)

    (out / "eval.json").write_text(json.dumps({"models": results}, indent=1), encoding="utf-8")
    print(f"\n{'model':8} {'exact match':>12} {'gold reward':>12}   ({len(prompts)} held-out prompts)")
    for name, figures in results.items():
        print(f"{name:8} {figures['exact_match']:12.3f} {figures['gold_reward']:12.3f}")
    print("\nsample answers of the SFT model:")
    for sample in results["sft"]["samples"][:3]:
        print(f"  {sample['prompt']!r} -> {sample['answer']!r} (reference {sample['reference']!r})")
    run_dir = Path(config.output_dir)
    print(
        f"\nfinished in {time.time() - started:.0f} s\n"
        f"  model:   {run_dir / 'model'}\n  metrics: {run_dir / 'metrics.jsonl'}\n"
        f"  plots:   {run_dir / 'plots'}\n  report:  {run_dir / 'report.md'}\n  eval:    {out / 'eval.json'}"
    )
    return results
