"""The loop demo's claims over several seeds: `python benchmarks/loop_seeds.py [--seeds 0 1 2] [--out DIR] [--record]`.

Runs `posttrain loop demo --seed N --out DIR/seed_N` once per seed, each in its own process (under
`/usr/bin/time -v` when available: wall time and peak memory), then checks what issue 19 asks of it:

- the held-out gold reward of the policy in force rises over the rounds: after the last round it is above the
  SFT model's (the first policy), and no round lowers it (a rolled-back round keeps the previous policy);
- every seed within 15 minutes on the machine it runs on (2 cores in the README's figures).

Prints each seed's per-round table, then one JSON line with every figure and whether each claim held on every
seed. A finished seed is reused by the pipeline (delete its directory to measure it from scratch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import add_results_option, emit_results, run_timed

BUDGET_S = 15 * 60


def run_seed(seed: int, out: Path) -> dict:
    command = [sys.executable, "-m", "posttrain", "loop", "demo", "--seed", str(seed), "--out", str(out)]
    result, wall, peak = run_timed(command)
    if result.returncode != 0:
        sys.exit(f"seed {seed}: the loop demo failed (exit {result.returncode})\n{result.stderr[-3000:]}")
    report = json.loads((out / "loop.json").read_text())
    print(f"seed {seed}: {wall:.0f} s\n{result.stdout.strip()}\n", flush=True)
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "peak_rss_mb": peak,
        **policy_gold(report),
        "rounds": report["rounds"],
    }


def policy_gold(report: dict) -> dict:
    """The gold reward of the policy in force: the first policy's, then after each round (the candidate's when
    promoted, else the one before)."""
    rounds = report["rounds"]
    gold = [rounds[0]["gold_reward_current"]]
    for row in rounds:
        gold.append(row["gold_reward"] if row["promoted"] else gold[-1])
    return {"gold_by_round": gold, "promoted": [row["promoted"] for row in rounds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/loop-seeds"))
    add_results_option(parser)
    args = parser.parse_args()
    runs = [run_seed(seed, args.out / f"seed_{seed}") for seed in args.seeds]
    rises = all(r["gold_by_round"][-1] > r["gold_by_round"][0] for r in runs)
    never_lower = all(all(b >= a for a, b in zip(r["gold_by_round"], r["gold_by_round"][1:])) for r in runs)
    within = all(r["wall_s"] <= BUDGET_S for r in runs)
    out = {
        "seeds": args.seeds,
        **{f"seed{r['seed']}_gold_by_round": r["gold_by_round"] for r in runs},
        **{f"seed{r['seed']}_promoted": r["promoted"] for r in runs},
        **{f"seed{r['seed']}_wall_s": r["wall_s"] for r in runs},
        **{f"seed{r['seed']}_peak_rss_mb": r["peak_rss_mb"] for r in runs},
        "claim_gold_rises_every_seed": rises,
        "claim_no_round_lowers_gold": never_lower,
        "claim_within_15_minutes": within,
    }
    table = ["| seed | gold: SFT, then after rounds 1..n | promoted | wall s | peak RSS MB |", "|---|---|---|---|---|"]
    for r in runs:
        golds = ", ".join(f"{g:.3f}" for g in r["gold_by_round"])
        table.append(f"| {r['seed']} | {golds} | {r['promoted']} | {r['wall_s']:.0f} | {r['peak_rss_mb']} |")
    emit_results(out, args.record, table)


if __name__ == "__main__":
    main()
