"""Reference tests for the pure losses: hand-derived values, written out in the docstrings."""

import math

import torch
from torch.testing import assert_close

from posttrain.losses import IGNORE_INDEX, per_sequence_nll, sft_loss


def test_sft_loss_hand_derived() -> None:
    """Two positions over a 2-token vocabulary, one ignored.

    Position 0: logits [0, ln 3] → p(token 1) = 3/4 → NLL = ln(4/3).
    Position 1: logits [0, 0], target ignored.
    Position 2: logits [ln 3, 0] → p(token 1) = 1/4 → NLL = ln 4.
    Sum = ln(4/3) + ln 4 = ln(16/3). Normalised by num_items_in_batch = 4 (the accumulated batch's count,
    not this micro-batch's 2): ln(16/3) / 4.
    """
    ln3 = math.log(3.0)
    logits = torch.tensor([[0.0, ln3], [0.0, 0.0], [ln3, 0.0]])
    targets = torch.tensor([1, IGNORE_INDEX, 1])
    loss, stats = sft_loss(logits, targets, num_items_in_batch=4)
    assert_close(loss, torch.tensor(math.log(16 / 3) / 4))
    assert_close(stats["loss_sum"], torch.tensor(math.log(16 / 3)))
    assert int(stats["num_tokens"]) == 2


def test_micro_batch_losses_sum_to_the_big_batch_mean() -> None:
    """Splitting 5 trained tokens into micro-batches of 2 and 3 and normalising each by 5 sums to the mean."""
    torch.manual_seed(0)
    logits, targets = torch.randn(5, 7), torch.randint(0, 7, (5,))
    whole, _ = sft_loss(logits, targets, 5)
    parts = sft_loss(logits[:2], targets[:2], 5)[0] + sft_loss(logits[2:], targets[2:], 5)[0]
    assert_close(whole, torch.nn.functional.cross_entropy(logits, targets))
    assert_close(parts, whole)


def test_per_sequence_nll_groups_tokens() -> None:
    """Uniform logits over V=4 give NLL ln 4 per trained token; sequence 0 has 2 trained tokens, sequence 1 one."""
    logits = torch.zeros(4, 4)
    targets = torch.tensor([1, 2, IGNORE_INDEX, 3])
    nll, counts = per_sequence_nll(logits, targets, torch.tensor([0, 0, 1, 1]), 2)
    assert_close(nll, torch.tensor([2 * math.log(4), math.log(4)]))
    assert_close(counts, torch.tensor([2.0, 1.0]))
