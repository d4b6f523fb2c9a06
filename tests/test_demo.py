"""The demo end to end in --quick mode (the whole pipeline on fewer rows and steps), its report in a real browser,
and `posttrain chat` on two of its models. The full demo's claims (3 seeds) are measured by
`benchmarks/demo_seeds.py` and stated in the README; --quick checks the machinery and that SFT beats base. How long
--quick takes is measured there too (`--budgets`), not asserted here: a wall-clock assert fails on a busy machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from helpers import launch_chromium

from posttrain.cli import main

MODELS = ("base", "sft", "ppo", "grpo", "dpo", "rejection_sampling")
FIGURES = ("exact_match", "gold_reward", "rm_score", "kl_to_sft", "length", "eos_rate")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.slow  # the whole pipeline: minutes on two CPU cores (`make test-fast` leaves it out)


def test_quick_demo_runs_every_stage_and_sft_beats_base(
    quick_demo: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert quick_demo["code"] == 0
    out: Path = quick_demo["out"]
    figures = json.loads((out / "eval.json").read_text())
    assert set(figures["models"]) == set(MODELS)
    for name in MODELS:
        assert set(figures["models"][name]) == set(FIGURES), name
        assert 0.0 <= figures["models"][name]["eos_rate"] <= 1.0
    assert figures["models"]["sft"]["exact_match"] > figures["models"]["base"]["exact_match"]
    assert figures["models"]["sft"]["kl_to_sft"] == 0.0  # the reference against itself
    assert figures["models"]["ppo"]["kl_to_sft"] > 0.0
    assert 0.0 <= figures["reward_model"]["accuracy"] <= 1.0
    for stage in ("toy", "pretrain", "sft", "reward", "ppo", "grpo", "dpo", "rejection_sampling"):
        assert json.loads((out / stage / "stage.json").read_text())["status"] == "done", stage
    report = (out / "report.md").read_text()
    assert "rejection_sampling" in report and "KL to sft" in report


def test_a_second_demo_run_reuses_every_stage(quick_demo: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out: Path = quick_demo["out"]
    before = (out / "eval.json").read_text()
    capsys.readouterr()
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0
    printed = capsys.readouterr()
    assert "0 stages run, 8 reused" in printed.out
    assert (out / "eval.json").read_text() == before


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_the_report_opens_in_a_browser_and_shows_the_plots(quick_demo: dict[str, Any], tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    out: Path = quick_demo["out"]
    with playwright.sync_playwright() as p:
        browser = launch_chromium(p, CHROMIUM)
        page = browser.new_page()
        page.goto((out / "report.html").as_uri())
        rows = page.locator("#evaluation tbody tr").all_inner_texts()
        assert [row.split("\t")[0] for row in rows] == list(MODELS)
        images = page.locator("img")
        assert images.count() >= 3  # bars per model, supervised losses, RL curves
        for i in range(images.count()):
            # Decoded and laid out: a broken data URI has naturalWidth 0.
            assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 300"), images.nth(
                i
            ).get_attribute("alt")
        assert page.locator("#samples tbody tr").count() >= 3
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_chat_compares_two_demo_models_on_one_prompt(
    quick_demo: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    out: Path = quick_demo["out"]
    capsys.readouterr()
    code = main(
        [
            "chat",
            str(out / "sft"),
            str(out / "ppo"),
            "--prompt",
            "Count the words: cat dog fox",
            "--max-new-tokens",
            "12",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "[sft]" in printed and "[ppo]" in printed
    answers = [block.split("\n", 1)[1].strip() for block in printed.split("[")[1:]]
    assert len(answers) == 2 and all(answers)
