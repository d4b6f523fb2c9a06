"""Chat templates: render exactly as transformers does, built-in templates for models without one, selection.

Rendering goes through transformers' own ``render_jinja_template`` (its sandboxed Jinja environment with
``trim_blocks``/``lstrip_blocks``, ``raise_exception``, the non-escaping ``tojson``, ``strftime_now``, the
``{% generation %}`` tag and the loop controls), with the same input preparation as
``PreTrainedTokenizerBase.apply_chat_template`` in transformers 5.x: keys whose value is ``None`` are dropped from
every message, and the tokenizer's special tokens are visible to the template, overridden by explicit keywords.
So ``render(template, messages, tokenizer=tok)`` is the string ``tok.apply_chat_template(messages,
chat_template=template, tokenize=False)`` gives (tested against a real tokenizer).

Built-in templates serve models that ship none (base checkpoints). Each is written here from the model's real
template or LLaMA-Factory's slot strings (the source is cited above each one) and keeps two properties the loss
mask in ``data/tokenize.py`` relies on:

- every assistant turn ends with the model's end-of-turn token (``END_OF_TURN``), so a trained model stops;
- the prompt rendered with ``add_generation_prompt=True`` is an exact prefix of the full conversation.

They reject roles they have no slot for and conversations with ``tools`` (none of them renders tools), rather
than dropping either silently.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2

# Built-ins that have no tool format refuse a `tools` argument instead of training on a prompt without them.
_NO_TOOLS = (
    '{%- if tools -%}{{- raise_exception("the built-in {name} chat template does not render tools; use the '
    "model's own template or a .jinja file that does\") -}}{%- endif -%}\n"
)


def _refuse_tools(name: str) -> str:
    return _NO_TOOLS.replace("{name}", name)


# LLaMA-Factory's `default` template (llama-factory/template-formats.json, current_head.default):
#   system "System: {{content}}" eos "\n", user "Human: {{content}}" eos "\nAssistant:", assistant "{{content}}" eos "\n".
# Their user slot carries the "Assistant:" header; here it belongs to the assistant turn (and to the generation
# prompt), which renders the same full conversation but keeps `add_generation_prompt` in charge of the header.
# No space after "Assistant:": a prompt ending in a space makes the model start its reply with a token it never
# saw at that position in pretraining text.
DEFAULT = (
    _refuse_tools("default")
    + """\
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {{- 'System: ' + message['content'] + eos_token + '\\n' -}}
  {%- elif message['role'] == 'user' -%}
    {{- 'Human: ' + message['content'] + eos_token + '\\n' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- 'Assistant:' + message['content'] + eos_token + '\\n' -}}
  {%- else -%}
    {{- raise_exception('the default chat template has no slot for role ' ~ message['role'] ~ '; use system, user or assistant') -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- 'Assistant:' -}}
{%- endif -%}"""
)

# Llama-2-chat, from meta-llama/Llama-2-7b-chat-hf's chat_template (peer-data chat-templates/llama-2-chat.jinja):
#   <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST] ...
# Same output as that template, including its .strip() of every turn and the user/assistant alternation check.
# The generation prompt is empty: "[/INST]" closes the user turn, and the reply starts with its leading space.
LLAMA2 = (
    _refuse_tools("llama2")
    + """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_message = messages[0]['content'] -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set system_message = none -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- if message['role'] not in ['user', 'assistant'] -%}
    {{- raise_exception('the llama2 chat template has no slot for role ' ~ message['role'] ~ ' here; a system message must come first, then user and assistant alternate') -}}
  {%- endif -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('the llama2 chat template needs roles to alternate user/assistant/user/... after an optional first system message') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- set content = message['content'] -%}
    {%- if loop.first and system_message is not none -%}
      {%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + content -%}
    {%- endif -%}
    {{- bos_token + '[INST] ' + content | trim + ' [/INST]' -}}
  {%- else -%}
    {{- ' ' + message['content'] | trim + ' ' + eos_token -}}
  {%- endif -%}
{%- endfor -%}"""
)

# Llama-3-Instruct, from meta-llama/Meta-Llama-3-8B-Instruct's chat_template (chat-templates/llama-3-instruct.jinja,
# and LLaMA-Factory's `llama3` slots): {bos}<|start_header_id|>{role}<|end_header_id|>\n\n{content|trim}<|eot_id|>.
# Any role renders (the header names it: Llama 3.1 uses `ipython` for tool results). The turn ends with
# <|eot_id|>, not the tokenizer's eos (<|end_of_text|> on the base checkpoints).
LLAMA3 = (
    _refuse_tools("llama3")
    + """\
{%- for message in messages -%}
  {%- set turn = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -%}
  {%- if loop.first -%}
    {%- set turn = bos_token + turn -%}
  {%- endif -%}
  {{- turn -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}"""
)

# ChatML, as in Qwen2/Qwen2.5-Instruct's templates (chat-templates/qwen2-instruct.jinja, qwen2.5-instruct.jinja) and
# the old transformers default (the `_base` case of hfjs-e2e-cases.json): <|im_start|>{role}\n{content}<|im_end|>\n.
# Unlike Qwen's own templates it adds no default system prompt when none is given (a base model has no persona).
# vLLM's chatml.jinja and Qwen1.5-Chat's template leave the last turn without <|im_end|>, which would never
# teach the model to stop.
CHATML = (
    _refuse_tools("chatml")
    + """\
{%- for message in messages -%}
  {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}"""
)

# Baichuan2-Chat: {system}<reserved_106>{user}<reserved_107>{assistant}... as in vLLM's template_baichuan.jinja
# (chat-templates/baichuan2-chat.jinja), Baichuan2's own build_chat_input and LLaMA-Factory's `baichuan2` slots.
# Those put no token after an assistant turn; Baichuan2's fine-tune.py instead trains eos as the label of the next
# user token (LLaMA-Factory's `efficient_eos`). A string template can only teach stopping by writing eos after the
# turn, so this one does; with eos_token='' it renders exactly what vLLM's template renders.
BAICHUAN2 = (
    _refuse_tools("baichuan2")
    + """\
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}
    {%- if not loop.first -%}
      {{- raise_exception('the baichuan2 chat template takes a system message only as the first message') -}}
    {%- endif -%}
    {{- message['content'] -}}
  {%- elif message['role'] == 'user' -%}
    {{- '<reserved_106>' + message['content'] -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<reserved_107>' + message['content'] + eos_token -}}
  {%- else -%}
    {{- raise_exception('the baichuan2 chat template has no slot for role ' ~ message['role'] ~ '; use system, user or assistant') -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<reserved_107>' -}}
{%- endif -%}"""
)

# ChatGLM3-6B, from THUDM/chatglm3-6b's chat_template (chat-templates/chatglm3-6b.jinja, the same string as
# tokenizers/chatglm/tokenizer_config.json): [gMASK]sop<|{role}|>\n {content}. The space after "\n" is the
# SentencePiece word-start the original tokenizer adds to every message. ChatGLM3 stops on the next <|user|> or
# <|observation|> token, so the last turn of a conversation would teach no stop; as LLaMA-Factory's `chatglm3`
# (`efficient_eos`) and ChatGLM3's finetune_demo do, eos follows the assistant turn. With eos_token='' this
# renders exactly what the original template renders.
CHATGLM3 = (
    _refuse_tools("chatglm3")
    + """\
{%- for message in messages -%}
  {%- if message['role'] not in ['system', 'user', 'assistant', 'observation'] -%}
    {{- raise_exception('the chatglm3 chat template has no slot for role ' ~ message['role'] ~ '; use system, user, assistant or observation') -}}
  {%- endif -%}
  {%- if loop.first -%}
    {{- '[gMASK]sop' -}}
  {%- endif -%}
  {%- set turn = '<|' + message['role'] + '|>\\n ' + message['content'] -%}
  {%- if message['role'] == 'assistant' -%}
    {%- set turn = turn + eos_token -%}
  {%- endif -%}
  {{- turn -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|>' -}}
{%- endif -%}"""
)

# Mistral-7B-Instruct / Mixtral-8x7B-Instruct v0.1, from the model's chat_template
# (chat-templates/mixtral-8x7b-instruct.jinja): {bos}[INST] {user} [/INST]{assistant}</s>[INST] ... That template
# refuses a system message; here it is prepended to the first user message followed by "\n\n", as LLaMA-Factory's
# `mistral` template does (format_system "{{content}}\n\n" inside the first user turn). Without a system message
# the output equals the original. (Ollama's mistral:7b-instruct revision writes a space after </s>; the Mixtral one
# does not, so every assistant turn ends exactly on eos.)
MISTRAL = (
    _refuse_tools("mistral")
    + """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system_message = messages[0]['content'] -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set system_message = none -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
  {%- if message['role'] not in ['user', 'assistant'] -%}
    {{- raise_exception('the mistral chat template has no slot for role ' ~ message['role'] ~ ' here; a system message must come first, then user and assistant alternate') -}}
  {%- endif -%}
  {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('the mistral chat template needs roles to alternate user/assistant/user/... after an optional first system message') -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {%- set content = message['content'] -%}
    {%- if loop.first and system_message is not none -%}
      {%- set content = system_message + '\\n\\n' + content -%}
    {%- endif -%}
    {{- '[INST] ' + content + ' [/INST]' -}}
  {%- else -%}
    {{- message['content'] + eos_token -}}
  {%- endif -%}
{%- endfor -%}"""
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "default": DEFAULT,
    "llama2": LLAMA2,
    "llama3": LLAMA3,
    "chatml": CHATML,
    "qwen": CHATML,
    "baichuan2": BAICHUAN2,
    "chatglm3": CHATGLM3,
    "mistral": MISTRAL,
}
"""Built-in chat templates by name (``qwen`` is an alias of ``chatml``)."""

END_OF_TURN: dict[str, str | None] = {
    "default": None,
    "llama2": None,
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "qwen": "<|im_end|>",
    "baichuan2": None,
    "chatglm3": None,
    "mistral": None,
}
"""The token each built-in writes after every assistant turn; ``None``: the tokenizer's ``eos_token``.

Generation must stop on it, and it must be a single token of the tokenizer for the loss to train it."""


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool | None = False,
    tools: Sequence[dict[str, Any] | Callable[..., Any]] | None = None,
    special_tokens: Mapping[str, str] | None = None,
    tokenizer: Any = None,
    **extra: Any,
) -> str:
    """Render ``messages`` with the Jinja chat ``template`` exactly as transformers' ``apply_chat_template`` does.

    Args:
        template: the Jinja source of a chat template.
        messages: the conversation, dicts with ``role`` and ``content`` (and whatever else the template reads).
        add_generation_prompt: append the header that starts an assistant reply. ``None`` leaves the variable
            undefined, as a caller of the bare Jinja template (or of huggingface.js) that does not pass it does;
            some templates default an undefined one to true. transformers always passes a bool.
        tools: JSON schemas (or typed, documented functions) of tools, for templates that render them.
        special_tokens: template variables such as ``bos_token`` and ``eos_token``.
        tokenizer: a transformers tokenizer whose ``special_tokens_map`` supplies those variables; entries of
            ``special_tokens`` override it, as keyword arguments do in ``apply_chat_template``.
        **extra: further template variables (``enable_thinking``, ``documents``, ...).

    Returns:
        The rendered text.

    Raises:
        ValueError: the conversation is empty.
        jinja2.TemplateError: the template itself refused the input (``raise_exception``) or failed.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    if not messages:
        raise ValueError("cannot render an empty conversation; give at least one message")
    # apply_chat_template drops None-valued keys (an API's content=None next to tool_calls) because templates
    # handle a missing key but print "None" or crash on a None one; doing the same keeps both renders equal.
    conversation = [{key: value for key, value in message.items() if value is not None} for message in messages]
    variables: dict[str, Any] = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    variables.update(special_tokens or {})
    variables.update(extra)
    rendered, _ = render_jinja_template(
        conversations=[conversation],
        tools=list(tools) if tools is not None else None,
        chat_template=template,
        add_generation_prompt=jinja2.Undefined() if add_generation_prompt is None else add_generation_prompt,
        **variables,
    )
    return rendered[0]


def _tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's own chat template, choosing ``default`` among named ones as transformers does."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        if "default" not in template:
            raise ValueError(
                f"the tokenizer has several chat templates ({', '.join(sorted(template))}) and none named "
                "'default'; set model.chat_template to one of the built-ins or to a .jinja file"
            )
        template = template["default"]
    return template or None


def resolve_template(tokenizer: Any, override: str | None = None) -> tuple[str, str]:
    """The chat template to train with, as ``(name, template source)``.

    Order: ``override`` (a built-in name, or the path of a ``.jinja`` file), else the tokenizer's own template
    (name ``"tokenizer"``), else the ``default`` built-in. A file's name is its path as given.

    Raises:
        FileNotFoundError: ``override`` looks like a path and no file is there.
        ValueError: ``override`` is neither a built-in name nor a path; the message lists the names and the
            closest one.
    """
    if override is not None:
        if override in BUILTIN_TEMPLATES:
            return override, BUILTIN_TEMPLATES[override]
        path = Path(override).expanduser()
        if path.is_file():
            return override, path.read_text(encoding="utf-8")
        names = sorted(BUILTIN_TEMPLATES)
        if path.suffix == ".jinja" or "/" in override or "\\" in override:
            raise FileNotFoundError(
                f"chat template file {override!r} not found; give an existing .jinja file or a built-in name "
                f"({', '.join(names)})"
            )
        closest = difflib.get_close_matches(override, names, n=1, cutoff=0.0)
        hint = f" Did you mean {closest[0]!r}?" if closest else ""
        raise ValueError(
            f"unknown chat template {override!r}: not a built-in name and not a .jinja file. "
            f"Built-in templates: {', '.join(names)}.{hint}"
        )
    own = _tokenizer_template(tokenizer) if tokenizer is not None else None
    if own is not None:
        return "tokenizer", own
    return "default", BUILTIN_TEMPLATES["default"]
