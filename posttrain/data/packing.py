"""Batching: padded rows, or packed rows holding several sequences with no attention across them.

What is batched are examples (:class:`Example`: a sequence, or a unit of sequences that share a forward), drawn
by the runtime ``train.batch_size`` at a time; :func:`collate_examples` lays one micro-batch's examples out, packed
among themselves or padded. Packing therefore never changes which examples a step trains on, only how many tensor
rows they take (a larger micro-batch packs tighter).

Packed rows carry ``position_ids`` that restart at 0 for every sequence and no attention mask; transformers
(>= 4.54, ``masking_utils.find_packed_sequence_indices``) turns restarting positions into a block-diagonal
causal mask for the sdpa/eager kernels and into the varlen path for flash-attention. No token attends across
sequences, and positions are those each sequence would have alone, so a packed row computes the same per-sample
losses as padded rows (tested).

Shared prefixes. The sequences of a unit (a preference pair's chosen and rejected sides, a KTO example and its
mismatched completion) usually begin with the same prompt tokens. With ``share_prefix`` a packed unit holds that
prefix once, then each sequence's remainder (its "branch"), positions continuing from the prefix; ``collate`` then
builds the 4D boolean mask itself: causal, within a unit, and a branch sees the prefix and itself but no other
branch. Every trained token sees exactly the tokens it would see alone at the same positions, so log-probs and
rewards are unchanged (tested) while the prompt's forward and backward are paid once per unit instead of once per
sequence (about a third of the tokens of short chat pairs). Only kernels that take a dense mask can do this (sdpa);
flash-attention's varlen path has no way to express a branch.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Mapping, Sequence
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
    # Shared-prefix rows only: 0 on a unit's shared prefix, i + 1 on the branch of the unit's i-th sequence.
    branch_ids: list[int] | None = None


def shared_prefix_length(unit: list[TokenizedSequence]) -> int:
    """How many leading tokens every sequence of ``unit`` can compute once: their common prefix, cut at the first
    trained position of any of them (a trained position predicts its own sequence's next token, so it must sit
    in that sequence's branch). Every branch keeps at least its first trained position. 0 for a lone sequence."""
    if len(unit) < 2:
        return 0
    limit = min(
        min(next((i for i, t in enumerate(s.targets) if t != IGNORE_INDEX), len(s.targets)), len(s.input_ids) - 1)
        for s in unit
    )
    first, others = unit[0].input_ids, [s.input_ids for s in unit[1:]]
    length = 0
    while length < limit and all(length < len(o) and o[length] == first[length] for o in others):
        length += 1
    return length


def _row(sequences: Sequences, units: list[list[int]], shared: list[int] | None = None) -> Row:
    """A row holding ``units`` (lists of sequence indices) one after the other; ``shared[u]`` leading tokens of
    unit ``u`` are held once (its shared prefix, owned by the unit's first sequence)."""
    input_ids, targets, positions, sequence_ids, source_ids = [], [], [], [], []
    branch_ids: list[int] | None = [] if shared is not None else None
    for unit_index, members in enumerate(units):
        prefix = shared[unit_index] if shared is not None else 0
        for branch, index in enumerate(members):
            sequence = sequences[index]
            start = prefix if branch else 0  # the first sequence carries the prefix
            n = len(sequence.input_ids) - start
            input_ids += sequence.input_ids[start:]
            targets += sequence.targets[start:]
            positions += range(start, len(sequence.input_ids))
            sequence_ids += [index] * n
            source_ids += [sequence.source_index] * n
            if branch_ids is not None:
                branch_ids += [0] * (prefix - start) + [branch + 1] * (len(sequence.input_ids) - prefix)
    members = [index for unit in units for index in unit]
    num_targets = sum(sequences[i].num_targets for i in members)
    return Row(input_ids, targets, positions, sequence_ids, num_targets, source_ids, len(members), branch_ids)


# Sequences are looked up by their id: a list (ids 0…n−1) or a mapping from the ids a batch's examples own.
Sequences = Sequence[TokenizedSequence] | Mapping[int, TokenizedSequence]


def single_rows(sequences: Sequences, units: list[list[int]] | None = None) -> list[Row]:
    """One row per sequence, or per unit (a group of sequence indices that must share a row, e.g. the chosen and
    rejected sides of a pair, placed one after the other with restarting positions)."""
    return [_row(sequences, [members]) for members in (units or [[i] for i in range(len(sequences))])]


def pack_rows(
    sequences: Sequences,
    max_length: int,
    seed: int,
    units: list[list[int]] | None = None,
    share_prefix: bool = False,
) -> list[Row]:
    """Best-fit-decreasing packing into rows of at most ``max_length`` tokens (ties broken by a seeded shuffle).

    ``units`` (default: each sequence alone) are groups of sequence indices that stay together in one row; with
    ``share_prefix`` each holds its sequences' shared prefix once (module docstring)."""
    units = units or [[i] for i in range(len(sequences))]
    shared = [shared_prefix_length([sequences[i] for i in unit]) for unit in units] if share_prefix else None
    lengths = [
        sum(len(sequences[i].input_ids) for i in unit) - (len(unit) - 1) * (shared[u] if shared else 0)
        for u, unit in enumerate(units)
    ]
    order = list(range(len(units)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda u: -lengths[u])
    return [
        _row(sequences, [units[u] for u in members], [shared[u] for u in members] if shared else None)
        for members in best_fit(lengths, order, max_length)
    ]


def best_fit(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: each item of ``order`` in turn goes to the open bin it fills best, or opens a new one
    (of ``capacity``, or its own length when longer). With ``order`` by decreasing length: best-fit-decreasing."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin index)
    for item in order:
        length = lengths[item]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, bin_index = free.pop(slot)
        else:
            space, bin_index = max(capacity, length), len(bins)
            bins.append([])
        bins[bin_index].append(item)
        if space - length > 0:
            bisect.insort(free, (space - length, bin_index))
    return bins


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


def _segments(row: Row) -> list[Row]:
    """A packed row cut where positions restart at 0: its units (or, in a unit with nothing shared, its
    sequences), none of which attends to another."""
    starts = [i for i, position in enumerate(row.position_ids) if position == 0] + [len(row.input_ids)]
    return [_slice(row, start, end) for start, end in zip(starts, starts[1:])]


def _slice(row: Row, start: int, end: int) -> Row:
    targets = row.targets[start:end]
    return Row(
        row.input_ids[start:end],
        targets,
        row.position_ids[start:end],
        row.sequence_ids[start:end],
        sum(t != IGNORE_INDEX for t in targets),
        row.source_ids[start:end],
        len(set(row.sequence_ids[start:end])),
        row.branch_ids[start:end] if row.branch_ids is not None else None,
    )


def _joined(parts: list[Row]) -> Row:
    joined = Row([], [], [], [], 0, [], 0, [] if any(p.branch_ids is not None for p in parts) else None)
    for part in parts:
        joined.input_ids += part.input_ids
        joined.targets += part.targets
        joined.position_ids += part.position_ids
        joined.sequence_ids += part.sequence_ids
        joined.source_ids += part.source_ids
        joined.num_targets += part.num_targets
        joined.num_sequences += part.num_sequences
        if joined.branch_ids is not None:
            joined.branch_ids += part.branch_ids if part.branch_ids is not None else [0] * len(part.input_ids)
    return joined


# Dense-mask rows are re-cut to about this many segments (units) each, and at most this many tokens unless one
# segment is longer; see _narrow_rows.
SEGMENTS_PER_DENSE_ROW = 4
DENSE_ROW_TOKENS = 256


def _narrow_rows(rows: list[Row]) -> list[Row]:
    """The same tokens in narrower tensor rows, for a batch whose mask ``collate`` builds densely.

    A dense mask makes attention cost the row's length squared, however little of it is visible: a 508-token
    row of 20 short units scores 508² key pairs per head where its units alone would score 20 × 25². So the
    batch's units are re-packed (best-fit-decreasing, each unit whole) into rows of about four units' length
    (at most 256 tokens: past that, attention's share of the work grows faster than the padding it saves), or
    the longest unit, which cuts that waste about fivefold for a few percent of padding. Only the tensor
    layout changes: the batch holds the same units and the same tokens see the same tokens, so losses, batch
    sizes and everything the recipes compute are those of the rows as packed (and long units, which fill a row
    on their own, are left as they are)."""
    segments = [segment for row in rows for segment in _segments(row)]
    lengths = [len(segment.input_ids) for segment in segments]
    width = max(max(lengths), min(round(SEGMENTS_PER_DENSE_ROW * sum(lengths) / len(lengths)), DENSE_ROW_TOKENS))
    if width >= max(len(row.input_ids) for row in rows):
        return rows
    order = sorted(range(len(segments)), key=lambda i: -lengths[i])
    return [_joined([segments[i] for i in sorted(members)]) for members in best_fit(lengths, order, width)]


def collate(rows: list[Row], pad_token_id: int, packed: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one. Padded mode gets an attention mask and one sequence per tensor row (a
    row that holds a pair becomes two consecutive tensor rows); packed mode gets restarting positions instead
    (and its padding forms its own segment, which trains nothing). Rows with shared prefixes get the 4D mask of
    ``shared_prefix_mask``, in narrower tensor rows (``_narrow_rows``)."""
    dense_mask = packed and any(row.branch_ids is not None for row in rows)
    if dense_mask:
        rows = _narrow_rows(rows)
    if not packed:  # a row that holds several sequences (a pair's two sides) becomes one tensor row per sequence
        rows = [segment for row in rows for segment in (_segments(row) if row.num_sequences > 1 else [row])]
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
        if dense_mask:
            branch_ids = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                if row.branch_ids is not None:
                    branch_ids[i, : len(row.branch_ids)] = torch.tensor(row.branch_ids)
            batch["attention_mask"] = shared_prefix_mask(position_ids, branch_ids)
    else:
        batch["attention_mask"] = attention_mask
    batch["num_real_tokens"] = attention_mask.sum()
    return batch


def shared_prefix_mask(position_ids: torch.Tensor, branch_ids: torch.Tensor) -> torch.Tensor:
    """``(B, 1, L, L)`` boolean attention mask (True: attend) of packed rows whose units may share a prefix.

    A unit starts where positions restart at 0 (so does the padding at a row's end, which then attends only to
    itself). Query q sees key k when k is not after q, both lie in the same unit, and k is on the shared prefix
    (branch 0) or on q's own branch; the causal order already hides later branches from earlier ones."""
    units = (position_ids == 0).long().cumsum(-1)
    width = position_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=position_ids.device).tril()
    same_unit = units[:, :, None] == units[:, None, :]
    visible_branch = (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    return (causal & same_unit & visible_branch)[:, None]


@dataclass(frozen=True)
class Example:
    """One training example, the thing ``train.batch_size`` counts: a unit of ``k`` sequences that always share a
    forward (an SFT or pretraining sequence alone; a preference pair's chosen and rejected sides; a KTO example and
    its mismatched completion). Its sequences are numbered ``k·index … k·index+k−1`` in every batch that holds it,
    whatever else the batch holds, so per-sequence tables (cached reference log-probs, labels, margins) index the
    same way in any layout."""

    index: int
    sequences: tuple[TokenizedSequence, ...]

    @property
    def num_targets(self) -> int:
        return sum(sequence.num_targets for sequence in self.sequences)


def examples_of(units: Sequence[TokenizedSequence | tuple[TokenizedSequence, ...]]) -> list[Example]:
    """Number ``units`` (sequences, or tuples of ``k`` sequences) as examples ``0 … len(units)−1``."""
    return [Example(index, unit if isinstance(unit, tuple) else (unit,)) for index, unit in enumerate(units)]


def example_rows(
    examples: Sequence[Example], packed: bool, max_length: int, seed: int, share_prefix: bool = False
) -> list[Row]:
    """Rows holding exactly ``examples``, each whole: packed (best-fit into rows of ``k·max_length`` tokens, so
    any unit fits; ``share_prefix`` holds a unit's shared prefix once) or one row per example (``collate`` splits
    a ``k``-sequence row into one tensor row per sequence). Only the layout depends on ``packed``: the examples,
    their sequence ids and every per-sequence value computed from them do not."""
    if not examples:
        return []
    k = len(examples[0].sequences)
    by_id = {k * example.index + j: sequence for example in examples for j, sequence in enumerate(example.sequences)}
    units = [[k * example.index + j for j in range(k)] for example in examples]
    if packed:
        return pack_rows(by_id, k * max_length, seed, units, share_prefix)
    return single_rows(by_id, units)


def collate_examples(
    examples: list[Example], pad_token_id: int, packed: bool, max_length: int, seed: int, share_prefix: bool = False
) -> dict[str, torch.Tensor]:
    """The batch of ``examples``: laid out by :func:`example_rows`, then :func:`collate`; ``num_examples`` counts
    them (what the runtime logs per step as ``examples``)."""
    batch = collate(example_rows(examples, packed, max_length, seed, share_prefix), pad_token_id, packed)
    batch["num_examples"] = torch.tensor(len(examples))
    return batch


def unit_rows(
    units: list[tuple[TokenizedSequence, ...]], packed: bool, max_length: int, seed: int, share_prefix: bool = False
) -> list[Row]:
    """Rows that keep every unit of ``k`` sequences whole (the chosen and rejected sides of a preference pair; a
    KTO example and its mismatched completion), numbered so that unit ``u`` holds sequence ids ``k·u … k·u+k−1``:
    per-sequence values of a batch (in ``local_sequence_ids`` order) reshape to ``(units, k)``, and a row holds
    ``row.num_sequences // k`` units. Packed rows take up to ``k·max_length`` tokens, so any unit fits; padded,
    each unit is one row that ``collate`` splits into one tensor row per sequence. ``share_prefix`` (packed only)
    holds each unit's shared prefix once (module docstring)."""
    return example_rows(examples_of(units), packed, max_length, seed, share_prefix)
