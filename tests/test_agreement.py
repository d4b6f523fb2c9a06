"""Agreement coefficients and arena ratings against reference implementations and published worked examples.

References (dev dependencies, used only here): scikit-learn's ``cohen_kappa_score`` and ``LogisticRegression``
(the solver of Chatbot Arena's ``compute_mle_elo``), statsmodels' ``fleiss_kappa`` and ``proportion_confint``, the
``krippendorff`` package, and the ``agreement`` package's multi-rater Scott's pi (= Fleiss' kappa with missing
data) and Gwet's gamma (AC1). Gwet's own irrCAC pins scipy==1.12 and pandas<3, which this project cannot install
beside its own pins, so its published outputs are quoted as numbers instead.
"""

from __future__ import annotations

import math
import random

import krippendorff
import numpy as np
import pytest
from agreement.metrics import gwets_gamma, scotts_pi
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import fleiss_kappa as statsmodels_fleiss_kappa
from statsmodels.stats.proportion import proportion_confint

from posttrain.feedback.agreement import (
    LEVELS,
    cohens_kappa,
    fleiss_kappa,
    gold_accuracy,
    gwet_ac1,
    krippendorff_alpha,
    position_bias,
)
from posttrain.feedback.ratings import bootstrap_intervals, bradley_terry

SCALE = list(range(1, 9))  # Llama 2's 8-point scale

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4-coder, 12-unit example with missing
# values (None); unit 12 has a single value and is not pairable. Gwet's Handbook uses the same data (irrCAC's
# raw_4raters).
KRIPPENDORFF_CODERS = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}
KRIPPENDORFF_RATINGS = [
    (f"unit{unit}", coder, value)
    for coder, values in KRIPPENDORFF_CODERS.items()
    for unit, value in enumerate(values, start=1)
    if value is not None
]

# Fleiss (1971): 30 patients, each given one of 5 diagnoses by 6 psychiatrists (not the same 6 for every patient,
# which Fleiss' kappa allows); the paper's kappa is 0.430. The same table is in statsmodels' own tests.
FLEISS_1971_DIAGNOSES = [
    [4, 4, 4, 4, 4, 4], [2, 2, 2, 5, 5, 5], [2, 3, 3, 3, 3, 5], [5, 5, 5, 5, 5, 5], [2, 2, 2, 4, 4, 4],
    [1, 1, 3, 3, 3, 3], [3, 3, 3, 3, 5, 5], [1, 1, 3, 3, 3, 4], [1, 1, 4, 4, 4, 4], [5, 5, 5, 5, 5, 5],
    [1, 4, 4, 4, 4, 4], [1, 2, 4, 4, 4, 4], [2, 2, 2, 3, 3, 3], [1, 4, 4, 4, 4, 4], [2, 2, 4, 4, 4, 5],
    [3, 3, 3, 3, 3, 5], [1, 1, 1, 4, 5, 5], [1, 1, 1, 1, 1, 2], [2, 2, 4, 4, 4, 4], [1, 3, 3, 5, 5, 5],
    [5, 5, 5, 5, 5, 5], [2, 4, 4, 4, 4, 4], [2, 2, 4, 5, 5, 5], [1, 1, 4, 4, 4, 4], [1, 4, 4, 4, 4, 5],
    [2, 2, 2, 2, 2, 4], [1, 1, 1, 1, 5, 5], [2, 2, 4, 4, 4, 4], [1, 3, 3, 3, 3, 3], [5, 5, 5, 5, 5, 5],
]  # fmt: skip


def noisy_scale_ratings(seed: int = 0, items: int = 40, annotators: int = 5) -> list[tuple[str, str, int]]:
    """Labels on the 8-point scale with missing data: each item has a true preference, seen by 1 to 4 annotators
    (so some items are rated once and are not pairable) who each add their own noise and their own lean."""
    generator = np.random.default_rng(seed)
    names = [f"ann{index}" for index in range(annotators)]
    lean = generator.normal(0.0, 0.7, annotators)
    ratings = []
    for item in range(items):
        truth = generator.uniform(1, 8)
        for annotator in generator.choice(
            annotators, size=generator.integers(1, min(annotators, 4) + 1), replace=False
        ):
            value = int(np.clip(round(truth + lean[annotator] + generator.normal(0.0, 1.2)), 1, 8))
            ratings.append((f"item{item}", names[annotator], value))
    return ratings


