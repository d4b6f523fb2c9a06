"""The labelling app in a real browser (Debian chromium driven by Playwright): two annotators label their queues
with the keyboard only, one reloads in the middle (with a choice made and not submitted) and carries on, keys do
not fire while typing a rationale, a battle reveals its models after the vote; the export holds exactly the votes
they gave, un-swapped to A/B."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
from helpers import launch_chromium
from test_label import start_label_server

from posttrain.cli import main
from posttrain.feedback.store import LabelStore

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ITEMS = 6


def write_items(db: Path, tmp_path: Path) -> None:
    """Five pairs and one battle (models m1, m2), made with ``posttrain label create``."""
    rows = [
        {"prompt": f"question {i}", "response_a": f"answer {i} A", "response_b": f"answer {i} B"} for i in range(6)
    ]
    pairs, battle = tmp_path / "pairs.jsonl", tmp_path / "battle.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows[:5]))
    battle.write_text(json.dumps({**rows[5], "model_a": "m1", "model_b": "m2"}) + "\n")
    assert main(["label", "create", str(db), "--pairs", str(pairs)]) == 0
    assert main(["label", "create", str(db), "--pairs", str(battle), "--battle"]) == 0


def canonical_choice(annotator: str, question: int) -> int:
    """What each annotator means, on the A/B scale: both prefer A on even questions and B on odd ones, each with
    their own degree, so no item splits evenly."""
    degree = 1 + (question + len(annotator)) % 4  # 1 much better ... 4 negligibly better
    return degree if question % 2 == 0 else 9 - degree


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (.ci/run installs it)")
def test_two_annotators_label_with_the_keyboard_and_the_export_holds_their_votes(tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    from posttrain.runtime.distributed import free_loopback_port

    db, port = tmp_path / "labels.sqlite", free_loopback_port()
    write_items(db, tmp_path)
    process, urls = start_label_server(
        db, port, tmp_path / "server.log", "--annotators", "ann,bob", "--overlap", "2", "--gold-rate", "0"
    )
    expected: dict[tuple[str, str], int | None] = {}  # (item id, annotator) -> canonical value, None for a skip
    flagged: set[tuple[str, str]] = set()
    try:
        with playwright.sync_playwright() as p:
            browser = launch_chromium(p, CHROMIUM)
            for name in ("ann", "bob"):
                page = browser.new_page()
                page.goto(urls[name])
                for step in range(ITEMS):
                    label_one_card(page, name, step, expected, flagged)
                assert page.locator("#finished").is_visible()
                assert page.locator("#progress").inner_text() == f"{ITEMS} / {ITEMS}"
            browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", str(db), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == ITEMS
    for row in rows:
        votes = {
            (row["id"], annotator): value for annotator, value in zip(row["annotator_ids"], row["votes"], strict=True)
        }
        assert votes == {key: value for key, value in expected.items() if key[0] == row["id"] and value is not None}
        question = int(row["prompt"][0]["content"].split()[1])
        winner = "A" if question % 2 == 0 else "B"
        assert row["chosen"] == [{"role": "assistant", "content": f"answer {question} {winner}"}]
        assert row["flags"] == (["unsafe"] if any(key[0] == row["id"] for key in flagged) else [])
    assert sum(row["n_votes"] for row in rows) == sum(value is not None for value in expected.values()) == 11
    with LabelStore(db) as store:
        votes = store.votes()
    assert sorted(vote.rationale or "" for vote in votes if vote.rationale) == ["8 is wrong, s f 1"] * 2
    assert [(vote.annotator, vote.skip_reason) for vote in votes if vote.skip_reason] == [("bob", "cannot judge")]


def label_one_card(page: Any, name: str, step: int, expected: dict[Any, Any], flagged: set[Any]) -> None:
    card = page.locator("#card")
    item_id = card.get_attribute("data-item-id")
    question = int(page.locator("#prompt .text").inner_text().split()[1])
    left_is_a = page.locator(".response .text").nth(0).inner_text().endswith(" A")
    assert page.locator("#progress").inner_text() == f"{step} / {ITEMS}"
    canonical = canonical_choice(name, question)
    pressed = canonical if left_is_a else 9 - canonical
    if name == "bob" and step == 2:
        # Choose, then reload before submitting: the same card comes back, nothing was stored.
        page.keyboard.press(str(9 - pressed))
        page.reload()
        assert page.locator("#card").get_attribute("data-item-id") == item_id
        assert page.locator(".scale.selected").count() == 0
    if name == "bob" and step == 4:
        page.keyboard.press("s")  # skip: "cannot judge" (the first reason), Enter submits it
        expected[(item_id, name)] = None
    else:
        if step == 1:
            # Typing in the rationale box (digits, s, f, Enter-less) must not choose, skip or flag.
            page.locator("#rationale").click()
            page.keyboard.type("8 is wrong, s f 1")
            page.keyboard.press("Escape")
            assert page.locator(".scale.selected").count() == 0 and page.locator("#skip").is_hidden()
            assert page.locator("#flag").inner_text() == "none"
        if name == "ann" and step == 3:
            page.keyboard.press("f")  # flag: unsafe
            flagged.add((item_id, name))
        page.keyboard.press(str(pressed))
        assert page.locator(".scale.selected").get_attribute("data-value") == str(pressed)
        expected[(item_id, name)] = canonical
    if card.get_attribute("data-battle") == "1" and expected[(item_id, name)] is not None:
        page.keyboard.press("Enter")  # the vote is stored, then the models are named; Enter moves on
        page.locator("#model-left").filter(has_text="m").wait_for()
        shown = {page.locator("#model-left").inner_text(), page.locator("#model-right").inner_text()}
        assert shown == {"(m1)", "(m2)"}
        with page.expect_navigation():
            page.keyboard.press("Enter")
    else:
        with page.expect_navigation():
            page.keyboard.press("Enter")
