"""`posttrain label`: the store's queue rules (overlap, never twice, K before new items, gold rate, resume), the
left/right randomisation and its un-swapping, export aggregation and margins read back by the preference reader,
the app's API and escaping, the CLI's errors, and a live server killed with SIGKILL and restarted."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from posttrain.cli import main
from posttrain.data.formats import read_records
from posttrain.data.records import Preference
from posttrain.feedback.app import create_app
from posttrain.feedback.create import items_from_models, items_from_pairs
from posttrain.feedback.store import (
    AlreadyAnswered,
    Card,
    Item,
    LabelError,
    LabelStore,
    NotAssigned,
    UnknownItem,
    UnknownToken,
)

REPO = Path(__file__).resolve().parents[1]


def make_items(count: int, prefix: str = "q", gold: int | None = None, kind: str = "pair") -> list[Item]:
    models = {"model_a": "alpha", "model_b": "beta"} if kind == "battle" else {}
    return [
        Item(
            [{"role": "user", "content": f"{prefix}{i}"}],
            f"{prefix}{i} A",
            f"{prefix}{i} B",
            gold=gold,
            kind=kind,
            **models,
        )  # type: ignore[arg-type]
        for i in range(count)
    ]


def shown(card: Card, canonical: int) -> int:
    """The left/right value an annotator presses to mean ``canonical`` (A/B) on this card."""
    left_is_a = card.left.endswith(" A")
    return canonical if left_is_a else 9 - canonical


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with LabelStore(tmp_path / "labels.sqlite") as opened:
        opened.configure(seed=7)
        yield opened


# -- the queue --------------------------------------------------------------------------------------------------
def test_overlap_k_never_twice_and_items_reach_k_before_new_ones_open(store: LabelStore) -> None:
    store.configure(overlap=3, gold_rate=0.0)
    store.add_items(make_items(40))
    tokens = store.add_annotators(["ann", "bob", "cat", "dan", "eve"])
    served: dict[str, int] = {}  # item -> annotators it was served to
    seen: set[tuple[str, str]] = set()
    open_cards: dict[str, Card | None] = {}
    rng = random.Random(0)
    finished: set[str] = set()
    while len(finished) < len(tokens):
        name = rng.choice(sorted(set(tokens) - finished))
        card = open_cards.get(name)
        if card is None:
            # The rule: a new item opens only when no started item below K is available to this annotator.
            started_open = [item for item, count in served.items() if 0 < count < 3 and (name, item) not in seen]
            card = store.next_card(tokens[name])
            if card is None:
                finished.add(name)
                continue
            assert (name, card.item_id) not in seen, "an annotator was served the same item twice"
            if served.get(card.item_id, 0) == 0:
                assert not started_open, f"{name} opened a new item while {started_open} waited for more answers"
            seen.add((name, card.item_id))
            served[card.item_id] = served.get(card.item_id, 0) + 1
            assert served[card.item_id] <= 3
            open_cards[name] = card
            assert store.next_card(tokens[name]) == card, "the open card must come back until it is answered"
        if rng.random() < 0.7:  # answer now, or leave it open while others work
            store.submit(tokens[name], card.item_id, value=rng.randint(1, 8))
            open_cards[name] = None
    assert store.is_complete()
    assert sorted(served.values()) == [3] * 40
    ratings = store.ratings()
    assert len(ratings) == 120 and len({(item, who) for item, who, _ in ratings}) == 120


def test_left_right_is_randomised_stored_and_unswapped(store: LabelStore) -> None:
    """Over 1,000 items A is on the left 50 +/- 3 % of the time; the annotator always presses 1 (left much better)
    and the store records A much better (1) exactly where A was on the left, B much better (8) elsewhere."""
    store.configure(overlap=1, gold_rate=0.0)
    store.add_items(make_items(1000))
    token = store.add_annotators(["ann"])["ann"]
    left_was_a = []
    for _ in range(1000):
        card = store.next_card(token)
        assert card is not None
        left_was_a.append(card.left.endswith(" A"))
        submitted = store.submit(token, card.item_id, value=1)
        assert submitted.value == (1 if left_was_a[-1] else 8)
    assert store.next_card(token) is None
    assert abs(sum(left_was_a) / 1000 - 0.5) <= 0.03
    # Random, not alternating: the first card of each block of two draws its order.
    block_starts = left_was_a[::2]
    assert 0.4 < sum(block_starts) / len(block_starts) < 0.6
    assert [vote.left_is_a for vote in store.votes()] == left_was_a
    assert store.left_chosen() == [True] * 1000
    # The export names the response the annotator saw on the left as chosen, every time.
    rows = store.preferences()
    assert all(
        row["chosen"][0]["content"] == (row["prompt"][0]["content"] + (" A" if a else " B"))
        for row, a in zip(rows, left_was_a)
    )


def test_gold_items_are_mixed_in_at_the_rate_and_never_served_alone(store: LabelStore) -> None:
    store.configure(overlap=1, gold_rate=0.1)
    store.add_items(make_items(900) + make_items(200, prefix="g", gold=2))
    token = store.add_annotators(["ann"])["ann"]
    gold_served = []
    while (card := store.next_card(token)) is not None:
        gold_served.append(card.item_id in store.gold())
        store.submit(token, card.item_id, value=2)
    assert len(gold_served) - sum(gold_served) == 900  # every regular item, then the queue ends
    assert abs(sum(gold_served) / len(gold_served) - 0.1) < 0.03
    assert len(set(store.gold())) == 200 and sum(gold_served) < 200  # unseen gold remain: never served alone
    assert store.is_complete()
    # Gold items are out of the export and of the regular ratings.
    assert len(store.preferences()) == 900 and len(store.ratings()) == 900


def test_skips_count_as_answers_and_the_card_comes_back_after_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "labels.sqlite"
    with LabelStore(path) as store:
        store.configure(overlap=2, gold_rate=0.0)
        store.add_items(make_items(3))
        tokens = store.add_annotators(["ann", "bob"])
        first = store.next_card(tokens["ann"])
        assert first is not None
        store.submit(tokens["ann"], first.item_id, skip_reason="cannot judge", flag="pii")
        held = store.next_card(tokens["ann"])
    with LabelStore(path) as reopened:
        assert reopened.next_card(tokens["ann"]) == held
        assert reopened.add_annotators(["ann"]) == {"ann": tokens["ann"]}  # a restart keeps the URLs
        vote = reopened.votes()[0]
        assert (vote.value, vote.skip_reason, vote.flag) == (None, "cannot judge", "pii")
        assert reopened.progress()["answers_given"] == 1


# -- export -----------------------------------------------------------------------------------------------------
def label_canonical(store: LabelStore, tokens: dict[str, str], plan: dict[str, list[int | None]]) -> None:
    """Each annotator answers their cards with the canonical values in ``plan`` (keyed by the prompt; None skips)."""
    for name, token in tokens.items():
        while (card := store.next_card(token)) is not None:
            values = plan[card.prompt[0]["content"]]
            value = values[list(tokens).index(name)]
            if value is None:
                store.submit(token, card.item_id, skip_reason="other")
            else:
                store.submit(token, card.item_id, value=shown(card, value), safety="both_safe" if value == 1 else None)


def test_export_aggregates_votes_into_graded_preferences(store: LabelStore) -> None:
    store.configure(overlap=3, gold_rate=0.0)
    store.add_items(make_items(5))
    tokens = store.add_annotators(["ann", "bob", "cat"])
    plan: dict[str, list[int | None]] = {
        "q0": [1, 3, 6],  # A wins 2:1; A-side degrees much (0), slightly (2): median_high -> slightly better
        "q1": [8, 7, 7],  # B wins unanimously, "better"
        "q2": [2, 7, None],  # 1:1 split: left out as a tie
        "q3": [None, None, None],  # all skipped: no vote
        "q4": [4, 5, 5],  # B wins 2:1, negligibly better
    }
    label_canonical(store, tokens, plan)
    assert store.is_complete()
    rows, left_out = store.aggregate()
    assert left_out == {"ties": 1, "no_votes": 1, "gold": 0}
    by_prompt = {row["prompt"][0]["content"]: row for row in rows}
    assert set(by_prompt) == {"q0", "q1", "q4"}
    q0, q1, q4 = by_prompt["q0"], by_prompt["q1"], by_prompt["q4"]
    assert (q0["chosen"][0]["content"], q0["rejected"][0]["content"]) == ("q0 A", "q0 B")
    assert (q0["degree"], q0["margin"], q0["agreement"], q0["n_votes"]) == ("slightly better", 1.0, 2 / 3, 3)
    assert sorted(q0["votes"]) == [1, 3, 6] and sorted(q0["annotator_ids"]) == ["ann", "bob", "cat"]
    assert q0["safety"] == "both_safe"
    assert (q1["chosen"][0]["content"], q1["degree"], q1["margin"], q1["agreement"]) == ("q1 B", "better", 2.0, 1.0)
    assert (q4["chosen"][0]["content"], q4["degree"], q4["margin"]) == ("q4 B", "negligibly better", 0.0)
    custom = {row["prompt"][0]["content"]: row["margin"] for row in store.preferences(margins=(5, 4, 3, 2))}
    assert custom == {"q0": 3.0, "q1": 4.0, "q4": 2.0}
    with pytest.raises(LabelError, match="margins"):
        store.preferences(margins=(3, 2, 1))


def test_the_export_loads_into_the_preference_reader_and_the_reward_data(
    store: LabelStore, tmp_path: Path, toy: Any
) -> None:
    from transformers import AutoTokenizer

    from posttrain.config import DataConfig
    from posttrain.data.pairs import load_pairs

    store.add_items(make_items(6))
    token = store.add_annotators(["ann"])["ann"]
    while (card := store.next_card(token)) is not None:
        store.submit(token, card.item_id, value=shown(card, 1 if card.prompt[0]["content"] < "q3" else 7))
    db = store.path
    out = tmp_path / "prefs.jsonl"
    assert main(["label", "export", str(db), "--out", str(out), "--margins", "4,3,2,1"]) == 0
    result = read_records(out, kind="preference")
    assert result.format == "preference" and len(result.records) == 6 and not result.invalid
    for record in result.records:
        assert isinstance(record, Preference)
        question = record.prompt[0]["content"]
        winner = "A" if question < "q3" else "B"
        assert record.chosen == [{"role": "assistant", "content": f"{question} {winner}"}]
        assert record.margin == (4.0 if winner == "A" else 3.0)
    tokenizer = AutoTokenizer.from_pretrained(toy.model)
    pairs = load_pairs(DataConfig(train=str(out), max_length=64), tokenizer, seed=0)
    margins = sorted(pair.margin for pair in pairs.train)
    assert margins == [3.0, 3.0, 3.0, 4.0, 4.0, 4.0]


def test_battles_hide_models_until_the_vote_and_feed_the_arena(store: LabelStore) -> None:
    store.add_items(make_items(4, kind="battle"))
    token = store.add_annotators(["ann"])["ann"]
    winners = []
    for canonical in (1, 8, 4, 5):
        card = store.next_card(token)
        assert card is not None and card.battle
        assert "alpha" not in json.dumps(card.__dict__) and "beta" not in json.dumps(card.__dict__)
        submitted = store.submit(token, card.item_id, value=shown(card, canonical))
        left_is_a = card.left.endswith(" A")
        assert submitted.revealed == (
            {"left": "alpha", "right": "beta"} if left_is_a else {"left": "beta", "right": "alpha"}
        )
        winners.append(submitted.value)
    assert winners == [1, 8, 4, 5]
    assert store.battles() == [
        ("alpha", "beta", "a"),
        ("alpha", "beta", "b"),
        ("alpha", "beta", "tie"),
        ("alpha", "beta", "tie"),
    ]


# -- errors -----------------------------------------------------------------------------------------------------
def test_bad_input_raises_typed_errors(store: LabelStore) -> None:
    store.add_items(make_items(3))
    tokens = store.add_annotators(["ann", "bob"])
    card = store.next_card(tokens["ann"])
    assert card is not None
    with pytest.raises(UnknownToken):
        store.next_card("not-a-token")
    with pytest.raises(NotAssigned):
        store.submit(tokens["bob"], card.item_id, value=1)
    with pytest.raises(UnknownItem):
        store.submit(tokens["ann"], "nope", value=1)
    for bad in (0, 9, True, 2.5):
        with pytest.raises(LabelError, match="1-8"):
            store.submit(tokens["ann"], card.item_id, value=bad)  # type: ignore[arg-type]
    with pytest.raises(LabelError, match="not both"):
        store.submit(tokens["ann"], card.item_id, value=1, skip_reason="other")
    with pytest.raises(LabelError, match="not both"):
        store.submit(tokens["ann"], card.item_id)
    with pytest.raises(LabelError, match="needs a vote"):
        store.submit(tokens["ann"], card.item_id, skip_reason="other", safety="both_safe")
    with pytest.raises(LabelError, match="flag"):
        store.submit(tokens["ann"], card.item_id, value=1, flag="spam")
    store.submit(tokens["ann"], card.item_id, value=1)
    with pytest.raises(AlreadyAnswered):
        store.submit(tokens["ann"], card.item_id, value=2)
    assert len(store.votes()) == 1
    with pytest.raises(LabelError, match="token"):
        store.add_annotators({"cat": "short"})
    with pytest.raises(LabelError, match="already ann's"):
        store.add_annotators({"cat": tokens["ann"]})
    with pytest.raises(LabelError, match="annotator name"):
        store.add_annotators(["no spaces"])
    with pytest.raises(LabelError, match="gold"):
        store.add_items([Item([{"role": "user", "content": "x"}], "a", "b", gold=0)])


def test_pairs_files_read_every_shape_and_name_the_bad_field(tmp_path: Path) -> None:
    from posttrain.data.errors import DataError

    good = tmp_path / "pairs.jsonl"
    good.write_text(
        json.dumps({"prompt": "2+2?", "response_a": "4", "response_b": "5", "gold": 1})
        + "\n"
        + json.dumps(
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": "hello",
                "rejected": [{"role": "assistant", "content": "bye"}],
            }
        )
        + "\n"
    )
    first, second = items_from_pairs(good)
    assert (first.prompt, first.response_a, first.response_b, first.gold) == (
        [{"role": "user", "content": "2+2?"}],
        "4",
        "5",
        1,
    )
    assert (second.response_a, second.response_b, second.gold) == ("hello", "bye", None)
    cases = {
        '{"prompt": "p", "response_a": "a"}': "line 1|:1: field 'response_b'",
        '{"prompt": "p", "response_a": "a", "response_b": "b", "gold": 9}': ":1: field 'gold'",
        '{"response_a": "a", "response_b": "b"}': ":1: field 'prompt'",
        '{"prompt": "p", "response_a": "a", "response_b": 3}': ":1: field 'response_b'",
    }
    for text, expected in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text + "\n")
        with pytest.raises(DataError) as error:
            items_from_pairs(bad)
        assert str(bad) in str(error.value) and any(part in str(error.value) for part in expected.split("|"))
    gold_file = tmp_path / "gold.jsonl"
    gold_file.write_text('{"prompt": "p", "response_a": "a", "response_b": "b"}\n')
    with pytest.raises(DataError, match="gold"):
        items_from_pairs(gold_file, gold_required=True)


def test_items_sampled_from_two_models_pair_them_up(toy: Any, tmp_path: Path) -> None:
    from helpers import prompts_file, save_micro_model

    first = save_micro_model(toy.model, tmp_path / "m1", seed=0, initializer_range=0.3)
    second = save_micro_model(toy.model, tmp_path / "m2", seed=1, initializer_range=0.3)
    prompts = prompts_file(toy, tmp_path / "prompts.jsonl", rows=4)
    items = items_from_models(prompts, [str(first), str(second)], battle=True, max_new_tokens=6, temperature=0.0)
    assert 1 <= len(items) <= 4
    assert all(item.kind == "battle" and (item.model_a, item.model_b) == ("m1", "m2") for item in items)
    assert all(item.response_a != item.response_b for item in items)
    # Reproducible: the same seed samples the same responses.
    again = items_from_models(prompts, [str(first), str(second)], battle=True, max_new_tokens=6, temperature=0.0)
    assert [(i.response_a, i.response_b) for i in again] == [(i.response_a, i.response_b) for i in items]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "labels.sqlite")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response_a": "a"}\n')
    made, good = tmp_path / "made.sqlite", tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "response_a": "a", "response_b": "b"}\n')
    assert main(["label", "create", str(made), "--pairs", str(good)]) == 0
    bad_tokens = tmp_path / "tokens.txt"
    bad_tokens.write_text("ann 0123456789abcdef0123\nbob\n")
    for argv in (
        ["label", "create", db, "--pairs", str(bad)],
        ["label", "create", db],
        ["label", "create", db, "--prompts", str(bad)],
        ["label", "export", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "x.jsonl")],
        ["label", "report", str(tmp_path / "missing.sqlite")],
        ["label", "serve", db, "--annotators", "ann"],  # the database was never made
        ["label", "create", str(good), "--pairs", str(good)],  # a JSONL file is not a database
        ["label", "serve", str(made), "--tokens", str(bad_tokens)],
        ["label", "serve", str(made), "--annotators", "has space"],
        ["label", "serve", str(made), "--annotators", "ann", "--gold-rate", "1.5"],
        ["label", "serve", str(made), "--annotators", "ann", "--gold", str(good)],  # a gold row without its gold
    ):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err


# -- the app ----------------------------------------------------------------------------------------------------
def test_app_api_tokens_errors_and_escaping(store: LabelStore) -> None:
    hostile = "<script>alert('x')</script><img src=x onerror=alert(1)>"
    store.add_items([Item([{"role": "user", "content": hostile}], hostile + " A", "</div><b>bold</b> B")])
    token = store.add_annotators(["ann"])["ann"]
    client = TestClient(create_app(store))
    assert client.get("/api/next").status_code == 401
    assert client.get("/api/next", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/?token=wrong").status_code == 401
    page = client.get(f"/?token={token}")
    assert page.status_code == 200
    assert "<script>alert" not in page.text and "<img src=x" not in page.text and "<b>bold</b>" not in page.text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page.text and "&lt;b&gt;bold&lt;/b&gt;" in page.text
    assert 'id="progress">0 / 1<' in page.text
    card = client.get(f"/api/next?token={token}").json()
    assert card["progress"] == {"done": 0, "assigned": 1}
    item_id = card["card"]["item_id"]
    headers = {"Authorization": f"Bearer {token}"}
    for body, status in (
        ({"item_id": item_id, "value": 9}, 400),
        ({"item_id": item_id, "value": 1, "extra": 1}, 400),
        ({"item_id": "nope", "value": 1}, 404),
        ({"item_id": item_id, "value": 1, "safety": "maybe"}, 400),
    ):
        answer = client.post("/api/label", json=body, headers=headers)
        assert answer.status_code == status and answer.json()["error"], (body, answer.text)
    answer = client.post(
        "/api/label", json={"item_id": item_id, "value": 8, "rationale": "right is safer"}, headers=headers
    )
    assert answer.status_code == 200 and answer.json() == {
        "item_id": item_id,
        "revealed": None,
        "progress": {"done": 1, "assigned": 1},
    }
    assert client.post("/api/label", json={"item_id": item_id, "value": 8}, headers=headers).status_code == 409
    assert client.get("/api/next", headers=headers).json()["card"] is None
    assert "All done" in client.get(f"/?token={token}").text
    assert client.get("/api/progress", headers=headers).json()["complete"] is True
    assert store.votes()[0].rationale == "right is safer"


# -- a live server: SIGKILL, restart, nothing lost --------------------------------------------------------------
def start_label_server(db: Path, port: int, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``python -m posttrain label serve`` on ``port``; returns the process and the printed URLs by annotator."""
    command = [sys.executable, "-m", "posttrain", "label", "serve", str(db), "--port", str(port), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("ab"), env=env)
    assert process.stdout is not None
    urls = {}
    for _ in range(2):
        name, _, url = process.stdout.readline().decode().strip().partition(": ")
        assert url.startswith(f"http://127.0.0.1:{port}/?token="), (name, url, log.read_text())
        urls[name] = url
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process, urls
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def test_a_killed_server_loses_no_label_and_resumes_each_queue(tmp_path: Path) -> None:
    from posttrain.runtime.distributed import free_loopback_port

    db = tmp_path / "labels.sqlite"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"q{i}", "response_a": f"q{i} A", "response_b": f"q{i} B"}) + "\n" for i in range(12)
        )
    )
    assert main(["label", "create", str(db), "--pairs", str(pairs)]) == 0
    port, log = free_loopback_port(), tmp_path / "server.log"
    serve_args = ("--annotators", "ann", "bob", "--overlap", "2", "--gold-rate", "0")
    process, urls = start_label_server(db, port, log, *serve_args)
    base = f"http://127.0.0.1:{port}"
    tokens = {name: url.split("token=")[1] for name, url in urls.items()}
    submitted = {}
    try:
        for round_index in range(5):
            for name, token in tokens.items():
                headers = {"Authorization": f"Bearer {token}"}
                card = httpx.get(f"{base}/api/next", headers=headers).json()["card"]
                value = 1 + (round_index + len(name)) % 8
                answer = httpx.post(
                    f"{base}/api/label", json={"item_id": card["item_id"], "value": value}, headers=headers
                )
                assert answer.status_code == 200, answer.text
                left_is_a = card["left"].endswith(" A")
                submitted[(card["item_id"], name)] = value if left_is_a else 9 - value
        # Each annotator now holds an open card, served but not answered.
        held = {name: httpx.get(f"{base}/?token={token}").text for name, token in tokens.items()}
        held_cards = {
            name: httpx.get(f"{base}/api/next?token={token}").json()["card"] for name, token in tokens.items()
        }
    finally:
        process.kill()
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    # The restart names its annotators by a tokens file this time: the same tokens, so the same URLs.
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text("# name token\n" + "".join(f"{name} {token}\n" for name, token in tokens.items()))
    process, urls_again = start_label_server(db, port, log, "--tokens", str(tokens_file), *serve_args[3:])
    try:
        assert urls_again == urls
        for name, token in tokens.items():
            assert httpx.get(f"{base}/api/next?token={token}").json()["card"] == held_cards[name]
            assert httpx.get(f"{base}/?token={token}").text == held[name]
        with LabelStore(db) as store:
            assert {(vote.item_id, vote.annotator): vote.value for vote in store.votes()} == submitted
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()


