"""Chat templates: parity with transformers and with real models' expected renders, built-in invariants, selection.

Reference data lives outside the repo (``POSTTRAIN_PEER_DATA``, default ``../shared/peer-data``) and is never
copied in; tests that need a file skip when it is absent.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest
from helpers import need_peer_file

from posttrain.data.templates import BUILTIN_TEMPLATES, END_OF_TURN, render, resolve_template

PEER_DATA = Path(os.environ.get("POSTTRAIN_PEER_DATA", Path(__file__).resolve().parents[2] / "shared" / "peer-data"))
CHAT_TEMPLATES = PEER_DATA / "chat-templates"
TOKENIZERS = PEER_DATA / "tokenizers"
LLAMA_FACTORY = PEER_DATA / "llama-factory"

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
EXCHANGES = [
    {"role": "user", "content": "Add 2 and 3."},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse: a b c"},
    {"role": "assistant", "content": "c b a"},
    {"role": "user", "content": "你好"},
    {"role": "assistant", "content": "很高兴认识你！"},
]
CONVERSATIONS = {"with_system": [SYSTEM, *EXCHANGES], "without_system": EXCHANGES}


_need = need_peer_file


def _real_template(name: str) -> str:
    return _need(CHAT_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def _ollama_template(model: str) -> str:
    entries = json.loads(_need(CHAT_TEMPLATES / "ollama-library-chat-templates.json").read_text(encoding="utf-8"))
    return next(entry["chat_template"] for entry in entries if entry["ollama_model"] == model)


def _hfjs_cases() -> list[dict[str, Any]]:
    path = CHAT_TEMPLATES / "hfjs-e2e-cases.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def _render_case(case: dict[str, Any], absent_means_undefined: bool = True, **kwargs: Any) -> str:
    """Render one huggingface.js case: its data object holds the messages and the template variables.
    An add_generation_prompt absent from the data is left undefined (None), exactly what the JS test passes;
    ``absent_means_undefined=False`` gives transformers' default (False) instead."""
    variables = dict(case["data"])
    messages = variables.pop("messages")
    add_generation_prompt = variables.pop("add_generation_prompt", None if absent_means_undefined else False)
    tools = variables.pop("tools", None)
    return render(case["chat_template"], messages, add_generation_prompt, tools, **variables, **kwargs)


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """``strftime_now`` reads transformers' module-level ``datetime``; e2e.test.js fixes the date at 10 July 2025."""
    from transformers.utils import chat_template_utils

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> FrozenDatetime:
            return cls(2025, 7, 10)

    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)


