"""What test files share besides fixtures: configs and models for tests, subprocess training, peer-data skips,
learning-test figures, and the generation/evaluation shortcuts that only tests use.

Test files import from here (``from helpers import sft_config``); ``conftest.py`` keeps the fixtures and hooks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

# Set before any test imports transformers: offline, quiet, and no tokenizer thread pools fighting pytest's.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
PEER_DATA = Path(os.environ.get("POSTTRAIN_PEER_DATA", REPO.parent / "shared" / "peer-data"))
# The learning tests run seed 0 in the suite; ``benchmarks/learning_seeds.py`` runs them over other seeds (the kit,
# micro model and training all follow it) and records the figures in benchmarks/RESULTS.md.
LEARNING_SEED = int(os.environ.get("POSTTRAIN_LEARNING_SEED", "0"))
LEARNING_FIGURES_ENV = "POSTTRAIN_LEARNING_FIGURES"
"""When set, a file that :func:`report_learning_figures` appends one JSON line to (``benchmarks/learning_seeds.py``)."""


def assert_weights_close(
    actual: dict[str, Any], expected: dict[str, Any], initial: dict[str, Any], ulps: int = 1024
) -> None:
    """float32 weights after the same updates summed in another order (grad accumulation, packing): they differ by
    the rounding of the updates, so the tolerance scales with each tensor's update ``max|expected − initial|``
    (lr · gradient, over the steps), not with a fixed 1e-6 nor with the weight (a 1e-6 absolute bound failed at
    1.5e-6 on an embedding). Measured on the reward model's 1×8 vs 8×1: up to 110 eps · max|Δw|; ``ulps`` = 1024
    leaves a ~10× margin. ``rtol`` = 64 eps covers the weight's own last-bit rounding."""
    import torch
    from torch.testing import assert_close

    eps = torch.finfo(torch.float32).eps
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        before = initial.get(name, torch.zeros_like(want))
        update = (want.float() - before.float()).abs().max().item()
        assert_close(
            actual[name], want, rtol=64 * eps, atol=ulps * eps * update, msg=lambda m, name=name: f"{name}: {m}"
        )


def save_micro_model(tokenizer_dir: Path, out: Path, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A 2-layer, 64-wide Llama over the tokenizer in ``tokenizer_dir``, saved with it to ``out``. A larger
    ``initializer_range`` (0.3) gives sharper, varied greedy answers where the default repeats one token."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_lora(
    base_dir: Path, out: Path, seed: int, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj")
) -> Path:
    """A LoRA adapter over ``base_dir`` with random non-zero B (peft starts B at 0, which would change nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets)),
    )
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.3)
    model.save_pretrained(out)
    return out


def sft_config(model: Path, data: Path, out: Path, **overrides: Any) -> Any:
    """An SftConfig for tests: quiet, small, fp32; ``overrides`` in dotted form (``train__max_steps=3``)."""
    from posttrain.config import build_config

    raw: dict[str, Any] = {
        "stage": "sft",
        "output_dir": str(out),
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_length": 128},
        "train": {"max_steps": 4, "batch_size": 4},
        "optim": {"lr": 1e-3},
        "schedule": {"name": "constant"},
        "checkpoint": {"every": None},
        "logging": {"progress": False, "tensorboard": False, "report": False},
    }
    for key, value in overrides.items():
        *blocks, leaf = key.split("__")
        node = raw
        for block in blocks:
            node = node.setdefault(block, {})
        node[leaf] = value
    return build_config(raw)


# Runs `posttrain train CONFIG [overrides]` and, with a kill step, SIGKILLs itself right after that optimizer
# step has ended (logged, evaluated when due, checkpointed when due: Runtime.end_step): a crash at an exact point, whatever the machine's load. The
# parent never has to catch a fast run in the act (polling a checkpoint file and killing from outside is a race
# the run can win by finishing first).
_TRAIN_AND_KILL = """
import os, signal, sys
from posttrain.cli import main
from posttrain.runtime.trainer import Runtime

