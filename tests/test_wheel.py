"""The package works outside the repository: its wheel, installed into a fresh virtual environment and run from an
empty directory, builds the toy kit, trains a stage from its defaults (no YAML) and resolves the pipelines it ships.

Offline: the wheel is built without build isolation (setuptools is already installed) from a copy of this checkout
(setuptools builds in-tree, and a stale ``build/`` would leak deleted modules into the wheel). The new environment
reuses the installed dependencies through a ``.pth`` line naming this environment's site-packages: a plain path
line adds that folder to ``sys.path`` without running the ``.pth`` files in it, so the editable install's finder
(which would import this checkout instead of the wheel) stays out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # building and installing the wheel, then a training run
BUILD_LEFTOVERS = (
    ".git",
    ".venv",
    "build",
    "dist",
    "runs",
    "out",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
)


def _run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    # PYTHONPATH would put a checkout back on the path; the new environment must find only the wheel.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel of this checkout installed; returns its bin/ folder."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(*BUILD_LEFTOVERS))
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(root / "dist"),
            str(source),
        ],
        cwd=root,
    )
    (wheel,) = (root / "dist").glob("posttrain-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).stdout.strip()
    )
    (site_packages / "installed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        cwd=root,
    )
    return venv / "bin"


def test_the_wheel_holds_the_code_and_the_shipped_configs(installed: Path, tmp_path: Path) -> None:
    where = _run(
        [
            str(installed / "python"),
            "-c",
            "import posttrain.cli as c; print(c.__file__); print(sorted(p.name for p in c.SHIPPED_CONFIGS.glob('*.yaml')))",
        ],
        cwd=tmp_path,
    )
    module, configs = where.stdout.splitlines()
    assert Path(module).is_relative_to(installed.parent), module  # the wheel's copy, not this checkout
    assert "demo.yaml" in configs and "sft_lora.yaml" in configs and "grpo.yaml" in configs


def test_one_stage_trains_from_its_defaults_in_an_empty_directory(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    _run([str(installed / "python"), "-m", "posttrain", "toy", "kit", "--size", "tiny"], cwd=work)
    _run(
        [
            str(installed / "posttrain"),
            "train",
            "sft",
            "model.path=kit/model",
            "data.train=kit/data/sft.jsonl",
            "output_dir=run",
            "train.max_steps=12",
            "optim.lr=1e-3",
            "data.max_length=64",
            "logging.progress=false",
        ],
        cwd=work,
    )
    losses = [
        row["loss"]
        for row in map(json.loads, (work / "run" / "metrics.jsonl").read_text().splitlines())
        if "loss" in row
    ]
    assert len(losses) == 12 and losses[-1] < 0.8 * losses[0], losses
    assert (work / "run" / "model" / "model.safetensors").exists() and (
        work / "run" / "model" / "tokenizer.json"
    ).exists()
    assert sorted(p.name for p in work.iterdir()) == ["kit", "run"]  # nothing read from or written to a checkout


def test_the_packaged_pipelines_resolve_every_stage(installed: Path, tmp_path: Path) -> None:
    """The demo and loop-demo pipelines ship with the wheel and every stage config (and the loop's) validates from
    it, in dependency order. (They run end to end from the source tree in test_demo.py and test_loop.py; running
    the quick demo again from the wheel cost a minute of the suite for what only differs in the package data.)"""
    work = tmp_path / "empty"
    work.mkdir()
    for name, stages in (
        ("demo", ["toy", "pretrain", "sft", "reward", "ppo", "grpo", "dpo", "rejection_sampling"]),
        ("loop_demo", ["toy", "pretrain", "sft", "reward", "loop"]),
    ):
        printed = _run([str(installed / "posttrain"), "pipeline", name, "--quick", "--dry-run"], cwd=work).stdout
        assert [line.split()[0] for line in printed.splitlines() if line.strip()] == stages, printed
