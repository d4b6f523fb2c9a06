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
    num_sequences: int = 1


def _row(sequences: list[TokenizedSequence], members: list[int]) -> Row:
    input_ids, targets, positions, sequence_ids, source_ids = [], [], [], [], []
    for index in members:
        sequence = sequences[index]
        input_ids += sequence.input_ids
        targets += sequence.targets
        positions += range(len(sequence.input_ids))
        sequence_ids += [index] * len(sequence.input_ids)
        source_ids += [sequence.source_index] * len(sequence.input_ids)
    num_targets = sum(sequences[i].num_targets for i in members)
    return Row(input_ids, targets, positions, sequence_ids, num_targets, source_ids, len(members))


def single_rows(sequences: list[TokenizedSequence], units: list[list[int]] | None = None) -> list[Row]:
    """One row per sequence, or per unit (a group of sequence indices that must share a row, e.g. the chosen and
    rejected sides of a pair, placed one after the other with restarting positions)."""
    return [_row(sequences, members) for members in (units or [[i] for i in range(len(sequences))])]


def pack_rows(sequences: list[TokenizedSequence], max_length: int, seed: int, units: list[list[int]] | None = None) -> list[Row]:
    """Best-fit-decreasing packing into rows of at most ``max_length`` tokens (ties broken by a seeded shuffle).

    ``units`` (default: each sequence alone) are groups of sequence indices that stay together in one row."""
    units = units or [[i] for i in range(len(sequences))]
    lengths = [sum(len(sequences[i].input_ids) for i in unit) for unit in units]
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda u: -lengths[u])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for unit in order:
        length = lengths[unit]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, bin_index = free.pop(slot)
        else:
            space, bin_index = max(max_length, length), len(bins)
            bins.append([])
        bins[bin_index] += units[unit]
        if space - length > 0:
            bisect.insort(free, (space - length, bin_index))
    return [_row(sequences, members) for members in bins]


def local_sequence_ids(sequence_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a batch's global sequence ids (-1 on padding) to 0..S-1 in increasing global order; padding stays -1.
    Returns the local ids and the ``(S,)`` global id of each local one.

    With the chosen and rejected sides of pair p stored as sequences 2p and 2p+1, local ids keep that layout:
    ``values.view(-1, 2)`` gives (chosen, rejected) per pair."""
    real = sequence_ids >= 0
    unique, inverse = torch.unique(sequence_ids[real], return_inverse=True)
    local = torch.full_like(sequence_ids, -1)
    local[real] = inverse
    return local, unique


def sequence_ends(local_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Flat index (into ``local_ids.view(-1)``) of each sequence's last token, ``(S,)`` in local-id order: where a
    reward model reads its score. Works for padded rows (either side) and packed rows alike."""
    flat = local_ids.reshape(-1)
    positions = torch.arange(flat.numel(), device=flat.device)
    real = flat >= 0
    ends = torch.full((num_sequences,), -1, dtype=torch.long, device=flat.device)
    return ends.scatter_reduce(0, flat[real], positions[real], reduce="amax")


def _one_sequence_per_row(rows: list[Row]) -> list[Row]:
    """Split rows that hold several sequences (a pair's two sides) into one row per sequence, in order."""
    split: list[Row] = []
    for row in rows:
        if row.num_sequences == 1:
            split.append(row)
            continue
        starts = [i for i, position in enumerate(row.position_ids) if position == 0] + [len(row.input_ids)]
        for start, end in zip(starts, starts[1:]):
            targets = row.targets[start:end]
            split.append(Row(
                row.input_ids[start:end], targets, row.position_ids[start:end], row.sequence_ids[start:end],
                sum(t != IGNORE_INDEX for t in targets), row.source_ids[start:end],
            ))
    return split


def collate(rows: list[Row], pad_token_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one. Padded mode gets an attention mask and one sequence per tensor row (a
    row that holds a pair becomes two consecutive tensor rows); packed mode gets restarting positions instead
    (and its padding forms its own segment, which trains nothing)."""
    if not packed:
        rows = _one_sequence_per_row(rows)
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


def unit_rows(units: list[tuple[TokenizedSequence, ...]], packed: bool, max_length: int, seed: int) -> list[Row]:
    """Rows that keep every unit of ``k`` sequences whole (the chosen and rejected sides of a preference pair; a
    KTO example and its mismatched completion), numbered so that unit ``u`` holds sequence ids ``k·u … k·u+k−1``:
    per-sequence values of a batch (in ``local_sequence_ids`` order) reshape to ``(units, k)``, and a row holds
    ``row.num_sequences // k`` units. Packed rows take up to ``k·max_length`` tokens, so any unit fits; padded,
    each unit is one row that ``collate`` splits into one tensor row per sequence."""
    if not units:
        return []
    k = len(units[0])
    sequences = [sequence for unit in units for sequence in unit]
    groups = [list(range(k * u, k * u + k)) for u in range(len(units))]
    return pack_rows(sequences, k * max_length, seed, groups) if packed else single_rows(sequences, groups)
