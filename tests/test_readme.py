"""Every command in the README's code blocks runs as written (in order, in a shell, from the repository root),
with two substitutions: `/tmp/` becomes a fresh temporary directory and `runs/demo` a copy of the quick demo's
output (the commands rerun stages in it; other tests read the original).
Each must exit 0 and leave what it says it writes (`output_dir=`, `--out`). Not run here, and why:
- `make demo` / `make test`: `make test` is this suite; `make demo` is `posttrain demo` after installing, which
  runs here in --quick mode (test_demo.py) because the full one takes minutes of the suite's budget;
- `python benchmarks/...`: speed and seed benchmarks take minutes each and need `.[bench]`; each one's
  `--help` runs here, so a renamed flag or a broken import is still caught;
- `posttrain serve ...`: it serves until stopped; test_serve.py starts the same command line on a free port and
  drives it with the openai client the README shows. `posttrain label serve ...` likewise: test_label.py starts it,
  SIGKILLs and restarts it, and test_label_browser.py labels through it;
- `posttrain loop demo`: 10-15 minutes (its three seeds are a benchmark, `benchmarks/loop_seeds.py`); its pipeline
  resolves here (`--dry-run`, quoted in the README) and test_loop.py runs the loop's rounds.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NOT_RUN = ("make demo", "make test")
SERVES_OR_MINUTES = ("posttrain serve ", "posttrain label serve ", "posttrain loop demo")
BENCHMARKS = sorted((REPO / "benchmarks").glob("[!_]*.py"))  # each one's --help runs, quoted in the README or not


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith(("posttrain ", "make ", "python ")):
                commands.append(line)
    return commands


def test_the_readme_starts_with_the_two_commands() -> None:
    assert (REPO / "README.md").read_text(encoding="utf-8").startswith("```\nmake demo\nmake test\n```\n")
    assert set(NOT_RUN) <= set(readme_commands())


def test_every_benchmark_command_in_the_readme_parses() -> None:
    benchmarks = [c for c in readme_commands() if c.startswith("python benchmarks/")]
    assert benchmarks, "the README names its benchmark commands"
    for script in sorted({shlex.split(c)[1] for c in benchmarks} | {str(p.relative_to(REPO)) for p in BENCHMARKS}):
        result = subprocess.run(
            [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0 and "usage" in result.stdout, (script, result.stderr[-2000:])


def test_every_posttrain_command_in_the_readme_runs(tmp_path: Path, quick_demo: dict[str, Any]) -> None:
    commands = [c for c in readme_commands() if c.startswith("posttrain ") and not c.startswith(SERVES_OR_MINUTES)]
    assert len(commands) >= 15
    posttrain = Path(sys.executable).parent / "posttrain"
    # The README reruns stages in runs/demo (`--from`, overrides): on a copy, so test_demo's checks of the
    # session's demo directory hold in any test order.
    demo = tmp_path / "demo"
    shutil.copytree(quick_demo["out"], demo)
    for command in commands:
        concrete = command.replace("/tmp/", f"{tmp_path}/").replace("runs/demo", str(demo))
        concrete = str(posttrain) + concrete[len("posttrain") :]
        result = subprocess.run(concrete, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        for written in re.findall(r"(?:output_dir=|--out )(\S+)", concrete):
            assert Path(written).exists(), f"{command}: {written} was not written"