def reliability_matrix(ratings, categories) -> tuple[np.ndarray, np.ndarray]:
    """The references' inputs: annotators × items values (nan = missing) and items × categories counts."""
    items = sorted({item for item, _, _ in ratings})
    annotators = sorted({annotator for _, annotator, _ in ratings})
    values = np.full((len(annotators), len(items)), np.nan)
    counts = np.zeros((len(items), len(categories)))
    for item, annotator, value in ratings:
        values[annotators.index(annotator), items.index(item)] = value
        counts[items.index(item), list(categories).index(value)] += 1
    return values, counts


# --- published worked examples -------------------------------------------------------------------------------


def test_fleiss_1971_table_gives_the_papers_kappa_and_statsmodels_value() -> None:
    ratings = [
        (f"patient{patient}", f"rater{slot}", diagnosis)
        for patient, diagnoses in enumerate(FLEISS_1971_DIAGNOSES)
        for slot, diagnosis in enumerate(diagnoses)
    ]
    kappa = fleiss_kappa(ratings, categories=[1, 2, 3, 4, 5])
    assert round(kappa, 3) == 0.430
    table = np.array([[row.count(category) for category in range(1, 6)] for row in FLEISS_1971_DIAGNOSES])
    assert kappa == pytest.approx(statsmodels_fleiss_kappa(table, method="fleiss"), abs=1e-6)


@pytest.mark.parametrize(("level", "published"), [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849)])
def test_krippendorff_canonical_example_matches_the_paper_and_the_package(level: str, published: float) -> None:
    alpha = krippendorff_alpha(KRIPPENDORFF_RATINGS, categories=[1, 2, 3, 4, 5], level=level)
    assert round(alpha, 3) == published
    values, _ = reliability_matrix(KRIPPENDORFF_RATINGS, [1, 2, 3, 4, 5])
    reference = krippendorff.alpha(reliability_data=values, level_of_measurement=level, value_domain=[1, 2, 3, 4, 5])
    assert alpha == pytest.approx(reference, abs=1e-6)


def test_gwet_ac1_on_the_handbook_example() -> None:
    """Gwet's Handbook (and irrCAC's documented output on raw_4raters): AC1 = 0.77544, P_a = 0.81818."""
    ac1 = gwet_ac1(KRIPPENDORFF_RATINGS, categories=[1, 2, 3, 4, 5])
    assert round(ac1, 5) == 0.77544
    _, counts = reliability_matrix(KRIPPENDORFF_RATINGS, [1, 2, 3, 4, 5])
    assert ac1 == pytest.approx(gwets_gamma(counts), abs=1e-6)


# --- every statistic against its reference on missing data with 5 annotators --------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_annotator_statistics_match_references_with_missing_data(seed: int) -> None:
    ratings = noisy_scale_ratings(seed)
    values, counts = reliability_matrix(ratings, SCALE)
    assert (counts.sum(axis=1) == 1).any() and (counts.sum(axis=1) >= 3).any()  # the fixture has what we claim
    pairable = counts[counts.sum(axis=1) >= 2]
    assert fleiss_kappa(ratings, SCALE) == pytest.approx(scotts_pi(pairable), abs=1e-6)
    assert gwet_ac1(ratings, SCALE) == pytest.approx(gwets_gamma(counts), abs=1e-6)
    for level in LEVELS:
        reference = krippendorff.alpha(reliability_data=values, level_of_measurement=level, value_domain=SCALE)
        assert krippendorff_alpha(ratings, SCALE, level=level) == pytest.approx(reference, abs=1e-6)


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohens_kappa_matches_sklearn_on_each_pairs_common_items(weights: str | None) -> None:
    ratings = noisy_scale_ratings(seed=3, items=80, annotators=3)
    by_annotator: dict[str, dict[str, int]] = {}
    for item, annotator, value in ratings:
        by_annotator.setdefault(annotator, {})[item] = value
    for first, second in [("ann0", "ann1"), ("ann0", "ann2"), ("ann1", "ann2")]:
        common = sorted(by_annotator[first].keys() & by_annotator[second].keys())
        assert 10 < len(common) < len(by_annotator[first])  # overlap, with missing data on both sides
        reference = cohen_kappa_score(
            [by_annotator[first][item] for item in common],
            [by_annotator[second][item] for item in common],
            labels=SCALE,
            weights=weights,
        )
        assert cohens_kappa(ratings, first, second, SCALE, weights=weights) == pytest.approx(reference, abs=1e-6)


