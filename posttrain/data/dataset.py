"""From ``data.*`` config to tokenised sequences: resolve sources (files, folders, registry names), read them
into canonical records, pick the chat template, tokenise with loss masks, and check that training can work."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import DataConfig
from posttrain.data.errors import DataError
from posttrain.data.formats import ReadResult
from posttrain.data.records import Conversation, Text
from posttrain.data.registry import read_dataset, resolve_dataset
from posttrain.data.templates import END_OF_TURN, resolve_template
from posttrain.data.tokenize import TokenizedSequence, tokenize_conversation, tokenize_text


def use_chat_template(tokenizer: Any, override: str | None) -> str:
    """Install the training template on the tokenizer (it is saved with the model, so chat and serving render
    prompts exactly as training did) and return its name."""
    name, template = resolve_template(tokenizer, override)
    tokenizer.chat_template = template
    return name


def end_of_turn_ids(tokenizer: Any, template_name: str) -> set[int]:
    """Token ids that close an assistant turn under this template (EOS, or e.g. ``<|eot_id|>`` for llama3)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    marker = END_OF_TURN.get(template_name)
    if marker:
        marker_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(marker_id, int) and marker_id != tokenizer.unk_token_id:
            ids.add(marker_id)
    return ids


def read_source(source: str, config: DataConfig, kind: str) -> ReadResult:
    """One ``data.train`` entry → records of ``kind``. Names resolve through ``data.registry``, else a
    dataset_info.json in the working directory or ./data (LLaMA-Factory's layout)."""
    spec = resolve_dataset(source, config.registry, search_dirs=[Path.cwd(), Path.cwd() / "data"])
    if config.format != "auto":
        spec = dataclasses.replace(spec, format=config.format)
    return read_dataset(spec, kind=kind, on_invalid=config.on_invalid)  # type: ignore[arg-type]


@dataclass
class SequenceSet:
    """Tokenised training and held-out sequences, with what a user needs to trust them."""

    train: list[TokenizedSequence]
    held_out: list[TokenizedSequence]
    reports: list[str] = field(default_factory=list)
    skipped_rows: int = 0
    template: str = ""

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.train)

    @property
    def cut_turns(self) -> int:
        return sum(bool(s.extra.get("cut_turn")) for s in self.train)


def tokenize_records(result: ReadResult, tokenizer: Any, config: DataConfig) -> list[TokenizedSequence]:
    sequences: list[TokenizedSequence] = []
    for record in result.records:
        if isinstance(record, Text):
            sequences += tokenize_text(tokenizer, record.text, config.max_length)
            continue
        assert isinstance(record, Conversation)
        try:
            sequences.append(
                tokenize_conversation(
                    tokenizer, record.messages, config.max_length, config.train_on_prompt, record.tools, config.last_turn_only
                )
            )
        except DataError:
            raise
        except Exception as error:  # the template's raise_exception, a Jinja error: the row is the cause
            raise DataError(
                record.meta.get("source", result.source), record.meta.get("line"), "messages",
                f"the chat template cannot render this conversation: {error}",
            ) from None
    return sequences


def load_sequences(config: DataConfig, tokenizer: Any, stage: str, seed: int) -> SequenceSet:
    """Training and held-out sequences (``data.eval``, or an ``eval_fraction`` split of the training rows)."""
    kind = "text" if stage == "pretrain" else "conversation"
    template = use_chat_template(tokenizer, config.template) if kind == "conversation" else ""
    sources = [config.train] if isinstance(config.train, str) else list(config.train)
    reports, train, skipped = [], [], 0
    for source in sources:
        result = read_source(source, config, kind)
        reports.append(result.summary())
        skipped += len(result.invalid)
        train += tokenize_records(result, tokenizer, config)
    held_out: list[TokenizedSequence] = []
    if config.eval:
        result = read_source(config.eval, config, kind)
        reports.append(result.summary())
        held_out = tokenize_records(result, tokenizer, config)
    elif config.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        cut = max(1, int(len(train) * config.eval_fraction))
        held_out = [train[i] for i in order[:cut]]
        train = [train[i] for i in order[cut:]]
    sequences = SequenceSet(train, held_out, reports, skipped, template)
    if kind == "conversation":
        check_end_of_turn_trained(sequences, tokenizer)
    return sequences


def check_end_of_turn_trained(sequences: SequenceSet, tokenizer: Any) -> None:
    """Refuse to train a chat model that would never learn to stop (no end-of-turn token ever labelled)."""
    stop_ids = end_of_turn_ids(tokenizer, sequences.template)
    if not any(stop_ids.intersection(seq.targets) for seq in sequences.train):
        names = sorted(tokenizer.convert_ids_to_tokens(list(stop_ids))) if stop_ids else ["(the tokenizer has no EOS)"]
        raise DataError(
            None, None, "template",
            f"no trained token is an end-of-turn token {names} (template {sequences.template!r}): the model would "
            "never learn to stop. Check data.template (each assistant turn must end with one) or data.max_length",
        )
