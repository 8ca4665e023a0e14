"""Voxel-wise encoding of BOLD by fixed regressors (the dictionary's atoms).

One call of :func:`fit_encoding` handles one participant and one story (one or
more runs). For every mask voxel it gives

- per atom, an effect, its variance and a z value: OLS with an AR(1) error model
  (nilearn ``run_glm``'s "ar1" model, vectorized here) per run, runs
  combined by fixed effects (inverse-variance weighting);
- in-sample R^2 of the OLS fit (runs stacked, per-run intercepts): the paper's number;
- cross-validated prediction accuracy of ridge (himalaya): ``cv_r``, the mean
  over outer folds of the Pearson r between prediction and held-out data, and
  ``cv_r2 = 1 - sum SSE / sum SST`` over the held-out folds (SST about each
  held-out fold's mean). Outer folds: leave-one-run-out with several runs,
  else ``cv_folds`` contiguous blocks with ``gap`` frames removed from training
  on each side of the test block. Ridge's alpha is chosen per voxel and per
  outer fold on inner folds (leave-one-run-out among training runs, or 3
  contiguous blocks of the training frames). For the cross-validation the
  confounds are regressed out of each fold's training frames and test frames
  separately (see ``_FoldCleaner``): cleaning the whole run first leaks;
- a one-sided p-value of ``cv_r`` under a null that keeps the autocorrelation of
  both regressors and BOLD: the design is circularly shifted within each run by
  a random offset (at least ``min_shift_fraction`` of the run), ridge is refit
  with each voxel's selected alphas and ``cv_r`` recomputed;
  ``p = (1 + #{null >= observed}) / (1 + n_permutations)``; Benjamini-Hochberg
  FDR over the valid voxels gives ``significant``;
- a noise ceiling when runs share a ``repeat_group`` (the same story heard
  again): the mean between-repeat Pearson r, Spearman-Brown corrected to the
  reliability of the mean of the repeats.

Voxels that are not finite or are constant in any run (also after confound
regression) are excluded: their effect, z, cv_r, cv_r2 and in-sample R^2 are 0,
variance and noise ceiling NaN, p = 1, never significant;
``info['excluded_mask']`` marks them.

Everything is computed in batches of ``n_targets_batch`` voxels, so memory is
bounded whatever the size of the brain.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from himalaya.backend import get_backend, set_backend
from himalaya.ridge import solve_ridge_cv_svd
from nilearn import signal

from ..errors import DataError, UsageError
from ..records import EncodingResult
from . import stats

log = logging.getLogger(__name__)

DEFAULT_ALPHAS = np.logspace(-2, 5, 15)


@dataclass
class RunData:
    """One BOLD run, ready to be encoded.

    Attributes
    ----------
    Y : ndarray, shape (n_frames, n_voxels)
        Masked BOLD (float32 preferred), all frames of the run.
    design : ndarray, shape (n_frames, n_atoms)
        The atoms sampled at this run's frames (the caller aligns them).
    confounds : pandas.DataFrame or ndarray, shape (n_frames, n_confounds), or None
    sample_mask : ndarray of int, shape (n_kept,), or None
        Frames to keep (from :func:`~bids_llm_encode.encoding.confounds.load_confounds`).
    repeat_group : str or None
        Runs with the same value are presentations of the same story (noise ceiling).
    name : str
        Used in messages (e.g. the BOLD file name).
    story_frames : int or None
        Frames the whole story spans; a run with fewer frames is fitted on what
        exists, with a warning.
    """

    Y: np.ndarray
    design: np.ndarray
    confounds: Optional[pd.DataFrame] = None
    sample_mask: Optional[np.ndarray] = None
    repeat_group: Optional[str] = None
    name: str = ""
    story_frames: Optional[int] = None


@dataclass
class _Prepared:
    kept: list  # frame indices kept per run
    D: list  # cleaned design per run, (n_kept, K) float32
    conf: list  # confound arrays per run (n_frames, c) or None
    n_conf: list
    D_raw: list  # design per run at kept frames, z-scored, before confound regression
    C: list  # per run (n_kept, c + 1): standardized confounds at kept frames and an intercept


def _zscore(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    sd = X.std(0)
    return (X - X.mean(0)) / np.where(sd > 0, sd, 1.0)


class _FoldCleaner:
    """Confound regression done separately on a fold's training and test frames.

    Regressing the confounds out of the whole run before splitting it couples
    training and test frames (the residuals satisfy ``C^T y = 0`` over the whole
    run, so test values are tied to training values), and the ridge learns that
    coupling: on the demo, undriven voxels reached a median CV r of 0.13 with a
    design played backwards. Fitting the confounds on the training frames and
    extrapolating them into the test block removes the coupling but doubles the
    null's spread (cosines extrapolate badly). So each run's training frames
    and test frames are cleaned each by their own fit: no coupling, no
    extrapolation.
    """

    def __init__(self, C: list, slices: list, train: np.ndarray, test: np.ndarray):
        self.parts = []
        for Cr, sl in zip(C, slices):
            rows = np.arange(sl.start, sl.stop)
            for part in (train, test):
                idx = np.flatnonzero(np.isin(rows, part))
                if idx.size:
                    Cp = Cr[idx]
                    self.parts.append((sl.start + idx, Cp, np.linalg.pinv(Cp, rcond=1e-6)))

    def __call__(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros_like(X)
        for rows, Cp, pinv in self.parts:
            Xp = X[rows]
            out[rows] = Xp - Cp @ (pinv.astype(X.dtype) @ Xp)
        return out


def _label(run: RunData, i: int) -> str:
    return run.name or f"run {i}"


def _check_runs(runs: Sequence[RunData]) -> tuple[int, int]:
    if not runs:
        raise UsageError("fit_encoding needs at least one run")
    n_vox = n_atoms = None
    for i, run in enumerate(runs):
        lab = _label(run, i)
        Y, D = np.asarray(run.Y), np.asarray(run.design)
        if Y.ndim != 2:
            raise DataError(f"{lab}: BOLD must be 2D (frames x voxels), got shape {Y.shape}")
        if D.ndim != 2:
            raise DataError(f"{lab}: design must be 2D (frames x atoms), got shape {D.shape}")
        if D.shape[0] != Y.shape[0]:
            raise DataError(
                f"{lab}: the design has {D.shape[0]} frames but the BOLD has {Y.shape[0]}; "
                "the atoms must be sampled at this run's frames"
            )
        if not np.isfinite(D).all():
            raise DataError(f"{lab}: the design has non-finite values")
        if n_vox is None:
            n_vox, n_atoms = Y.shape[1], D.shape[1]
        elif Y.shape[1] != n_vox or D.shape[1] != n_atoms:
            raise DataError(
                f"{lab}: {Y.shape[1]} voxels x {D.shape[1]} atoms, but the first run has "
                f"{n_vox} x {n_atoms}; all runs must share the mask and the atoms"
            )
        if run.confounds is not None and len(run.confounds) != Y.shape[0]:
            raise DataError(f"{lab}: {len(run.confounds)} confound rows for {Y.shape[0]} frames")
        if run.sample_mask is not None:
            sm = np.asarray(run.sample_mask)
            if sm.ndim != 1 or sm.size == 0 or sm.min() < 0 or sm.max() >= Y.shape[0] or np.any(np.diff(sm) <= 0):
                raise DataError(f"{lab}: sample_mask must be increasing frame indices in [0, {Y.shape[0]})")
        if run.story_frames is not None and Y.shape[0] < run.story_frames:
            log.warning("%s: %d frames, shorter than the story (%d frames); fitting the frames that exist",
                        lab, Y.shape[0], run.story_frames)
    return n_vox, n_atoms


def _clean(X: np.ndarray, conf, sample_mask) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = signal.clean(
            np.asarray(X, dtype=np.float64), detrend=False, standardize="zscore_sample",
            confounds=conf, standardize_confounds=True, filter=False, sample_mask=sample_mask,
        )
    return out



def _prepare(runs: Sequence[RunData], n_atoms: int) -> _Prepared:
    kept, D, confs, n_conf, D_raw, C = [], [], [], [], [], []
    for i, run in enumerate(runs):
        lab = _label(run, i)
        n = run.Y.shape[0]
        k = np.arange(n) if run.sample_mask is None else np.asarray(run.sample_mask, dtype=np.int64)
        conf = None
        if run.confounds is not None:
            conf = np.asarray(run.confounds, dtype=np.float64)
            if conf.ndim == 1:
                conf = conf[:, None]
            if conf.shape[1] == 0:
                conf = None
            elif not np.isfinite(conf[k]).all():
                raise DataError(f"{lab}: confounds have missing values in kept frames "
                                "(fill n/a rows as load_confounds does)")
        c = 0 if conf is None else conf.shape[1]
        if len(k) <= n_atoms + c + 2:
            raise DataError(
                f"{lab}: {len(k)} usable frames for {n_atoms} atoms + {c} confounds + intercept; "
                "need more frames than parameters (fewer atoms, fewer confounds or no scrubbing)"
            )
        d = _clean(run.design, conf, run.sample_mask)
        sd = d.std(0)
        if np.any(sd < 1e-6):
            bad = np.flatnonzero(sd < 1e-6).tolist()
            raise DataError(f"{lab}: atoms {bad} are constant at this run's frames (or explained by the confounds)")
        kept.append(k)
        D.append(d.astype(np.float32))
        confs.append(conf)
        n_conf.append(c)
        D_raw.append(_zscore(np.asarray(run.design, dtype=np.float64)[k]).astype(np.float32))
        Ck = np.ones((len(k), c + 1))
        if conf is not None:
            Ck[:, :c] = _zscore(conf[k])
        C.append(Ck.astype(np.float32))
    return _Prepared(kept, D, confs, n_conf, D_raw, C)


def _outer_inner_folds(lengths: list[int], cv_folds: int, gap: int, inner_folds: int):
    """Outer (train, test) splits over stacked runs, each with its inner splits (train-relative)."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    n = int(starts[-1])
    run_idx = [np.arange(starts[i], starts[i + 1]) for i in range(len(lengths))]
    outer = []
    if len(lengths) > 1:
        scheme = "leave-one-run-out"
        for i in range(len(lengths)):
            test = run_idx[i]
            train_runs = [j for j in range(len(lengths)) if j != i]
            train = np.concatenate([run_idx[j] for j in train_runs])
            if len(train_runs) > 1:
                inner = []
                offs = np.concatenate([[0], np.cumsum([lengths[j] for j in train_runs])])
                for a, b in zip(offs[:-1], offs[1:]):
                    t = np.arange(len(train))
                    inner.append((t[(t < a) | (t >= b)], t[a:b]))
            else:
                inner = stats.contiguous_folds(len(train), inner_folds, gap)
            outer.append((train, test, inner))
    else:
        scheme = f"{cv_folds} contiguous blocks, gap {gap} frames"
        for train, test in stats.contiguous_folds(n, cv_folds, gap):
            # train indices are not contiguous across the removed block: inner blocks in train order
            inner = stats.contiguous_folds(len(train), inner_folds, gap)
            outer.append((train, test, inner))
    return outer, scheme


