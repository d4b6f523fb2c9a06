"""Chat rendering with loss masks derived from character offsets, and plain-text tokenisation.

The rendered conversation is tokenised once; a token is trained when its first character lies inside an
assistant turn's span of the rendered text. Spans come from rendering growing prefixes of the conversation with
the same template, so the end-of-turn token the template emits after each assistant message is inside the span
(a model that never learns it never stops talking). Tokenising fragments separately would be wrong at BPE
merges across boundaries; offsets are not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.data.errors import DataError
from posttrain.losses import IGNORE_INDEX


@dataclass
class TokenizedSequence:
    """One training sequence: ``targets[t]`` is the token position t must predict (-100: not trained)."""

    input_ids: list[int]
    targets: list[int]
    truncated: bool = False
    source_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return sum(1 for t in self.targets if t != IGNORE_INDEX)


def shift_labels(input_ids: list[int], labels: list[int]) -> list[int]:
    """Labels aligned with inputs → targets aligned with the positions that predict them."""
    return labels[1:] + [IGNORE_INDEX] if input_ids else []


def render(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools: Any = None) -> str:
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None, last_turn_only: bool = False
) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of the assistant turns to train (each with its
    end-of-turn marker): every assistant turn not marked ``train: false``, or only the last one."""
    text = render(tokenizer, messages, tools=tools)
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("train", True) is not False]
    if last_turn_only:
        trained = trained[-1:]
    spans = []
    for index in trained:
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True, tools=tools) if index else ""
        through = render(tokenizer, messages[: index + 1], tools=tools)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise DataError(
                None, None, "chat_template",
                "the chat template does not render conversations prefix-consistently (turn "
                f"{index} renders differently inside the full conversation); set data.template to a template "
                "that does",
            )
        # Whitespace the template puts between turns belongs to no turn; the end-of-turn token stays in.
        end = len(through.rstrip()) if through.rstrip() else len(through)
        spans.append((len(prompt), max(end, len(prompt))))
    return text, spans


def tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    max_length: int,
    train_on_prompt: bool = False,
    tools: Any = None,
    last_turn_only: bool = False,
) -> TokenizedSequence:
    """Render with the chat template, tokenise once, label the assistant spans, truncate to ``max_length``.

    A truncated sequence is flagged; when the cut falls inside a trained turn, ``extra["cut_turn"]`` says so
    (the half turn still trains on what is left, and the count is reported)."""
    text, spans = assistant_spans(tokenizer, messages, tools, last_turn_only)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids: list[int] = encoded["input_ids"]
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(input_ids)
    if not train_on_prompt:
        span_index = 0
        for position, (start, _end) in enumerate(encoded["offset_mapping"]):
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
                labels[position] = input_ids[position]
    truncated = len(input_ids) > max_length
    cut_turn = truncated and labels[max_length - 1] != IGNORE_INDEX and labels[max_length] != IGNORE_INDEX
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedSequence(input_ids, shift_labels(input_ids, labels), truncated, extra={"cut_turn": cut_turn} if cut_turn else {})


def tokenize_text(tokenizer: Any, text: str, max_length: int) -> list[TokenizedSequence]:
    """A plain document as BOS + tokens + EOS, cut into chunks of ``max_length`` (pretraining keeps every token)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    chunks = []
    for start in range(0, len(ids), max_length):
        chunk = ids[start : start + max_length]
        if len(chunk) >= 2:
            chunks.append(TokenizedSequence(chunk, shift_labels(chunk, chunk)))
    return chunks
