"""The typed step statistics (``runtime.metrics.Metrics``), hand-computed: how each kind combines over the
micro-batches of a step and over processes (two processes simulated by merging two accumulators, and through the
one all-reduce), and what is logged."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.runtime.metrics import Kind, Metrics


def micro_batch(loss_sum: float, tokens: int, accuracy_sum: float, pairs: int, real_tokens: int) -> Metrics:
    stats = Metrics()
    stats.token_mean("loss", torch.tensor(loss_sum), torch.tensor(tokens))
    stats.example_mean("accuracy", accuracy_sum, pairs)
    stats.sum("count", pairs)
    stats.per_second("tokens_per_s", real_tokens)
    stats.count_trained_tokens(tokens)
    return stats


def test_micro_batches_combine_as_one_large_batch() -> None:
    """Two micro-batches: losses 6 over 2 tokens and 3 over 4 tokens. The token mean is (6+3)/(2+4) = 1.5, not
    the mean of the micro-batch means (3 + 0.75)/2 = 1.875. Accuracy: 1 of 2 pairs, then 3 of 3: 4/5 = 0.8.
    Throughput: (10 + 20) real tokens in 2 s = 15 per second."""
    step = micro_batch(6.0, 2, 1.0, 2, 10).merge(micro_batch(3.0, 4, 3.0, 3, 20))
    assert step.values(seconds=2.0) == pytest.approx(
        {"loss": 1.5, "accuracy": 0.8, "count": 5.0, "tokens_per_s": 15.0}
    )
    assert step.trained_tokens == 6.0


def test_two_processes_merge_to_the_whole_batch_and_the_all_reduce_agrees() -> None:
    """Process A: loss 6 over 2 tokens, 1 of 2 pairs right; process B: loss 3 over 4 tokens, 3 of 3. Merged, as
    the all-reduce sums them: loss 9/6 = 1.5, accuracy 4/5. ``reduce`` with a sum that adds B's numbers to A's
    (what the all-reduce does on A) gives the same values; without ``seconds`` no rate is logged."""
    a, b = micro_batch(6.0, 2, 1.0, 2, 10), micro_batch(3.0, 4, 3.0, 3, 20)
    merged = Metrics().merge(a).merge(b)
    assert merged.values() == pytest.approx({"loss": 1.5, "accuracy": 0.8, "count": 5.0})

    order = sorted(["loss", "accuracy", "count", "tokens_per_s"])  # the flat layout: names sorted, then trained tokens
    numbers_of_b = {"loss": [3.0, 4.0], "accuracy": [3.0, 3.0], "count": [3.0], "tokens_per_s": [20.0]}
    b_flat = torch.tensor([x for name in order for x in numbers_of_b[name]] + [4.0], dtype=torch.float64)

    def all_reduce(flat: torch.Tensor) -> torch.Tensor:
        assert flat.dtype == torch.float64 and flat.shape == b_flat.shape
        return flat + b_flat

    reduced = a.reduce(all_reduce)
    assert reduced.values(seconds=1.0) == pytest.approx({**merged.values(), "tokens_per_s": 30.0})
    assert reduced.trained_tokens == 6.0
    assert a.values() == pytest.approx({"loss": 3.0, "accuracy": 0.5, "count": 2.0}), (
        "reduce leaves the local stats as they were"
    )


def test_example_mean_of_a_per_process_value() -> None:
    """A value every process (or micro-batch) has once, e.g. KTO's z0 or an explained variance: count 1 each, so
    the logged value is their mean: (0.2 + 0.4 + 0.9) / 3 = 0.5."""
    step = Metrics()
    for value in (0.2, 0.4, 0.9):
        share = Metrics()
        share.example_mean("kl", value, 1)
        step.merge(share)
    assert step.values() == pytest.approx({"kl": 0.5})


def test_std_is_the_population_std_of_every_value() -> None:
    """Rewards 1, 2 on one process and 3, 6 on another: mean 3, E[x²] = (1+4+9+36)/4 = 12.5, std √(12.5 − 9) = √3.5
    (the mean of the two per-process stds, 0.5 and 1.5, would be 1.0)."""
    a, b = Metrics(), Metrics()
    a.std("reward_std", torch.tensor([1.0, 2.0]))
    b.std("reward_std", torch.tensor([3.0, 6.0]))
    assert a.merge(b).values()["reward_std"] == pytest.approx(math.sqrt(3.5))


def test_last_is_not_summed() -> None:
    """A value already the same on every process (PPO's KL coefficient): micro-batches and processes do not add
    up; the latest value given is logged, and the all-reduce leaves it out of the sum."""
    a, b = Metrics(), Metrics()
    a.last("kl_coef", 0.05)
    b.last("kl_coef", 0.07)
    assert a.merge(b).values() == {"kl_coef": 0.07}
    a.sum("responses", 8)
    doubled = a.reduce(lambda flat: flat * 2)  # two processes with the same numbers
    assert doubled.values() == {"kl_coef": 0.07, "responses": 16.0}


def test_a_mean_over_nothing_is_left_out() -> None:
    """KTO's undesirable rewards in a step without an undesirable example: count 0 everywhere, nothing logged
    (not 0, not NaN); a sum of 0 is still logged."""
    stats = Metrics()
    stats.example_mean("rewards/undesirable", 0.0, 0)
    stats.token_mean("loss/domain", 0.0, 0)
    stats.std("reward_std", torch.tensor([]))
    stats.sum("tokens/domain", 0)
    assert stats.values() == {"tokens/domain": 0.0}


def test_one_name_one_kind() -> None:
    stats = Metrics()
    stats.token_mean("loss", 1.0, 2)
    other = Metrics()
    other.example_mean("loss", 1.0, 1)
    with pytest.raises(ValueError, match="'loss' is recorded both as example mean and as token mean"):
        stats.merge(other)
    assert {kind.value for kind in Kind} == {"sum", "token mean", "example mean", "std", "per second", "last"}


def test_emptiness_is_what_was_recorded() -> None:
    """The runtime skips the all-reduce of an empty step; counting zero trained tokens is not empty (every
    process counts them, so all take the same branch)."""
    assert not Metrics()
    counted = Metrics()
    counted.count_trained_tokens(0)
    assert counted
