"""Voxel-wise encoding on synthetic data with known truth (AR(1) noise, HRF-convolved regressors)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from nilearn.glm.first_level import glover_hrf

from bids_llm_encode.encoding import stats
from bids_llm_encode.encoding.fit import RunData, fit_encoding
from bids_llm_encode.errors import DataError


def ar1(rng, T, V, rho):
    e = rng.standard_normal((T, V)).astype(np.float32)
    out = np.empty_like(e)
    out[0] = e[0]
    for t in range(1, T):
        out[t] = rho * out[t - 1] + np.sqrt(1 - rho**2) * e[t]
    return out


def make_design(rng, T, K, tr=1.5):
    h = glover_hrf(tr, oversampling=1, time_length=30)
    ev = rng.standard_normal((T, K)) * (rng.random((T, K)) < 0.3)
    D = np.stack([np.convolve(ev[:, k], h)[:T] for k in range(K)], 1)
    return ((D - D.mean(0)) / D.std(0)).astype(np.float32)


N_DRIVEN = 60


@pytest.fixture(scope="module")
def single_run():
    rng = np.random.default_rng(1)
    T, V, K = 280, 800, 8
    D = make_design(rng, T, K)
    B = np.zeros((K, V), np.float32)
    B[:, :N_DRIVEN] = rng.standard_normal((K, N_DRIVEN)) * 0.3
    rho = rng.uniform(0.3, 0.7, V).astype(np.float32)  # strongly autocorrelated noise
    Y = D @ B + ar1(rng, T, V, rho)
    res = fit_encoding([RunData(Y, D)], n_permutations=200, seed=3)
    return res, B


def test_driven_voxels_significant(single_run):
    res, _ = single_run
    assert res.significant[:N_DRIVEN].mean() > 0.9
    assert res.cv_r[:N_DRIVEN].mean() > 0.3
    assert res.cv_r2[:N_DRIVEN].mean() > 0.05
    assert res.in_sample_r2[:N_DRIVEN].mean() > res.in_sample_r2[N_DRIVEN:].mean() + 0.1


def test_null_voxels_calibrated_under_ar1(single_run):
    res, _ = single_run
    null_p = res.p[N_DRIVEN:]
    assert res.significant[N_DRIVEN:].mean() <= 0.05
    # p ~ uniform under the null: false-positive rate at 0.05 near 5% (binomial sd ~0.8% for 740 voxels)
    for p in (null_p, res.info["p_empirical"][N_DRIVEN:]):
        assert 0.02 <= (p < 0.05).mean() <= 0.085
        assert 0.4 <= np.median(p) <= 0.6
    assert abs(res.cv_r[N_DRIVEN:].mean()) < 0.03


def test_normal_null_agrees_with_empirical(single_run):
    res, _ = single_run
    pe, pn = res.info["p_empirical"], res.p
    assert np.corrcoef(pe, pn)[0, 1] > 0.98
    mid = (pe > 0.05) & (pe < 0.95)
    assert np.median(np.abs(pe[mid] - pn[mid])) < 0.03


def test_z_sign_recovers_activation_and_deactivation(single_run):
    res, B = single_run
    strong = np.abs(B) > 0.2
    assert (np.sign(res.z[strong]) == np.sign(B[strong])).mean() > 0.97
    assert res.effect.shape == B.shape and res.variance.shape == B.shape
    assert np.all(res.variance[:, :N_DRIVEN] > 0)
    assert res.info["fold_scheme"].startswith("5 contiguous")


def test_leave_one_run_out_and_noise_ceiling():
    rng = np.random.default_rng(2)
    T, V, K = 220, 300, 6
    D = make_design(rng, T, K)
    B = np.zeros((K, V), np.float32)
    B[:, :100] = rng.standard_normal((K, 100)) * 0.4
    extra = np.zeros((T, V), np.float32)  # stimulus-locked signal the atoms do not explain
    extra[:, 100:200] = make_design(rng, T, 1) * 0.8
    runs = [RunData(D @ B + extra + ar1(rng, T, V, 0.4), D, repeat_group="story", name=f"run-{i}")
            for i in (1, 2)]
    res = fit_encoding(runs, n_permutations=50, seed=0)
    assert res.info["fold_scheme"] == "leave-one-run-out"
    assert res.noise_ceiling is not None
    assert res.noise_ceiling[:200].mean() > 0.5
    # sqrt(max(r, 0)) of a between-repeat r that is 0 +- 1/sqrt(T): small, not 0
    assert np.median(res.noise_ceiling[200:]) < 0.1
    # the repeat-locked signal the atoms miss: reliable (ceiling) but poorly predicted
    assert res.cv_r[:100].mean() > 0.3
    assert res.cv_r[100:200].mean() < res.noise_ceiling[100:200].mean() - 0.2
    assert res.design.shape == (2 * T, K)
    single = fit_encoding(runs[:1], n_permutations=0)
    assert single.noise_ceiling is None and not single.significant.any()


def test_noise_ceiling_is_single_run_scale_and_aligned_by_story_time():
    """The ceiling equals the r of a perfect model of the repeatable signal with one run.

    Two presentations of one story that start at different scan times (onsets 3
    and 9 frames) with noise-only frames before and after: the ceiling must
    match by story time and skip the frames outside the story.
    """
    rng = np.random.default_rng(8)
    T_story, V, K, tr = 240, 400, 3, 1.5
    rho = np.linspace(0.05, 0.6, V)  # share of variance that repeats
    s = make_design(rng, T_story, 1)[:, 0][:, None] * np.sqrt(rho)[None]
    runs, perfect_r = [], []
    for onset in (3, 9):
        T = T_story + onset + 6
        Y = rng.standard_normal((T, V)).astype(np.float32)
        Y[onset:onset + T_story] = s + rng.standard_normal((T_story, V)) * np.sqrt(1 - rho)[None]
        design = make_design(rng, T, K)
        time = (np.arange(T) - onset + 0.5) * tr
        runs.append(RunData(Y, design, repeat_group="story", story_time=time,
                            story_end=(T_story - 1) * tr - 8.0))
        perfect_r.append(stats.pearson_columns(s, Y[onset:onset + T_story]))
    res = fit_encoding(runs, n_permutations=0)
    truth = np.sqrt(rho)
    assert np.abs(res.noise_ceiling - truth).mean() < 0.05
    assert np.abs(res.noise_ceiling - np.mean(perfect_r, axis=0)).mean() < 0.05
    # without story times frames are matched by index: the 6-frame offset destroys the match
    by_index = fit_encoding([RunData(r.Y, r.design, repeat_group="story") for r in runs], n_permutations=0)
    assert by_index.noise_ceiling.mean() < res.noise_ceiling.mean() - 0.2


def test_bad_voxels_excluded_not_crash():
    rng = np.random.default_rng(4)
    T, V, K = 150, 50, 4
    D = make_design(rng, T, K)
    Y = D @ rng.standard_normal((K, V)).astype(np.float32) * 0.5 + ar1(rng, T, V, 0.3)
    Y[:, 3] = 7.0
    Y[10, 5] = np.nan
    conf = pd.DataFrame({"trans_x": rng.standard_normal(T), "trans_x_derivative1": rng.standard_normal(T)})
    conf.iloc[0, 1] = np.nan  # the n/a of a derivative column, as load_confounds fills it
    conf.iloc[0, 1] = conf.iloc[1, 1]
    res = fit_encoding([RunData(Y, D, confounds=conf, sample_mask=np.arange(2, T))], n_permutations=20)
    assert res.info["excluded_voxels"] == 2
    assert res.info["excluded_mask"][[3, 5]].all()
    for k in (3, 5):
        assert res.p[k] == 1 and res.cv_r[k] == 0 and not res.significant[k]
        assert np.all(res.z[:, k] == 0) and np.all(np.isnan(res.variance[:, k]))
    good = np.setdiff1d(np.arange(V), [3, 5])
    assert np.isfinite(res.z[:, good]).all() and np.isfinite(res.cv_r[good]).all()
    conf.iloc[0, 1] = np.nan  # an unfilled n/a in a kept frame is an error, not a silent NaN
    with pytest.raises(DataError, match="missing values"):
        fit_encoding([RunData(Y, D, confounds=conf)], n_permutations=0)


def test_too_few_frames_and_length_mismatch():
    rng = np.random.default_rng(5)
    D = make_design(rng, 60, 40)
    Y = rng.standard_normal((60, 10)).astype(np.float32)
    conf = pd.DataFrame(rng.standard_normal((60, 20)))
    with pytest.raises(DataError, match="usable frames"):
        fit_encoding([RunData(Y, D, confounds=conf, name="sub-01_bold")], n_permutations=0)
    with pytest.raises(DataError, match="design has 59 frames but the BOLD has 60"):
        fit_encoding([RunData(Y, D[:59], name="sub-01_bold")], n_permutations=0)


def test_stats_helpers():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=900), rng.uniform(0, 1e-4, size=100)])
    sig, q = stats.fdr_bh(p, 0.05)
    assert sig[900:].all() and sig[:900].mean() < 0.02 and np.all(q >= p - 1e-12)
    sh = stats.circular_shifts([100, 50], 500, 0.1, seed=1)
    assert sh[:, 0].min() >= 10 and sh[:, 0].max() <= 90 and sh[:, 1].min() >= 5
    folds = stats.contiguous_folds(100, 5, gap=3)
    for train, test in folds:
        assert np.intersect1d(train, np.arange(test[0] - 3, test[-1] + 4)).size == 0
    z = stats.t_to_z(np.array([-40.0, 0.0, 2.0]), 50)
    assert z[0] < -8 and z[1] == 0 and 1.9 < z[2] < 2.0


def test_confound_regression_does_not_leak_into_cv():
    """Confounds regressed from the whole run before CV couple test to training frames.

    With a design that has nothing to do with the data, held-out r must stay
    centred on 0 and FDR calls rare, also when drifts, cosines and aCompCor-like
    confounds are regressed out (the whole-run cleaning gave median r ~0.1 here).
    """
    rng = np.random.default_rng(7)
    T, V, K = 290, 1500, 16
    D = make_design(rng, T, K)
    t = np.arange(T)
    cosines = np.column_stack([np.cos(np.pi * (t + 0.5) * k / T) for k in range(1, 5)])
    smooth = np.cumsum(rng.standard_normal((T, 10)), axis=0)
    conf = pd.DataFrame(np.column_stack([cosines, smooth, rng.standard_normal((T, 6))]))
    Y = ar1(rng, T, V, 0.5) + smooth @ rng.standard_normal((10, V)) * 0.05 + cosines @ rng.standard_normal((4, V))
    res = fit_encoding([RunData(Y=Y.astype(np.float32), design=D, confounds=conf)], n_permutations=50, seed=1)
    assert abs(np.median(res.cv_r)) < 0.03
    assert res.significant.mean() <= 0.05


def test_run_shorter_than_the_story_is_fitted_with_a_warning(caplog):
    """A scan stopped before the story ended: fit the frames that exist, and say so."""
    rng = np.random.default_rng(3)
    T, K, V = 150, 8, 300
    D = make_design(rng, T, K)
    Y = ar1(rng, T, V, 0.3) + D[:, :1] * 2.0
    with caplog.at_level("WARNING"):
        res = fit_encoding([RunData(Y=Y.astype(np.float32), design=D, name="short_bold", story_frames=200)],
                           n_permutations=20)
    assert "short_bold: 150 frames, shorter than the story (200 frames)" in caplog.text
    assert res.cv_r.shape == (V,) and np.isfinite(res.cv_r).all()


def test_a_run_too_short_for_the_cross_validation_is_a_data_error():
    """39 frames, 2 outer folds and a 5-frame gap leave the inner splits nothing to train on."""
    rng = np.random.default_rng(0)
    Y, D = rng.standard_normal((39, 10)), rng.standard_normal((39, 3))
    with pytest.raises(DataError, match="39 frames are too few for the cross-validation"):
        fit_encoding([RunData(Y, D)], n_permutations=0, cv_folds=2)
    assert fit_encoding([RunData(Y, D)], n_permutations=0, cv_folds=5).cv_r.shape == (10,)
