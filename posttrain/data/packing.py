"""Batching: padded rows, or packed rows holding several sequences with no attention across them.

Packed rows carry ``position_ids`` that restart at 0 for every sequence and no attention mask; transformers
(>= 4.54, ``masking_utils.find_packed_sequence_indices``) turns restarting positions into a block-diagonal
causal mask for the sdpa/eager kernels and into the varlen path for flash-attention. No token attends across
sequences, and positions are those each sequence would have alone, so a packed row computes the same per-sample
losses as padded rows (tested).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from posttrain.data.tokenize import TokenizedSequence
from posttrain.losses import IGNORE_INDEX


@dataclass
class Row:
    """One row of a micro-batch: one sequence (padded mode) or several (packed mode)."""

    input_ids: list[int]
    targets: list[int]
    position_ids: list[int]
    sequence_ids: list[int]  # index of the sequence every token belongs to
    num_targets: int
    source_ids: list[int]  # index of the data source (mixture member) of every token


def single_rows(sequences: list[TokenizedSequence]) -> list[Row]:
    return [
        Row(s.input_ids, s.targets, list(range(len(s.input_ids))), [i] * len(s.input_ids), s.num_targets, [s.source_index] * len(s.input_ids))
        for i, s in enumerate(sequences)
    ]


def pack_rows(sequences: list[TokenizedSequence], max_length: int, seed: int) -> list[Row]:
    """Best-fit-decreasing packing into rows of at most ``max_length`` tokens (ties broken by a seeded shuffle)."""
    order = list(range(len(sequences)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -len(sequences[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for index in order:
        length = len(sequences[index].input_ids)
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, bin_index = free.pop(slot)
        else:
            space, bin_index = max_length, len(bins)
            bins.append([])
        bins[bin_index].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, bin_index))
    rows = []
    for members in bins:
        input_ids, targets, positions, sequence_ids, source_ids = [], [], [], [], []
        for index in members:
            sequence = sequences[index]
            input_ids += sequence.input_ids
            targets += sequence.targets
            positions += range(len(sequence.input_ids))
            sequence_ids += [index] * len(sequence.input_ids)
            source_ids += [sequence.source_index] * len(sequence.input_ids)
        rows.append(Row(input_ids, targets, positions, sequence_ids, sum(sequences[i].num_targets for i in members), source_ids))
    return rows


def collate(rows: list[Row], pad_token_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one. Padded mode gets an attention mask; packed mode gets restarting
    positions instead (and its padding forms its own segment, which trains nothing)."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    sequence_ids = torch.full((len(rows), width), -1, dtype=torch.long)
    source_ids = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        targets[i, :n] = torch.tensor(row.targets)
        sequence_ids[i, :n] = torch.tensor(row.sequence_ids)
        source_ids[i, :n] = torch.tensor(row.source_ids)
        position_ids[i, :n] = torch.tensor(row.position_ids)
        position_ids[i, n:] = torch.arange(width - n)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "targets": targets, "sequence_ids": sequence_ids, "source_ids": source_ids}
    if packed:
        batch["position_ids"] = position_ids
    else:
        batch["attention_mask"] = attention_mask
    batch["num_real_tokens"] = attention_mask.sum()
    return batch
