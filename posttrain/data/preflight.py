"""Preflight: the checks that refuse a training run which cannot work, run at the start of every stage and by
``posttrain data check CONFIG.yaml``. Each problem is a sentence saying what is wrong and what to change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.config import DataConfig
from posttrain.data.dataset import SequenceSet, end_of_turn_ids, load_sequences
from posttrain.data.errors import DataError
from posttrain.data.pairs import load_pairs, load_unpaired, pair_sides
from posttrain.data.tokenize import TokenizedSequence
from posttrain.losses import IGNORE_INDEX


@dataclass
class PreflightReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    example: str = ""

    def text(self) -> str:
        lines = [*self.notes, "example (trained tokens between ⟦ ⟧):", self.example]
        lines += [f"PROBLEM: {p}" for p in self.problems] or ["preflight: ok"]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if self.problems:
            raise DataError(None, None, None, "preflight refused to train:\n  " + "\n  ".join(self.problems))


def mark_trained(tokenizer: Any, sequence: TokenizedSequence) -> str:
    """The sequence's text with every trained run wrapped in ⟦ ⟧ (a target at t is token t+1)."""
    trained = [False] + [t != IGNORE_INDEX for t in sequence.targets[:-1]]
    pieces, run, run_trained = [], [], trained[0]
    for token, is_trained in zip(sequence.input_ids, trained):
        if is_trained != run_trained and run:
            text = tokenizer.decode(run)
            pieces.append(f"⟦{text}⟧" if run_trained else text)
            run = []
        run_trained = is_trained
        run.append(token)
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"⟦{text}⟧" if run_trained else text)
    return "".join(pieces)


def preflight(sequences: SequenceSet, tokenizer: Any, config: DataConfig, stage: str) -> PreflightReport:
    report = PreflightReport()
    train = sequences.train
    if not train:
        report.problems.append("no training sequences: check data.train")
        return report
    report.example = mark_trained(tokenizer, train[0])
    truncated_share = sequences.truncated / len(train)
    report.notes.append(
        f"{len(train)} sequences, {sequences.truncated} truncated at data.max_length={config.max_length} "
        f"({truncated_share:.1%}; {sequences.cut_turns} cut inside a trained turn), "
        f"{sum(s.num_targets for s in train)} trained tokens"
        + (f", chat template {sequences.template!r}" if sequences.template else "")
    )
    if not any(s.num_targets for s in train):
        report.problems.append("no token is trained in any sequence: check data.train_on_prompt / train flags")
    if truncated_share > config.max_truncated_share:
        report.problems.append(
            f"{truncated_share:.1%} of sequences are truncated at data.max_length={config.max_length} "
            f"(limit data.max_truncated_share={config.max_truncated_share}): raise data.max_length or the limit"
        )
    if stage != "pretrain":
        stop_ids = end_of_turn_ids(tokenizer, sequences.template)
        if not any(stop_ids.intersection(s.targets) for s in train):
            names = tokenizer.convert_ids_to_tokens(sorted(stop_ids)) if stop_ids else ["(no EOS in the tokenizer)"]
            report.problems.append(
                f"no trained token is an end-of-turn token {names} (template {sequences.template!r}): the model "
                "would never learn to stop. Check data.template (each assistant turn must end with one) or "
                "data.max_length"
            )
    return report


def load_for_check(config: Any, tokenizer: Any) -> SequenceSet:
    """The sequences ``config``'s stage trains on, as its recipe tokenises them (for ``posttrain data check``):
    chat or text for SFT/pretraining, both sides of every pair for reward models and DPO, KTO's examples."""

    if config.stage in ("reward", "dpo"):
        return pair_sides(load_pairs(config.data, tokenizer, config.seed))
    if config.stage == "kto":
        return load_unpaired(config.data, tokenizer, config.seed)
    if config.stage == "rejection_sampling":
        raise DataError(
            None,
            None,
            None,
            "rejection_sampling trains on responses it samples; check its prompts with posttrain data inspect",
        )
    return load_sequences(config.data, tokenizer, config.stage, config.seed)
