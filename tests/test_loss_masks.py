"""Loss masks with real tokenizers: exactly each assistant turn and its end-of-turn token are trained.

Tokenizers are the real models' files in peer-data (``POSTTRAIN_PEER_DATA``, default ``../shared/peer-data``; never
copied into the repo, tests skip without them): phi-2 (byte-level BPE), phi-3-mini (SentencePiece BPE with byte
fallback, built from its tokenizer.json as transformers 4 loaded it, and through transformers' own LlamaTokenizer)
and ChatGLM3. Templates are the built-ins and real models' templates (Phi-3-mini-instruct, Zephyr-7b-beta,
Qwen2.5-Instruct, DeepSeek-LLM-chat).

The checks do not reuse the implementation's character offsets. They read only ``input_ids`` and ``targets``:

- each maximal run of trained targets decodes to what the template writes for that reply after its generation
  prompt (written out below per template, from reading the template), end-of-turn token included;
- the end-of-turn token is trained exactly once per trained assistant turn;
- no reply appears in the decoded untrained tokens, and every system/user message does;
- the tokens before the first trained one decode to the generation prompt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from helpers import need_peer_file

from posttrain.data.dataset import use_chat_template
from posttrain.data.tokenize import TokenizedSequence, render, tokenize_conversation
from posttrain.losses import IGNORE_INDEX

PEER_DATA = Path(os.environ.get("POSTTRAIN_PEER_DATA", Path(__file__).resolve().parents[2] / "shared" / "peer-data"))
TOKENIZERS = PEER_DATA / "tokenizers"
CHAT_TEMPLATES = PEER_DATA / "chat-templates"

# Replies chosen to tempt merges across both edges of a turn: a quote or dots straight after a header that ends
# without whitespace ("Assistant:", "[/INST]": BPE has ':"', ']"', ':...'), punctuation right before the
# end-of-turn marker, a reply starting with a letter right after the header, and CJK (byte fallback on phi-2's
# and Phi-3's vocabularies, whole words in ChatGLM3's). No reply occurs inside a prompt message or vice versa.
SYSTEM = {"role": "system", "content": "You are a terse calculator."}
EXCHANGES = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": '"5", of course.'},
    {"role": "user", "content": "And 4 plus 3?"},
    {"role": "assistant", "content": "...7!"},
    {"role": "user", "content": "用中文打个招呼。"},
    {"role": "assistant", "content": "你好！很高兴认识你。"},
    {"role": "user", "content": "Say goodbye."},
    {"role": "assistant", "content": "Bye:)"},
]
CONVERSATIONS = {"with_system": [SYSTEM, *EXCHANGES], "without_system": EXCHANGES}


_need = need_peer_file


@dataclass(frozen=True)
class Template:
    """A chat template and what it writes for one assistant reply after its generation prompt."""

    choice: Callable[[], str | None]
    """The ``data.template`` value training would be given (a built-in name or a .jinja path; None: the tokenizer's)."""
    reply: Callable[[str, str], str]
    """(content, eos_token) → the text of the trained turn: the reply and its end-of-turn token."""
    end_of_turn: str | None = None
    """The token that ends an assistant turn; None: the tokenizer's eos."""
    markers: tuple[str, ...] = ()
    """The template's markers that are special tokens in the real model (added to the tokenizer)."""
    closing_eos: bool = False
    """The template writes eos once after the whole conversation (Phi-3): the last turn's run ends with it too."""


def _builtin(name: str) -> Callable[[], str]:
    return lambda: name


def _jinja(name: str) -> Callable[[], str]:
    return lambda: str(_need(CHAT_TEMPLATES / f"{name}.jinja"))


# The marker lists are the real models' special tokens: Qwen2's <|im_start|>/<|im_end|>, Llama 3's header and
# <|eot_id|> tokens, Baichuan2's <reserved_106>/<reserved_107>. Without them they split into pieces ('.<', '|', 'im',
# ...), which no model trained on its template sees. Llama-2's and Mistral-v0.1's "[INST]" and Zephyr's "<|user|>"
# are plain text in those models' vocabularies and stay so here. ChatGLM3's markers are in its tokenizer.json.
TEMPLATES: dict[str, Template] = {
    "default": Template(_builtin("default"), lambda content, eos: content + eos),
    # " [/INST]" closes the prompt; the reply is " {content} {eos}" (Llama-2's own template, trailing space included).
    "llama2": Template(_builtin("llama2"), lambda content, eos: f" {content} {eos}"),
    "llama3": Template(
        _builtin("llama3"),
        lambda content, eos: content + "<|eot_id|>",
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": Template(
        _builtin("chatml"), lambda content, eos: content + "<|im_end|>", "<|im_end|>", ("<|im_start|>", "<|im_end|>")
    ),
    "mistral": Template(_builtin("mistral"), lambda content, eos: content + eos),
    "baichuan2": Template(
        _builtin("baichuan2"), lambda content, eos: content + eos, None, ("<reserved_106>", "<reserved_107>")
    ),
    # The generation prompt is "<|assistant|>"; the "\n " after it belongs to the reply (the model writes it).
    "chatglm3": Template(_builtin("chatglm3"), lambda content, eos: f"\n {content}{eos}"),
    "phi-3-mini-instruct": Template(
        _jinja("phi-3-mini-instruct"), lambda content, eos: content + "<|end|>", "<|end|>", closing_eos=True
    ),
    "zephyr-7b-beta": Template(_jinja("zephyr-7b-beta"), lambda content, eos: content + eos),
    # The generation prompt is "Assistant:" and the turn "Assistant: {content}{eos}": the reply starts with a space.
    "deepseek-llm-chat": Template(_jinja("deepseek-llm-chat"), lambda content, eos: f" {content}{eos}"),
    "qwen2.5-instruct": Template(
        _jinja("qwen2.5-instruct"),
        lambda content, eos: content + "<|im_end|>",
        "<|im_end|>",
        ("<|im_start|>", "<|im_end|>"),
    ),
}

# "phi-3-mini" is its tokenizer.json as written (a legacy `Prepend("▁")` normaliser, so every piece of text after a
# special token starts with a word-start "▁"); "phi-3-mini/auto" is the same files through AutoTokenizer, i.e.
# transformers' LlamaTokenizer (Metaspace, "▁" only at the start of the text) with the model's own template.
PREPENDS_AFTER_SPECIAL_TOKENS = {"phi-3-mini"}
PAIRS = [
    *[
        ("phi-2", name)
        for name in (
            "default",
            "llama2",
            "llama3",
            "chatml",
            "mistral",
            "zephyr-7b-beta",
            "qwen2.5-instruct",
            "deepseek-llm-chat",
        )
    ],
    *[
        ("phi-3-mini", name)
        for name in (
            "phi-3-mini-instruct",
            "llama2",
            "mistral",
            "default",
            "chatml",
            "baichuan2",
            "zephyr-7b-beta",
            "deepseek-llm-chat",
        )
    ],
    *[("phi-3-mini/auto", name) for name in ("phi-3-mini-instruct", "mistral", "default")],
    # ChatGLM3 has no bos token, which the llama2/llama3/mistral templates write.
    *[("chatglm", name) for name in ("chatglm3", "default", "chatml")],
]
PAIR_IDS = [f"{tokenizer}-{template}" for tokenizer, template in PAIRS]


def _special_tokens(name: str) -> dict[str, str]:
    """bos/eos/unk/pad as the model's tokenizer_config.json sets them."""
    config = json.loads(_need(TOKENIZERS / name / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokens = {key: config.get(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return {key: value if isinstance(value, str) else value["content"] for key, value in tokens.items() if value}


def _load(tokenizer_name: str) -> Any:
    """A real tokenizer with bos/eos/unk/pad set as its model sets them."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if tokenizer_name == "phi-3-mini/auto":
        return AutoTokenizer.from_pretrained(_need(TOKENIZERS / "phi-3-mini" / "tokenizer_config.json").parent)
    # phi-2: bos = eos = unk = <|endoftext|>; phi-3-mini: <s>, <|endoftext|>, <unk>, pad <|endoftext|>; chatglm: eos
    # </s>, unk = pad = <unk> (its "sop" marker is spelled <!sop!> in this tokenizer.json, so "[gMASK]sop" tokenises
    # "sop" as text; it is in the prompt and never trained either way).
    return PreTrainedTokenizerFast(
        tokenizer_file=str(_need(TOKENIZERS / tokenizer_name / "tokenizer.json")), **_special_tokens(tokenizer_name)
    )


@cache
def _tokenizer(tokenizer_name: str, template_name: str) -> Any:
    """A real tokenizer set up as its model is, with the template installed as training installs it."""
    from tokenizers import AddedToken

    template = TEMPLATES[template_name]
    tokenizer = _load(tokenizer_name)
    choice = template.choice()
    if tokenizer_name == "phi-3-mini/auto" and template_name == "phi-3-mini-instruct":
        # No override: training resolves the tokenizer's own template, which is this file.
        assert tokenizer.chat_template.strip() == Path(choice).read_text(encoding="utf-8").strip()
        choice = None
    tokenizer.add_tokens(
        [AddedToken(m, special=True, normalized=False) for m in template.markers], special_tokens=True
    )
    use_chat_template(tokenizer, choice)
    return tokenizer


# --- reading a sequence without its offsets ------------------------------------------------------------------------


def _decode(tokenizer: Any, ids: list[int]) -> str:
    """The text of ``ids`` as it reads in the middle of a sequence. SentencePiece decoders drop the word-start
    space of the first token they decode (Phi-3's `Strip`, ChatGLM3's Metaspace); decoding after an anchor token
    and cutting the anchor off keeps it."""
    anchor = tokenizer.convert_tokens_to_ids("a")
    assert anchor is not None and anchor != tokenizer.unk_token_id
    whole = tokenizer.decode([anchor, *ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return whole[len(tokenizer.decode([anchor], skip_special_tokens=False, clean_up_tokenization_spaces=False)) :]


def _runs(flags: list[bool], ids: list[int]) -> list[list[int]]:
    """``ids`` grouped into maximal runs of consecutive positions whose flag is set."""
    runs: list[list[int]] = []
    for position, flag in enumerate(flags):
        if flag and position and flags[position - 1]:
            runs[-1].append(ids[position])
        elif flag:
            runs.append([ids[position]])
    return runs


def trained_texts(tokenizer: Any, sequence: TokenizedSequence) -> list[str]:
    """Each maximal run of trained targets, decoded."""
    return [_decode(tokenizer, run) for run in _runs([t != IGNORE_INDEX for t in sequence.targets], sequence.targets)]


def untrained_texts(tokenizer: Any, sequence: TokenizedSequence) -> list[str]:
    """Each maximal run of input tokens that no position is trained to predict (the first token never is)."""
    untrained = [True] + [t == IGNORE_INDEX for t in sequence.targets[:-1]]
    return [_decode(tokenizer, run) for run in _runs(untrained, sequence.input_ids)]


def assert_same_reply(tokenizer_name: str, decoded: str, expected: str) -> None:
    """Equal, except that a run of Phi-3's tokenizer.json may start with one space its text does not have: its
    legacy SentencePiece normaliser prepends the word-start "▁" to every piece of text after a special token, so a
    reply right after "<|assistant|>" starts with a "▁" that stands for no character (the tokenizer, not the mask,
    puts it there; it is what that tokenizer trains the model to write). Every other tokenizer, SentencePiece
    through transformers' LlamaTokenizer and ChatGLM3's included, must match exactly."""
    if tokenizer_name in PREPENDS_AFTER_SPECIAL_TOKENS and decoded == " " + expected:
        return
    assert decoded == expected


def assert_exact_mask(
    tokenizer_name: str,
    template_name: str,
    messages: list[dict[str, Any]],
    sequence: TokenizedSequence,
    trained: list[int],
    tools: Any = None,
    tokenizer: Any = None,
    template: Template | None = None,
) -> None:
    """Exactly the assistant messages at indices ``trained`` (with their end-of-turn token) are trained."""
    tokenizer = tokenizer or _tokenizer(tokenizer_name, template_name)
    template = template or TEMPLATES[template_name]
    assert not sequence.truncated
    assert all(t in (IGNORE_INDEX, nxt) for t, nxt in zip(sequence.targets, sequence.input_ids[1:]))
    assert sequence.targets[-1] == IGNORE_INDEX

    eos = tokenizer.eos_token
    expected = [template.reply(messages[i]["content"], eos) for i in trained]
    if template.closing_eos and trained and trained[-1] == len(messages) - 1:
        expected[-1] += eos
    decoded = trained_texts(tokenizer, sequence)
    assert len(decoded) == len(expected), (decoded, expected)
    for got, want in zip(decoded, expected):
        assert_same_reply(tokenizer_name, got, want)

    # The end-of-turn marker is one token, trained once per trained turn.
    marker = template.end_of_turn or eos
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    assert tokenizer(marker, add_special_tokens=False)["input_ids"] == [marker_id]
    assert sequence.targets.count(marker_id) == len(trained)

    untrained = untrained_texts(tokenizer, sequence)
    for index, message in enumerate(messages):
        if index in trained:
            assert not any(message["content"] in text for text in untrained), message
        else:
            assert any(message["content"] in text for text in untrained), message

    # Everything before the first trained token reads as the generation prompt: the mask starts where the model's
    # reply starts at inference, not a token earlier or later.
    if trained:
        prompt = render(tokenizer, messages[: trained[0]], add_generation_prompt=True, tools=tools)
        first = next(i for i, t in enumerate(sequence.targets) if t != IGNORE_INDEX)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(sequence.input_ids[: first + 1]) == tokenizer.decode(prompt_ids)


def _assistant_indices(messages: list[dict[str, Any]]) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


# --- the matrix ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize(("tokenizer_name", "template_name"), PAIRS, ids=PAIR_IDS)
def test_every_assistant_turn_and_its_end_token_are_exactly_the_trained_tokens(
    tokenizer_name: str, template_name: str, conversation: str
) -> None:
    tokenizer = _tokenizer(tokenizer_name, template_name)
    messages = CONVERSATIONS[conversation]
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096)
    assert_exact_mask(tokenizer_name, template_name, messages, sequence, _assistant_indices(messages))
    # Splitting a token at a turn's edge keeps the text: it decodes as the one-pass tokenisation does.
    text = render(tokenizer, messages)
    one_pass = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(sequence.input_ids) == tokenizer.decode(one_pass)


@pytest.mark.parametrize(("tokenizer_name", "template_name"), PAIRS, ids=PAIR_IDS)
def test_train_false_leaves_exactly_that_turn_untrained(tokenizer_name: str, template_name: str) -> None:
    tokenizer = _tokenizer(tokenizer_name, template_name)
    messages = [dict(m) for m in CONVERSATIONS["with_system"]]
    assistant = _assistant_indices(messages)
    messages[assistant[1]]["train"] = False
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096)
    assert_exact_mask(tokenizer_name, template_name, messages, sequence, [i for i in assistant if i != assistant[1]])


@pytest.mark.parametrize(("tokenizer_name", "template_name"), PAIRS, ids=PAIR_IDS)
def test_last_turn_only_trains_the_last_reply(tokenizer_name: str, template_name: str) -> None:
    tokenizer = _tokenizer(tokenizer_name, template_name)
    messages = CONVERSATIONS["with_system"]
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096, last_turn_only=True)
    assert_exact_mask(tokenizer_name, template_name, messages, sequence, _assistant_indices(messages)[-1:])


@pytest.mark.parametrize(("tokenizer_name", "template_name"), PAIRS, ids=PAIR_IDS)
def test_train_on_prompt_trains_every_next_token(tokenizer_name: str, template_name: str) -> None:
    tokenizer = _tokenizer(tokenizer_name, template_name)
    messages = CONVERSATIONS["with_system"]
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096, train_on_prompt=True)
    assert sequence.input_ids == tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert sequence.targets == [*sequence.input_ids[1:], IGNORE_INDEX]


@pytest.mark.parametrize(("tokenizer_name", "template_name"), PAIRS, ids=PAIR_IDS)
def test_truncation_flags_a_cut_inside_a_trained_turn_only(tokenizer_name: str, template_name: str) -> None:
    tokenizer = _tokenizer(tokenizer_name, template_name)
    messages = CONVERSATIONS["with_system"]
    full = tokenize_conversation(tokenizer, messages, max_length=4096)
    # Input position k holds a trained token when position k - 1 is trained to predict it.
    trained = [False] + [t != IGNORE_INDEX for t in full.targets[:-1]]
    runs, start = [], None
    for position, flag in enumerate([*trained, False]):
        if flag and start is None:
            start = position
        elif not flag and start is not None:
            runs.append((start, position))
            start = None
    assert len(runs) == len(_assistant_indices(messages))

    # Cut between two tokens of the third reply (the CJK one): the half turn is flagged, and what is left is the
    # full sequence's prefix, its last position untrained (nothing follows it).
    first, stop = runs[2]
    cut = (first + stop) // 2
    assert first < cut < stop
    inside = tokenize_conversation(tokenizer, messages, max_length=cut)
    assert inside.truncated and inside.extra.get("cut_turn") is True
    assert inside.input_ids == full.input_ids[:cut]
    assert inside.targets == [*full.targets[: cut - 1], IGNORE_INDEX]

    # Cut inside the prompt between the second and third replies (a user turn): truncated, no turn cut.
    between = (runs[1][1] + runs[2][0]) // 2
    assert runs[1][1] < between < runs[2][0]
    in_prompt = tokenize_conversation(tokenizer, messages, max_length=between)
    assert in_prompt.truncated and "cut_turn" not in in_prompt.extra
    assert in_prompt.input_ids == full.input_ids[:between]


# --- the bugs these tests found (fixed in posttrain/data/tokenize.py) ------------------------------------------------


@pytest.mark.parametrize(("tokenizer_name", "template_name"), [("phi-2", "default"), ("phi-3-mini", "mistral")])
def test_a_reply_right_after_its_header_trains_its_first_character(tokenizer_name: str, template_name: str) -> None:
    """'Assistant:' + '"5"' tokenises as ':"' in one pass (phi-2), '[/INST]' + '"5"' as ']"' (Llama vocabulary).
    That token starts in the prompt, so the reply's opening quote was never trained. It is split at the turn's
    edge: the prompt ends in ':' / ']' as the generation prompt does when tokenised alone, and '"' is trained."""
    tokenizer = _tokenizer(tokenizer_name, template_name)
    messages = CONVERSATIONS["without_system"][:2]
    one_pass = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    header_end = ":" if template_name == "default" else "]"
    assert f'{header_end}"' in tokenizer.convert_ids_to_tokens(one_pass)
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096)
    tokens = tokenizer.convert_ids_to_tokens(sequence.input_ids)
    first = next(i for i, t in enumerate(sequence.targets) if t != IGNORE_INDEX)
    assert tokens[first] == header_end and tokens[first + 1] == '"'
    assert_exact_mask(tokenizer_name, template_name, messages, sequence, [1])


def test_phi3_own_template_trains_every_turn_of_a_multi_turn_conversation() -> None:
    """Phi-3's template writes eos once after the conversation, so a turn rendered alone ('...<|end|>\\n<|endoftext|>')
    is not a prefix of the whole conversation ('...<|end|>\\n<|user|>...'); every multi-turn conversation was refused
    as not prefix-consistent. Each turn now ends at its <|end|>, and the closing eos is trained after the last."""
    tokenizer = _tokenizer("phi-3-mini/auto", "phi-3-mini-instruct")
    messages = CONVERSATIONS["with_system"]
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096)
    assert sequence.targets.count(tokenizer.convert_tokens_to_ids("<|end|>")) == 4
    assert sequence.targets.count(tokenizer.eos_token_id) == 1
    assert sequence.targets[-2] == tokenizer.eos_token_id == sequence.input_ids[-1]
    # The next turn's header is not trained, though '<|endoftext|>' and '<|user|>' share their first characters.
    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    assert user_id in sequence.input_ids and user_id not in sequence.targets


def test_qwen25_with_tools_trains_only_the_replies() -> None:
    """Qwen2.5's template puts the tools in its system turn: prompt, untrained."""
    tokenizer = _tokenizer("phi-2", "qwen2.5-instruct")
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two integers.",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            },
        }
    ]
    messages = CONVERSATIONS["with_system"]
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096, tools=tools)
    assert_exact_mask("phi-2", "qwen2.5-instruct", messages, sequence, _assistant_indices(messages), tools)
    assert any("Add two integers." in text for text in untrained_texts(tokenizer, sequence))


# A header that ends in a space ("ASSISTANT: ", as some hand-written templates have) puts that space in the prompt:
# byte-level and SentencePiece BPE both attach it to the reply's first word (' 5', '▁Bye'), a token starting in the
# prompt. Split, the space ends the prompt (as when the generation prompt is tokenised alone) and the word is trained.
TRAILING_SPACE = """\
{%- for message in messages -%}
  {%- if message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}
  {%- else -%}{{ message['role'] | upper + ': ' + message['content'] + '\\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT: ' }}{%- endif -%}"""


@pytest.mark.parametrize("tokenizer_name", ["phi-2", "phi-3-mini", "chatglm"])
def test_a_header_ending_in_a_space_keeps_the_space_in_the_prompt(tokenizer_name: str, tmp_path: Path) -> None:
    path = tmp_path / "trailing-space.jinja"
    path.write_text(TRAILING_SPACE, encoding="utf-8")
    tokenizer = _load(tokenizer_name)
    use_chat_template(tokenizer, str(path))
    template = Template(lambda: str(path), lambda content, eos: content + eos)
    messages = CONVERSATIONS["with_system"]
    text = render(tokenizer, messages)
    assert "ASSISTANT: Bye:)" in text
    sequence = tokenize_conversation(tokenizer, messages, max_length=4096)
    assert_exact_mask(tokenizer_name, "", messages, sequence, _assistant_indices(messages), None, tokenizer, template)
    # No trained run starts with a space (decoded after an anchor, SentencePiece's word start included).
    assert not any(run.startswith(" ") for run in trained_texts(tokenizer, sequence))
