"""``posttrain demo`` / ``make demo``: the embedded default, end to end on a laptop CPU.

The demo is the pipeline in ``configs/demo.yaml`` (toy kit → pretrain → SFT → reward model → PPO, GRPO, DPO,
rejection sampling, each evaluated on the same held-out prompts), run with the given seed and output directory;
``--quick`` applies that file's ``quick:`` block (fewer rows and steps, for CI). It prints the evaluation table
and where the report is.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, config: str | Path | None = None) -> dict[str, Any]:
    """Run the demo pipeline; returns the evaluation (``eval.json``'s content)."""
    from posttrain.eval.report import eval_json, format_table, reference_row_of
    from posttrain.pipeline import load_pipeline, run_pipeline

    started = time.time()
    pipeline = load_pipeline(config or DEMO_CONFIG, [f"out={out}", f"seed={seed}"], quick=quick)
    result = run_pipeline(pipeline)
    evaluation = result.evaluation or {}
    reference_row = reference_row_of(pipeline)

    print(f"\n{format_table(evaluation, reference_row)}\n")
    out = Path(out)
    print(
        f"finished in {time.time() - started:.0f} s ({len(result.ran)} stages run, {len(result.reused)} reused)\n"
        f"  report: {out / 'report.html'}\n  also:   {out / 'report.md'}, {out / 'eval.json'}, one run directory per stage in {out}/",
        file=sys.stdout,
    )
    return eval_json(evaluation, reference_row)
