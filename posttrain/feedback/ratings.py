"""Arena ratings: Bradley-Terry on the Elo scale, as Chatbot Arena computes its leaderboard, with bootstrap intervals.

A battle is ``(model_a, model_b, winner)`` with winner ``"a"``, ``"b"`` or ``"tie"``. The model: P(a beats b) =
1 / (1 + base^((R_b − R_a) / scale)), ratings R on the Elo scale (base 10, scale 400). Chatbot Arena fits it by
maximum likelihood over all votes at once (``compute_mle_elo`` in their leaderboard notebook, which replaced the
order-dependent online Elo): a logistic regression without intercept on design columns +log(base) for model_a and
−log(base) for model_b, each tie entered as half a win for each side, ratings = scale · coefficient + 1000. The fit
here is the same likelihood maximised by Newton's method in numpy (no scikit-learn at run time); its solution has
mean rating 1000, the minimum-norm solution the notebook's solver also lands on, or puts a named ``anchor`` model
at 1000. Intervals are the notebook's percentile bootstrap: refit on battles resampled with replacement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Battle = tuple[str, str, str]

WIN_SHARE = {"a": 1.0, "b": 0.0, "tie": 0.5}
"""model_a's share of the win per outcome: a tie is half a win for each side."""


def bradley_terry(
    battles: Sequence[Battle],
    *,
    scale: float = 400.0,
    base: float = 10.0,
    initial_rating: float = 1000.0,
    anchor: str | None = None,
) -> dict[str, float]:
    """Each model's Bradley-Terry rating on the Elo scale, maximum likelihood over all ``battles``.

    Maximises Σ_battles [s log σ(θ_a − θ_b) + (1 − s) log σ(θ_b − θ_a)], s = model_a's win share (1, 0 or ½),
    and returns initial_rating + scale · θ / ln(base), shifted so that the mean rating (or ``anchor``'s) is
    ``initial_rating``. A model that won (or lost) every one of its battles has no finite maximum likelihood
    estimate; the fit then stops where the likelihood stops improving to machine precision, so such a model ranks
    first (or last) but its distance to the others is a lower bound, not a measurement (and, in the mean, it shifts
    everyone else: name a regular model as ``anchor`` to keep theirs readable). Models that no chain of
    battles connects have no common scale: ``ValueError``.
    """
    models, first, second, first_share = _encoded(battles)
    if anchor is not None and anchor not in models:
        raise ValueError(f"anchor {anchor!r} fought no battle (models: {', '.join(models)})")
    wins = _win_matrix(first, second, first_share, len(models))
    unlinked = _unlinked_models(wins, models)
    if unlinked:
        raise ValueError(
            f"no chain of battles links {models[0]!r} to {', '.join(map(repr, unlinked))}: "
            "their ratings have no common scale; collect battles between these groups"
        )
    return _elo_ratings(_maximum_likelihood_strengths(wins), models, scale, base, initial_rating, anchor)


def bootstrap_intervals(
    battles: Sequence[Battle],
    rounds: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    *,
    scale: float = 400.0,
    base: float = 10.0,
    initial_rating: float = 1000.0,
    anchor: str | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of ``bradley_terry``'s ratings (Chatbot Arena's ``get_bootstrap_result``).

    Each of ``rounds`` rounds draws len(battles) battles with replacement (numpy ``default_rng(seed)``) and refits;
    a model's interval is the (1 − confidence)/2 and (1 + confidence)/2 quantiles of its ratings over the rounds.
    A resample that leaves a model out, or splits the models into groups no battle links, has no common scale; it
    is drawn again (the notebook instead skips absent models and fits split boards arbitrarily), so the intervals
    are conditional on a linked board. When redraws outnumber ``rounds`` the board is too sparse: ``ValueError``.
    """
    if rounds < 2:
        raise ValueError(f"bootstrap needs at least 2 rounds, got {rounds}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    models, first, second, first_share = _encoded(battles)
    if anchor is not None and anchor not in models:
        raise ValueError(f"anchor {anchor!r} fought no battle (models: {', '.join(models)})")
    generator = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    redraws = 0
    for round_index in range(rounds):
        while True:
            drawn = generator.integers(0, len(first), size=len(first))
            wins = _win_matrix(first[drawn], second[drawn], first_share[drawn], len(models))
            if not _unlinked_models(wins, models):
                break
            redraws += 1
            if redraws > rounds:
                raise ValueError(
                    f"bootstrap: {redraws} resamples left a model out or unlinked ({len(battles)} battles among "
                    f"{len(models)} models); collect more battles per model before computing intervals"
                )
        ratings = _elo_ratings(_maximum_likelihood_strengths(wins), models, scale, base, initial_rating, anchor)
        samples[round_index] = [ratings[model] for model in models]
    low, high = np.quantile(samples, [(1.0 - confidence) / 2, (1.0 + confidence) / 2], axis=0)
    return {model: (float(low[index]), float(high[index])) for index, model in enumerate(models)}


def _encoded(battles: Sequence[Battle]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Model names (sorted) and, per battle, model_a's index, model_b's index and model_a's win share."""
    if len(battles) == 0:
        raise ValueError("Bradley-Terry needs at least one battle")
    for index, (model_a, model_b, winner) in enumerate(battles):
        if winner not in WIN_SHARE:
            raise ValueError(f"battle {index} ({model_a} vs {model_b}): winner {winner!r} is not 'a', 'b' or 'tie'")
        if model_a == model_b:
            raise ValueError(f"battle {index}: model {model_a!r} against itself")
    models = sorted({model for model_a, model_b, _ in battles for model in (model_a, model_b)})
    index_of = {model: index for index, model in enumerate(models)}
    first = np.array([index_of[model_a] for model_a, _, _ in battles])
    second = np.array([index_of[model_b] for _, model_b, _ in battles])
    first_share = np.array([WIN_SHARE[winner] for _, _, winner in battles])
    return models, first, second, first_share


