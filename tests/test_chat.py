"""``posttrain chat``: the streamed reply is the greedy rollout's reply, each model keeps its own conversation
(rendered with system prompt and history by its template), several models answer under their names, the
interactive commands do what they say, and bad paths fail with exit code 2.

An untrained micro model only repeats the newline that ends the generation prompt (tied embeddings), so its
greedy reply is empty and would prove nothing about streaming. The two chat models here are micro models that
memorised one reply each in a few dozen optimizer steps: multi-word, multi-line, ending in the EOS.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import generate_responses

from posttrain.cli import main
from posttrain.rollout import SamplingSettings
from posttrain.serve.chat import ChatSession, chat_name, format_columns, load_session, run_chat, unique_names

QUESTION = "Count the words: cat dog"
REPLIES = {"sft": "There are 2 words.\nThey are cat and dog.", "dpo": "cat dog\nThat makes two words."}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny matrices: a second thread only adds contention on a shared 2-core machine (10x slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def memorise(base: Path, reply: str, out: Path) -> Path:
    """The micro model at ``base`` after learning to answer QUESTION with ``reply``, saved with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(base), AutoTokenizer.from_pretrained(base)
    conversation = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": reply}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert generate_responses(model, tokenizer, [conversation[:1]], max_new_tokens=40) == [reply]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(micro_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``sft`` as a run directory (weights in ``runs/sft/model``) and ``dpo`` as a plain model directory."""
    root = tmp_path_factory.mktemp("chat")
    memorise(micro_model, REPLIES["sft"], root / "runs" / "sft" / "model")
    memorise(micro_model, REPLIES["dpo"], root / "zoo" / "dpo")
    return {"sft": root / "runs" / "sft", "dpo": root / "zoo" / "dpo"}


@pytest.fixture(scope="module")
def sft(models: dict[str, Path]) -> ChatSession:
    return load_session(models["sft"], settings=SamplingSettings(max_new_tokens=40))


def fresh(session: ChatSession, system: str | None = None) -> ChatSession:
    """A new conversation with an already loaded model."""
    return ChatSession(
        session.model, session.tokenizer, session.name, session.stop_token_ids, system, session.settings
    )


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_streamed_reply_equals_the_greedy_rollout_turn_after_turn(sft: ChatSession) -> None:
    session = fresh(sft)
    pieces: list[str] = []
    reply = session.generate_reply(QUESTION, pieces.append)
    assert (
        reply
        == REPLIES["sft"]
        == generate_responses(session.model, session.tokenizer, [[user(QUESTION)]], max_new_tokens=40)[0]
    )
    assert "".join(pieces) == reply
    assert len(pieces) >= 3  # word by word (TextStreamer holds back the word being formed), not one block at the end

    pieces = []
    second = session.generate_reply("again", pieces.append)
    with_history = [user(QUESTION), assistant(reply), user("again")]
    assert second == generate_responses(session.model, session.tokenizer, [with_history], max_new_tokens=40)[0]
    assert "".join(pieces) == second
    assert session.history == with_history + [assistant(second)]


