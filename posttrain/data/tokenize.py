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


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The full rendered text and the character spans of every assistant turn (with its end-of-turn marker)."""
    text = render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:index], add_generation_prompt=True) if index else ""
        through = render(tokenizer, messages[: index + 1])
        if not (text.startswith(through) and through.startswith(prompt)):
            raise DataError(
                None, None, "chat_template",
                "the chat template does not render conversations prefix-consistently (turn "
                f"{index} renders differently inside the full conversation); set model.chat_template to a template "
                "that does",
            )
        # Whitespace the template puts between turns belongs to no turn; the end-of-turn token stays in.
        end = len(through.rstrip()) if through.rstrip() else len(through)
        spans.append((len(prompt), max(end, len(prompt))))
    return text, spans


def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int, train_on_prompt: bool = False
) -> TokenizedSequence:
    """Render with the chat template, tokenise once, label the assistant spans, truncate to ``max_length``."""
    text, spans = assistant_spans(tokenizer, messages)
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
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedSequence(input_ids, shift_labels(input_ids, labels), truncated)


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
