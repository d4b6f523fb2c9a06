"""Rewards: the HTTP reward against a real local server (protocol, batching, retries, every error), the toy format
reward against a hand-made table, weights with several sources, the unfinished penalty, and their config.

The server is a real ``ThreadingHTTPServer`` on 127.0.0.1 (port 0): nothing leaves the machine, and every test
here runs in well under a second (timeouts of 0.2 s, backoff 0 or a recorded fake sleep)."""

from __future__ import annotations

import json
import random
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers import sft_config
from pydantic import ValidationError

from posttrain import rewards
from posttrain.config import RewardSource
from posttrain.rewards import HttpReward, RewardError, WeightedReward, build_reward, load_reward_function
from posttrain.tasks import TASKS, format_reward, task_of


def length_reward(prompt: str, response: str, reference: str | None) -> float:
    return float(len(response))


def word_reward(prompt: str, response: str, reference: str | None) -> float:
    return float(len(response.split()))


LENGTH_REWARD, WORD_REWARD = f"{__name__}:length_reward", f"{__name__}:word_reward"


# ---- a real reward service ------------------------------------------------------------------------------------


class RewardServer:
    """Scores each response by its length (``{"scores": [len(r), ...]}``) unless ``plan`` holds an answer for the
    next request: ``(status, body bytes, delay seconds)``, used once each, in order. Records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.content_types: list[str | None] = []
        self.plan: list[tuple[int, bytes, float]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # wakes handlers that are told to sleep, at teardown
        self.url = ""

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        batch = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        with self.lock:
            self.requests.append(batch)
            self.content_types.append(handler.headers.get("Content-Type"))
            step = self.plan.pop(0) if self.plan else None
        if step is None:
            step = (200, json.dumps({"scores": [float(len(r)) for r in batch["responses"]]}).encode(), 0.0)
        status, body, delay = step
        if delay:
            self.stopping.wait(delay)
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
        except OSError:
            pass  # the client timed out and closed the connection


@pytest.fixture
def server() -> Iterator[RewardServer]:
    state = RewardServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            state.answer(self)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/score"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def messages(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


def fast(url: str, **kwargs: Any) -> HttpReward:
    """An HttpReward that waits 0.2 s for an answer and not at all between attempts."""
    return HttpReward(url, **{"timeout": 0.2, "backoff": 0.0, **kwargs})


# ---- HttpReward: the protocol and batching ----------------------------------------------------------------------


def test_scores_come_back_in_order_in_batches(server: RewardServer) -> None:
    responses = ["a", "bb", "ccc", "dddd", "eeeee"]
    prompts = [messages(f"q{i}") for i in range(5)]
    scores = fast(server.url, batch_size=2)(prompts, responses, [None] * 5)
    assert scores == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [r["responses"] for r in server.requests] == [["a", "bb"], ["ccc", "dddd"], ["eeeee"]]  # 5 by 2: 3 requests
    assert fast(server.url)([], [], []) == [] and len(server.requests) == 3  # nothing to score: no request


def test_request_json_follows_the_protocol(server: RewardServer) -> None:
    prompts = [messages("Add 2 and 3."), [{"role": "user", "content": "Repeat: cat"}]]
    fast(server.url)(prompts, ["5", "cat"], ["5", None])
    assert server.requests == [{"prompts": prompts, "responses": ["5", "cat"], "references": ["5", None]}]
    assert server.content_types == ["application/json"]


def test_a_503_is_retried_then_succeeds(server: RewardServer) -> None:
    server.plan = [(503, b"overloaded", 0.0)]
    assert fast(server.url, retries=3)([messages("q")] * 2, ["ab", "c"], [None, None]) == [2.0, 1.0]
    assert len(server.requests) == 2 and server.requests[0] == server.requests[1]  # the same batch, sent again


def test_429_is_retried(server: RewardServer) -> None:
    server.plan = [(429, b"slow down", 0.0), (429, b"slow down", 0.0)]
    assert fast(server.url, retries=2)([messages("q")], ["abc"], [None]) == [3.0]
    assert len(server.requests) == 3


def test_5xx_every_time_fails_after_retries_plus_one_attempts(server: RewardServer) -> None:
    server.plan = [(500, b"boom: scorer crashed", 0.0)] * 3
    with pytest.raises(RewardError, match=r"/score .*failed 3 attempt.*HTTP 500 .*boom: scorer crashed"):
        fast(server.url, retries=2)([messages("q")], ["a"], [None])
    assert len(server.requests) == 3


def test_400_is_not_retried_and_the_error_names_status_and_body(server: RewardServer) -> None:
    server.plan = [(400, b"unknown field 'prompt'", 0.0)]
    with pytest.raises(
        RewardError,
        match=r"127\.0\.0\.1:\d+/score.*HTTP 400 Bad Request: \"unknown field 'prompt'\" on attempt 1 of 4; not retried",
    ):
        fast(server.url, retries=3)([messages("q")], ["a"], [None])
    assert len(server.requests) == 1


def test_a_timeout_fails_after_retries_plus_one_attempts(server: RewardServer) -> None:
    server.plan = [(200, b'{"scores": [1.0]}', 2.0)] * 2  # answers in 2 s, the client waits 0.2 s
    with pytest.raises(RewardError, match=r"/score .*failed 2 attempt.*no answer within 0\.2 s"):
        fast(server.url, retries=1)([messages("q")], ["a"], [None])
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>oops</html>", r"not JSON .*<html>oops</html>"),
        (b"[1.0, 2.0]", r"a JSON list, not an object"),
        (b'{"score": [1.0, 2.0]}', r"without \"scores\" \(keys: \['score'\]\)"),
        (b'{"scores": 1.0}', r"\"scores\" as a JSON float, not a list"),
        (b'{"scores": [1.0]}', r"1 scores for 2 responses"),
        (b'{"scores": [1.0, NaN]}', r"score nan at index 1 \(response 1\)"),
        (b'{"scores": [1.0, Infinity]}', r"score inf at index 1"),
        (b'{"scores": ["1.0", 2.0]}', r"score '1\.0' at index 0"),
        (b'{"scores": [true, 2.0]}', r"score True at index 0"),
        (b'{"scores": [1.0, null]}', r"score None at index 1"),
    ],
)
def test_malformed_answers_name_the_problem_and_are_not_retried(
    server: RewardServer, body: bytes, problem: str
) -> None:
    server.plan = [(200, body, 0.0)]
    with pytest.raises(
        RewardError,
        match=rf"/score \(responses 0\.\.1\) answered on attempt 1 with .*{problem}.*expected \{{\"scores\"",
    ):
        fast(server.url)([messages("q")] * 2, ["a", "b"], [None, None])
    assert len(server.requests) == 1


def test_connection_refused_names_the_url() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(RewardError, match=rf"{url} .*failed 2 attempt.*(refused|ConnectionRefused)"):
        fast(url, retries=1)([messages("q")], ["a"], [None])


def test_backoff_doubles_and_is_capped(server: RewardServer, monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(rewards, "time", SimpleNamespace(sleep=waits.append))
    server.plan = [(502, b"", 0.0)] * 5
    with pytest.raises(RewardError, match="failed 5 attempt"):
        HttpReward(server.url, timeout=0.2, retries=4)([messages("q")], ["a"], [None])
    assert waits == [0.5, 1.0, 2.0, 4.0]  # HTTP_BACKOFF_S, doubling; no wait after the last attempt
    waits.clear()
    server.plan = [(502, b"", 0.0)] * 4
    with pytest.raises(RewardError):
        HttpReward(server.url, timeout=0.2, retries=3, backoff=5.0)([messages("q")], ["a"], [None])
    assert waits == [5.0, rewards.HTTP_BACKOFF_MAX_S, rewards.HTTP_BACKOFF_MAX_S]


def test_http_reward_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="'localhost:8000' is not an http"):
        HttpReward("localhost:8000")
    with pytest.raises(ValueError, match="timeout > 0"):
        HttpReward("http://localhost:8000", timeout=0)
    with pytest.raises(ValueError, match="one of each per response"):
        HttpReward("http://localhost:8000")([messages("q")], ["a", "b"], [None, None])
    assert issubclass(RewardError, ValueError)


def test_the_documented_minimal_server_answers_http_reward() -> None:
    """The server in docs/reward-http.md, run as written (on port 0 instead of 8000), scores through HttpReward."""
    document = (Path(__file__).resolve().parents[1] / "docs" / "reward-http.md").read_text(encoding="utf-8")
    (code,) = [block.split("\n", 1)[1] for block in document.split("```")[1::2] if block.startswith("python")]
    namespace: dict[str, Any] = {"__name__": "reward_http_doc"}
    exec(compile(code, "docs/reward-http.md", "exec"), namespace)
    namespace["Score"].log_message = lambda *args: None  # keep the test's output quiet
    httpd = namespace["ThreadingHTTPServer"](("127.0.0.1", 0), namespace["Score"])
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        scores = fast(f"http://127.0.0.1:{httpd.server_address[1]}")(
            [messages("q")] * 2, ["short", "x" * 30], ["5", None]
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
    assert scores == [1.0, 0.0]


# ---- toy_format ---------------------------------------------------------------------------------------------------


FORMAT_TABLE = [
    # add: one integer (right or wrong)
    ("Add 23 and 58.", "81", 1.0),
    ("Add 23 and 58.", " 80\n", 1.0),
    ("Add 23 and 58.", "81.", 0.0),
    ("Add 23 and 58.", "81 81", 0.0),
    ("Add 23 and 58.", "eighty-one", 0.0),
    ("Add 23 and 58.", "", 0.0),
    # reverse: single lower-case letters, space-separated
    ("Reverse: c a t", "t a c", 1.0),
    ("Reverse: c a t", "x  y", 1.0),
    ("Reverse: c a t", "tac", 0.0),
    ("Reverse: c a t", "T A C", 0.0),
    ("Reverse: c a t", "t a 1", 0.0),
    ("Reverse: c a t", "t, a, c", 0.0),
    # sort: single digits
    ("Sort: 3 1 2", "1 2 3", 1.0),
    ("Sort: 3 1 2", "3 2", 1.0),
    ("Sort: 3 1 2", "12 3", 0.0),
    ("Sort: 3 1 2", "1,2,3", 0.0),
    ("Sort: 3 1 2", "a b c", 0.0),
    # copy: lower-case words
    ("Repeat: cat dog", "cat dog", 1.0),
    ("Repeat: cat dog", "fox", 1.0),
    ("Repeat: cat dog", "CAT DOG", 0.0),
    ("Repeat: cat dog", "cat dog.", 0.0),
    ("Repeat: cat dog", "cat 2", 0.0),
    # upper: upper-case words
    ("Uppercase: cat dog", "CAT DOG", 1.0),
    ("Uppercase: cat dog", "FOX", 1.0),
    ("Uppercase: cat dog", "CAT dog", 0.0),
    ("Uppercase: cat dog", "cat dog", 0.0),
    ("Uppercase: cat dog", "CAT DOG!", 0.0),
    # count: one integer
    ("Count the words: cat dog fox", "3", 1.0),
    ("Count the words: cat dog fox", "7", 1.0),
    ("Count the words: cat dog fox", "three", 0.0),
    ("Count the words: cat dog fox", "3 words", 0.0),
    # letters: one integer
    ("Count the letters: a b c d", "4", 1.0),
    ("Count the letters: a b c d", "12", 1.0),
    ("Count the letters: a b c d", "four", 0.0),
    ("Count the letters: a b c d", "a b c d", 0.0),
]


def test_toy_format_table() -> None:
    assert {task_of(prompt) for prompt, _, _ in FORMAT_TABLE} == set(TASKS)  # every task has rows
    reward = load_reward_function("toy_format")
    assert reward.needs_reference is False
    prompts = [messages(prompt) for prompt, _, _ in FORMAT_TABLE]
    got = reward(prompts, [r for _, r, _ in FORMAT_TABLE], [None] * len(FORMAT_TABLE))
    assert [(p, r, g) for (p, r, _), g in zip(FORMAT_TABLE, got)] == FORMAT_TABLE
    assert build_reward(RewardSource(function="toy_format")).needs_reference is False
    with pytest.raises(ValueError, match="toy_format failed on prompt 'hello'.*matches no toy task"):
        reward([messages("hello")], ["5"], [None])


def test_every_reference_answer_has_its_task_format() -> None:
    rng = random.Random(0)
    for name, task in TASKS.items():
        for _ in range(50):
            _, answer = task.generate(rng)
            assert format_reward(name, answer) == 1.0, (name, answer)


# ---- weights and the unfinished penalty ---------------------------------------------------------------------------


def test_three_weighted_terms(server: RewardServer) -> None:
    reward = WeightedReward(
        [
            ("length", load_reward_function(LENGTH_REWARD), 2.0),
            ("http", fast(server.url), 0.5),
            ("words", load_reward_function(WORD_REWARD), -1.0),
        ]
    )
    parts = reward.breakdown([messages("q")] * 2, ["cat", "dog dog"], [None, None])
    # "cat": 2*3 + 0.5*3 - 1*1 = 6.5; "dog dog": 2*7 + 0.5*7 - 1*2 = 15.5
    assert parts == {"length": [3.0, 7.0], "http": [3.0, 7.0], "words": [1.0, 2.0], "total": [6.5, 15.5]}


class FakeModelReward:
    """Stands in for a reward model in build_reward: scores 10 per response."""

    needs_reference = False

    def __init__(self, path: str, batch_size: int = 32, device: str | None = None) -> None:
        self.name = f"model:{path}"

    def __call__(self, prompts: Any, responses: Any, references: Any) -> list[float]:
        return [10.0] * len(responses)


def test_build_reward_applies_every_weight_with_two_or_more_sources(
    server: RewardServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rewards, "ModelReward", FakeModelReward)
    args = ([messages("q")] * 2, ["cat", "dog dog"], [None, None])
    three = build_reward(
        RewardSource(
            model="rm", function=WORD_REWARD, http=server.url, model_weight=0.1, function_weight=3.0, http_weight=0.5
        )
    )
    parts = three.breakdown(*args)
    # 0.1*10 + 3*1 + 0.5*3 = 5.5; 0.1*10 + 3*2 + 0.5*7 = 10.5
    assert parts == {"model": [10.0, 10.0], "function": [1.0, 2.0], "http": [3.0, 7.0], "total": [5.5, 10.5]}
    two = build_reward(RewardSource(function=WORD_REWARD, http=server.url, function_weight=3.0, http_weight=0.5))
    assert two(*args) == [3.0 + 1.5, 6.0 + 3.5]
    alone = build_reward(RewardSource(http=server.url, http_weight=0.5))  # one source: its weight is not applied
    assert alone(*args) == [3.0, 7.0]
    http_term = alone.terms[0][1]
    assert isinstance(http_term, HttpReward) and (http_term.timeout, http_term.retries) == (30.0, 3)


def test_unfinished_penalty_arithmetic() -> None:
    reward = WeightedReward([("function", load_reward_function(LENGTH_REWARD), 2.0)], unfinished_penalty=0.5)
    parts = reward.breakdown([messages("q")] * 3, ["cat", "dog dog", ""], [None] * 3, finished=[True, False, False])
    # 2*3 + 0; 2*7 - 0.5; 2*0 - 0.5: the penalty is not weighted
    assert parts == {"function": [3.0, 7.0, 0.0], "unfinished": [0.0, -0.5, -0.5], "total": [6.0, 13.5, -0.5]}
    assert reward([messages("q")], ["cat"], [None], finished=[False]) == [5.5]
    built = build_reward(RewardSource(function=LENGTH_REWARD, unfinished_penalty=1.0))
    assert built.unfinished_penalty == 1.0 and built([messages("q")], ["cat"], [None], [False]) == [2.0]


def test_unfinished_penalty_needs_finished() -> None:
    reward = WeightedReward([("function", load_reward_function(LENGTH_REWARD), 1.0)], unfinished_penalty=0.5)
    with pytest.raises(ValueError, match="unfinished_penalty 0.5: pass finished="):
        reward([messages("q")], ["cat"], [None])
    with pytest.raises(ValueError, match="2 finished flags for 1 responses"):
        reward([messages("q")], ["cat"], [None], finished=[True, False])
    off = WeightedReward([("function", load_reward_function(LENGTH_REWARD), 1.0)])
    assert off.breakdown([messages("q")], ["cat"], [None]) == {
        "function": [3.0],
        "total": [3.0],
    }  # no penalty: no term
    with pytest.raises(ValueError, match="expected a number >= 0"):
        WeightedReward([], unfinished_penalty=-1.0)


# ---- config -------------------------------------------------------------------------------------------------------


def test_reward_source_config() -> None:
    source = RewardSource(http="http://localhost:8000/score")
    assert (source.http_weight, source.http_timeout, source.http_retries, source.unfinished_penalty) == (
        1.0,
        30.0,
        3,
        0.0,
    )
    with pytest.raises(ValidationError, match="reward.model .*reward.function .*reward.http"):
        RewardSource()
    with pytest.raises(ValidationError, match="unfinished_penalty"):
        RewardSource(function="toy", unfinished_penalty=-0.1)
    with pytest.raises(ValidationError, match="http_timeout"):
        RewardSource(http="http://localhost:8000", http_timeout=0)
    with pytest.raises(ValidationError, match="http_retries"):
        RewardSource(http="http://localhost:8000", http_retries=-1)
    with pytest.raises(ValidationError, match="'localhost:8000' is not an http:// or https:// URL"):
        RewardSource(http="localhost:8000")


# ---- rejection sampling scores through the service and the penalty ------------------------------------------------


def test_rejection_sampling_with_http_reward_and_unfinished_penalty(
    toy: Any, micro_model: Path, tmp_path: Path, server: RewardServer
) -> None:
    from posttrain.recipes import rejection_sampling as rs

    data = tmp_path / "p.jsonl"
    data.write_text("".join(toy.prompts.read_text().splitlines(keepends=True)[:4]))
    config = sft_config(
        micro_model,
        data,
        tmp_path / "o",
        stage="rejection_sampling",
        sampling__num_samples=3,
        sampling__max_new_tokens=8,
        sampling__temperature=1.0,
        rejection__train_after=False,
        rejection__require_finished=False,
        reward={"http": server.url, "unfinished_penalty": 0.25, "http_timeout": 5.0},
    )
    rs.run(config)
    samples = [
        s for line in (tmp_path / "o" / "samples.jsonl").read_text().splitlines() for s in json.loads(line)["samples"]
    ]
    assert len(samples) == 12 and server.requests
    for sample in samples:
        penalty = 0.0 if sample["finished"] else -0.25
        assert sample["rewards"] == {"http": float(len(sample["text"])), "unfinished": penalty}
        assert sample["reward"] == len(sample["text"]) + penalty
    assert any(not s["finished"] for s in samples), "the untrained micro model should run past 8 tokens sometimes"