def test_fleiss_kappa_equals_statsmodels_on_complete_data() -> None:
    generator = np.random.default_rng(4)
    ratings = [(f"item{item}", f"ann{a}", int(generator.integers(1, 4))) for item in range(25) for a in range(4)]
    _, counts = reliability_matrix(ratings, [1, 2, 3])
    assert fleiss_kappa(ratings, [1, 2, 3]) == pytest.approx(statsmodels_fleiss_kappa(counts), abs=1e-6)


# --- properties -------------------------------------------------------------------------------------------------


def test_order_of_ratings_and_names_of_annotators_and_items_do_not_matter() -> None:
    ratings = noisy_scale_ratings(seed=5)
    renamed = {f"ann{index}": name for index, name in enumerate(["zoe", "bob", "amy", "kim", "eli"])}
    shuffled = [(f"x-{item[::-1]}", renamed[annotator], value) for item, annotator, value in ratings]
    random.Random(0).shuffle(shuffled)
    assert fleiss_kappa(shuffled, SCALE) == pytest.approx(fleiss_kappa(ratings, SCALE), abs=1e-12)
    assert gwet_ac1(shuffled, SCALE) == pytest.approx(gwet_ac1(ratings, SCALE), abs=1e-12)
    for level in LEVELS:
        expected = krippendorff_alpha(ratings, SCALE, level)
        assert krippendorff_alpha(shuffled, SCALE, level) == pytest.approx(expected, abs=1e-12)
    kappa = cohens_kappa(ratings, "ann0", "ann1", SCALE)
    assert cohens_kappa(shuffled, "bob", "zoe", SCALE) == pytest.approx(kappa, abs=1e-12)


def test_cohen_equals_fleiss_for_two_annotators_only_when_their_marginals_match() -> None:
    """With two annotators Fleiss' kappa is Scott's pi, whose chance term uses the pooled marginal; Cohen's uses
    each annotator's own. They coincide exactly when both annotators used the categories equally often."""
    same_marginals = [("i1", "x", 1), ("i1", "y", 2), ("i2", "x", 2), ("i2", "y", 1), ("i3", "x", 1)]
    same_marginals += [("i3", "y", 1), ("i4", "x", 3), ("i4", "y", 3), ("i5", "x", 3), ("i5", "y", 3)]
    assert cohens_kappa(same_marginals, "x", "y", [1, 2, 3]) == pytest.approx(fleiss_kappa(same_marginals, [1, 2, 3]))
    skewed = [("i1", "x", 1), ("i1", "y", 1), ("i2", "x", 1), ("i2", "y", 2), ("i3", "x", 1), ("i3", "y", 2)]
    skewed += [("i4", "x", 2), ("i4", "y", 2)]
    assert cohens_kappa(skewed, "x", "y", [1, 2]) != pytest.approx(fleiss_kappa(skewed, [1, 2]))


def test_one_category_everywhere_gives_nan_kappa_and_alpha_as_the_references_but_ac1_one() -> None:
    ratings = [(f"item{item}", annotator, 5) for item in range(6) for annotator in ("x", "y", "z")]
    values, counts = reliability_matrix(ratings, SCALE)
    with pytest.warns(RuntimeWarning):  # the references divide 0 by 0
        assert math.isnan(statsmodels_fleiss_kappa(counts))
        assert math.isnan(
            krippendorff.alpha(reliability_data=values, level_of_measurement="ordinal", value_domain=SCALE)
        )
    assert math.isnan(fleiss_kappa(ratings, SCALE))
    assert math.isnan(krippendorff_alpha(ratings, SCALE, "ordinal"))
    assert math.isnan(cohens_kappa(ratings, "x", "y", SCALE))
    with pytest.warns(UserWarning):
        assert math.isnan(cohen_kappa_score([5] * 6, [5] * 6, labels=SCALE))
    assert gwet_ac1(ratings, SCALE) == 1.0 == gwets_gamma(counts)


def test_perfect_agreement_on_varied_labels_is_one_and_opposite_ordinal_labels_are_negative() -> None:
    perfect = [(f"item{item}", annotator, item % 8 + 1) for item in range(16) for annotator in ("x", "y")]
    assert fleiss_kappa(perfect, SCALE) == pytest.approx(1.0)
    assert krippendorff_alpha(perfect, SCALE) == pytest.approx(1.0)
    assert cohens_kappa(perfect, "x", "y", SCALE) == pytest.approx(1.0)
    mirrored = [(f"item{item}", "x", item % 8 + 1) for item in range(16)]
    mirrored += [(f"item{item}", "y", 8 - item % 8) for item in range(16)]
    assert krippendorff_alpha(mirrored, SCALE, "ordinal") < -0.5


# --- loud failures --------------------------------------------------------------------------------------------


