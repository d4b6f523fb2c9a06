"""Preference pairs and unpaired (KTO) examples → token sequences whose trained tokens are exactly the response.

A pair is two conversations that share the prompt: ``prompt + chosen`` and ``prompt + rejected``, each rendered
with the chat template. Only the response turns are trained (assistant turns inside the prompt are marked
``train: false``), so a sequence's summed target log-probability is ``log π(response | prompt)``, which every
DPO-family loss and the KTO loss need; the reward model reads its score at each sequence's last token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from posttrain.config import DataConfig
from posttrain.data.dataset import SequenceSet, load_examples, tokenize_messages, use_chat_template
from posttrain.data.errors import DataError
from posttrain.data.formats import ReadResult
from posttrain.data.packing import Example, Row, examples_of, unit_rows
from posttrain.data.records import Preference, Unpaired
from posttrain.data.tokenize import TokenizedSequence


@dataclass
class TokenizedPair:
    """The chosen and rejected sequences of one preference pair (and its Llama-2 margin, if any)."""

    chosen: TokenizedSequence
    rejected: TokenizedSequence
    margin: float | None = None
    source_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated

    @property
    def num_targets(self) -> int:
        return self.chosen.num_targets + self.rejected.num_targets


def _response_config(config: DataConfig) -> DataConfig:
    # The loss is over the response: prompt tokens are never trained here, whatever the SFT switches say.
    return config.model_copy(update={"train_on_prompt": False, "last_turn_only": False})


def _with_response(prompt: list[dict[str, Any]], response: list[dict[str, Any]]) -> list[dict[str, Any]]:
    untrained_prompt = [{**m, "train": False} if m["role"] == "assistant" else m for m in prompt]
    return untrained_prompt + response


def tokenize_preferences(result: ReadResult, tokenizer: Any, config: DataConfig) -> tuple[list[TokenizedPair], int]:
    """Tokenise every pair; returns the pairs and how many were dropped because truncation at
    ``data.max_length`` left the chosen or rejected response with no token (nothing to compare)."""
    response_config = _response_config(config)
    pairs, dropped = [], 0
    for record in result.records:
        assert isinstance(record, Preference)
        chosen, rejected = (
            tokenize_messages(
                tokenizer, _with_response(record.prompt, side), response_config, record.meta, result.source
            )
            for side in (record.chosen, record.rejected)
        )
        if chosen.num_targets == 0 or rejected.num_targets == 0:
            dropped += 1
            continue
        pairs.append(TokenizedPair(chosen, rejected, record.margin))
    return pairs, dropped


def load_pairs(config: DataConfig, tokenizer: Any, seed: int) -> SequenceSet:
    """Training and held-out preference pairs (``SequenceSet`` of ``TokenizedPair``)."""
    template = use_chat_template(tokenizer, config.template)
    dropped: list[int] = []

    def tokenize(result: ReadResult) -> list[TokenizedPair]:
        pairs, lost = tokenize_preferences(result, tokenizer, config)
        dropped.append(lost)
        return pairs

    pairs = load_examples(config, "preference", tokenize, seed, template)
    if sum(dropped):
        pairs.reports.append(
            f"{sum(dropped)} pairs dropped: their prompt fills data.max_length={config.max_length}, leaving no "
            "response token to compare"
        )
    return pairs


def tokenize_unpaired(result: ReadResult, tokenizer: Any, config: DataConfig, seed: int) -> list[TokenizedSequence]:
    """KTO examples: each completion with its prompt, ``extra["label"]`` True (desirable) or False, and
    ``extra["kl"]``: the same prompt with the completion of another example (a mismatched pair, whose log-ratio
    estimates KL(π‖π_ref), the reference point z0 of KTO). Preference pairs are split into one desirable and one
    undesirable example (TRL's ``unpair_preference_dataset``)."""
    response_config = _response_config(config)
    examples: list[tuple[list[dict[str, Any]], list[dict[str, Any]], bool, dict[str, Any]]] = []
    for record in result.records:
        if isinstance(record, Preference):
            examples += [
                (record.prompt, record.chosen, True, record.meta),
                (record.prompt, record.rejected, False, record.meta),
            ]
        else:
            assert isinstance(record, Unpaired)
            examples.append((record.prompt, record.completion, record.label, record.meta))
    # A derangement-like shift of a seeded permutation: example i borrows the completion of order[i + 1].
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    borrowed = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}
    sequences = []
    for index, (prompt, completion, label, meta) in enumerate(examples):
        sequence = tokenize_messages(
            tokenizer, _with_response(prompt, completion), response_config, meta, result.source
        )
        other = examples[borrowed[index]][1]
        kl = tokenize_messages(tokenizer, _with_response(prompt, other), response_config, meta, result.source)
        if sequence.num_targets == 0 or kl.num_targets == 0:
            continue
        sequence.extra = {**sequence.extra, "label": label, "kl": kl}
        sequences.append(sequence)
    return sequences


def load_unpaired(config: DataConfig, tokenizer: Any, seed: int) -> SequenceSet:
    """Training and held-out KTO examples from unpaired rows (with a label) or preference pairs."""
    template = use_chat_template(tokenizer, config.template)

    def tokenize(result: ReadResult) -> list[TokenizedSequence]:
        if result.kind not in ("unpaired", "preference"):
            raise DataError(
                result.source,
                None,
                None,
                f"KTO needs completions labelled desirable/undesirable (a label field) or preference pairs; "
                f"this source holds {result.kind} records",
            )
        return tokenize_unpaired(result, tokenizer, config, seed)

    return load_examples(config, None, tokenize, seed, template)


def pair_rows(pairs: list[TokenizedPair], config: DataConfig, seed: int, share_prefix: bool = False) -> list[Row]:
    """Rows for a pair recipe: pair p's chosen and rejected sides are sequences 2p and 2p+1 and always share a
    row (one forward computes both; per-sequence values ``.view(-1, 2)`` give (chosen, rejected)); with
    ``share_prefix`` the prompt they share is held once (``models.forward.shares_prefix`` decides)."""
    units = [(pair.chosen, pair.rejected) for pair in pairs]
    return unit_rows(units, config.packing, config.max_length, seed, share_prefix)


def pair_examples(pairs: list[TokenizedPair]) -> list[Example]:
    """The pairs as training examples (what ``train.batch_size`` counts): pair p's chosen and rejected sides are
    sequences 2p and 2p+1 in any batch that holds it (``data.packing.Example``)."""
    return examples_of([(pair.chosen, pair.rejected) for pair in pairs])


def pair_sides(pairs: SequenceSet) -> SequenceSet:
    """The pairs' chosen and rejected sequences as one flat set (what preflight checks: truncation, trained
    end-of-turn tokens)."""
    sides = [side for pair in pairs.train for side in (pair.chosen, pair.rejected)]
    held_out = [side for pair in pairs.held_out for side in (pair.chosen, pair.rejected)]
    return SequenceSet(
        sides, held_out, pairs.reports, pairs.skipped_rows, pairs.template, pairs.source_names, pairs.source_counts
    )
