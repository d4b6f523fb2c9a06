"""Shared-prefix rows (``data.packing``): how much of a unit is held once, the exact attention mask, and the
equality of log-probs with the sequences laid out whole, on hand-built sequences and on the micro model."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from posttrain.data.packing import collate, pack_rows, shared_prefix_length, shared_prefix_mask, unit_rows
from posttrain.data.tokenize import TokenizedSequence
from posttrain.losses import IGNORE_INDEX as X


def _sequence(ids: list[int], first_trained: int) -> TokenizedSequence:
    """Targets = the next token from position ``first_trained`` on (the response), untrained before."""
    targets = [X] * first_trained + ids[first_trained + 1 :] + [X]
    return TokenizedSequence(ids, targets)


def test_shared_length_stops_at_the_first_difference_and_at_the_first_trained_position() -> None:
    prompt = [5, 6, 7, 8]
    chosen, rejected = _sequence(prompt + [20, 21, 2], 3), _sequence(prompt + [30, 2], 3)
    # Common prefix 4 tokens, but position 3 (the last prompt token) predicts each side's first answer token.
    assert shared_prefix_length([chosen, rejected]) == 3
    # Same first answer token: the common prefix is 5 tokens long, still cut at the first trained position.
    assert shared_prefix_length([_sequence(prompt + [20, 21, 2], 3), _sequence(prompt + [20, 2], 3)]) == 3
    # Prompts that differ at token 1: only token 0 is shared.
    assert shared_prefix_length([_sequence([5, 6, 9, 2], 2), _sequence([5, 7, 9, 2], 2)]) == 1
    assert shared_prefix_length([_sequence([5, 6, 2], 1), _sequence([4, 6, 2], 1)]) == 0
    assert shared_prefix_length([chosen]) == 0
    # Three sequences: the prefix all of them share.
    assert (
        shared_prefix_length(
            [_sequence([1, 2, 3, 4, 5], 4), _sequence([1, 2, 3, 9, 5], 4), _sequence([1, 2, 8, 4, 5], 4)]
        )
        == 2
    )


def test_row_layout_and_mask_of_two_units() -> None:
    a_chosen, a_rejected = _sequence([1, 2, 3, 10, 11], 2), _sequence([1, 2, 3, 12], 2)  # shares [1, 2]
    b_chosen, b_rejected = _sequence([4, 13], 0), _sequence([5, 14], 0)  # shares nothing
    (row,) = pack_rows([a_chosen, a_rejected, b_chosen, b_rejected], 64, 0, [[0, 1], [2, 3]], share_prefix=True)
    # Best-fit-decreasing puts the longer unit first.
    assert row.input_ids == [1, 2, 3, 10, 11, 3, 12, 4, 13, 5, 14]
    assert row.position_ids == [0, 1, 2, 3, 4, 2, 3, 0, 1, 0, 1]
    assert row.branch_ids == [0, 0, 1, 1, 1, 2, 2, 1, 1, 2, 2]
    assert row.sequence_ids == [0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert row.targets == [X, X, 10, 11, X, 12, X, 13, X, 14, X]
    assert row.num_sequences == 4 and row.num_targets == 5

    batch = collate([row], pad_token_id=0, packed=True)
    mask = batch["attention_mask"][0, 0]
    expected = torch.zeros(11, 11, dtype=torch.bool)
    for query, keys in {
        0: [0],
        1: [0, 1],
        2: [0, 1, 2],
        3: [0, 1, 2, 3],
        4: [0, 1, 2, 3, 4],
        5: [0, 1, 5],
        6: [0, 1, 5, 6],  # the rejected branch sees the prefix and itself, not the chosen branch
        7: [7],
        8: [7, 8],
        9: [9],
        10: [9, 10],  # unit b: nothing shared, two separate sequences
    }.items():
        expected[query, keys] = True
    assert torch.equal(mask, expected)


def test_mask_of_padding_and_of_rows_without_branches() -> None:
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0]])  # two sequences and one pad token
    mask = shared_prefix_mask(position_ids, torch.zeros_like(position_ids))[0, 0]
    # No branches: the block-diagonal causal mask of ordinary packing; the pad token sees only itself.
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[:2, :2] = torch.ones(2, 2).tril().bool()
    expected[2:5, 2:5] = torch.ones(3, 3).tril().bool()
    expected[5, 5] = True
    assert torch.equal(mask, expected)


def test_shared_rows_give_the_log_probs_of_whole_sequences(toy, micro_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import DataConfig
    from posttrain.data.pairs import load_pairs
    from posttrain.models.forward import batch_sequence_logps

    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32, attn_implementation="sdpa")
    pairs = load_pairs(DataConfig(train=str(toy.prefs), max_length=128), tokenizer, seed=0).train[:12]
    units = [(p.chosen, p.rejected) for p in pairs]
    shared = unit_rows(units, True, 128, 0, share_prefix=True)
    whole = unit_rows(units, True, 128, 0)
    assert sum(len(r.input_ids) for r in shared) < sum(len(r.input_ids) for r in whole)
    shared_batch = collate(shared, tokenizer.pad_token_id, True)
    # The batch is laid out in narrower tensor rows than it was packed in (its mask is dense), same tokens.
    assert shared_batch["input_ids"].shape[1] < max(len(r.input_ids) for r in shared)
    assert shared_batch["input_ids"].shape[0] > len(shared)
    assert int(shared_batch["num_real_tokens"]) == sum(len(r.input_ids) for r in shared)
    with torch.no_grad():
        shared_logps, shared_counts, shared_ids = batch_sequence_logps(model, shared_batch)
        whole_logps, whole_counts, whole_ids = batch_sequence_logps(
            model, collate(whole, tokenizer.pad_token_id, True)
        )
    assert torch.equal(shared_ids, whole_ids) and torch.equal(shared_counts, whole_counts)
    assert_close(shared_logps, whole_logps, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    "attention, method, packing, share_prompt, expected",
    [
        ("sdpa", "full", True, True, True),
        ("sdpa", "lora", True, True, True),
        ("sdpa", "full", True, False, False),  # switched off
        ("sdpa", "full", False, True, False),  # padded rows hold one sequence each
        ("eager", "full", True, True, False),  # eager adds the mask to the scores: a boolean one would be wrong
        ("sdpa", "prompt_tuning", True, True, False),  # virtual tokens the mask does not cover
        ("sdpa", "prefix", True, True, False),  # prefix keys the mask does not cover
    ],
)
def test_which_models_take_shared_rows(micro_model, attention, method, packing, share_prompt, expected) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.config import DataConfig, PeftConfig
    from posttrain.models.adapters import attach_adapter
    from posttrain.models.forward import shares_prefix

    model = AutoModelForCausalLM.from_pretrained(micro_model, dtype=torch.float32, attn_implementation=attention)
    if method != "full":
        model = attach_adapter(model, PeftConfig(method=method, num_virtual_tokens=4), task="CAUSAL_LM")
    assert shares_prefix(DataConfig(packing=packing, share_prompt=share_prompt), model) is expected