def test_a_value_off_the_scale_names_the_item_and_the_annotator() -> None:
    ratings = [("item1", "ann", 3), ("item1", "bob", 9)]
    for statistic in (fleiss_kappa, gwet_ac1, krippendorff_alpha):
        with pytest.raises(ValueError, match=r"item 'item1', annotator 'bob': value 9 is not one of \[1, 2"):
            statistic(ratings, SCALE)


def test_invalid_inputs_raise_one_clear_line() -> None:
    with pytest.raises(ValueError, match="at least 2 annotators, got \\['ann'\\]"):
        fleiss_kappa([("item1", "ann", 3), ("item2", "ann", 4)], SCALE)
    with pytest.raises(ValueError, match="item 'item1', annotator 'ann': rated twice"):
        gwet_ac1([("item1", "ann", 3), ("item1", "ann", 4), ("item1", "bob", 4)], SCALE)
    with pytest.raises(ValueError, match="no item was rated by 2 or more annotators"):
        krippendorff_alpha([("item1", "ann", 3), ("item2", "bob", 4)], SCALE)
    with pytest.raises(ValueError, match="annotators 'ann' and 'bob' rated no item in common"):
        cohens_kappa([("item1", "ann", 3), ("item2", "bob", 4)], "ann", "bob", SCALE)
    with pytest.raises(ValueError, match="annotator 'eve' has no ratings"):
        cohens_kappa([("item1", "ann", 3), ("item1", "bob", 4)], "ann", "eve", SCALE)
    with pytest.raises(ValueError, match="level must be one of nominal, ordinal, interval, got 'ratio'"):
        krippendorff_alpha([("item1", "ann", 3), ("item1", "bob", 4)], SCALE, level="ratio")
    with pytest.raises(ValueError, match="categories must be at least 2 distinct values"):
        fleiss_kappa([("item1", "ann", 3), ("item1", "bob", 3)], [3])


# --- gold accuracy and position bias ----------------------------------------------------------------------------


def test_gold_accuracy_counts_the_side_by_default_and_any_rule_given() -> None:
    ratings = [("g1", "ann", 1), ("g2", "ann", 4), ("g3", "ann", 5), ("x", "ann", 8)]
    ratings += [("g1", "bob", 2), ("g2", "bob", 2), ("x", "bob", 1), ("y", "eve", 3)]
    gold = {"g1": 1, "g2": 6, "g3": 8}
    assert gold_accuracy(ratings, gold) == {"ann": (2, 3), "bob": (1, 2), "eve": (0, 0)}
    assert gold_accuracy(ratings, gold, agree=lambda value, truth: value == truth) == {
        "ann": (1, 3),
        "bob": (0, 2),
        "eve": (0, 0),
    }


def test_position_bias_wilson_interval_hand_derived_and_against_statsmodels() -> None:
    """No left votes out of 10: p̂ = 0, so the Wilson centre and half-width are both (z²/2n)/(1 + z²/n) and the
    interval is [0, z²/(n + z²)] with z = 1.959964 (z² = 3.841459): [0, 3.841459/13.841459] = [0, 0.277530]."""
    share, low, high = position_bias([False] * 10)
    assert share == 0.0
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    votes = [True] * 61 + [False] * 39
    share, low, high = position_bias(votes)
    assert share == 0.61
    assert (low, high) == pytest.approx(proportion_confint(61, 100, alpha=0.05, method="wilson"), abs=1e-9)
    assert low > 0.5  # this pool favours the left response
    with pytest.raises(ValueError, match="at least one vote"):
        position_bias([])


# --- Bradley-Terry ratings ----------------------------------------------------------------------------------------

TRUE_ELO = {"alpha": 1000.0, "beta": 1100.0, "gamma": 850.0, "delta": 1250.0, "eps": 1030.0}


def simulated_battles(count: int, seed: int, tie_rate: float = 0.15) -> list[tuple[str, str, str]]:
    generator = np.random.default_rng(seed)
    models = list(TRUE_ELO)
    battles = []
    for _ in range(count):
        first, second = (models[index] for index in generator.choice(len(models), size=2, replace=False))
        first_wins = 1.0 / (1.0 + 10 ** ((TRUE_ELO[second] - TRUE_ELO[first]) / 400))
        if generator.random() < tie_rate:
            battles.append((first, second, "tie"))
        else:
            battles.append((first, second, "a" if generator.random() < first_wins else "b"))
    return battles


