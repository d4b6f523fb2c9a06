"""What the posttrain-vs-TRL benchmarks share: step timing inside a training subprocess, running one contender in a
fresh subprocess, best-of-rounds summaries and the machine-load warning.

Each benchmark script runs itself as the worker (``script --worker SPEC_JSON``); the worker prints one JSON object
as its last stdout line. The scripts are run as ``python benchmarks/NAME.py``, whose directory is first on
``sys.path``, and import this module as ``_common``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

CONTENDED_CPU_SHARE = 0.8  # below this share of its cores a run is flagged as slowed by other processes
RUSAGE_UNITS_PER_MIB = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


class StepRecorder:
    """Wall-clock time at the end of every optimizer step, and per-micro-batch counts from the collator."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.step_cpu: list[float] = []  # process CPU time (all threads) at the same moments
        self.counts: dict[str, list[int]] = {}  # counter name -> one value per collated micro-batch

    def install_step_hook(self) -> None:
        """A global ``torch.optim`` step post-hook: fires after every optimizer step of any library."""
        from torch.optim.optimizer import register_optimizer_step_post_hook

        def after_step(_optimizer: Any, _args: Any, _kwargs: Any) -> None:
            self.step_ends.append(time.perf_counter())
            self.step_cpu.append(time.process_time())

        register_optimizer_step_post_hook(after_step)

    def wrap_collator(
        self, collate: Callable[..., Any], counters: dict[str, Callable[..., int]]
    ) -> Callable[..., Any]:
        """``collate`` that records ``counters[name](batch, *args)`` under ``name`` for every batch it builds
        (``args`` are what the collator was called with, e.g. its list of rows)."""

        def counting_collate(*args: Any, **kwargs: Any) -> Any:
            batch = collate(*args, **kwargs)
            for name, count in counters.items():
                self.counts.setdefault(name, []).append(int(count(batch, *args)))
            return batch

        return counting_collate

    def batches_so_far(self) -> int:
        return max((len(v) for v in self.counts.values()), default=0)

    def discard_batches_from(self, index: int) -> None:
        """Forget the batches collated from ``index`` on (e.g. those of a reference pass that is not a training step)."""
        for values in self.counts.values():
            del values[index:]

    def window(self, warmup: int) -> tuple[float, float]:
        """Wall and process-CPU seconds from the end of step ``warmup`` to the end of the last step."""
        return self.step_ends[-1] - self.step_ends[warmup - 1], self.step_cpu[-1] - self.step_cpu[warmup - 1]


def process_stats(timed_s: float, cpu_s: float) -> dict[str, Any]:
    """Peak RSS of this process so far, its thread count, the share of those cores it had while timed (near 1 on an
    idle machine) and the 1-minute load average (the run itself accounts for about ``threads`` of it)."""
    import torch

    threads = torch.get_num_threads()
    return {
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / RUSAGE_UNITS_PER_MIB,
        "threads": threads,
        "cpu_share": cpu_s / (timed_s * threads),
        "load_avg_1min": os.getloadavg()[0],
    }