@pytest.fixture(scope="module")
def phi3_tokenizer() -> Any:
    """microsoft/Phi-3-mini-4k-instruct's tokenizer (loads offline; has its own chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_need(TOKENIZERS / "phi-3-mini" / "tokenizer.json").parent)


# --- rendering equals transformers -------------------------------------------------------------------------------


def test_render_equals_apply_chat_template_on_every_hfjs_case(phi3_tokenizer: Any, frozen_clock: None) -> None:
    """53 real templates with tools, documents, reasoning and None-valued fields: same string, or same refusal."""
    cases = _hfjs_cases() or pytest.skip("hfjs-e2e-cases.json not found")
    for case in cases:
        variables = dict(case["data"])
        messages = variables.pop("messages")
        try:
            expected: Any = phi3_tokenizer.apply_chat_template(
                messages, chat_template=case["chat_template"], tokenize=False, **variables
            )
        except Exception as error:  # noqa: BLE001 - the refusal itself is what is compared
            expected = type(error)
        try:
            ours: Any = _render_case(case, absent_means_undefined=False, tokenizer=phi3_tokenizer)
        except Exception as error:  # noqa: BLE001
            ours = type(error)
        assert ours == expected, case["name"]


# With transformers' semantics 51 of the 53 huggingface.js cases render exactly. The other two differ because
# the reference is JavaScript, and each reason is checked below:
# - MadeAgents/Hammer2.1 prints `{{ tools }}`: Python gives the list's repr ('type': ...), JavaScript its JSON.
# - ai21labs/AI21-Jamba-Large-1.6 passes only because an absent add_generation_prompt is left undefined (the JS
#   test passes none and the template defaults an undefined one to true); with transformers' default False the
#   generation prompt is missing, which is also checked.
# - meetkai/functionary-medium-v2.2 has an assistant message with "content": null; apply_chat_template drops
#   None-valued keys, and the template then concatenates the missing content (UndefinedError). A plain jinja2
#   render that keeps the None passes it, which is why peer-data's SOURCES.md counts 51.
# (HuggingFaceTB/SmolLM3-3B prints today's date; it matches with the clock frozen at the JS test's date.)
HFJS_DIFFERENT = {"MadeAgents/Hammer2.1", "meetkai/functionary-medium-v2.2"}


def test_hfjs_e2e_cases_render_exactly(frozen_clock: None) -> None:
    cases = _hfjs_cases() or pytest.skip("hfjs-e2e-cases.json not found")
    assert len(cases) == 53
    different = set()
    for case in cases:
        try:
            if _render_case(case) == case["target"]:
                continue
        except jinja2.TemplateError:
            pass
        different.add(case["name"])
    assert len(cases) - len(different) == 51
    assert different == HFJS_DIFFERENT

    by_name = {case["name"]: case for case in cases}
    hammer = by_name["MadeAgents/Hammer2.1"]
    assert "[{'type': 'function'" in _render_case(hammer) and '[{"type": "function"' in hammer["target"]
    jamba = by_name["ai21labs/AI21-Jamba-Large-1.6"]
    assert "add_generation_prompt" not in jamba["data"]
    assert _render_case(jamba) == jamba["target"]
    assert _render_case(jamba, absent_means_undefined=False) != jamba["target"]
    with pytest.raises(jinja2.UndefinedError):
        _render_case(by_name["meetkai/functionary-medium-v2.2"])


# --- real models' templates give LLaMA-Factory's expected renders ----------------------------------------------

# LLaMA-Factory template name -> (the model's real template, its bos_token from the model's tokenizer_config).
LLAMA_FACTORY_SOURCES: dict[str, tuple[tuple[str, str], dict[str, str]]] = {
    "gemma": (("ollama", "library/gemma3:1b"), {"bos_token": "<bos>"}),
    "gemma2": (("file", "gemma-2-it"), {"bos_token": "<bos>"}),
    "llama3": (("file", "llama-3-instruct"), {"bos_token": "<|begin_of_text|>"}),
    "llama4": (("ollama", "library/llama4:latest"), {"bos_token": "<|begin_of_text|>"}),
    "phi4": (("ollama", "library/phi4:14b"), {}),
    "qwen": (("file", "qwen2.5-instruct"), {}),
    "qwen3": (("file", "qwen3"), {}),
}


def _llama_factory_cases() -> list[dict[str, Any]]:
    path = LLAMA_FACTORY / "expected-template-renders.json"
    return json.loads(path.read_text(encoding="utf-8"))["cases"] if path.is_file() else []


@pytest.mark.parametrize("case", _llama_factory_cases(), ids=lambda case: case["test"])
def test_llama_factory_expected_renders(case: dict[str, Any]) -> None:
    """Full conversation = prompt + answer, and the prompt alone is the generation-prompt render of the history."""
    (kind, source), special_tokens = LLAMA_FACTORY_SOURCES[case["template"]]
    template = _real_template(source) if kind == "file" else _ollama_template(source)
    messages = case["messages"]
    assert render(template, messages, special_tokens=special_tokens) == case["prompt_str"] + case["answer_str"]
    prompt = render(template, messages[:-1], add_generation_prompt=True, special_tokens=special_tokens)
    assert prompt == case["prompt_str"]


def test_llama_factory_cases_are_all_covered() -> None:
    cases = _llama_factory_cases() or pytest.skip("expected-template-renders.json not found")
    assert len(cases) == 8 and {case["template"] for case in cases} <= set(LLAMA_FACTORY_SOURCES)


# --- built-in templates --------------------------------------------------------------------------------------------


def _end_of_turn(name: str) -> str:
    return END_OF_TURN[name] or SPECIAL_TOKENS["eos_token"]


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_prompt_is_prefix_and_every_assistant_turn_ends_with_end_of_turn(name: str, conversation: str) -> None:
    """The loss mask cuts turns out of growing prefixes; each prefix must reappear verbatim in the full render."""
    messages = CONVERSATIONS[conversation]
    template = BUILTIN_TEMPLATES[name]
    full = render(template, messages, special_tokens=SPECIAL_TOKENS)
    assistant_turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    assert len(assistant_turns) == 3
    for index in assistant_turns:
        prompt = render(template, messages[:index], add_generation_prompt=True, special_tokens=SPECIAL_TOKENS)
        through = render(template, messages[: index + 1], special_tokens=SPECIAL_TOKENS)
        assert through.startswith(prompt) and full.startswith(through), (name, index)
        reply = messages[index]["content"]
        # What follows the reply, up to whitespace the template puts between turns, is the end-of-turn token.
        assert through[len(prompt) :].strip().startswith(reply)
        assert through[through.rindex(reply) + len(reply) :].strip() == _end_of_turn(name), (name, index)
    assert full.count(_end_of_turn(name)) >= len(assistant_turns)
    if conversation == "with_system":
        assert SYSTEM["content"] in full
        assert full != render(template, EXCHANGES, special_tokens=SPECIAL_TOKENS)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_refuses_tools_rather_than_dropping_them(name: str) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(jinja2.TemplateError, match="does not render tools"):
        render(BUILTIN_TEMPLATES[name], EXCHANGES, tools=tools, special_tokens=SPECIAL_TOKENS)


@pytest.mark.parametrize("name", [name for name, token in END_OF_TURN.items() if token is None])
def test_builtin_needs_an_eos_token_to_end_turns(name: str) -> None:
    """Without eos_token a turn would end on nothing and the model would never learn to stop."""
    with pytest.raises(jinja2.UndefinedError, match="eos_token"):
        render(BUILTIN_TEMPLATES[name], EXCHANGES, special_tokens={"bos_token": "<s>"})


@pytest.mark.parametrize("name", ["default", "llama2", "baichuan2", "chatglm3", "mistral"])
def test_builtin_refuses_a_role_it_has_no_slot_for(name: str) -> None:
    messages = [*EXCHANGES[:2], {"role": "tool", "content": "42"}]
    with pytest.raises(jinja2.TemplateError, match="role|alternate"):
        render(BUILTIN_TEMPLATES[name], messages, special_tokens=SPECIAL_TOKENS)


# Built-in -> real templates with the same semantics, and the special tokens the real model defines.
REAL_EQUIVALENTS: list[tuple[str, str, dict[str, str], bool]] = [
    ("llama2", "llama-2-chat", SPECIAL_TOKENS, True),
    ("llama3", "llama-3-instruct", {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}, True),
    # Qwen's templates add a default system prompt only when the conversation has none.
    ("chatml", "qwen2-instruct", {"eos_token": "<|im_end|>"}, True),
    ("chatml", "qwen2.5-instruct", {"eos_token": "<|im_end|>"}, True),
    # (qwen1.5-chat and vLLM's chatml.jinja are not equivalents: they leave the last turn without <|im_end|>.)
    # The Mixtral template refuses a system message.
    ("mistral", "mixtral-8x7b-instruct", SPECIAL_TOKENS, False),
    # These two originals write nothing after an assistant turn; with an empty eos the formats are the same.
    ("baichuan2", "baichuan2-chat", {"eos_token": ""}, True),
    ("chatglm3", "chatglm3-6b", {"eos_token": ""}, True),
]


@pytest.mark.parametrize(("name", "real", "special_tokens", "system"), REAL_EQUIVALENTS, ids=lambda x: str(x))
def test_builtin_renders_what_the_real_template_renders(
    name: str, real: str, special_tokens: dict[str, str], system: bool
) -> None:
    real_template = _real_template(real)
    messages = CONVERSATIONS["with_system" if system else "without_system"]
    for add_generation_prompt, conversation in ((False, messages), (True, messages[:-1])):
        ours = render(BUILTIN_TEMPLATES[name], conversation, add_generation_prompt, special_tokens=special_tokens)
        theirs = render(real_template, conversation, add_generation_prompt, special_tokens=special_tokens)
        assert ours == theirs


def test_chatml_matches_the_transformers_default_chatml_case() -> None:
    """The `_base` huggingface.js case is the old transformers default template: plain ChatML."""
    base = next((case for case in _hfjs_cases() if case["name"] == "_base"), None) or pytest.skip("no hfjs cases")
    messages = base["data"]["messages"]
    assert render(BUILTIN_TEMPLATES["chatml"], messages) == base["target"]
    assert render(BUILTIN_TEMPLATES["chatml"], messages) == render(base["chat_template"], messages)


def test_chatglm3_builtin_trains_eos_after_every_assistant_turn_with_the_real_tokenizer() -> None:
    """With ChatGLM3's own vocabulary the end of every assistant turn is the single eos token, and it is trained."""
    from transformers import PreTrainedTokenizerFast

    from posttrain.data.tokenize import tokenize_conversation

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(_need(TOKENIZERS / "chatglm" / "tokenizer.json")), eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = BUILTIN_TEMPLATES["chatglm3"]
    sequence = tokenize_conversation(tokenizer, CONVERSATIONS["with_system"], max_length=512)
    assert sequence.targets.count(tokenizer.eos_token_id) == 3
    assert sequence.input_ids.count(tokenizer.eos_token_id) == 3


