"""Agreement between human annotators of pairwise preferences, as pure functions over plain sequences (numpy only).

Ratings are ``(item_id, annotator, value)`` triples: one value per annotator and item, from ``categories`` (the
Llama 2 8-point scale 1..8 in ``posttrain label``: 1 = A much better ... 8 = B much better). Missing data is the
normal case (overlap K < the number of annotators), so every coefficient takes whatever overlap there is:

* ``cohens_kappa``: two named annotators over the items both rated (Cohen 1960; weighted, Cohen 1968).
* ``fleiss_kappa``: any number of annotators, nominal, over the items rated at least twice (Fleiss 1971).
* ``krippendorff_alpha``: any number of annotators, nominal / ordinal / interval, built on the coincidence matrix
  (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"); ordinal is the scale's natural level.
* ``gwet_ac1``: Gwet's first-order agreement coefficient (Gwet 2008), which stays meaningful when nearly every
  rating falls in one category, where kappa and alpha collapse (the "kappa paradox").
* ``gold_accuracy`` against hidden gold items, and ``position_bias``: how often the response shown on the left won.

Convention for undefined coefficients: when chance agreement is already perfect (every pairable rating in one
category) kappa and alpha are 0/0; they return ``nan``, as scikit-learn's ``cohen_kappa_score``, statsmodels'
``fleiss_kappa`` and the ``krippendorff`` package do. AC1 is defined there (it gives 1.0). Invalid input raises
``ValueError`` with one line naming the item and annotator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from statistics import NormalDist

import numpy as np

Rating = tuple[str, str, int]
"""``(item_id, annotator, value)``; the value is on the item's canonical A/B orientation, not the screen's."""

LEVELS = ("nominal", "ordinal", "interval")

KAPPA_WEIGHTS: dict[str | None, Callable[[np.ndarray], np.ndarray]] = {
    None: lambda offset: (offset != 0).astype(float),
    "linear": lambda offset: np.abs(offset).astype(float),
    "quadratic": lambda offset: offset.astype(float) ** 2,
}
"""Cohen's kappa disagreement weight as a function of the distance between two categories' positions."""


def cohens_kappa(
    ratings: Iterable[Rating], first: str, second: str, categories: Sequence[int], *, weights: str | None = None
) -> float:
    """Cohen's kappa between annotators ``first`` and ``second`` over the items both of them rated.

    κ = 1 − Σ w_ij o_ij / Σ w_ij e_ij, with o the two annotators' joint distribution over ``categories``, e the
    product of its margins (each annotator keeps their own marginal: Cohen 1960), and w the disagreement weights:
    0 on the diagonal and 1 elsewhere (plain kappa), |i − j| (``weights="linear"``) or (i − j)² (``"quadratic"``,
    Cohen 1968), i and j being positions in ``categories``. This is scikit-learn's ``cohen_kappa_score`` with
    ``labels=categories``; ``nan`` when e puts all its mass on agreement (both always chose the same one category).
    """
    if first == second:
        raise ValueError(f"cohens_kappa compares two different annotators, got {first!r} twice")
    if weights not in KAPPA_WEIGHTS:
        raise ValueError(f"weights must be None, 'linear' or 'quadratic', got {weights!r}")
    rows = _validated(ratings, categories)
    first_values = {item_id: value for item_id, annotator, value in rows if annotator == first}
    second_values = {item_id: value for item_id, annotator, value in rows if annotator == second}
    for name, values in ((first, first_values), (second, second_values)):
        if not values:
            raise ValueError(f"annotator {name!r} has no ratings (annotators seen: {_annotators(rows)})")
    common = first_values.keys() & second_values.keys()
    if not common:
        raise ValueError(f"annotators {first!r} and {second!r} rated no item in common; Cohen's kappa needs overlap")
    position = {category: index for index, category in enumerate(categories)}
    joint = np.zeros((len(categories), len(categories)))
    for item_id in common:
        joint[position[first_values[item_id]], position[second_values[item_id]]] += 1
    joint /= len(common)
    chance = np.outer(joint.sum(axis=1), joint.sum(axis=0))
    disagreement = KAPPA_WEIGHTS[weights](np.subtract.outer(np.arange(len(categories)), np.arange(len(categories))))
    expected_disagreement = float((disagreement * chance).sum())
    if expected_disagreement == 0.0:
        return math.nan
    return 1.0 - float((disagreement * joint).sum()) / expected_disagreement


def fleiss_kappa(ratings: Iterable[Rating], categories: Sequence[int]) -> float:
    """Fleiss' kappa over the items rated by at least 2 annotators (nominal categories).

    κ = (P_a − P_e) / (1 − P_e), where P_a is the mean over items of the share of agreeing rater pairs,
    Σ_k r_ik (r_ik − 1) / (r_i (r_i − 1)) with r_ik the item's ratings in category k and r_i its ratings, and
    P_e = Σ_k π_k² with π_k the mean over items of r_ik / r_i (Fleiss 1971, eqs. 2-9). Fleiss assumed the same
    number of raters on every item; with unequal numbers this is the generalisation in Gwet's Handbook of
    Inter-Rater Reliability (every item weighs the same in P_a and π), equal to Fleiss' for complete data and to
    the multi-rater Scott's pi of the ``agreement`` package. Items rated once are left out of P_a and π alike
    (Gwet's irrCAC keeps them in π: 0.7612 against 0.7625 here on Krippendorff's 4-coder example).
    ``nan`` when P_e = 1 (every rating in one category).
    """
    counts = _pairable(_category_counts(_validated(ratings, categories), categories))
    observed = _observed_agreement(counts)
    prevalence = (counts / counts.sum(axis=1, keepdims=True)).mean(axis=0)
    chance = float((prevalence**2).sum())
    if chance >= 1.0 - 1e-12:
        return math.nan
    return (observed - chance) / (1.0 - chance)


def krippendorff_alpha(ratings: Iterable[Rating], categories: Sequence[int], level: str = "ordinal") -> float:
    """Krippendorff's alpha with missing data, at the ``nominal``, ``ordinal`` or ``interval`` level.

    α = 1 − (n − 1) Σ_ck o_ck δ²_ck / Σ_ck n_c n_k δ²_ck (Krippendorff 2011). The coincidence matrix
    o_ck = Σ_u r_uc (r_uk − [c = k]) / (m_u − 1) counts, over the pairable units u (m_u ≥ 2 values; units with
    one value are not pairable and are left out), every ordered pair of values from different annotators;
    n_c = Σ_k o_ck and n = Σ_c n_c. The metric δ² is [c ≠ k] (nominal); (c − k)² (interval); and for the ordinal
    level (Σ_{g=c..k} n_g − (n_c + n_k)/2)², over the categories in increasing order, i.e. the squared distance
    between the two categories' mid-ranks among all pairable values. Unused categories get n_g = 0 and change
    nothing. ``nan`` when the expected disagreement is 0 (all pairable values in one category), as the
    ``krippendorff`` package.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
    scale = sorted(categories)
    counts = _pairable(_category_counts(_validated(ratings, categories), scale))
    pair_weights = counts / (counts.sum(axis=1, keepdims=True) - 1)
    coincidences = pair_weights.T @ counts - np.diag(pair_weights.sum(axis=0))
    category_totals = coincidences.sum(axis=1)
    if level == "nominal":
        squared_distance = 1.0 - np.eye(len(scale))
    else:
        positions = np.asarray(scale, dtype=float)
        if level == "ordinal":
            positions = np.cumsum(category_totals) - category_totals / 2  # mid-ranks of the pooled values
        squared_distance = np.subtract.outer(positions, positions) ** 2
    expected = float((np.outer(category_totals, category_totals) * squared_distance).sum())
    if expected == 0.0:
        return math.nan
    observed = float((coincidences * squared_distance).sum())
    return 1.0 - (category_totals.sum() - 1.0) * observed / expected