def _glm_run(Y: np.ndarray, D: np.ndarray, n_conf: int, noise_model: str):
    """Effects, variances and df of the atoms in one run. Y (n, v) float64, D (n, K).

    The same model as ``nilearn.glm.first_level.run_glm(noise_model="ar1")`` (OLS,
    lag-1 autocorrelation of the residuals per voxel truncated to 0.01 bins,
    whitened refit per bin), written out so that it is vectorized over voxels:
    ``run_glm`` keeps whitened copies of the data per bin and was too slow at
    whole-brain scale. ``noise_model="ols"`` skips the whitening.
    """
    n, K = D.shape
    X = np.column_stack([D, np.ones(n)])
    p = X.shape[1]
    df = n - p - n_conf  # the confounds were regressed out before: they cost degrees of freedom
    v = Y.shape[1]
    eff = np.zeros((K, v))
    var = np.zeros((K, v))
    pinv = np.linalg.pinv(X)
    B = pinv @ Y
    R = Y - X @ B
    if noise_model == "ols":
        eff[:] = B[:K]
        var[:] = np.diag(pinv @ pinv.T)[:K, None] * ((R**2).sum(0) / df)[None]
        return eff, var, df
    if noise_model != "ar1":
        raise UsageError(f"noise_model must be 'ar1' or 'ols', got {noise_model!r}")
    rho = (R[1:] * R[:-1]).sum(0) / np.maximum((R * R).sum(0), 1e-30)
    rho = np.trunc(rho * 100) / 100  # nilearn's binning
    for r in np.unique(rho):
        sel = rho == r
        Xw = X.copy()
        Xw[1:] -= r * X[:-1]
        Xw[0] *= np.sqrt(max(1 - r * r, 1e-6))
        Yw = Y[:, sel].copy()
        Yw[1:] -= r * Y[:-1, sel]
        Yw[0] *= np.sqrt(max(1 - r * r, 1e-6))
        pw = np.linalg.pinv(Xw)
        th = pw @ Yw
        disp = ((Yw - Xw @ th) ** 2).sum(0) / df
        eff[:, sel] = th[:K]
        var[:, sel] = np.diag(pw @ pw.T)[:K, None] * disp[None]
    return eff, var, df