# -- report -----------------------------------------------------------------------------------------------------
def test_report_gives_agreement_gold_accuracy_position_bias_and_the_arena(
    store: LabelStore, capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.feedback.agreement import cohens_kappa, fleiss_kappa, gwet_ac1, krippendorff_alpha
    from posttrain.feedback.ratings import bradley_terry
    from posttrain.feedback.report import format_report, label_report

    store.configure(overlap=3, gold_rate=0.3)
    battles = [
        Item([{"role": "user", "content": f"b{i}"}], f"b{i} A", f"b{i} B", model_a=a, model_b=b, kind="battle")
        for i, (a, b) in enumerate([("alpha", "beta"), ("beta", "gamma"), ("gamma", "alpha")] * 4)
    ]
    store.add_items(make_items(12) + battles + make_items(6, prefix="g", gold=2))
    tokens = store.add_annotators(["ann", "bob", "cat"])
    rng = random.Random(3)
    for name, token in tokens.items():
        while (card := store.next_card(token)) is not None:
            question = card.prompt[0]["content"]
            if question.startswith("g"):  # gold: A better; cat gets them wrong
                canonical = 7 if name == "cat" else rng.choice([1, 2, 3])
            elif question.startswith("b"):  # the arena: alpha beats beta beats gamma, mostly
                canonical = rng.choice([1, 2, 3, 2, 6])
            else:
                canonical = rng.choice([1, 2, 3]) if name != "cat" else rng.choice([2, 6])
            store.submit(token, card.item_id, value=shown(card, canonical))
    report = label_report(store, min_gold_accuracy=0.7, bootstrap_rounds=50)
    ratings = store.ratings()
    scale = list(range(1, 9))
    agreement = report["agreement"]
    assert agreement["fleiss_kappa"]["value"] == fleiss_kappa(ratings, scale)
    assert agreement["krippendorff_alpha_ordinal"]["value"] == krippendorff_alpha(ratings, scale, "ordinal")
    assert agreement["gwet_ac1"]["value"] == gwet_ac1(ratings, scale)
    assert set(agreement["cohens_kappa"]) == {"ann|bob", "ann|cat", "bob|cat"}
    assert agreement["cohens_kappa"]["ann|bob"]["value"] == cohens_kappa(ratings, "ann", "bob", scale)
    gold = report["gold_accuracy"]
    assert gold["cat"]["total"] > 0 and gold["cat"]["correct"] == 0 and gold["cat"]["below_threshold"]
    assert gold["ann"]["accuracy"] == 1.0 and not gold["ann"]["below_threshold"]
    assert report["position_bias"]["low"] <= report["position_bias"]["left_share"] <= report["position_bias"]["high"]
    board = report["arena"]["board"]
    assert report["arena"]["battles"] == 36
    assert {row["model"]: row["rating"] for row in board} == pytest.approx(bradley_terry(store.battles()))
    assert all(row["low"] <= row["rating"] <= row["high"] for row in board)
    text = format_report(report)
    assert "Cohen's kappa ann vs bob" in text and "below threshold" in text and "arena" in text
    assert main(["label", "report", str(store.path), "--bootstrap-rounds", "20"]) == 0
    assert "Krippendorff's alpha (ordinal)" in capsys.readouterr().out
