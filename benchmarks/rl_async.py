"""Asynchronous online RL against synchronous, with the roles on Ray actors on CPU: steps/s and learning.

    python benchmarks/rl_async.py                          # 3 seeds x {sync, async}, 300 RL steps each
    python benchmarks/rl_async.py --seeds 0 --steps 6      # a smoke run

What runs. For each seed, the set-up of ``tests/test_rl_learning.py`` (its kit counts, its micro model, its SFT
budget, its GRPO settings and learning rate, imported from the test where they are names): the toy kit restricted
to the count / upper-case / copy tasks, the 2-layer micro model after 60 SFT steps (not timed), then GRPO with the
toy's graded gold reward, 8 prompts x 8 samples a step, 16 new tokens at temperature 1, 2 epochs x 2 updates, twice
from that same start: ``algorithm.async: false`` and ``true``. Every run is a real ``ppo.run`` with
``distributed.placement: ray``: the rollout engine, the reference and the reward are each a Ray actor with
``threads: 1``; the trainer is this process, with one torch thread. ``watch.gold: toy`` logs the gold reward of
every step's rollout; ``data.eval`` is the kit's 300 held-out prompts (same three tasks), evaluated greedily once
after the last step (``eval_gold_reward``, ``eval_exact_match``, from the run's ``summary.json``).

Asynchronous mode samples step t+1's rollout on the weights of version t while step t updates (one step
off-policy, the behaviour log-probs in the ratio; ``docs/rl.md``): on a machine with a core for the engine, the
sampling leaves the trainer's critical path. Synchronous and asynchronous runs of a seed sample with the same keys
from the same start, so their first rollout is identical; afterwards they see different weights.

``--steps`` defaults to the test's 300 RL steps, where its held-out gain over SFT is measured: the question here is
whether asynchronous training ends where synchronous training does. The whole benchmark, 3 seeds x 2 modes, takes
about 10 minutes on 2 idle cores (each run also spends ~10 s starting its actors and evaluating).

How it is measured. One local Ray runtime for the whole benchmark (``ray.init``, its start-up reported apart as
``ray_start_s``); each run joins it. Steps/s = steps / the sum of the run's per-step ``step_time_s`` from
``metrics.jsonl`` (a step's wall time from the start of its iteration to its record: waiting for the rollout,
reference and reward calls, the updates, the weight sync), so model loading, actor start-up and the final
evaluation are not timed. Runs go seed by seed, sync then async, so a change in the machine's load falls on both
modes alike. The machine should be idle: 4 processes share its cores.

Learning curve: per step, the rollout's ``gold_reward``, mean over seeds, sync and async side by side (shown as
means over windows of ``--curve-every`` steps). Verdict on the final held-out gold reward, over n seeds per mode:
the difference of the modes' means against twice its standard error, ``2 x pooled sd x sqrt(2 / n)`` (pooled sd:
the root mean of the two modes' sample variances over seeds); within it, "same within noise", else "differs". The
seeds' spread includes that of their SFT starts, which a seed's two runs share; so the paired comparison is given
too: the mean of the per-seed differences (async - sync) against twice its standard error, ``2 x sd / sqrt(n)``.
With one seed there is no spread to judge by and no verdict.

The LAST line printed is one JSON object: ``sync_steps_s``, ``async_steps_s`` (means over seeds), ``speedup``
(their ratio), each mode's held-out gold reward and exact match mean and sd over seeds, ``gold_diff``
(async - sync), ``noise_bound``, ``same_within_noise`` (true / false / null with one seed), the paired
``paired_noise_bound`` and ``same_within_paired_noise``, ``ray_start_s``, the windowed curves and every run. ``--record`` writes the tables and figures to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_results_option, emit_results

# The learning test's recipe (its budgets and its micro model) is imported from the test, not restated.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import save_micro_model, sft_config  # noqa: E402
from test_rl_learning import LEARNING_RATE, SETTINGS, keep_tasks  # noqa: E402

from posttrain.recipes import ppo, sft  # noqa: E402
from posttrain.toy import build_toy  # noqa: E402

# tests/test_rl_learning.py's ``start`` fixture: the kit's row counts and the SFT that gives the RL start.
KIT_COUNTS = {"sft": 1500, "prefs": 10, "prompts": 1500, "eval": 300, "pretrain": 10}
SFT_SETTINGS = {"train__max_steps": 60, "train__batch_size": 80, "optim__lr": 3e-3}
MAX_NEW_TOKENS = 16  # the test's sampling.max_new_tokens
DEFAULT_STEPS = 300  # the test's train.max_steps
DEFAULT_SEEDS = (0, 1, 2)
MODES = ("sync", "async")
ROLE_THREADS = {f"distributed__roles__{role}__threads": 1 for role in ("rollout", "reference", "reward")}
RAY_CPUS = 4  # three one-thread actors and the trainer; on 2 cores they mostly wait on each other


def rl_start(root: Path, seed: int) -> dict[str, Path]:
    """The test's start for ``seed``: the three-task kit and the micro model after its SFT (not timed)."""
    kit = build_toy(root / "kit", size="tiny", seed=seed, **KIT_COUNTS)
    save_micro_model(kit.model, root / "init", seed=seed)
    paths = {name: keep_tasks(getattr(kit, name), root / f"{name}.jsonl") for name in ("sft", "prompts", "eval")}
    sft.run(sft_config(root / "init", paths["sft"], root / "sft", seed=seed, **SFT_SETTINGS))
    return {**paths, "model": root / "sft" / "model"}