kill_after_step = int(sys.argv[1])
end_step = Runtime.end_step

def end_step_then_kill(self, *args, **kwargs):
    end_step(self, *args, **kwargs)
    if self.global_step == kill_after_step:
        os.kill(os.getpid(), signal.SIGKILL)

if kill_after_step > 0:
    Runtime.end_step = end_step_then_kill
sys.exit(main(["train", *sys.argv[2:]]))
"""


def write_config(config: Any, path: Path) -> Path:
    """``config`` as the YAML file `posttrain train` reads."""
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def train_in_subprocess(
    config: Any,
    *overrides: str,
    kill_after_step: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """`posttrain train` on ``config`` in a fresh process (its YAML written beside ``output_dir``); with
    ``kill_after_step`` the process SIGKILLs itself once that step is logged. ``tests/`` is importable there (for
    reward functions defined in test files); ``env`` adds variables."""
    out = Path(config.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    config_path = write_config(config, out.parent / f"{out.name}.yaml")
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-c", _TRAIN_AND_KILL, str(kill_after_step or 0), str(config_path), *overrides],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# `.ci/run` sets this: a test that needs peer-data then fails when it is missing, instead of skipping and letting
# CI go green without the real-tokenizer loss masks, templates and registries. `make test` alone still skips.
REQUIRE_PEER_DATA = os.environ.get("POSTTRAIN_REQUIRE_PEER_DATA", "") not in ("", "0")
PEER_DATA_REQUIRED = "POSTTRAIN_REQUIRE_PEER_DATA=1 (set by .ci/run): peer data is required"


def need_peer_file(path: Path) -> Path:
    """``path`` under peer-data, or skip the test when that folder is not beside the checkout (fail under
    ``POSTTRAIN_REQUIRE_PEER_DATA=1``)."""
    if not path.exists():
        message = f"peer data not found: {path} (set POSTTRAIN_PEER_DATA)"
        if REQUIRE_PEER_DATA:
            pytest.fail(f"{PEER_DATA_REQUIRED}; {message}", pytrace=False)
        pytest.skip(message)
    return path


def report_learning_figures(test: str, **figures: float) -> None:
    """Print a learning test's measured figures (``pytest -s`` shows them) and, under ``POSTTRAIN_LEARNING_FIGURES``,
    append them with the test's name and seed as one JSON line to that file."""
    print(f"{test}, seed {LEARNING_SEED}: " + ", ".join(f"{name} {value:.3f}" for name, value in figures.items()))
    path = os.environ.get(LEARNING_FIGURES_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"test": test, "seed": LEARNING_SEED, **figures}) + "\n")


def generate_responses(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, str]]], max_new_tokens: int = 32
) -> list[str]:
    """The greedy reply text to each prompt (a message list): one sample each from ``rollout.sample_responses``."""
    from posttrain.rollout import sample_responses

    return [group[0].text for group in sample_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]


def evaluate_verifiable(model: Any, tokenizer: Any, prompts: list[Any], max_new_tokens: int = 32) -> dict[str, Any]:
    """Greedy answers to each prompt, scored by ``eval.verifiable.verifiable_metrics`` (exact match, gold reward)."""
    from posttrain.eval.common import generate_answers
    from posttrain.eval.verifiable import verifiable_metrics

    return verifiable_metrics(prompts, generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens))


def prompts_file(toy: Any, path: Path, rows: int = 32) -> Path:
    """The first ``rows`` prompt records of the toy kit, written to ``path``."""
    path.write_text("".join(toy.prompts.read_text().splitlines(keepends=True)[:rows]))
    return path


# Debian chromium driven by Playwright, as the browser tests launch it: no sandbox (root in CI), and none of the
# background connections this machine's closed network refuses.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
)


def launch_chromium(playwright: Any, executable: str) -> Any:
    """A headless Debian chromium browser from a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS))
