"""The demo's claims over several seeds: `python benchmarks/demo_seeds.py [--seeds 0 1 2] [--out runs/demo-seeds]`.

Runs the full demo (`posttrain demo --seed N`) once per seed, each in its own process under `/usr/bin/time -v`
when available (wall time and peak memory as the README states them), then checks what the demo must show:

- SFT exact match far above base (at least +0.2 absolute);
- the reward model's held-out accuracy >= 0.90;
- PPO, GRPO, DPO and rejection sampling each above SFT on gold reward;
- the whole demo within 10 minutes.

Prints one table per seed, then one JSON line with every figure and whether each claim held on every seed.
Already finished seeds are reused by the pipeline (delete --out to measure from scratch).

`--budgets` measures instead the two wall-clock budgets the test suite used to assert (a timing assert fails on
a busy machine, so they live here): `posttrain demo --quick` within 120 s and a tiny toy-kit build (cold imports
included) within 15 s, each from scratch in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import add_results_option, emit_results, run_timed

ALIGNED = ("ppo", "grpo", "dpo", "rejection_sampling")
BUDGETS_S = {"demo_quick": 120.0, "toy_build_tiny": 15.0}


def run_seed(seed: int, out: Path) -> dict:
    command = [sys.executable, "-m", "posttrain", "demo", "--seed", str(seed), "--out", str(out)]
    result, wall, peak = run_timed(command)
    if result.returncode != 0:
        sys.exit(f"seed {seed}: demo failed (exit {result.returncode})\n{result.stderr[-3000:]}")
    figures = json.loads((out / "eval.json").read_text())
    table = result.stdout.split("\n\n")[0] if "exact match" in result.stdout else result.stdout
    print(f"seed {seed}: {wall:.0f} s\n{table.strip()}\n", flush=True)
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "peak_rss_mb": peak,
        **figures,
    }


def claims(run: dict) -> dict[str, bool]:
    models = run["models"]
    held = {
        "sft_far_above_base": models["sft"]["exact_match"] >= models["base"]["exact_match"] + 0.2,
        "rm_accuracy_at_least_0.9": run["reward_model"]["accuracy"] >= 0.9,
        "within_10_minutes": run["wall_s"] <= 600,
    }
    for name in ALIGNED:
        held[f"{name}_above_sft_on_gold"] = models[name]["gold_reward"] > models["sft"]["gold_reward"]
    return held


def timed(command: list[str]) -> float:
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed (exit {result.returncode})\n{result.stderr[-3000:]}")
    return time.time() - started


def budgets(out: Path) -> dict:
    """Wall time of `posttrain demo --quick` and of a tiny toy build, each from scratch, against BUDGETS_S."""
    shutil.rmtree(out, ignore_errors=True)
    build = "from posttrain.toy import build_toy; import sys; build_toy(sys.argv[1], size='tiny', seed=0)"
    seconds = {
        "demo_quick": timed(
            [sys.executable, "-m", "posttrain", "demo", "--quick", "--seed", "0", "--out", str(out / "quick")]
        ),
        "toy_build_tiny": timed([sys.executable, "-c", build, str(out / "toy")]),
    }
    for name, value in seconds.items():
        print(
            f"{name}: {value:.1f} s (budget {BUDGETS_S[name]:.0f} s){'' if value <= BUDGETS_S[name] else '  OVER BUDGET'}"
        )
    return {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "budget_s": BUDGETS_S,
        "within_budget": {k: seconds[k] <= BUDGETS_S[k] for k in seconds},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/demo-seeds")
    parser.add_argument(
        "--budgets", action="store_true", help="measure the demo --quick and toy-build wall-clock budgets instead"
    )
    add_results_option(parser)
    args = parser.parse_args()
    if args.budgets:
        emit_results(budgets(Path(args.out) / "budgets"), args.record)
        return
    runs = [run_seed(seed, Path(args.out) / f"seed{seed}") for seed in args.seeds]
    per_seed = [claims(run) for run in runs]
    summary = {name: all(held[name] for held in per_seed) for name in per_seed[0]}
    for run, held in zip(runs, per_seed):
        failed = [name for name, ok in held.items() if not ok]
        print(f"seed {run['seed']}: {'all claims hold' if not failed else 'FAILED: ' + ', '.join(failed)}")
    emit_results(
        {"claims_hold_on_every_seed": summary, "claims_per_seed": per_seed, "runs": runs},
        args.record,
        seed_table(runs),
    )


def seed_table(runs: list[dict]) -> list[str]:
    """One markdown row per seed: time, peak memory, exact match of base and SFT, the reward model's accuracy and
    the gold reward of SFT and of each aligned model."""
    lines = [
        "| seed | time | peak RSS | base EM | SFT EM | RM accuracy | gold: SFT | " + " | ".join(ALIGNED) + " |",
        "|---" * (7 + len(ALIGNED)) + "|",
    ]
    for run in runs:
        models = run["models"]
        minutes, seconds = divmod(round(run["wall_s"]), 60)
        peak = f"{run['peak_rss_mb']:,} MiB" if run["peak_rss_mb"] else "n/a"
        lines.append(
            f"| {run['seed']} | {minutes} min {seconds:02d} s | {peak} | {models['base']['exact_match']:.3f} | "
            f"{models['sft']['exact_match']:.3f} | {run['reward_model']['accuracy']:.3f} | {models['sft']['gold_reward']:.3f} | "
            + " | ".join(f"{models[name]['gold_reward']:.3f}" for name in ALIGNED)
            + " |"
        )
    return lines


if __name__ == "__main__":
    main()