def rl_run(start: dict[str, Path], out: Path, seed: int, steps: int, asynchronous: bool) -> dict[str, Any]:
    """One GRPO run with the roles on the running Ray runtime; its speed, its gold curve and its held-out figures."""
    ppo.run(
        sft_config(
            start["model"],
            start["prompts"],
            out,
            stage="ppo",
            train__max_steps=steps,
            optim__lr=LEARNING_RATE["grpo"],
            seed=seed,
            sampling__max_new_tokens=MAX_NEW_TOKENS,
            resume=False,
            data__eval=str(start["eval"]),
            watch__gold="toy",
            distributed__placement="ray",
            algorithm__async=asynchronous,
            **ROLE_THREADS,
            **SETTINGS["grpo"],
        )
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "step_time_s" in r]
    if len(step_records) != steps:
        raise RuntimeError(f"{out}: {len(step_records)} step records in metrics.jsonl, expected {steps}")
    summary = json.loads((out / "summary.json").read_text())
    loop_s = sum(r["step_time_s"] for r in step_records)
    return {
        "seed": seed,
        "mode": "async" if asynchronous else "sync",
        "steps_s": steps / loop_s,
        "loop_s": loop_s,
        "eval_gold_reward": summary["final_eval_gold_reward"],
        "eval_exact_match": summary["final_eval_exact_match"],
        "weight_sync_s_mean": summary["placement"]["weight_sync_s_mean"],
        "version_lag_mean": statistics.fmean(r.get("rollout_version_lag", 0) for r in step_records),
        "gold_curve": [r["gold_reward"] for r in step_records],
    }


def mean_and_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def verdict(sync_values: list[float], async_values: list[float]) -> dict[str, Any]:
    """The difference of the modes' mean final figure against twice its standard error, over the seeds' spread and
    paired by seed (module docstring); the lists are in the same seed order."""
    n = len(sync_values)
    differences = [a - s for s, a in zip(sync_values, async_values)]
    diff = statistics.fmean(differences)
    if n < 2:
        return {
            "gold_diff": diff,
            "noise_bound": None,
            "same_within_noise": None,
            "paired_noise_bound": None,
            "same_within_paired_noise": None,
        }
    pooled_sd = math.sqrt((statistics.variance(sync_values) + statistics.variance(async_values)) / 2)
    bound = 2 * pooled_sd * math.sqrt(2 / n)
    paired_bound = 2 * statistics.stdev(differences) / math.sqrt(n)
    return {
        "gold_diff": diff,
        "noise_bound": bound,
        "same_within_noise": abs(diff) <= bound,
        "paired_noise_bound": paired_bound,
        "same_within_paired_noise": abs(diff) <= paired_bound,
    }


def windowed_curve(runs: list[dict[str, Any]], mode: str, every: int) -> list[float]:
    """The per-step gold reward, mean over the seeds, then mean over each window of ``every`` steps."""
    curves = [run["gold_curve"] for run in runs if run["mode"] == mode]
    per_step = [statistics.fmean(values) for values in zip(*curves)]
    return [statistics.fmean(per_step[i : i + every]) for i in range(0, len(per_step), every)]


