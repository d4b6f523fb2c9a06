"""Mixtures (ratios, per-source epochs, per-source loss) and the preflight checks."""

from __future__ import annotations

import json

import pytest
from helpers import sft_config
from transformers import AutoTokenizer

from posttrain.config import DataSource
from posttrain.data.dataset import load_sequences
from posttrain.data.errors import DataError
from posttrain.data.preflight import mark_trained, preflight
from posttrain.data.tokenize import tokenize_conversation
from posttrain.recipes import sft


@pytest.fixture
def two_sources(toy, tmp_path):
    lines = toy.sft.read_text().splitlines()
    domain, general = tmp_path / "domain.jsonl", tmp_path / "general.jsonl"
    domain.write_text("\n".join(lines[:100]) + "\n")
    general.write_text("\n".join(lines[100:400]) + "\n")
    return domain, general


def _sequences(toy, micro_model, out, sources):
    config = sft_config(micro_model, toy.sft, out, data__train=sources)
    return load_sequences(config.data, AutoTokenizer.from_pretrained(micro_model), "sft", config.seed)


def test_ratios_draw_the_largest_mixture_without_repeats(toy, micro_model, tmp_path, two_sources) -> None:
    """100 domain and 300 general rows at 20/80: N = min(100/0.2, 300/0.8) = 375 → 75 domain + 300 general."""
    domain, general = two_sources
    sources = [DataSource(path=str(domain), ratio=0.2), DataSource(path=str(general), ratio=0.8)]
    sequences = _sequences(toy, micro_model, tmp_path / "o", sources)
    assert sequences.source_names == ["domain", "general"] and sequences.source_counts == [75, 300]
    assert sum(s.source_index == 0 for s in sequences.train) == 75
    domain_ids = {tuple(s.input_ids) for s in sequences.train if s.source_index == 0}
    assert len(domain_ids) == 75, "drawn without replacement"
    assert any("mixture: domain 75 (20.0%), general 300 (80.0%)" in r for r in sequences.reports)


def test_per_source_epochs_repeat_a_source(toy, micro_model, tmp_path, two_sources) -> None:
    domain, general = two_sources
    sources = [DataSource(path=str(domain), epochs=2.5), DataSource(path=str(general))]
    assert _sequences(toy, micro_model, tmp_path / "o", sources).source_counts == [250, 300]


def test_mixture_logs_per_source_loss(toy, micro_model, tmp_path, two_sources) -> None:
    domain, general = two_sources
    sources = [{"path": str(domain), "ratio": 0.5}, {"path": str(general), "ratio": 0.5}]
    sft.run(sft_config(micro_model, toy.sft, tmp_path / "run", data__train=sources, train__max_steps=2))
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        tokens = record["tokens/domain"] + record["tokens/general"]
        mixed = (
            record["loss/domain"] * record["tokens/domain"] + record["loss/general"] * record["tokens/general"]
        ) / tokens
        assert record["loss"] == pytest.approx(mixed, rel=1e-5)
        assert record["tokens/domain"] > 0 and record["tokens/general"] > 0


def test_ratio_config_must_cover_every_source_and_sum_to_one(toy, micro_model, tmp_path) -> None:
    from posttrain.config import ConfigError

    with pytest.raises(ConfigError, match="sum to 1"):
        sft_config(micro_model, toy.sft, tmp_path, data__train=[{"path": "a", "ratio": 0.5}, {"path": "b"}])


def test_preflight_marks_trained_tokens_and_refuses_heavy_truncation(toy, micro_model, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    messages = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    marked = mark_trained(tokenizer, tokenize_conversation(tokenizer, messages, 128))
    assert marked.endswith("<|assistant|>\n⟦5<|end|>⟧\n")
    config = sft_config(micro_model, toy.sft, tmp_path / "o", data__max_length=12)
    sequences = load_sequences(config.data, tokenizer, "sft", 0)
    report = preflight(sequences, tokenizer, config.data, "sft")
    assert any("truncated at data.max_length=12" in p for p in report.problems)
    with pytest.raises(DataError, match="preflight refused to train"):
        sft.run(config)
    relaxed = sft_config(micro_model, toy.sft, tmp_path / "o2", data__max_length=128)
    assert not preflight(load_sequences(relaxed.data, tokenizer, "sft", 0), tokenizer, relaxed.data, "sft").problems


def test_data_check_command(toy, micro_model, tmp_path, capsys) -> None:
    from posttrain.cli import main

    common = ["configs/sft_lora.yaml", f"model.path={micro_model}", f"data.train={toy.sft}"]
    assert main(["data", "check", *common]) == 0
    out = capsys.readouterr().out
    assert "format openai" in out and "⟦" in out and "preflight: ok" in out
    assert main(["data", "check", *common, "data.max_length=12"]) == 2
    assert "PROBLEM: " in capsys.readouterr().out