def _win_matrix(first: np.ndarray, second: np.ndarray, first_share: np.ndarray, n_models: int) -> np.ndarray:
    """``wins[i, j]``: how many times model i beat model j, ties counted half to each."""
    wins = np.bincount(first * n_models + second, weights=first_share, minlength=n_models * n_models)
    wins += np.bincount(second * n_models + first, weights=1.0 - first_share, minlength=n_models * n_models)
    return wins.reshape(n_models, n_models)


def _unlinked_models(wins: np.ndarray, models: list[str]) -> list[str]:
    """The models that no chain of battles links to the first one: their relative ratings are not identified."""
    played = (wins + wins.T) > 0
    reached = {0}
    frontier = [0]
    while frontier:
        for neighbour in np.flatnonzero(played[frontier.pop()]):
            if int(neighbour) not in reached:
                reached.add(int(neighbour))
                frontier.append(int(neighbour))
    return [model for index, model in enumerate(models) if index not in reached]


def _maximum_likelihood_strengths(wins: np.ndarray, tolerance: float = 1e-12, max_steps: int = 200) -> np.ndarray:
    """Bradley-Terry strengths θ (natural log-odds units, mean 0) by Newton's method with step halving.

    The log-likelihood Σ_ij w_ij log σ(θ_i − θ_j) is concave; its gradient g_i = Σ_j (w_ij − n_ij σ(θ_i − θ_j))
    (n = w + wᵀ games played) sums to zero and its Hessian −L is a weighted graph Laplacian, singular only along
    the all-ones direction that shifting every rating leaves unchanged. Solving (L + 11ᵀ/p) Δ = g gives the
    Newton step inside the mean-zero subspace. Convergence: the largest gradient entry per battle falls below
    ``tolerance``, or (a model that won everything) the likelihood stops increasing.
    """
    n_models = len(wins)
    games = wins + wins.T
    per_battle = 1.0 / wins.sum()
    strengths = np.zeros(n_models)
    log_likelihood = _log_likelihood(strengths, wins)
    for _ in range(max_steps):
        win_probability = _sigmoid(np.subtract.outer(strengths, strengths))
        gradient = (wins - games * win_probability).sum(axis=1)
        if np.abs(gradient).max() * per_battle < tolerance:
            return strengths
        pair_curvature = games * win_probability * win_probability.T
        laplacian = np.diag(pair_curvature.sum(axis=1)) - pair_curvature
        step = np.linalg.solve(laplacian + 1.0 / n_models, gradient)
        for _ in range(60):  # halve until the likelihood does not fall: plain Newton can overshoot far from θ*
            candidate = strengths + step
            candidate_log_likelihood = _log_likelihood(candidate, wins)
            if candidate_log_likelihood >= log_likelihood:
                break
            step /= 2.0
        else:
            return strengths  # no ascent direction left at float64 precision
        if candidate_log_likelihood - log_likelihood <= 1e-15 * max(1.0, abs(log_likelihood)):
            return candidate  # separated data: θ runs off to infinity while the likelihood saturates
        strengths, log_likelihood = candidate, candidate_log_likelihood
    raise RuntimeError(f"Bradley-Terry fit did not converge in {max_steps} Newton steps")


def _log_likelihood(strengths: np.ndarray, wins: np.ndarray) -> float:
    # log σ(x) = −log(1 + e^{−x}), written with logaddexp so large rating gaps neither overflow nor give log(0)
    return float(-(wins * np.logaddexp(0.0, -np.subtract.outer(strengths, strengths))).sum())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -x))


def _elo_ratings(
    strengths: np.ndarray, models: list[str], scale: float, base: float, initial_rating: float, anchor: str | None
) -> dict[str, float]:
    ratings = scale * strengths / math.log(base)
    offset = ratings[models.index(anchor)] if anchor is not None else ratings.mean()
    return {model: float(initial_rating + ratings[index] - offset) for index, model in enumerate(models)}
