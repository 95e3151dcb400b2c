"""Statistics for results across runs and games, by rliable (Agarwal et al. 2021, "Deep RL at the edge of the
statistical precipice"): interquartile means, stratified bootstrap intervals, probabilities of improvement and
performance profiles. Score matrices are (runs, games); curves add a trailing axis of points.

rliable is an optional extra (`pip install -e ".[plot]"`): it is imported on first use, so listing or running a
benchmark does not need it, only reporting does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np

from agents.infra.cli import UsageError

CONFIDENCE = 0.95
MIN_RUNS_FOR_INTERVAL = 5  # below this, report the range of the runs, never an interval


def _rliable():
    # rliable hands arch a RandomState, which arch 7 warns about on every bootstrap; the results are the same.
    warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
    try:
        from rliable import library, metrics
    except ImportError as err:
        raise UsageError(f'statistics need rliable ({err}); install it with: pip install -e ".[plot]"') from None
    return library, metrics


def iqm(scores: np.ndarray) -> float:
    """Interquartile mean of all the scores of a (runs, games) matrix: the middle 50% of run x game scores."""
    _, metrics = _rliable()
    return float(metrics.aggregate_iqm(np.asarray(scores, dtype=np.float64)))


def mean(scores: np.ndarray) -> float:
    _, metrics = _rliable()
    return float(metrics.aggregate_mean(np.asarray(scores, dtype=np.float64)))


def interval_estimates(
    scores: Mapping[str, np.ndarray], statistic: Callable[[np.ndarray], np.ndarray], reps: int = 2000, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(point estimates, 95% intervals (2, ...)) of `statistic` per arm, by rliable's stratified bootstrap: each
    resample draws runs with replacement within every game, so games keep their weight."""
    return _stratified_bootstrap(
        {name: np.asarray(x, dtype=np.float64) for name, x in scores.items()}, statistic, reps, seed
    )


def _stratified_bootstrap(
    score_dict: Mapping, statistic: Callable, reps: int, seed: int, confidence: float = CONFIDENCE
):
    """rliable's get_interval_estimates (95% unless told), reproducible for one seed."""
    library, _ = _rliable()
    np.random.seed(seed)  # rliable's stratified resampling draws from the global generator, not from random_state
    return library.get_interval_estimates(
        score_dict, statistic, reps=reps, confidence_interval_size=confidence, random_state=np.random.RandomState(seed)
    )


def aggregate_estimates(scores: Mapping[str, np.ndarray], reps: int = 2000, seed: int = 0):
    """IQM and mean of each arm's (runs, games) normalised scores, with stratified-bootstrap intervals:
    ({arm: [iqm, mean]}, {arm: [[iqm_lo, mean_lo], [iqm_hi, mean_hi]]})."""
    _, metrics = _rliable()
    return interval_estimates(
        scores, lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)]), reps, seed
    )


def curve_estimates(curves: Mapping[str, np.ndarray], reps: int = 1000, seed: int = 0):
    """IQM over runs x games at each point of (runs, games, points) curves, with stratified-bootstrap intervals."""
    return interval_estimates(curves, iqm_per_point, reps, seed)


def iqm_per_point(curves: np.ndarray) -> np.ndarray:
    """IQM over runs x games at each point of (runs, games, points) curves, without an interval."""
    _, metrics = _rliable()
    return np.array([metrics.aggregate_iqm(curves[..., k]) for k in range(curves.shape[-1])])


def probability_of_improvement(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], reps: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """P(X > Y) for each "X vs Y" pair of (runs, games) score matrices (the chance that a run of X beats a run of Y
    on a game, averaged over games; ties count half), with stratified-bootstrap intervals at `confidence`."""
    _, metrics = _rliable()
    points, intervals = _stratified_bootstrap(
        {name: (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)) for name, (x, y) in pairs.items()},
        metrics.probability_of_improvement,
        reps,
        seed,
        confidence,
    )
    return {name: float(value) for name, value in points.items()}, {k: v.ravel() for k, v in intervals.items()}


def iqm_difference(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], reps: int = 2000, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """IQM(X) - IQM(Y) for each "X vs Y" pair of (runs, games) score matrices, with a stratified-bootstrap interval
    at `confidence`: each resample draws the runs of X and, independently, those of Y with replacement within every
    game (rliable's StratifiedIndependentBootstrap, as for the probability of improvement), recomputes both IQMs and
    takes the difference."""
    _, metrics = _rliable()
    points, intervals = _stratified_bootstrap(
        {name: (np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)) for name, (x, y) in pairs.items()},
        lambda x, y: metrics.aggregate_iqm(x) - metrics.aggregate_iqm(y),
        reps,
        seed,
        confidence,
    )
    return {name: float(value) for name, value in points.items()}, {k: v.ravel() for k, v in intervals.items()}


def dominance(x: np.ndarray, y: np.ndarray) -> int:
    """1 if on every game every run of X scores above every run of Y (a probability of improvement of exactly 1 in
    every resample), -1 if every run of Y scores above every run of X, 0 otherwise; (runs, games) matrices."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if np.all(x.min(axis=0) > y.max(axis=0)):
        return 1
    if np.all(y.min(axis=0) > x.max(axis=0)):
        return -1
    return 0


def bonferroni_confidence(comparisons: int, confidence: float = CONFIDENCE) -> float:
    """The level at which each of `comparisons` intervals must hold for all of them to hold together at
    `confidence` (Bonferroni): 1 - (1 - confidence) / comparisons."""
    return 1 - (1 - confidence) / comparisons


def performance_profiles(scores: Mapping[str, np.ndarray], thresholds: np.ndarray, reps: int = 1000, seed: int = 0):
    """The fraction of runs x games scoring above each threshold, per arm, with stratified-bootstrap bands."""
    library, _ = _rliable()
    np.random.seed(seed)  # rliable's profile bootstrap takes no random state of its own
    return library.create_performance_profile(
        {name: np.asarray(x, dtype=np.float64) for name, x in scores.items()}, thresholds, reps=reps
    )


def profile_points(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The fraction of a (runs, games) matrix's scores above each threshold: a performance profile without a band."""
    return (np.asarray(scores, dtype=np.float64).ravel()[:, None] > thresholds).mean(axis=0)


def run_range(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return (float(values.min()), float(values.max())) if len(values) else (float("nan"), float("nan"))
