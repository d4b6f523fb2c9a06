"""A learning test over several seeds: `python benchmarks/learning_seeds.py tests/test_dpo_learning.py --seeds 0 1 2 3 4`.

The learning tests (`tests/test_*_learning.py`) run seed 0 in the suite and assert thresholds set from several
seeds: each threshold is the smallest figure over the seeds less a margin stated in the test's docstring. This
script measures those figures. For each seed it runs the test file in its own process as

    POSTTRAIN_LEARNING_SEED=N OMP_NUM_THREADS=1 pytest -s -p no:cacheprovider TEST_FILE

(the seed varies the toy kit, the micro model and training alike; one thread, because threaded float sums are
not reproducible and the machine may be shared), and collects what the test reports through
`helpers.report_learning_figures`: one JSON line per test and seed, written to the file named by
`POSTTRAIN_LEARNING_FIGURES`. A seed whose test fails still reports its figures (they are measured before the
asserts) and is marked failed.

Prints one row per test and seed, then one JSON line: every row, the minimum of each figure per test (what a
threshold is set from) and the seeds whose run failed. With `--record` the table and figures go to
benchmarks/RESULTS.md under this command. Each seed takes minutes (the RL test over ten): run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import add_results_option, emit_results

REPO = Path(__file__).resolve().parents[1]
FIGURES_ENV = "POSTTRAIN_LEARNING_FIGURES"  # tests/helpers.py LEARNING_FIGURES_ENV


def run_seed(test_file: str, seed: int) -> tuple[list[dict], float]:
    """The figures each test of the file reported under ``seed`` (with whether that test passed), and the wall
    time."""
    with tempfile.TemporaryDirectory() as scratch:
        figures_file = Path(scratch) / "figures.jsonl"
        env = {
            **os.environ,
            "POSTTRAIN_LEARNING_SEED": str(seed),
            "OMP_NUM_THREADS": "1",
            FIGURES_ENV: str(figures_file),
        }
        started = time.time()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-s", "-q", "-rA", "-p", "no:cacheprovider", test_file],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.time() - started
        rows = [json.loads(line) for line in figures_file.read_text().splitlines()] if figures_file.exists() else []
    if not rows:
        sys.exit(
            f"{test_file}, seed {seed}: no figures reported (exit {result.returncode})\n{result.stdout[-3000:]}{result.stderr[-2000:]}"
        )
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    # A parametrized test's id names its case ("[grpo]"): one case failing does not fail the others. A failure
    # without a case id cannot be attributed, so it fails every row.
    unattributed = any("[" not in line for line in failed)
    for row in rows:
        row["passed"] = not (unattributed or any(f"[{row['test']}]" in line for line in failed))
    return rows, wall


def seed_table(rows: list[dict]) -> list[str]:
    """One markdown row per test and seed, a column per figure."""
    names = list(dict.fromkeys(name for row in rows for name in row if name not in ("test", "seed", "passed")))
    lines = ["| test | seed | " + " | ".join(names) + " | passed |", "|---" * (len(names) + 3) + "|"]
    for row in rows:
        cells = [f"{row[name]:.3f}" if isinstance(row.get(name), float) else str(row.get(name, "")) for name in names]
        lines.append(
            f"| {row['test']} | {row['seed']} | " + " | ".join(cells) + f" | {'yes' if row['passed'] else 'no'} |"
        )
    return lines


def minima(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per test, the smallest value of each figure over the seeds."""
    out: dict[str, dict[str, float]] = {}
    for row in rows:
        smallest = out.setdefault(row["test"], {})
        for name, value in row.items():
            if isinstance(value, float):
                smallest[name] = min(value, smallest.get(name, value))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_file", help="a learning test, e.g. tests/test_reward_learning.py")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--jobs", type=int, default=1, help="seeds run at once (each is one thread: up to the core count)"
    )
    add_results_option(parser)
    args = parser.parse_args()
    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = pool.map(lambda seed: run_seed(args.test_file, seed), args.seeds)
        for seed, (reported, wall) in zip(args.seeds, runs):
            for row in reported:
                rows.append(row)
                figures = ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
                failed = "" if row["passed"] else "  FAILED"
                print(f"{row['test']}, seed {seed}: {figures}{failed} ({wall:.0f} s)", flush=True)
    failed = sorted({row["seed"] for row in rows if not row["passed"]})
    emit_results(
        {"test_file": args.test_file, "minima": minima(rows), "failed_seeds": failed, "runs": rows},
        args.record,
        seed_table(rows),
    )


if __name__ == "__main__":
    main()