# --- selection -------------------------------------------------------------------------------------------------------


def test_resolve_prefers_override_then_tokenizer_then_default(tmp_path: Path) -> None:
    with_template = SimpleNamespace(chat_template="{{ messages[0]['content'] }}")
    without_template = SimpleNamespace(chat_template=None)
    assert resolve_template(with_template, "llama3") == ("llama3", BUILTIN_TEMPLATES["llama3"])
    assert resolve_template(with_template, "qwen") == ("qwen", BUILTIN_TEMPLATES["chatml"])
    assert resolve_template(with_template, None) == ("tokenizer", with_template.chat_template)
    assert resolve_template(without_template, None) == ("default", BUILTIN_TEMPLATES["default"])
    assert resolve_template(None, None) == ("default", BUILTIN_TEMPLATES["default"])

    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert resolve_template(with_template, str(path)) == (str(path), path.read_text(encoding="utf-8"))


def test_resolve_picks_the_default_of_named_tokenizer_templates() -> None:
    tokenizer = SimpleNamespace(chat_template={"default": "A", "tool_use": "B"})
    assert resolve_template(tokenizer, None) == ("tokenizer", "A")
    with pytest.raises(ValueError, match="tool_use"):
        resolve_template(SimpleNamespace(chat_template={"tool_use": "B"}), None)


