"""How often a finished 2-process job aborts at exit, ending as Python's teardown ends it and as posttrain ends it.

Each job is two gloo ranks (torch's elastic launcher, as `posttrain train --nproc 2` uses) that all-reduce, pass a
barrier and keep their group referenced past ``destroy_process_group``, as DTensor's caches (FSDP2) and DeepSpeed
do. They then end either through the interpreter's teardown (``teardown``), where a gloo worker that drops its
last collective's tensors needs the GIL, is killed by the finalizing interpreter and aborts the process
("terminate called without an active exception", exit -6), or through ``posttrain.cli._end_launched_process``
(``posttrain``). The two kinds alternate, ``--parallel`` jobs at a time, so both see the same load.

    python benchmarks/exit_abort.py --jobs 300 --parallel 3 [--record]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import add_results_option, emit_results

RANK = """
import sys
import torch, torch.distributed as dist
from posttrain.cli import _end_launched_process

dist.init_process_group("gloo")
values = torch.ones(3)
dist.all_reduce(values)
dist.barrier()
KEPT = dist.group.WORLD  # what the engines' caches hold
if sys.argv[1] == "posttrain":
    _end_launched_process()
else:
    dist.destroy_process_group()
"""

ENDINGS = ("teardown", "posttrain")


def one_job(script: Path, ending: str) -> tuple[str, int, bool]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run(
        [*command, str(script), ending], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return ending, result.returncode, "terminate called without an active exception" in result.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=300, help="jobs in all, half of each ending")
    parser.add_argument("--parallel", type=int, default=3, help="jobs at once (the load that opens the race)")
    add_results_option(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="posttrain-exit-") as scratch:
        script = Path(scratch) / "rank.py"
        script.write_text(RANK)
        endings = [ENDINGS[i % 2] for i in range(args.jobs)]
        with ThreadPoolExecutor(args.parallel) as pool:
            results = list(pool.map(lambda ending: one_job(script, ending), endings))
    table = ["| ending | jobs | failed | aborted at exit (-6) |", "|---|---|---|---|"]
    out: dict[str, object] = {"jobs": args.jobs, "parallel": args.parallel}
    for ending in ENDINGS:
        mine = [r for r in results if r[0] == ending]
        failed = sum(code != 0 for _, code, _ in mine)
        aborted = sum(abort for _, _, abort in mine)
        table.append(f"| {ending} | {len(mine)} | {failed} | {aborted} |")
        out[f"{ending}_failed"] = failed
        out[f"{ending}_aborted"] = aborted
    print("\n".join(table))
    emit_results(out, args.record, table)


if __name__ == "__main__":
    main()
