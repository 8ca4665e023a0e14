"""Statistics used by the encoding stage, in one place.

Everything here is small and pure: false discovery rate, the circular-shift
null's offsets, fold schemes, column-wise correlation, and conversions between
t and z. Functions that touch big arrays work on numpy arrays and on torch
tensors alike (they only use operators and ``.sum``/``.mean``), so that the
himalaya backend chosen by :func:`bids_llm_encode.encoding.fit.fit_encoding`
can run them on a GPU.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from scipy import stats as sps

log = logging.getLogger(__name__)


def fdr_bh(p: np.ndarray, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg false discovery rate control.

    Parameters
    ----------
    p : ndarray, shape (n_tests,)
        P-values; NaN counts as 1 (never significant, still counted as a test).
    alpha : float
        Level at which the FDR is controlled, in (0, 1).

    Returns
    -------
    significant : ndarray of bool, shape (n_tests,)
    q : ndarray, shape (n_tests,)
        BH-adjusted p-values (``scipy.stats.false_discovery_control``).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"fdr_alpha must lie in (0, 1), got {alpha}")
    p = np.asarray(p, dtype=np.float64).ravel()
    if p.size == 0:
        return np.zeros(0, bool), np.zeros(0)
    p = np.where(np.isfinite(p), np.clip(p, 0.0, 1.0), 1.0)
    q = sps.false_discovery_control(p, method="bh")
    return q <= alpha, q


def circular_shifts(
    run_lengths: Sequence[int],
    n_permutations: int,
    min_fraction: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """Random circular-shift offsets, one per permutation and run.

    Each offset lies in ``[m, n - m]`` with ``m = max(1, ceil(min_fraction * n))``
    for a run of ``n`` frames, so that no shift is close to the identity.

    Parameters
    ----------
    run_lengths : sequence of int, length n_runs
    n_permutations : int
    min_fraction : float
        Smallest shift as a fraction of the run length, in [0, 0.5).
    seed : int

    Returns
    -------
    shifts : ndarray of int, shape (n_permutations, n_runs)
    """
    if not 0 <= min_fraction < 0.5:
        raise ValueError(f"min_fraction must lie in [0, 0.5), got {min_fraction}")
    rng = np.random.default_rng(seed)
    out = np.zeros((int(n_permutations), len(run_lengths)), dtype=np.int64)
    for j, n in enumerate(run_lengths):
        m = max(1, int(np.ceil(min_fraction * n)))
        if n - m < m:
            raise ValueError(f"a run of {n} frames is too short for circular shifts")
        out[:, j] = rng.integers(m, n - m + 1, size=int(n_permutations))
    return out


def shift_within_runs(X: np.ndarray, run_slices: Sequence[slice], shifts: Sequence[int]) -> np.ndarray:
    """Circularly shift the rows of ``X`` within each run.

    Parameters
    ----------
    X : ndarray, shape (n_frames_total, n_features)
    run_slices : sequence of slice
        The rows of each run in ``X``.
    shifts : sequence of int, one per run

    Returns
    -------
    X_shifted : ndarray, shape (n_frames_total, n_features)
    """
    out = np.empty_like(X)
    for sl, s in zip(run_slices, shifts):
        out[sl] = np.roll(X[sl], int(s), axis=0)
    return out


def contiguous_folds(n: int, n_folds: int, gap: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous test blocks, with ``gap`` frames on each side dropped from training.

    Parameters
    ----------
    n : int
        Number of frames.
    n_folds : int
        Number of blocks (>= 2).
    gap : int
        Frames removed from the training set before and after each test block,
        so that autocorrelated noise does not leak from training to test.

    Returns
    -------
    folds : list of (train, test) index arrays
    """
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    if n < n_folds * 2:
        raise ValueError(f"{n} frames are too few for {n_folds} folds")
    edges = np.linspace(0, n, n_folds + 1).round().astype(int)
    idx = np.arange(n)
    folds = []
    for a, b in zip(edges[:-1], edges[1:]):
        test = idx[a:b]
        train = idx[(idx < a - gap) | (idx >= b + gap)]
        folds.append((train, test))
    return folds


def pearson_columns(a, b, eps: float = 1e-12):
    """Pearson correlation of matching columns.

    Parameters
    ----------
    a, b : array (numpy or torch), shape (n_samples, n_columns)

    Returns
    -------
    r : array, shape (n_columns,)
        0 where either column is constant.
    """
    a = a - a.mean(0)
    b = b - b.mean(0)
    num = (a * b).sum(0)
    den = ((a * a).sum(0) * (b * b).sum(0)) ** 0.5
    return num / (den + eps)