def fit_encoding(
    runs: Sequence[RunData],
    *,
    cv_folds: int = 5,
    alphas: np.ndarray = DEFAULT_ALPHAS,
    n_permutations: int = 200,
    fdr_alpha: float = 0.05,
    seed: int = 0,
    backend: str = "numpy",
    n_targets_batch: int = 20000,
    gap: int = 5,
    inner_folds: int = 3,
    min_shift_fraction: float = 0.1,
    noise_model: str = "ar1",
    null: str = "normal",
) -> EncodingResult:
    """Fit the atoms as fixed regressors of every voxel's BOLD.

    Parameters
    ----------
    runs : sequence of RunData
        The runs of one participant on one story (same mask, same atoms).
    cv_folds : int
        Contiguous outer blocks when there is a single run.
    alphas : ndarray, shape (n_alphas,)
        Ridge penalties searched per voxel on inner folds.
    n_permutations : int
        Circular shifts of the design for the null of ``cv_r`` (0: no test, p = 1).
    fdr_alpha : float
        Benjamini-Hochberg level for ``significant``.
    seed : int
        Seeds the shifts.
    backend : {"numpy", "torch", "torch_cuda", "auto"}
        himalaya backend for the ridge and the null ("auto": CUDA when available).
    n_targets_batch : int
        Voxels processed at once (memory knob).
    gap : int
        Frames dropped from training on each side of a contiguous test block.
    inner_folds : int
        Contiguous inner blocks for the choice of alpha.
    min_shift_fraction : float
        Smallest circular shift, as a fraction of the run.
    noise_model : str
        nilearn ``run_glm`` error model for the effect/z maps ("ar1" or "ols").
    null : {"normal", "empirical"}
        How ``p`` is read from the circular-shift null. "empirical":
        ``(1 + #null >= observed) / (1 + n_permutations)``, whose resolution
        (>= 1 / (1 + n_permutations)) is too coarse for FDR over a whole brain.
        "normal" (default): the upper tail of a normal with the voxel's null
        mean and standard deviation, which gives p-values below that floor; it
        agrees with the empirical p where both resolve (see docs/encoding.md).
        Both are returned (``info['p_empirical']``).

    Returns
    -------
    EncodingResult
        Voxel arrays of shape (n_voxels,) or (n_atoms, n_voxels); see its docs.

    Raises
    ------
    DataError
        Inconsistent shapes, too few frames for the parameters, constant atoms.
    """
    t0 = time.perf_counter()
    n_vox, K = _check_runs(runs)
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if n_permutations < 0:
        raise UsageError("n_permutations must be >= 0")
    if null not in ("normal", "empirical"):
        raise UsageError(f"null must be 'normal' or 'empirical', got {null!r}")
    if null == "normal" and 0 < n_permutations < 20:
        raise UsageError("the normal null needs at least 20 circular shifts")
    prep = _prepare(runs, K)
    lengths = [len(k) for k in prep.kept]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    slices = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    Dc = np.concatenate(prep.D).astype(np.float32)  # (n_total, K)
    Draw = np.concatenate(prep.D_raw)  # the same before confound regression
    n_total = Dc.shape[0]
    folds, scheme = _outer_inner_folds(lengths, cv_folds, gap, inner_folds)
    cleaners = [_FoldCleaner(prep.C, slices, train, test) for train, test, _ in folds]
    shifts = stats.circular_shifts(lengths, n_permutations, min_shift_fraction, seed) if n_permutations else None

    # in-sample OLS with per-run intercepts
    X_full = np.zeros((n_total, K + len(runs)))
    X_full[:, :K] = Dc
    for j, sl in enumerate(slices):
        X_full[sl, K + j] = 1.0
    pinv_full = np.linalg.pinv(X_full)

    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        if run.repeat_group is not None:
            groups.setdefault(run.repeat_group, []).append(i)
    groups = {g: idx for g, idx in groups.items() if len(idx) > 1}

    prev_backend = get_backend()
    if backend == "auto":
        bk = set_backend("torch_cuda", on_error="warn")
        if bk.name != "torch_cuda":
            bk = set_backend("numpy")
    else:
        try:
            bk = set_backend(backend, on_error="raise")
        except Exception as exc:
            raise UsageError(f"himalaya backend {backend!r} is not available: {exc}") from exc

    effect = np.zeros((K, n_vox), np.float32)
    variance = np.full((K, n_vox), np.nan, np.float32)
    zmap = np.zeros((K, n_vox), np.float32)
    cv_r = np.zeros(n_vox, np.float32)
    cv_r2 = np.zeros(n_vox, np.float32)
    p_emp = np.ones(n_vox, np.float64)
    null_mean = np.zeros(n_vox, np.float64)
    null_sd = np.full(n_vox, np.nan, np.float64)
    r2_in = np.zeros(n_vox, np.float32)
    ceiling = np.full(n_vox, np.nan, np.float32) if groups else None
    excluded = np.zeros(n_vox, bool)
    alpha_counts = np.zeros(len(alphas), np.int64)
    timings = {"clean": 0.0, "glm": 0.0, "cv": 0.0, "null": 0.0}

    try:
        for b0 in range(0, n_vox, n_targets_batch):
            b1 = min(n_vox, b0 + n_targets_batch)
            log.info("encoding voxels %d-%d of %d", b0, b1, n_vox)
            t = time.perf_counter()
            valid = np.ones(b1 - b0, bool)
            for i, run in enumerate(runs):
                Yk = np.asarray(run.Y[:, b0:b1])[prep.kept[i]]
                valid &= np.isfinite(Yk).all(0)
                with np.errstate(invalid="ignore"):
                    valid &= np.nan_to_num(Yk.std(0)) > 1e-8
            cols = np.flatnonzero(valid)
            Yruns, Yraw = [], []
            for i, run in enumerate(runs):
                y = np.asarray(run.Y[:, b0:b1])[:, cols]
                Yruns.append(_clean(y, prep.conf[i], run.sample_mask))
                Yraw.append(_zscore(y[prep.kept[i]]).astype(np.float32))
            post_ok = np.all([y.std(0) > 1e-6 for y in Yruns], axis=0)
            cols, Yruns = cols[post_ok], [y[:, post_ok] for y in Yruns]
            Yraw = np.concatenate([y[:, post_ok] for y in Yraw])
            valid[:] = False
            valid[cols] = True
            excluded[b0:b1] = ~valid
            gidx = b0 + cols
            timings["clean"] += time.perf_counter() - t
            if cols.size == 0:
                continue

            # effect, variance, z: AR(1) GLM per run, fixed effects over runs
            t = time.perf_counter()
            num = np.zeros((K, cols.size))
            den = np.zeros((K, cols.size))
            df_tot = 0
            for i in range(len(runs)):
                e, v, df = _glm_run(Yruns[i], prep.D[i].astype(np.float64), prep.n_conf[i], noise_model)
                num += e / v
                den += 1.0 / v
                df_tot += df
            eff = num / den
            var = 1.0 / den
            effect[:, gidx] = eff
            variance[:, gidx] = var
            zmap[:, gidx] = stats.t_to_z(eff / np.sqrt(var), df_tot)
            Yc = np.concatenate(Yruns).astype(np.float32)  # (n_total, v)
            del Yruns
            B = pinv_full.astype(np.float32) @ Yc
            resid = Yc - X_full.astype(np.float32) @ B
            sst = np.zeros(cols.size)
            for sl in slices:
                sst += ((Yc[sl] - Yc[sl].mean(0)) ** 2).sum(0)
            r2_in[gidx] = 1.0 - (resid**2).sum(0) / sst
            del resid, B
            if groups:
                ceiling[gidx] = _noise_ceiling(Yc, slices, prep.kept, groups)
            timings["glm"] += time.perf_counter() - t

            # cross-validated ridge
            t = time.perf_counter()
            fold_cache = []
            r_sum = 0.0
            sse = 0.0
            sst = 0.0
            for (train, test, inner), clean in zip(folds, cleaners):
                Yb = bk.asarray(clean(Yraw))
                Xb = bk.asarray(clean(Draw))
                Xtr, Ytr = Xb[train], Yb[train]
                mx, my = Xtr.mean(0), Ytr.mean(0)
                Xtr, Ytr = Xtr - mx, Ytr - my
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    best, coefs, _ = solve_ridge_cv_svd(
                        Xtr, Ytr, alphas=bk.asarray(alphas.astype(np.float32)), cv=inner,
                        local_alpha=True, n_targets_batch=n_targets_batch, warn=False,
                    )
                coefs = bk.asarray(coefs)
                Yte = Yb[test]
                pred = (Xb[test] - mx) @ coefs + my
                r_sum = r_sum + stats.pearson_columns(pred, Yte)
                sse = sse + ((Yte - pred) ** 2).sum(0)
                sst = sst + ((Yte - Yte.mean(0)) ** 2).sum(0)
                best_np = bk.to_numpy(best)
                alpha_counts += np.bincount(np.abs(np.log(alphas)[:, None] - np.log(best_np)[None]).argmin(0),
                                            minlength=len(alphas))
                Yte_c = Yte - Yte.mean(0)
                Yte_n = Yte_c / ((Yte_c**2).sum(0) ** 0.5 + 1e-12)
                fold_cache.append((train, test, Ytr, Yte_n, bk.asarray(best), clean))
            obs = bk.to_numpy(r_sum / len(folds))
            cv_r[gidx] = obs
            cv_r2[gidx] = bk.to_numpy(1.0 - sse / sst)
            timings["cv"] += time.perf_counter() - t

            # circular-shift null
            t = time.perf_counter()
            if n_permutations:
                exceed = np.zeros(cols.size, np.int64)
                s1 = np.zeros(cols.size)
                s2 = np.zeros(cols.size)
                obs_b = bk.asarray(obs)
                for k in range(n_permutations):
                    Xs_raw = stats.shift_within_runs(Draw, slices, shifts[k])
                    r_null = 0.0
                    for train, test, Ytr, Yte_n, best, clean in fold_cache:
                        Xs = clean(Xs_raw)
                        Xtr = Xs[train]
                        mx = Xtr.mean(0)
                        U, s, Vt = np.linalg.svd(Xtr - mx, full_matrices=False)
                        M = bk.asarray(((Xs[test] - mx) @ Vt.T).astype(np.float32))  # (n_te, K)
                        UtY = bk.asarray(U.T.astype(np.float32)) @ Ytr  # (K, v)
                        sb = bk.asarray(s.astype(np.float32))[:, None]
                        pred = M @ (sb / (sb**2 + best[None]) * UtY)
                        pred = pred - pred.mean(0)
                        r_null = r_null + (pred * Yte_n).sum(0) / ((pred**2).sum(0) ** 0.5 + 1e-12)
                    r_null = r_null / len(fold_cache)
                    exceed += bk.to_numpy(r_null >= obs_b).astype(np.int64)
                    r_np = bk.to_numpy(r_null).astype(np.float64)
                    s1 += r_np
                    s2 += r_np**2
                p_emp[gidx] = stats.permutation_p(obs, exceed, n_permutations)
                null_mean[gidx] = s1 / n_permutations
                null_sd[gidx] = np.sqrt(np.maximum(s2 - s1**2 / n_permutations, 0) / max(n_permutations - 1, 1))
            timings["null"] += time.perf_counter() - t
            del fold_cache, Yb, Yc, Yraw
    finally:
        set_backend(prev_backend)

    ok = ~excluded
    if null == "normal" and n_permutations:
        p = np.ones(n_vox, np.float64)
        p[ok] = stats.normal_p(cv_r[ok], null_mean[ok], null_sd[ok])
    else:
        p = p_emp
    significant = np.zeros(n_vox, bool)
    if n_permutations and ok.any():
        significant[ok] = stats.fdr_bh(p[ok], fdr_alpha)[0]
    n_exc = int(excluded.sum())
    if n_exc:
        log.warning("%d of %d voxels excluded (non-finite or constant in a run); their outputs are 0, p = 1",
                    n_exc, n_vox)
    seconds = time.perf_counter() - t0
    info = {
        "noise_model": noise_model,
        "effect_combination": "fixed effects over runs" if len(runs) > 1 else "single run",
        "fold_scheme": scheme,
        "inner_folds": "leave-one-run-out" if len(runs) > 2 else f"{inner_folds} contiguous blocks, gap {gap}",
        "cv_r": "mean over outer folds of Pearson r",
        "cv_r2": "1 - sum SSE / sum SST over held-out folds",
        "alphas": alphas.tolist(),
        "alpha_counts": alpha_counts.tolist(),
        "alpha_median": float(np.repeat(alphas, alpha_counts)[alpha_counts.sum() // 2]) if alpha_counts.sum() else None,
        "null": (f"circular shift of the design within runs, ridge refit with the selected alphas; p {null}"
                 if n_permutations else "none"),
        "p_kind": null if n_permutations else None,
        "p_empirical": p_emp,
        "null_mean": null_mean.astype(np.float32),
        "null_sd": null_sd.astype(np.float32),
        "n_permutations": int(n_permutations),
        "min_shift_fraction": float(min_shift_fraction),
        "fdr_alpha": float(fdr_alpha),
        "n_significant": int(significant.sum()),
        "excluded_voxels": n_exc,
        "excluded_mask": excluded,
        "noise_ceiling": "Spearman-Brown corrected mean between-repeat r" if groups else None,
        "n_frames": lengths,
        "backend": bk.name,
        "seconds": round(seconds, 2),
        "seconds_by_stage": {k: round(v, 2) for k, v in timings.items()},
    }
    log.info("encoding done in %.1f s: %d voxels, %d significant, %d excluded", seconds, n_vox,
             info["n_significant"], n_exc)
    return EncodingResult(effect=effect, variance=variance, z=zmap, cv_r=cv_r, cv_r2=cv_r2, p=p,
                          significant=significant, in_sample_r2=r2_in, noise_ceiling=ceiling,
                          design=Dc, info=info)


def _noise_ceiling(Yc: np.ndarray, slices, kept, groups: dict) -> np.ndarray:
    """Spearman-Brown corrected between-repeat correlation, averaged over repeat groups.

    Frames are matched by their index in the run (frames removed in any repeat are skipped).
    """
    out = []
    for idx in groups.values():
        common = kept[idx[0]]
        for i in idx[1:]:
            common = np.intersect1d(common, kept[i])
        rows = [slices[i].start + np.searchsorted(kept[i], common) for i in idx]
        rs = [stats.pearson_columns(Yc[rows[a]], Yc[rows[b]])
              for a in range(len(idx)) for b in range(a + 1, len(idx))]
        out.append(stats.spearman_brown(np.mean(rs, axis=0), len(idx)))
    return np.mean(out, axis=0).astype(np.float32)
