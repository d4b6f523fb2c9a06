"""Shared fixtures: the toy kit (built once per session, offline), a micro model for fast training tests and the quick
demo; the peer-data hook. Helpers that tests import live in ``helpers.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import PEER_DATA, PEER_DATA_REQUIRED, REQUIRE_PEER_DATA, save_micro_model


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The real toy kit (tiny size), smaller row counts."""
    from posttrain.toy import build_toy

    return build_toy(
        tmp_path_factory.mktemp("toy"), size="tiny", seed=0, sft=400, prefs=50, prompts=50, eval=40, pretrain=200
    )


@pytest.fixture(scope="session")
def micro_model(toy: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 64-wide Llama with the toy tokenizer: trains a step in milliseconds."""
    return save_micro_model(toy.model, tmp_path_factory.mktemp("micro") / "model")


def _skipped_for_missing_peer_data(item: pytest.Item, reason: str) -> bool:
    """The peer-data folder is missing and the skip comes from a test file that reads it (one that defines
    ``PEER_DATA``) or names it. A skip while the folder is present (a file the snapshot lacks) stays a skip."""
    folder = Path(getattr(item.module, "PEER_DATA", PEER_DATA))
    if folder.is_dir():
        return False
    return hasattr(item.module, "PEER_DATA") or "peer data" in reason or "peer-data" in reason or str(folder) in reason


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Under ``POSTTRAIN_REQUIRE_PEER_DATA=1`` with the peer-data folder missing, a skip from a test file's own
    ``skipif`` mark or ``pytest.skip`` (not only from :func:`need_peer_file`) is reported as a failure."""
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_PEER_DATA and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if _skipped_for_missing_peer_data(item, reason):
            report.outcome = "failed"
            report.longrepr = f"{PEER_DATA_REQUIRED}; {reason}"


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`posttrain demo --quick` run once per session: its exit code and output directory. A test that writes
    into a demo directory (test_readme's `--from` rerun) works on its own copy of it."""
    from posttrain.cli import main

    out = tmp_path_factory.mktemp("demo") / "run"
    code = main(["demo", "--quick", "--out", str(out), "--seed", "0"])
    return {"code": code, "out": out}
