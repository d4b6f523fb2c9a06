"""Does a multi-process run train the model a one-process run trains? ``configs/sft_full.yaml`` on the toy kit, once
in one process (``train.batch_size`` B) and then on N processes (B / N each, the same global batch) under every
strategy: ddp, fsdp, DeepSpeed ZeRO-1/2/3 and ZeRO-3 with everything offloaded. Per strategy: the largest weight
difference from the one-process model, the largest loss difference over the steps, wall time and each process's
peak memory (``summary.json``). Every multi-process run is started by ``posttrain train ... --nproc N``.

    python benchmarks/distributed_equivalence.py --steps 20 --record
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import add_results_option, emit_results

STRATEGIES: dict[str, list[str]] = {
    "ddp": [],
    "fsdp": ["distributed.strategy=fsdp"],
    "zero1": ["distributed.strategy=deepspeed", "distributed.zero_stage=1"],
    "zero2": ["distributed.strategy=deepspeed", "distributed.zero_stage=2"],
    "zero3": ["distributed.strategy=deepspeed", "distributed.zero_stage=3"],
    "zero3_offload_all": ["distributed.strategy=deepspeed", "distributed.zero_stage=3", "distributed.offload=all"],
}


def train(posttrain: Path, common: list[str], out: Path, extra: list[str]) -> float:
    started = time.time()
    result = subprocess.run(
        [str(posttrain), "train", *common, f"output_dir={out}", *extra], capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-6000:])
        raise RuntimeError(f"{out.name} failed (exit code {result.returncode})")
    return time.time() - started


def compare(one: Path, other: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    reference = load_file(str(one / "model" / "model.safetensors"))
    weights = load_file(str(other / "model" / "model.safetensors"))
    if reference.keys() != weights.keys():
        raise RuntimeError(f"{other.name}: the saved tensors differ from the one-process model's")

    def losses(run: Path) -> list[float]:
        records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return [record["loss"] for record in records if "loss" in record]

    summary = json.loads((other / "summary.json").read_text())
    return {
        "max_abs_weight_diff": max((weights[n].float() - reference[n].float()).abs().max().item() for n in reference),
        "max_abs_loss_diff": max(abs(a - b) for a, b in zip(losses(one), losses(other), strict=True)),
        "peak_mib_per_process": summary["peak_memory_mib_per_process"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="the one-process micro-batch (global batch)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    add_results_option(parser)
    args = parser.parse_args()
    if args.batch_size % args.nproc:
        parser.error("--batch-size must divide evenly over --nproc")
    posttrain = Path(sys.executable).parent / "posttrain"
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        subprocess.run([str(posttrain), "toy", str(work / "toy")], check=True, capture_output=True)
        common = [
            str(repo / "posttrain" / "configs" / "sft_full.yaml"),
            f"model.path={work / 'toy' / 'model'}",
            f"data.train={work / 'toy' / 'data' / 'sft.jsonl'}",
            f"train.max_steps={args.steps}",
            "logging.progress=false",
            "logging.report=false",
            "logging.tensorboard=false",
        ]
        one_process_s = train(posttrain, common, work / "one", [f"train.batch_size={args.batch_size}"])
        rows: dict[str, Any] = {}
        for name in args.strategies:
            per_process = [f"train.batch_size={args.batch_size // args.nproc}", "--nproc", str(args.nproc)]
            wall = train(posttrain, common, work / name, [*per_process, *STRATEGIES[name]])
            rows[name] = {**compare(work / "one", work / name), "wall_s": round(wall, 1)}
            print(f"{name}: {rows[name]}", file=sys.stderr)
        one_peak = json.loads((work / "one" / "summary.json").read_text())["peak_memory_mib_per_process"]
    table = [
        f"`configs/sft_full.yaml`, toy model, {args.steps} steps, global batch {args.batch_size}; {args.nproc} processes "
        f"vs one process ({one_process_s:.1f} s, peak {one_peak[0]:.0f} MiB). CPU peaks are resident sets, imports "
        "included.",
        "",
        "| strategy | max abs weight diff | max abs loss diff | wall (s) | peak MiB per process |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {row['max_abs_weight_diff']:.2e} | {row['max_abs_loss_diff']:.2e} | {row['wall_s']} | "
            f"{', '.join(f'{peak:.0f}' for peak in row['peak_mib_per_process'])} |"
            for name, row in rows.items()
        ),
    ]
    print("\n".join(table), file=sys.stderr)
    out = {"steps": args.steps, "nproc": args.nproc, "one_process_s": round(one_process_s, 1), "strategies": rows}
    emit_results(out, args.record, table)


if __name__ == "__main__":
    main()