def gwet_ac1(ratings: Iterable[Rating], categories: Sequence[int]) -> float:
    """Gwet's AC1 over any number of annotators with missing data.

    AC1 = (P_a − P_e) / (1 − P_e) with the same P_a as ``fleiss_kappa`` (items rated at least twice), and chance
    agreement P_e = Σ_k π_k (1 − π_k) / (q − 1), q = len(categories), π_k the mean over every rated item (items
    rated once included) of r_ik / r_i (Gwet 2008, "Computing inter-rater reliability and its variance in the
    presence of high agreement"; the missing-data form of his Handbook, as in his irrCAC package). P_e ≤ 1/q, so
    AC1 is always defined: 1.0 when every rating falls in one category.
    """
    all_counts = _category_counts(_validated(ratings, categories), categories)
    observed = _observed_agreement(_pairable(all_counts))
    prevalence = (all_counts / all_counts.sum(axis=1, keepdims=True)).mean(axis=0)
    chance = float((prevalence * (1.0 - prevalence)).sum()) / (len(categories) - 1)
    return (observed - chance) / (1.0 - chance)


def prefers_same_response(value: int, gold: int) -> bool:
    """Gold agreement on the 8-point scale: both values prefer the same response (1-4 A, 5-8 B), any degree."""
    return (value <= 4) == (gold <= 4)


