"""Variance partitioning between the low-level baselines and the atoms (encoding/fit.py).

The truth is planted with plain numpy (HRF-convolved random events, AR(1)
noise); the CV R^2 of each model is recomputed here with least squares on the
same folds, independently of the Frisch-Waugh shortcuts the fit uses.
"""

from __future__ import annotations

import numpy as np
import pytest

from bids_llm_encode.encoding.fit import RunData, _outer_inner_folds, fit_encoding

from test_encoding import ar1, make_design

T, K, V_EACH = 300, 6, 80


@pytest.fixture(scope="module")
def planted():
    """Three voxel groups: driven by the baseline only, by atom 0 only (uncorrelated with the baseline), none."""
    rng = np.random.default_rng(11)
    D = make_design(rng, T, K + 1)
    base, atoms = D[:, :1], D[:, 1:].copy()
    atoms[:, 1] = 0.9 * base[:, 0] + np.sqrt(1 - 0.81) * atoms[:, 1]  # atom 1 mostly word rate
    atoms = (atoms - atoms.mean(0)) / atoms.std(0)
    noise = ar1(rng, T, 3 * V_EACH, rng.uniform(0.2, 0.6, 3 * V_EACH).astype(np.float32))
    Y = noise.copy()
    Y[:, :V_EACH] += 0.6 * base
    Y[:, V_EACH:2 * V_EACH] += 0.6 * atoms[:, [0]]
    res = fit_encoding([RunData(Y, atoms, baseline=base)], n_permutations=60, seed=2)
    return res, Y, atoms, base


def test_baseline_only_signal_goes_to_the_baseline(planted):
    res, *_ = planted
    bl = slice(0, V_EACH)
    assert np.median(res.cv_r2_baseline[bl]) > 0.15
    # the atoms' unique part of a baseline-only signal: FDR-significant in at most 10 % of its voxels
    assert res.significant_unique[bl].mean() <= 0.10
    # atom 1 (0.9 word rate) has a large marginal z without the baseline; with it in the model, not
    assert np.median(np.abs(res.z[1, bl])) < 2.0


def test_atom_signal_is_unique(planted):
    res, *_ = planted
    at = slice(V_EACH, 2 * V_EACH)
    assert res.significant_unique[at].mean() > 0.9
    assert np.median(res.cv_r2_unique[at]) > 0.1
    assert np.median(res.cv_r2_baseline[at]) < 0.02


def test_unique_part_null_calibrated(planted):
    res, *_ = planted
    null = slice(2 * V_EACH, 3 * V_EACH)
    assert res.significant_unique[null].mean() <= 0.05
    assert 0.01 <= (res.p_unique[null] < 0.05).mean() <= 0.12
    assert 0.35 <= np.median(res.p_unique[null]) <= 0.65


def _ols_ridge_cv_r2(Y, X, B, alpha):
    """CV R^2 (sum over folds) of OLS on B, and of B (unpenalized) + X (ridge alpha), by augmented lstsq."""
    folds, _ = _outer_inner_folds([len(Y)], 5, 5, 3)
    sse_b = sse_j = sst = 0.0
    for train, test, _ in folds:
        # the fit cleans the intercept from the training and test frames separately
        Ytr, Yte = Y[train] - Y[train].mean(0), Y[test] - Y[test].mean(0)
        Xtr, Xte = X[train] - X[train].mean(0), X[test] - X[test].mean(0)
        Btr, Bte = B[train] - B[train].mean(0), B[test] - B[test].mean(0)
        beta = np.linalg.lstsq(Btr, Ytr, rcond=None)[0]
        sse_b += ((Yte - Bte @ beta) ** 2).sum(0)
        nb, k = B.shape[1], X.shape[1]
        A = np.vstack([np.hstack([Btr, Xtr]), np.hstack([np.zeros((k, nb)), np.sqrt(alpha) * np.eye(k)])])
        coef = np.linalg.lstsq(A, np.vstack([Ytr, np.zeros((k, Y.shape[1]))]), rcond=None)[0]
        sse_j += ((Yte - np.hstack([Bte, Xte]) @ coef) ** 2).sum(0)
        sst += ((Yte - Yte.mean(0)) ** 2).sum(0)
    return 1 - sse_b / sst, 1 - sse_j / sst


def test_partition_equals_independent_least_squares():
    rng = np.random.default_rng(5)
    D = make_design(rng, T, 5)
    base, atoms = D[:, :2], D[:, 2:]
    Y = (0.5 * base[:, :1] + 0.4 * atoms[:, :1] + rng.standard_normal((T, 30))).astype(np.float32)
    alpha = 30.0
    res = fit_encoding([RunData(Y, atoms, baseline=base)], alphas=np.array([alpha]), n_permutations=0)
    Yz = (Y - Y.mean(0)) / Y.std(0, ddof=1)  # the fit z-scores BOLD and regressors per run
    zb = (base - base.mean(0)) / base.std(0)
    za = (atoms - atoms.mean(0)) / atoms.std(0)
    r2_b, r2_j = _ols_ridge_cv_r2(Yz.astype(np.float64), za, zb, alpha)
    np.testing.assert_allclose(res.cv_r2_baseline, r2_b, atol=2e-4)
    np.testing.assert_allclose(res.cv_r2_joint, r2_j, atol=2e-4)
    np.testing.assert_allclose(res.cv_r2_unique, res.cv_r2_joint - res.cv_r2_baseline, atol=1e-6)
    assert res.p_unique is not None and res.info["n_baselines"] == 2


def test_no_baseline_leaves_the_partition_out():
    rng = np.random.default_rng(0)
    D = make_design(rng, 200, 3)
    res = fit_encoding([RunData(rng.standard_normal((200, 10)).astype(np.float32), D)], n_permutations=0)
    assert res.cv_r2_unique is None and res.info["partition"] is None


def test_baseline_shape_checked():
    from bids_llm_encode.errors import DataError

    rng = np.random.default_rng(0)
    D = make_design(rng, 200, 3)
    Y = rng.standard_normal((200, 10)).astype(np.float32)
    with pytest.raises(DataError, match="baselines must be"):
        fit_encoding([RunData(Y, D, baseline=np.ones((199, 1)))], n_permutations=0)
    with pytest.raises(DataError, match="constant"):
        fit_encoding([RunData(Y, D, baseline=np.ones((200, 1)))], n_permutations=0)
