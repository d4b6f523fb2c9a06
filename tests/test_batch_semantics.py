"""``train.batch_size`` counts examples, whatever ``data.packing``: the runtime draws examples, the recipe's collate
lays each micro-batch out packed or padded. Recipe-level packed == padded runs are in test_sft_invariance.py
(SFT) and test_dpo.py / test_reward.py (pairs); every shipped config on a 50-example file in test_cli.py."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from posttrain.config import ConfigError, build_config
from posttrain.data.packing import collate_examples, examples_of
from posttrain.data.reader import read_conversations
from posttrain.data.tokenize import tokenize_conversation
from posttrain.runtime import Runtime


def _runtime(tmp_path, **train) -> Runtime:
    return Runtime(
        build_config(
            {
                "stage": "sft",
                "output_dir": str(tmp_path),
                "model": {"path": "unused"},
                "data": {"train": "unused"},
                "train": train,
                "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
                "checkpoint": {"every": None},
                "logging": {"progress": False, "tensorboard": False, "report": False},
            }
        )
    )


def _steps(tmp_path, sequences, packed: bool) -> tuple[list[list[set[int]]], list[int]]:
    """The global sequence ids of every micro-batch, grouped by step, and each micro-batch's tensor row count."""
    rt = _runtime(tmp_path / str(packed), batch_size=5, grad_accum=2, max_steps=4)
    model = rt.setup(torch.nn.Linear(1, 1), num_rows=len(sequences))
    collate = partial(collate_examples, pad_token_id=0, packed=packed, max_length=128, seed=0)
    steps: list[list[set[int]]] = []
    rows: list[int] = []
    for batch in rt.batches(examples_of(sequences), collate):
        if rt._micro == 0:
            steps.append([])
        ids = batch["sequence_ids"]
        steps[-1].append(set(ids[ids >= 0].tolist()))
        rows.append(batch["input_ids"].shape[0])
        assert batch["num_examples"] == 5
        rt.step(model(torch.ones(1, 1)).sum() * 0.0)
    return steps, rows


def test_packing_changes_the_layout_never_the_examples_of_a_step(toy, micro_model, tmp_path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    sequences = [tokenize_conversation(tokenizer, c, 128) for c in read_conversations(toy.sft)[:40]]
    packed_steps, packed_rows = _steps(tmp_path, sequences, packed=True)
    padded_steps, padded_rows = _steps(tmp_path, sequences, packed=False)
    assert packed_steps == padded_steps
    assert len(packed_steps) == 4 and all(
        len(step) == 2 and all(len(micro) == 5 for micro in step) for step in packed_steps
    )
    # 40 examples, 10 a step: one epoch covers each once.
    assert sorted(i for step in packed_steps for micro in step for i in micro) == list(range(40))
    assert padded_rows == [5] * 8 and max(packed_rows) < 5, "packing must change the layout for this test to bite"


def test_too_few_examples_for_one_step_names_the_factors(tmp_path) -> None:
    rt = _runtime(tmp_path, batch_size=2, grad_accum=2, max_steps=1)
    with pytest.raises(
        ConfigError,
        match=r"^3 training examples are fewer than one optimizer step needs \(train.batch_size x "
        r"train.grad_accum x processes = 2 x 2 x 1 = 4\)",
    ):
        rt.setup(torch.nn.Linear(1, 1), num_rows=3)
