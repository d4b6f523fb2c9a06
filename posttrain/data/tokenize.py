"""Chat rendering with loss masks derived from character offsets, and plain-text tokenisation.

The rendered conversation is tokenised once; a token is trained when its first character lies inside an
assistant turn's span of the rendered text. Spans come from rendering growing prefixes of the conversation with
the same template, so the end-of-turn token the template emits after each assistant message is inside the span
(a model that never learns it never stops talking). Tokenising fragments separately would be wrong at BPE
merges across boundaries; offsets are not. The one exception is a token that straddles a span's edge (a reply
that starts right after "Assistant:" or "[/INST]" with a quote makes ':"' or ']"'): it is split there, as the
generation prompt is tokenised at inference, so the reply's first character is trained and no prompt character
is (see :func:`split_at_boundaries`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
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


def render(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tools: Any = None
) -> str:
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
        if not text.startswith(through):
            through = without_closing_suffix(tokenizer, through, text)
        if not (text.startswith(through) and through.startswith(prompt)):
            raise DataError(
                None,
                None,
                "chat_template",
                "the chat template does not render conversations prefix-consistently (turn "
                f"{index} renders differently inside the full conversation); set data.template to a template "
                "that does",
            )
        # Whitespace the template puts between turns belongs to no turn; the end-of-turn token stays in.
        end = len(through.rstrip()) if through.rstrip() else len(through)
        spans.append((len(prompt), max(end, len(prompt))))
    return text, spans


def without_closing_suffix(tokenizer: Any, through: str, text: str) -> str:
    """``through`` (the conversation rendered up to a turn) without what the template writes once after the last
    message, when that is why it is not a prefix of the full ``text``.

    Phi-3's own template ends every conversation with eos (``{% else %}{{ eos_token }}``), so a turn followed by
    more messages renders "...<|end|>\n<|endoftext|>" alone but "...<|end|>\n<|user|>..." inside the
    conversation; without this, Phi-3 could not train on any multi-turn conversation with its own template. The
    cut is made at the token where the two renders diverge, not the character: '<|endoftext|>' and '<|user|>'
    share '<|', which would otherwise end the span inside the next turn's header token and train it. ``through``
    comes back unchanged when the cut-off part is not how the whole conversation ends (the turn itself renders
    differently inside the conversation; the caller refuses the template)."""
    diverge = len(os.path.commonprefix([through, text]))
    offsets = tokenizer(through, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    cut = max((start for start, _end in offsets if start <= diverge), default=diverge)
    return through[:cut] if text.endswith(through[cut:]) else through


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table, the alphabet of byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(shifted)}}


def _split_token(token: str, head: str, tail: str) -> tuple[str, str] | None:
    """``token`` (a vocabulary string spelling ``head + tail``) cut into the spelling of each part, or None when
    its spelling is neither byte-level BPE nor SentencePiece's (then it is left whole)."""
    byte_level = "".join(_byte_alphabet()[b] for b in (head + tail).encode("utf-8")), tail.encode("utf-8")
    sentencepiece = (head + tail).replace(" ", "▁"), tail
    for spelling, tail_units in (byte_level, sentencepiece):
        # "▁" + ...: SentencePiece's word-start marker, which its normaliser inserts without a character of text.
        if tail_units and token in (spelling, "▁" + spelling):
            return token[: -len(tail_units)], token[-len(tail_units) :]
    return None


def split_at_boundaries(
    tokenizer: Any, text: str, input_ids: list[int], offsets: list[tuple[int, int]], boundaries: list[int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """Re-encode each (non-added) token that covers a character on both sides of a boundary as two pieces.

    A template whose reply follows its header without whitespace ("Assistant:" in LLaMA-Factory's default,
    "[/INST]" in Mistral's) lets BPE merge the header's last character with the reply's first: '"five"' after
    "Assistant:" becomes ':"', 'five', ... That token starts in the prompt, so the reply's opening quote would
    never be trained, and at inference the prompt ends in ':' (the generation prompt is tokenised alone), a
    context the merged training text never shows. Splitting keeps the tokenizer's own merges inside each piece."""
    cuts = [next((b for b in boundaries if start < b < end), None) for start, end in offsets]
    if not any(cut is not None for cut in cuts):
        return input_ids, offsets
    model = tokenizer.backend_tokenizer.model
    added = set(tokenizer.added_tokens_decoder)  # atomic: a special token is never split
    split_ids: list[int] = []
    split_offsets: list[tuple[int, int]] = []
    for token_id, (start, end), cut in zip(input_ids, offsets, cuts):
        parts = None
        if cut is not None and token_id not in added:
            parts = _split_token(tokenizer.convert_ids_to_tokens(token_id), text[start:cut], text[cut:end])
        if cut is None or parts is None:
            split_ids.append(token_id)
            split_offsets.append((start, end))
            continue
        for part, part_offsets in zip(parts, ((start, cut), (cut, end))):
            for piece in model.tokenize(part):
                split_ids.append(piece.id)
                split_offsets.append(part_offsets)
    return split_ids, split_offsets


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
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    if not train_on_prompt:
        boundaries = [edge for span in spans for edge in span]
        input_ids, offsets = split_at_boundaries(tokenizer, text, input_ids, offsets, boundaries)
    labels = list(input_ids) if train_on_prompt else [IGNORE_INDEX] * len(input_ids)
    if not train_on_prompt:
        span_index = 0
        for position, (start, _end) in enumerate(offsets):
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
                labels[position] = input_ids[position]
    truncated = len(input_ids) > max_length
    cut_turn = truncated and labels[max_length - 1] != IGNORE_INDEX and labels[max_length] != IGNORE_INDEX
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    return TokenizedSequence(
        input_ids, shift_labels(input_ids, labels), truncated, extra={"cut_turn": cut_turn} if cut_turn else {}
    )


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