def gold_accuracy(
    ratings: Iterable[Rating], gold: Mapping[str, int], agree: Callable[[int, int], bool] | None = None
) -> dict[str, tuple[int, int]]:
    """Each annotator's ``(correct, total)`` on the hidden gold items they rated.

    ``agree(value, gold_value)`` decides correctness; by default ``prefers_same_response`` (the degree on the
    8-point scale is a judgement call, the side is not). Annotators who met no gold item get ``(0, 0)``.
    """
    agrees = agree or prefers_same_response
    scores: dict[str, tuple[int, int]] = {}
    rated: set[tuple[str, str]] = set()
    for item_id, annotator, value in ratings:
        _check_once(item_id, annotator, rated)
        correct, total = scores.get(annotator, (0, 0))
        if item_id in gold:
            correct, total = correct + bool(agrees(value, gold[item_id])), total + 1
        scores[annotator] = (correct, total)
    return scores


def position_bias(shown_first_chosen: Sequence[bool], confidence: float = 0.95) -> tuple[float, float, float]:
    """The share of votes that went to the response shown first (left), with its Wilson score interval.

    An unbiased annotator pool gives 0.5 with left/right randomised; an interval that excludes 0.5 means the
    screen position sways the votes. Wilson (1927): (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n),
    z the normal quantile of (1 + confidence)/2; unlike the normal approximation it stays inside [0, 1] and is
    sound for shares near 0 or 1 and for small n.
    """
    votes = len(shown_first_chosen)
    if votes == 0:
        raise ValueError("position_bias needs at least one vote")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    share = sum(bool(chosen) for chosen in shown_first_chosen) / votes
    z = NormalDist().inv_cdf((1.0 + confidence) / 2.0)
    centre = (share + z * z / (2 * votes)) / (1 + z * z / votes)
    half_width = z / (1 + z * z / votes) * math.sqrt(share * (1 - share) / votes + z * z / (4 * votes * votes))
    return share, max(0.0, centre - half_width), min(1.0, centre + half_width)


def _validated(ratings: Iterable[Rating], categories: Sequence[int]) -> list[Rating]:
    """The ratings as a list, after checking the scale, the values, one rating per (item, annotator), ≥ 2 annotators."""
    scale = list(categories)
    if len(scale) < 2 or len(set(scale)) != len(scale):
        raise ValueError(f"categories must be at least 2 distinct values, got {scale}")
    allowed = set(scale)
    rows: list[Rating] = []
    rated: set[tuple[str, str]] = set()
    for item_id, annotator, value in ratings:
        if isinstance(value, bool) or value not in allowed:
            raise ValueError(f"item {item_id!r}, annotator {annotator!r}: value {value!r} is not one of {scale}")
        _check_once(item_id, annotator, rated)
        rows.append((item_id, annotator, value))
    if len(_annotators(rows)) < 2:
        raise ValueError(f"agreement needs ratings from at least 2 annotators, got {_annotators(rows)}")
    return rows


def _check_once(item_id: str, annotator: str, rated: set[tuple[str, str]]) -> None:
    if (item_id, annotator) in rated:
        raise ValueError(f"item {item_id!r}, annotator {annotator!r}: rated twice; keep one rating per item")
    rated.add((item_id, annotator))


def _annotators(rows: Iterable[Rating]) -> list[str]:
    return sorted({annotator for _, annotator, _ in rows})


def _category_counts(rows: Sequence[Rating], categories: Sequence[int]) -> np.ndarray:
    """``counts[i, k]``: how many annotators put the i-th rated item in ``categories[k]`` (rows: rated items)."""
    position = {category: index for index, category in enumerate(categories)}
    row_of_item: dict[str, int] = {}
    for item_id, _, _ in rows:
        row_of_item.setdefault(item_id, len(row_of_item))
    counts = np.zeros((len(row_of_item), len(position)))
    for item_id, _, value in rows:
        counts[row_of_item[item_id], position[value]] += 1
    return counts


def _pairable(counts: np.ndarray) -> np.ndarray:
    """The items rated by at least 2 annotators: only they can agree or disagree."""
    pairable = counts[counts.sum(axis=1) >= 2]
    if len(pairable) == 0:
        raise ValueError(
            "no item was rated by 2 or more annotators; agreement needs overlap (label serve --overlap 2+)"
        )
    return pairable


def _observed_agreement(counts: np.ndarray) -> float:
    """Mean over items of the share of annotator pairs that chose the same category."""
    ratings_per_item = counts.sum(axis=1)
    agreeing_pairs = (counts * (counts - 1)).sum(axis=1)
    return float((agreeing_pairs / (ratings_per_item * (ratings_per_item - 1))).mean())