def run_subprocess(
    script: str, spec: dict[str, Any], label: str, extra_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --worker SPEC`` offline in a fresh interpreter; returns the JSON object it printed last."""
    proc = run_with_own_peak(
        [sys.executable, script, "--worker", json.dumps(spec)], offline_env(spec["output_dir"], extra_env)
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise RuntimeError(f"{label} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Linux carries a process's peak resident set (ru_maxrss) across exec, and a new process starts with its parent's
# pages (vfork shares them, fork copies them): a subprocess of a benchmark that has built a model would report at
# least the benchmark's own peak. A small relay process in between starts the measured one from its few MiB.
PEAK_RESETTING_RELAY = (sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))")


def run_with_own_peak(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``command``'s completed process, output captured, its ``ru_maxrss`` (and its children's) its own."""
    return subprocess.run([*PEAK_RESETTING_RELAY, *command], capture_output=True, text=True, env=env)


def run_timed(command: list[str]) -> tuple[subprocess.CompletedProcess[str], float, int | None]:
    """``command`` under ``/usr/bin/time -v`` when there is one: its completed process (output captured), its wall
    seconds and its peak resident memory in MiB (None without the timer)."""
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    started = time.time()
    result = subprocess.run([timer, "-v", *command] if timer else command, capture_output=True, text=True)
    wall = time.time() - started
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return result, wall, round(int(peak.group(1)) / 1024) if peak else None


def offline_env(output_dir: str, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark subprocess: no network, no tokenizer threads competing with torch's, and a
    datasets cache inside the run's own directory."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    env["HF_DATASETS_CACHE"] = output_dir + "/hf-cache"
    env.update(extra_env or {})
    return env


def best_of_rounds(values: Iterable[float]) -> dict[str, Any]:
    """The fastest round (other processes on the machine can only slow a run down, so the least-disturbed round is
    the best estimate of the code's speed, as ``timeit`` takes the minimum), the median and every round."""
    values = list(values)
    return {"best": max(values), "median": statistics.median(values), "runs": [round(v, 1) for v in values]}


def warn_if_contended(shares: list[float], threads: int) -> None:
    if min(shares) < CONTENDED_CPU_SHARE:
        print(
            f"WARNING: some runs had as little as {min(shares):.0%} of their {threads} cores (other processes were "
            "running); their figures understate the code, and ratios between runs under different contention are "
            "unreliable. Re-run on an idle machine.",
            file=sys.stderr,
        )


def benchmark_parser(
    description: str, default_warmup: int, default_rounds: int, steps_help: str, rounds_help: str
) -> argparse.ArgumentParser:
    """The options every benchmark takes: --size, --steps, --warmup, --rounds, --threads (and the hidden --worker
    that runs one contender in a fresh process)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--size", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--steps", type=int, default=None, help=f"{steps_help} (default: per size)")
    parser.add_argument("--warmup", type=int, default=default_warmup, help="first steps left out of the timing")
    parser.add_argument("--rounds", type=int, default=default_rounds, help=rounds_help)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    add_results_option(parser)
    return parser


def add_results_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--record",
        action="store_true",
        help=f"also record the summary in {RESULTS_FILE.name} (the README quotes the figures from there)",
    )


RESULTS_FILE = Path(__file__).parent / "RESULTS.md"
RESULTS_HEADER = """# Benchmark results

Written by the scripts in this folder when run with `--record` (one section per command; a new run of the same
command replaces its section). The README quotes its figures from here. History lives in git.
"""


def emit_results(out: dict[str, Any], record: bool, table: list[str] | None = None) -> None:
    """Print the summary as one JSON line; with ``--record``, also write it to RESULTS.md under its command."""
    print(json.dumps(out))
    if record:
        record_results(out, sys.argv, table)


def record_results(out: dict[str, Any], argv: list[str], table: list[str] | None = None) -> None:
    """Replace (or add) the section of RESULTS.md whose heading is this command, with the commit, the date, the
    machine, ``table`` (markdown lines, when the script has a readable summary) and every figure of the summary."""
    arguments = [a for a in argv[1:] if a != "--record"]
    command = " ".join(["python", f"benchmarks/{Path(argv[0]).name}", *arguments])
    heading = f"## `{command}`"
    lines = [
        heading,
        "",
        f"Commit {STARTED_AT_COMMIT}, {time.strftime('%Y-%m-%d')}, {machine_description()}.",
        "",
        *([*table, ""] if table else []),
        "| figure | value |",
        "|---|---|",
        *(f"| {key} | {figure_cell(value, table)} |" for key, value in out.items()),
        "",
    ]
    text = RESULTS_FILE.read_text() if RESULTS_FILE.exists() else RESULTS_HEADER
    sections = text.split("\n## ")
    kept = [sections[0].rstrip("\n") + "\n"] + [
        "## " + s.rstrip("\n") + "\n" for s in sections[1:] if not ("## " + s).startswith(heading + "\n")
    ]
    RESULTS_FILE.write_text("\n".join([*kept, "\n".join(lines)]))


def figure_cell(value: Any, table: list[str] | None) -> str:
    """A figure as JSON; a long one (every run's record) only where the table above already shows it row by row."""
    text = json.dumps(value)
    return "(per row in the table above)" if table and len(text) > 300 else text


def machine_description() -> str:
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}"


def current_commit() -> str:
    """The checkout's commit, marked when the package or the benchmarks differ from it (figures of uncommitted
    code are not reproducible from the commit alone)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "../posttrain", ".")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} with uncommitted changes" if dirty else commit


# Taken when the script starts: a long run must not be attributed to a commit that landed while it ran.
STARTED_AT_COMMIT = current_commit()


def steps_and_threads(
    parser: argparse.ArgumentParser, args: argparse.Namespace, default_steps: dict[str, int]
) -> tuple[int, int]:
    """The run length (checked against --warmup) and the torch thread count."""
    import torch

    steps = args.steps or default_steps[args.size]
    if not 1 <= args.warmup < steps:
        parser.error(f"--warmup must be at least 1 and below --steps ({steps})")
    return steps, args.threads or torch.get_num_threads()


def trl_quiet_args() -> dict[str, Any]:
    """TRL ``*Config`` settings every benchmark shares: no warm-up, decay, checkpoints, evaluation, reporting or
    progress bar, gradient clipping at 1.0 (as posttrain), and the CPU when there is no GPU (TRL refuses bf16 on a
    machine without one unless told it runs on the CPU)."""
    import torch

    return {
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "use_cpu": not torch.cuda.is_available(),
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
    }


# Qwen2.5-0.5B's shape (494M parameters, tied embeddings): the GPU benchmarks' model, built without a download.
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151_936,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rope_theta=1_000_000.0,
)


def qwen_shaped_model(tokenizer_dir: Path, out: Path) -> Path:
    """A randomly initialised model of :data:`QWEN25_05B`'s shape with the tokenizer in ``tokenizer_dir`` (the toy
    kit's: its ids are a prefix of the vocabulary), saved to ``out``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen2Config(
        **QWEN25_05B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