def test_resolve_unknown_name_lists_the_names_and_the_closest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Did you mean 'chatglm3'") as error:
        resolve_template(None, "chatglm")
    assert all(name in str(error.value) for name in BUILTIN_TEMPLATES)
    with pytest.raises(ValueError, match="Did you mean 'llama3'"):
        resolve_template(None, "lama3")
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        resolve_template(None, str(tmp_path / "missing.jinja"))


# --- real tokenizers' own templates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_phi3_tokenizer_template_round_trips(phi3_tokenizer: Any, add_generation_prompt: bool) -> None:
    """Resolved from the tokenizer, rendered by us, tokenised: the same ids apply_chat_template produces."""
    name, template = resolve_template(phi3_tokenizer, None)
    assert name == "tokenizer" and template == phi3_tokenizer.chat_template
    messages = CONVERSATIONS["with_system"][:-1] if add_generation_prompt else CONVERSATIONS["with_system"]
    text = render(template, messages, add_generation_prompt, tokenizer=phi3_tokenizer)
    assert text == phi3_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ids = phi3_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == phi3_tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, return_dict=False
    )


def test_qwen25_tokenizer_config_template_round_trips() -> None:
    """Qwen2.5's tokenizer_config: its chat_template and special tokens on a tokenizer object (Qwen's own
    tokenizer.json is not in peer-data, phi-2's vocabulary stands in); render = apply_chat_template, with tools."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    config = json.loads(_need(TOKENIZERS / "qwen2.5" / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {key: config[key] for key in ("eos_token", "pad_token") if config.get(key)}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(_need(TOKENIZERS / "phi-2" / "tokenizer.json"))), **special
    )
    tokenizer.chat_template = config["chat_template"]
    name, template = resolve_template(tokenizer, None)
    assert name == "tokenizer" and template == _real_template("qwen2.5-instruct")

    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "description": "Add two integers.",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
            },
        }
    ]
    for messages, kwargs in ((EXCHANGES, {}), (EXCHANGES[:-1], {"add_generation_prompt": True, "tools": tools})):
        text = render(template, messages, tokenizer=tokenizer, **kwargs)
        assert text == tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    assert "<tools>" in text and '"name": "add"' in text
    qwen_case = next((c for c in _llama_factory_cases() if c["template"] == "qwen"), None)
    if qwen_case is not None:
        expected = qwen_case["prompt_str"] + qwen_case["answer_str"]
        assert render(template, qwen_case["messages"], tokenizer=tokenizer) == expected


def test_render_mirrors_apply_chat_template_input_handling() -> None:
    """None-valued keys are dropped, explicit keywords override a tokenizer's special tokens, empty is refused."""
    template = (
        "{% for m in messages %}{{ m['role'] }}{% if m['content'] is defined %}={{ m['content'] }}{% endif %};"
        "{% endfor %}{{ eos_token }}"
    )
    tokenizer = SimpleNamespace(special_tokens_map={"eos_token": "<eos>", "bos_token": "<bos>"})
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]},
        {"role": "user", "content": "hi"},
    ]
    assert render(template, messages, tokenizer=tokenizer) == "assistant;user=hi;<eos>"
    overridden = render(template, messages, tokenizer=tokenizer, special_tokens={"eos_token": "</s>"})
    assert overridden == "assistant;user=hi;</s>"
    assert render(template, messages, tokenizer=tokenizer, eos_token="[E]") == "assistant;user=hi;[E]"
    with pytest.raises(ValueError, match="empty conversation"):
        render(template, [], tokenizer=tokenizer)