def test_the_prompt_renders_system_and_history_and_reset_keeps_only_the_system(sft: ChatSession) -> None:
    session = fresh(sft, system="Be brief.")
    passed: list[list[int]] = []
    generate = session.model.generate

    def recording_generate(**kwargs: Any) -> Any:
        passed.append(kwargs["input_ids"][0].tolist())
        return generate(**kwargs)

    session.model.generate = recording_generate
    try:
        reply = session.generate_reply(QUESTION)
        session.generate_reply("again")
    finally:
        del session.model.generate
    tokenizer = session.tokenizer
    second_turn = [{"role": "system", "content": "Be brief."}, user(QUESTION), assistant(reply), user("again")]
    rendered = tokenizer.apply_chat_template(second_turn, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nCount the words")
    assert passed[1] == tokenizer(rendered, add_special_tokens=False)["input_ids"]

    session.reset()
    assert session.history == []
    assert session.render("hi") == "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    session.generate_reply(QUESTION)
    session.set_system("Answer with the result only.")
    assert session.history == []
    assert (
        session.render("hi")
        == "<|bos|><|system|>\nAnswer with the result only.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    )


def test_two_models_answer_each_scripted_turn_under_their_names(
    models: dict[str, Path], sft: ChatSession, capsys: pytest.CaptureFixture[str]
) -> None:
    from posttrain.models.loading import load_for_inference

    code = main(
        [
            "chat",
            str(models["sft"]),
            str(models["dpo"]),
            "--prompt",
            QUESTION,
            "--prompt",
            "again",
            "--max-new-tokens",
            "40",
        ]
    )
    assert code == 0
    expected = []
    for name in ("sft", "dpo"):
        model, tokenizer = (sft.model, sft.tokenizer) if name == "sft" else load_for_inference(models["dpo"])
        second = generate_responses(
            model, tokenizer, [[user(QUESTION), assistant(REPLIES[name]), user("again")]], max_new_tokens=40
        )[0]
        expected.append((REPLIES[name], second))
    (sft_first, sft_second), (dpo_first, dpo_second) = expected
    assert sft_first != dpo_first
    assert capsys.readouterr().out == (
        f"you> {QUESTION}\n[sft]\n{sft_first}\n[dpo]\n{dpo_first}\n"
        f"you> again\n[sft]\n{sft_second}\n[dpo]\n{dpo_second}\n"
    )


class Script:
    """Typed lines for ``run_chat``'s ``input_fn``; EOF (Ctrl-D) once they run out. Records the prompts shown."""

    def __init__(self, *lines: str) -> None:
        self.lines, self.asked = list(lines), []

    def __call__(self, prompt: str) -> str:
        self.asked.append(prompt)
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def test_interactive_commands(models: dict[str, Path], sft: ChatSession) -> None:
    script = Script(
        "hello", "", "/reset", "/history", "/bogus", "/system Be brief.", "/history", "/quit", "never read"
    )
    out = io.StringIO()
    assert run_chat([models["sft"]], max_new_tokens=40, input_fn=script, out=out) == 0
    hello = generate_responses(sft.model, sft.tokenizer, [[user("hello")]], max_new_tokens=40)[0]
    assert script.asked == ["you> "] * 8 and script.lines == ["never read"]
    assert out.getvalue().splitlines() == [
        "chatting with sft; commands: /reset (forget the conversation), /system TEXT (new system prompt, then reset), /history, /quit (or Ctrl-D)",
        "[sft]",
        *hello.splitlines(),
        "(conversation cleared)",
        "[sft]",
        "(empty)",
        "unknown command /bogus; commands: /reset (forget the conversation), /system TEXT (new system prompt, then reset), /history, /quit (or Ctrl-D)",
        "(system prompt set; conversation cleared)",
        "[sft]",
        "system: Be brief.",
    ]

    # EOF (Ctrl-D) leaves too, and /history shows the exchange that was had.
    out = io.StringIO()
    assert run_chat([models["sft"]], max_new_tokens=40, input_fn=Script(QUESTION, "/history"), out=out) == 0
    assert out.getvalue().endswith(f"[sft]\nuser: {QUESTION}\nassistant: {REPLIES['sft']}\n\n")


def test_bad_paths_fail_with_exit_code_2_naming_them(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    assert main(["chat", str(empty), "--prompt", "hi"]) == 2
    assert f"error: {empty}: not a model" in capsys.readouterr().err

    plain = shutil.copytree(models["dpo"], tmp_path / "plain")  # the same model, its tokenizer without a template
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["chat", str(plain), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"error: plain ({plain}): its tokenizer has no chat template" in err and "--template" in err
    assert main(["chat", str(plain), "--prompt", "hi", "--template", "default", "--max-new-tokens", "2"]) == 0


def test_names_and_columns(tmp_path: Path) -> None:
    assert chat_name("runs/demo/sft") == chat_name("runs/demo/sft/") == chat_name("runs/demo/sft/model") == "sft"
    assert unique_names(["a/sft", "b/sft/model", "c/dpo"]) == ["a/sft", "b/sft", "dpo"]
    assert unique_names(["a/sft", "a/sft"]) == ["a/sft", "a/sft#2"]
    # width 50, gap 3: two columns of (50 - 3) // 2 = 23 characters
    assert format_columns([("sft", "one two three"), ("dpo", "x\ny")], width=50) == "\n".join(
        [
            f"{'sft':23}   dpo",
            f"{'---':23}   ---",
            f"{'one two three':23}   x",
            f"{'':23}   y",
        ]
    )
    assert format_columns([("sft", "a b c d e f")], width=20) == "sft\n---\na b c d e f"
    assert format_columns([("sft", "a"), ("dpo", "b"), ("ppo", "c")], width=40) is None  # 11-wide columns: too narrow


def test_columns_show_every_reply_side_by_side(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = io.StringIO()
    assert run_chat([models["sft"], models["dpo"]], [QUESTION], max_new_tokens=40, columns=True, out=out) == 0
    assert out.getvalue() == format_columns([("sft", REPLIES["sft"]), ("dpo", REPLIES["dpo"])], 80) + "\n"
    assert out.getvalue().startswith(f"{'sft':38}   dpo\n")


def test_seeded_sampling_is_reproducible(models: dict[str, Path]) -> None:
    def sampled(seed: int) -> str:
        out = io.StringIO()
        run_chat([models["sft"]], [QUESTION], max_new_tokens=12, temperature=1.5, seed=seed, out=out)
        return out.getvalue()

    assert sampled(1) == sampled(1)
    assert len({sampled(1), sampled(2), sampled(3)}) > 1  # it does sample: seeds give different replies
