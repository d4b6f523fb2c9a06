"""From ``data.*`` config to tokenised sequences: resolve sources (files, folders, registry names), read them
into canonical records, pick the chat template, tokenise with loss masks, and check that training can work."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.config import DataConfig, DataSource
from posttrain.data.errors import DataError
from posttrain.data.formats import ReadResult
from posttrain.data.records import Conversation, Prompt, Text
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


def read_source(source: str, config: DataConfig, kind: str | None) -> ReadResult:
    """One ``data.train`` entry → records of ``kind`` (None: the kind of the first row). Names resolve through ``data.registry``, else a
    dataset_info.json in the working directory or ./data (LLaMA-Factory's layout)."""
    spec = resolve_dataset(source, config.registry, search_dirs=[Path.cwd(), Path.cwd() / "data"])
    if config.format != "auto":
        spec = dataclasses.replace(spec, format=config.format)
    return read_dataset(spec, kind=kind, on_invalid=config.on_invalid)  # type: ignore[arg-type]


def read_prompts(config: DataConfig, max_prompts: int | None = None) -> list[Prompt]:
    """Every ``data.train`` source as prompt records (file:line errors come from the data layer), the first
    ``max_prompts`` of them. For stages that sample each prompt once (rejection sampling, online RL)."""
    entries = [config.train] if isinstance(config.train, str) else list(config.train)
    prompts: list[Prompt] = []
    for entry in entries:
        if isinstance(entry, DataSource) and (entry.ratio is not None or entry.epochs is not None):
            raise ValueError(
                f"data.train {entry.path}: ratio/epochs mix sources for training; this stage samples every "
                "prompt once, so give the sources without them"
            )
        result = read_source(entry.path if isinstance(entry, DataSource) else entry, config, "prompt")
        print(f"data: {result.summary()}", file=sys.stderr)
        prompts += [r for r in result.records if isinstance(r, Prompt)]
    return prompts[:max_prompts]


def require_references(prompts: list[Prompt], what: str) -> None:
    """Refuse, before any sampling, prompts that ``what`` (a reward comparing with a reference answer) cannot
    score: a DataError naming the first such row's file and line."""
    missing = [p for p in prompts if p.reference is None]
    if missing:
        raise DataError(
            missing[0].meta.get("source"),
            missing[0].meta.get("line"),
            "reference",
            f"{what} compares with a reference answer and this row has none ({len(missing)} rows in all); "
            "add one, or use a reward model or a function that needs none",
        )


@dataclass
class SequenceSet:
    """Tokenised training and held-out examples (sequences, or pairs of them), with what a user needs to trust
    them."""

    train: list[Any]
    held_out: list[Any]
    reports: list[str] = field(default_factory=list)
    skipped_rows: int = 0
    template: str = ""
    source_names: list[str] = field(default_factory=list)
    source_counts: list[int] = field(default_factory=list)

    @property
    def truncated(self) -> int:
        return sum(s.truncated for s in self.train)

    @property
    def cut_turns(self) -> int:
        return sum(bool(s.extra.get("cut_turn")) for s in self.train)


def tokenize_messages(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    config: DataConfig,
    record_meta: dict[str, Any],
    source: str,
    tools: Any = None,
) -> TokenizedSequence:
    """One conversation → tokens and loss mask; a template that cannot render it is the row's error
    (file:line), not a traceback."""
    if isinstance(tools, str):  # LLaMA-Factory keeps tool schemas as JSON text; templates want the objects
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError as error:
            raise DataError(
                record_meta.get("source", source), record_meta.get("line"), "tools", f"not valid JSON: {error.msg}"
            ) from None
    try:
        return tokenize_conversation(
            tokenizer, messages, config.max_length, config.train_on_prompt, tools, config.last_turn_only
        )
    except DataError:
        raise
    except Exception as error:  # the template's raise_exception, a Jinja error: the row is the cause
        raise DataError(
            record_meta.get("source", source),
            record_meta.get("line"),
            "messages",
            f"the chat template cannot render this conversation: {error}",
        ) from None


def tokenize_records(result: ReadResult, tokenizer: Any, config: DataConfig) -> list[TokenizedSequence]:
    sequences: list[TokenizedSequence] = []
    for record in result.records:
        if isinstance(record, Text):
            sequences += tokenize_text(tokenizer, record.text, config.max_length)
            continue
        assert isinstance(record, Conversation)
        sequences.append(
            tokenize_messages(tokenizer, record.messages, config, record.meta, result.source, record.tools)
        )
    return sequences


def _source_name(source: str) -> str:
    name = Path(source).stem if ("/" in source or "." in source) else source
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def mix(
    per_source: list[list[TokenizedSequence]], sources: list[DataSource], seed: int
) -> list[list[TokenizedSequence]]:
    """Apply mixture ratios or per-source epochs.

    Ratios: the mixture is as large as possible without repeating any row, i.e. N = min(size_i / ratio_i), and
    source i contributes round(N * ratio_i) rows drawn without replacement. Epochs: source i is repeated
    floor(e_i) times plus a random fraction. Seeded, so a resumed run sees the same mixture.
    """
    rng = random.Random(seed)
    if sources and all(s.ratio is not None for s in sources):
        total = min(len(seqs) / s.ratio for seqs, s in zip(per_source, sources))  # type: ignore[operator]
        return [rng.sample(seqs, min(len(seqs), round(total * s.ratio))) for seqs, s in zip(per_source, sources)]  # type: ignore[operator]
    mixed = []
    for seqs, source in zip(per_source, sources):
        epochs = source.epochs or 1.0
        whole, fraction = int(epochs), epochs - int(epochs)
        mixed.append(seqs * whole + rng.sample(seqs, round(fraction * len(seqs))))
    return mixed


def load_examples(
    config: DataConfig, kind: str | None, tokenize: Callable[[ReadResult], list[Any]], seed: int, template: str = ""
) -> SequenceSet:
    """Read every source as ``kind`` records, ``tokenize`` them into examples (sequences, pairs...) that carry a
    ``source_index``, split off held-out examples (``data.eval``, or an ``eval_fraction`` split of every source)
    and apply mixture ratios / per-source epochs."""
    entries = [config.train] if isinstance(config.train, str) else list(config.train)
    sources = [e if isinstance(e, DataSource) else DataSource(path=e) for e in entries]
    reports, skipped = [], 0
    per_source: list[list[Any]] = []
    held_out: list[Any] = []
    rng = random.Random(seed)
    for index, source in enumerate(sources):
        result = read_source(source.path, config, kind)
        reports.append(result.summary())
        skipped += len(result.invalid)
        examples = tokenize(result)
        for example in examples:
            example.source_index = index
        if not config.eval and config.eval_fraction > 0:
            rng.shuffle(examples)
            cut = max(1, int(len(examples) * config.eval_fraction))
            if cut >= len(examples):  # else preflight would say "no training sequences", which hides why
                raise DataError(
                    source.path,
                    None,
                    None,
                    f"all {len(examples)} rows of {source.path} went to the held-out split "
                    f"(data.eval_fraction={config.eval_fraction} holds out at least one row per file); add rows, "
                    "set data.eval_fraction=0, or give held-out data as data.eval",
                )
            held_out += examples[:cut]
            examples = examples[cut:]
        per_source.append(examples)
    if len(sources) > 1:
        per_source = mix(per_source, sources, seed)
    if config.eval:
        result = read_source(config.eval, config, kind)
        reports.append(result.summary())
        held_out = tokenize(result)
    names = [_source_name(s.path) for s in sources]
    counts = [len(examples) for examples in per_source]
    if len(sources) > 1:
        reports.append(
            "mixture: " + ", ".join(f"{n} {c} ({c / max(sum(counts), 1):.1%})" for n, c in zip(names, counts))
        )
    train = [example for examples in per_source for example in examples]
    return SequenceSet(train, held_out, reports, skipped, template, names, counts)


def load_sequences(config: DataConfig, tokenizer: Any, stage: str, seed: int) -> SequenceSet:
    """Training and held-out sequences for SFT (conversations) or pretraining (text)."""
    kind = "text" if stage == "pretrain" else "conversation"
    template = use_chat_template(tokenizer, config.template) if kind == "conversation" else ""
    return load_examples(config, kind, lambda result: tokenize_records(result, tokenizer, config), seed, template)