def t_to_z(t: np.ndarray, df) -> np.ndarray:
    """Convert t statistics to z with the same tail probabilities (two-sided symmetric).

    Uses the upper tail for t > 0 and the lower tail for t < 0, so that large
    |t| does not saturate.
    """
    t = np.asarray(t, dtype=np.float64)
    df = np.broadcast_to(np.asarray(df, dtype=np.float64), t.shape)
    z = np.empty_like(t)
    pos = t >= 0
    z[pos] = sps.norm.isf(sps.t.sf(t[pos], df[pos]))
    z[~pos] = sps.norm.ppf(sps.t.cdf(t[~pos], df[~pos]))
    return z


MIN_CEILING = 0.1  # below this a ceiling is noise (sqrt of an r of 0 +- 1/sqrt(T)): no fraction


def ceiling_fraction(cv_r: np.ndarray, ceiling: np.ndarray) -> np.ndarray:
    """``cv_r / ceiling`` where the ceiling is at least ``MIN_CEILING``, NaN elsewhere."""
    ceiling = np.asarray(ceiling, np.float64)
    out = np.full(ceiling.shape, np.nan)
    ok = np.isfinite(ceiling) & (ceiling >= MIN_CEILING)
    out[ok] = np.asarray(cv_r, np.float64)[ok] / ceiling[ok]
    return out


def permutation_p(observed: np.ndarray, n_exceed: np.ndarray, n_permutations: int) -> np.ndarray:
    """``(1 + #null >= observed) / (1 + n_permutations)`` per voxel."""
    return (1.0 + np.asarray(n_exceed, dtype=np.float64)) / (1.0 + n_permutations)


def tail_p(observed: np.ndarray, null: np.ndarray, k: int = 25) -> np.ndarray:
    """Upper-tail p beyond a null sample, from an exponential fitted to its ``k`` largest values.

    The ``k`` largest null values' excesses over the next one, ``u``, are
    fitted by an exponential (the generalized Pareto of shape 0, the limit of
    light tails; Knijnenburg et al. 2009 fit the general one to the top
    exceedances of a permutation null): ``p = (k / n) * exp(-(observed - u) /
    mean excess)``. A bounded statistic (a share, a Dice) has a tail lighter
    than exponential, so this overstates p there (conservative). At the null's
    maximum it gives about ``1 / n``; beyond it, the p-values a permutation
    count cannot reach. A fixed number of order statistics rather than a
    fraction: spin nulls are often mostly zeros (a rotated network misses the
    map), and a top 10 % reaching into them fitted a tail too heavy to tell a
    map that is its network from one at the null's maximum.

    Parameters
    ----------
    observed : ndarray, shape (m,)
    null : ndarray, shape (n, m)
    k : int
        Order statistics in the fit (at most n - 1).

    Returns
    -------
    ndarray, shape (m,)
        1 where the top of the null has no spread.
    """
    observed = np.asarray(observed, dtype=np.float64)
    null = np.asarray(null, dtype=np.float64)
    n = null.shape[0]
    k = int(min(k, n - 1))
    p = np.ones_like(observed)
    if k < 1:
        return p
    top = -np.sort(-null, axis=0)[: k + 1]  # descending
    u = top[k]
    excess = (top[:k] - u[None]).mean(axis=0)
    ok = excess > 0
    p[ok] = k / n * np.exp(-np.maximum(observed[ok] - u[ok], 0.0) / excess[ok])
    return p


def normal_p(observed: np.ndarray, null_mean: np.ndarray, null_sd: np.ndarray, n_null: int) -> np.ndarray:
    """Upper-tail p of ``observed`` under a normal null whose mean and sd were estimated from ``n_null`` draws.

    The predictive distribution of a new draw from a normal with estimated mean
    and standard deviation is Student's t with ``n_null - 1`` degrees of freedom,
    scaled by ``sqrt(1 + 1 / n_null)``; using the normal's own tail instead
    (what this function did first) made the extreme p-values too small: on null
    participants (50 shifts, 8,700 voxels) 2 of 3 had a voxel called at FDR 0.05.
    A voxel whose null has no spread (sd 0 or NaN) gets p = 1.
    """
    observed = np.asarray(observed, dtype=np.float64)
    sd = np.asarray(null_sd, dtype=np.float64)
    ok = np.isfinite(sd) & (sd > 0)
    p = np.ones_like(observed)
    scale = sd[ok] * np.sqrt(1.0 + 1.0 / n_null)
    p[ok] = sps.t.sf((observed[ok] - np.asarray(null_mean, dtype=np.float64)[ok]) / scale, n_null - 1)
    return p