def arena_notebook_elo(battles) -> dict[str, float]:
    """Chatbot Arena's ``compute_mle_elo`` with numpy in place of pandas: two rows per battle (model_a won /
    model_b won) on ±log(10) design columns, weighted 2·share (a tie enters once each way, a win twice),
    scikit-learn's unpenalised logistic regression without intercept, ratings 400·coef, centred at 1000."""
    models = sorted({model for first, second, _ in battles for model in (first, second)})
    design, outcome, weight = [], [], []
    for first, second, winner in battles:
        row = np.zeros(len(models))
        row[models.index(first)], row[models.index(second)] = math.log(10), -math.log(10)
        share = {"a": 1.0, "b": 0.0, "tie": 0.5}[winner]
        design += [row, row]
        outcome += [1, 0]
        weight += [2 * share, 2 * (1 - share)]
    fit = LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-12, max_iter=10_000)
    fit.fit(np.array(design), np.array(outcome), sample_weight=np.array(weight))
    ratings = 400 * fit.coef_[0]
    return dict(zip(models, ratings - ratings.mean() + 1000))


@pytest.mark.parametrize("seed", [0, 1])
def test_bradley_terry_equals_the_arena_notebooks_fit(seed: int) -> None:
    battles = simulated_battles(500, seed)
    assert any(winner == "tie" for _, _, winner in battles)
    ratings = bradley_terry(battles)
    reference = arena_notebook_elo(battles)
    assert ratings.keys() == reference.keys()
    for model in ratings:
        assert ratings[model] == pytest.approx(reference[model], abs=1e-3)
    assert np.mean(list(ratings.values())) == pytest.approx(1000.0)


def test_anchor_shifts_every_rating_by_the_same_amount() -> None:
    battles = simulated_battles(300, seed=2)
    centred, anchored = bradley_terry(battles), bradley_terry(battles, anchor="gamma")
    assert anchored["gamma"] == pytest.approx(1000.0)
    differences = [anchored[model] - centred[model] for model in centred]
    assert max(differences) - min(differences) == pytest.approx(0.0, abs=1e-9)


def test_a_model_that_wins_every_battle_ranks_first() -> None:
    battles = simulated_battles(200, seed=3) + [("champion", model, "a") for model in TRUE_ELO] * 2
    battles += [(model, "champion", "b") for model in TRUE_ELO]
    ratings = bradley_terry(battles, anchor="alpha")
    assert max(ratings, key=ratings.__getitem__) == "champion"
    assert all(math.isfinite(rating) for rating in ratings.values())
    assert ratings["champion"] > max(rating for model, rating in ratings.items() if model != "champion") + 400


def test_bootstrap_intervals_contain_the_fit_narrow_with_more_battles_and_repeat_with_the_seed() -> None:
    few, many = simulated_battles(150, seed=4), simulated_battles(1500, seed=4)
    widths = {}
    for name, battles in (("few", few), ("many", many)):
        ratings, intervals = bradley_terry(battles), bootstrap_intervals(battles, rounds=300, seed=0)
        for model, (low, high) in intervals.items():
            assert low <= ratings[model] <= high
        widths[name] = np.mean([high - low for low, high in intervals.values()])
    assert widths["many"] < 0.5 * widths["few"]  # ~ 1/sqrt(10) expected
    assert bootstrap_intervals(few, rounds=50, seed=7) == bootstrap_intervals(few, rounds=50, seed=7)
    assert bootstrap_intervals(few, rounds=50, seed=7) != bootstrap_intervals(few, rounds=50, seed=8)


def test_bad_battles_raise_naming_the_battle() -> None:
    with pytest.raises(ValueError, match=r"battle 1 \(x vs y\): winner 'draw' is not 'a', 'b' or 'tie'"):
        bradley_terry([("x", "y", "a"), ("x", "y", "draw")])
    with pytest.raises(ValueError, match="battle 0: model 'x' against itself"):
        bradley_terry([("x", "x", "a")])
    with pytest.raises(ValueError, match="no chain of battles links 'a1' to 'c1', 'c2'"):
        bradley_terry([("a1", "a2", "a"), ("a2", "a1", "tie"), ("c1", "c2", "b"), ("c2", "c1", "a")])
    with pytest.raises(ValueError, match="anchor 'zed' fought no battle"):
        bradley_terry([("x", "y", "a")], anchor="zed")
    with pytest.raises(ValueError, match="resamples left a model out or unlinked"):
        # a chain of 5 battles over 6 models: only resamples that draw each battle once (5!/5⁵ ≈ 4%) link them
        bootstrap_intervals([(f"m{index}", f"m{index + 1}", "a") for index in range(5)], rounds=20)