def tables(runs: list[dict[str, Any]], curves: dict[str, list[float]], every: int, steps: int) -> list[str]:
    lines = [
        "| seed | mode | steps/s | held-out gold | held-out exact match | weight sync s | version lag |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        lines.append(
            f"| {run['seed']} | {run['mode']} | {run['steps_s']:.3f} | {run['eval_gold_reward']:.3f} | "
            f"{run['eval_exact_match']:.3f} | {run['weight_sync_s_mean']:.4f} | {run['version_lag_mean']:.2f} |"
        )
    lines += ["", "| steps | gold reward, sync | gold reward, async |", "|---|---|---|"]
    for index, (sync_gold, async_gold) in enumerate(zip(curves["sync"], curves["async"])):
        first = index * every + 1
        lines.append(f"| {first}-{min(first + every - 1, steps)} | {sync_gold:.3f} | {async_gold:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="RL steps per run")
    parser.add_argument("--curve-every", type=int, default=None, help="window of the curve (default: steps / 10)")
    add_results_option(parser)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    every = args.curve_every or max(1, args.steps // 10)

    import ray
    import torch

    torch.set_num_threads(1)  # the trainer's one thread
    os.environ["OMP_NUM_THREADS"] = "1"  # and the Ray workers' (each actor also sets its own threads)
    started = time.perf_counter()
    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    ray_start_s = time.perf_counter() - started
    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="rl_async-") as scratch:
            for seed in args.seeds:
                root = Path(scratch) / f"seed{seed}"
                print(f"seed {seed}: toy kit and SFT start (not timed)", file=sys.stderr, flush=True)
                start = rl_start(root, seed)
                for mode in MODES:
                    run = rl_run(start, root / mode, seed, args.steps, asynchronous=mode == "async")
                    runs.append(run)
                    print(
                        f"seed {seed}, {mode}: {run['steps_s']:.3f} steps/s, held-out gold "
                        f"{run['eval_gold_reward']:.3f}, exact match {run['eval_exact_match']:.3f}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        ray.shutdown()

    out: dict[str, Any] = {"seeds": args.seeds, "steps": args.steps, "ray_start_s": round(ray_start_s, 1)}
    for mode in MODES:
        mine = [run for run in runs if run["mode"] == mode]
        out[f"{mode}_steps_s"] = statistics.fmean(run["steps_s"] for run in mine)
        for figure in ("eval_gold_reward", "eval_exact_match"):
            out[f"{mode}_{figure}_mean"], out[f"{mode}_{figure}_sd"] = mean_and_sd([run[figure] for run in mine])
    out["speedup"] = out["async_steps_s"] / out["sync_steps_s"]
    golds = {mode: [run["eval_gold_reward"] for run in runs if run["mode"] == mode] for mode in MODES}
    out.update(verdict(golds["sync"], golds["async"]))
    curves = {mode: windowed_curve(runs, mode, every) for mode in MODES}
    out["curve_every"] = every
    out["gold_curves"] = curves
    out["runs"] = [{k: v for k, v in run.items() if k != "gold_curve"} for run in runs]

    table = tables(runs, curves, every, args.steps)
    print("\n".join(table))
    judged = {None: "no verdict with one seed", True: "same within noise", False: "differs beyond noise"}

    def bound(name: str) -> str:
        return f"{out[name]:.3f}" if out[name] is not None else "n/a"

    print(
        f"steps/s: sync {out['sync_steps_s']:.3f}, async {out['async_steps_s']:.3f} (x{out['speedup']:.2f}); "
        f"held-out gold: sync {out['sync_eval_gold_reward_mean']:.3f}, async {out['async_eval_gold_reward_mean']:.3f}, "
        f"|diff| {abs(out['gold_diff']):.3f} vs 2 x SE {bound('noise_bound')} over the seeds' spread: "
        f"{judged[out['same_within_noise']]}; vs 2 x SE {bound('paired_noise_bound')} paired by seed: "
        f"{judged[out['same_within_paired_noise']]}"
    )
    emit_results(out, args.record, table)


if __name__ == "__main__":
    main()
