"""Voxel-wise encoding of BOLD by fixed regressors (the dictionary's atoms).

One call of :func:`fit_encoding` handles one participant and one story (one or
more runs). For every mask voxel it gives

- per atom, an effect, its variance and a z value: by default the marginal
  regression of the cleaned BOLD on that atom alone (``atom_model``; the
  joint OLS of all atoms is an option), per run; the variance is the
  white-noise variance times the mean square of the atom's t value when the
  design is circularly shifted within the run (the shifts of the CV null),
  which respects any stationary autocorrelation of the noise; runs combined
  by fixed effects (inverse-variance weighting). An AR(1) model estimated
  from the residuals of 64 collinear atoms was measured too liberal (|z| >
  3.1 at 9-19x its nominal rate on null data); it stays as
  ``noise_model="ar1"`` (joint);
- in-sample R^2 of the OLS fit (runs stacked) and its chance level, the mean
  in-sample R^2 under the same shifts;
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
  again): the ceiling of a single-run prediction's r, ``sqrt`` of the mean
  between-repeat r over story frames aligned by story time.

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
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from himalaya.backend import get_backend, set_backend
from himalaya.ridge import solve_ridge_cv_svd
from nilearn import signal
from threadpoolctl import threadpool_limits

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
    story_time : ndarray, shape (n_frames,), or None
        Each frame's time relative to the start of the story's audio (s): repeats
        are aligned by it for the noise ceiling.
    story_end : float or None
        Audio time of the last word's end (s): the noise ceiling uses frames up to
        ``CEILING_TAIL_S`` after it.
    baseline : ndarray, shape (n_frames, n_baselines), or None
        Low-level regressors at this run's frames (word rate, phoneme rate, audio
        envelope: ``signal.baselines``), a second feature space: the atoms' effect
        maps are estimated with them in the model, and the cross-validated R^2 is
        partitioned between them and the atoms (see :func:`fit_encoding`). All
        runs have one or none.
    """

    Y: np.ndarray
    design: np.ndarray
    confounds: Optional[pd.DataFrame] = None
    sample_mask: Optional[np.ndarray] = None
    repeat_group: Optional[str] = None
    name: str = ""
    story_frames: Optional[int] = None
    story_time: Optional[np.ndarray] = None
    story_end: Optional[float] = None
    baseline: Optional[np.ndarray] = None


CEILING_TAIL_S = 8.0  # the haemodynamic response to the last words (its peak is ~5 s)


@dataclass
class _Prepared:
    kept: list  # frame indices kept per run
    D: list  # cleaned design per run, (n_kept, K) float32
    conf: list  # confound arrays per run (n_frames, c) or None
    n_conf: list
    D_raw: list  # design per run at kept frames, z-scored, before confound regression
    C: list  # per run (n_kept, c + 1): standardized confounds at kept frames and an intercept
    Q: list  # per run: orthonormal basis of C's columns
    Q_glm: list  # per run: orthonormal basis of C's and the baselines' columns (the atom maps' model)
    Qb: list  # per run: orthonormal basis of the baselines cleaned of C (None without baselines)
    B_raw: list  # per run: z-scored baselines at kept frames (None without baselines)


def _orth(C: np.ndarray) -> np.ndarray:
    """Orthonormal basis of the column span of ``C`` (rank-deficient confounds allowed)."""
    U, s, _ = np.linalg.svd(np.asarray(C, np.float64), full_matrices=False)
    return U[:, s > s[0] * 1e-8]


def _residualize(X: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """``X`` with the span of ``Q`` (confounds + intercept) projected out, columns z-scored.

    The same cleaning as ``nilearn.signal.clean(confounds=..., standardize_confounds=True,
    standardize="zscore_sample")`` at the kept frames (its confounds are zero-mean, so
    the intercept is orthogonal to them), written out so that it is cheap to apply to
    each circularly shifted design.
    """
    X = np.asarray(X, np.float64)
    R = X - Q @ (Q.T @ X)
    sd = R.std(0, ddof=1)
    return (R - R.mean(0)) / np.where(sd > 0, sd, 1.0)


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

    def flops(self, n_columns: int) -> float:
        """Multiply-adds (x2) of one call on ``n_columns`` columns."""
        return sum(4.0 * Cp.shape[0] * Cp.shape[1] * n_columns for _, Cp, _ in self.parts)

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
        if (run.baseline is None) != (runs[0].baseline is None):
            raise DataError(f"{lab}: baseline regressors in some runs and not in others")
        if run.baseline is not None:
            B = np.asarray(run.baseline)
            if B.ndim != 2 or B.shape[0] != Y.shape[0] or B.shape[1] < 1:
                raise DataError(f"{lab}: baselines must be (frames, n_baselines) with {Y.shape[0]} frames, "
                                f"got shape {B.shape}")
            if B.shape[1] != np.shape(runs[0].baseline)[1]:
                raise DataError(f"{lab}: {B.shape[1]} baselines, the first run has {np.shape(runs[0].baseline)[1]}")
            if not np.isfinite(B).all():
                raise DataError(f"{lab}: the baselines have non-finite values")
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
    """nilearn's confound regression and z-scoring of one run's BOLD at its kept frames."""
    return signal.clean(
        np.asarray(X, dtype=np.float64), detrend=False, standardize="zscore_sample",
        confounds=conf, standardize_confounds=True, filter=False, sample_mask=sample_mask,
    )



def _prepare(runs: Sequence[RunData], n_atoms: int) -> _Prepared:
    kept, D, confs, n_conf, D_raw, C, Q, Q_glm, Qb, B_raw = [], [], [], [], [], [], [], [], [], []
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
        nb = 0 if run.baseline is None else np.shape(run.baseline)[1]
        if len(k) <= n_atoms + c + nb + 2:
            raise DataError(
                f"{lab}: {len(k)} usable frames for {n_atoms} atoms + {nb} baselines + {c} confounds + "
                "intercept; need more frames than parameters (fewer atoms, fewer confounds or no scrubbing)"
            )
        Ck = np.ones((len(k), c + 1))
        if conf is not None:
            Ck[:, :c] = _zscore(conf[k])
        Qk = _orth(Ck)
        Qg, Qbk, braw = Qk, None, None
        if nb:
            braw = _zscore(np.asarray(run.baseline, dtype=np.float64)[k])
            bres = braw - Qk @ (Qk.T @ braw)
            if np.any(bres.std(0) < 1e-6):
                bad = np.flatnonzero(bres.std(0) < 1e-6).tolist()
                raise DataError(f"{lab}: baselines {bad} are constant at this run's frames (or explained by "
                                "the confounds)")
            Qbk = _orth(bres)
            Qg = _orth(np.column_stack([Ck, braw]))
        raw = _zscore(np.asarray(run.design, dtype=np.float64)[k])
        resid_sd = (raw - Qg @ (Qg.T @ raw)).std(0)
        if np.any(resid_sd < 1e-6):
            bad = np.flatnonzero(resid_sd < 1e-6).tolist()
            raise DataError(f"{lab}: atoms {bad} are constant at this run's frames (or explained by the "
                            "confounds and baselines)")
        kept.append(k)
        D.append(_residualize(raw, Qg).astype(np.float32))
        confs.append(conf)
        n_conf.append(c)
        D_raw.append(raw.astype(np.float32))
        C.append(Ck.astype(np.float32))
        Q.append(Qk)
        Q_glm.append(Qg)
        Qb.append(Qbk)
        B_raw.append(None if braw is None else braw.astype(np.float32))
    return _Prepared(kept, D, confs, n_conf, D_raw, C, Q, Q_glm, Qb, B_raw)


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


def _check_folds(folds, scheme: str, n_frames: int, n_atoms: int) -> None:
    """Every outer and inner training and test set has frames (DataError naming the shortfall).

    A short run with several folds (e.g. 39 frames, 2 outer folds and a 5-frame gap) leaves
    the inner splits of an outer training set without training frames.
    """
    for f, (train, test, inner) in enumerate(folds):
        sizes = [len(train), len(test)] + [n for tr, te in inner for n in (len(tr), len(te))]
        if min(sizes) < 2 or len(train) <= n_atoms:
            raise DataError(
                f"{n_frames} frames are too few for the cross-validation ({scheme}, {len(inner)} inner "
                f"splits to choose the ridge penalty): outer fold {f + 1} trains on {len(train)} frames, its inner "
                f"splits on {min((len(tr) for tr, _ in inner), default=0)}; {n_atoms} atoms need more. "
                "Try another --cv-folds (more folds train on more frames), or longer runs")


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
    n_permutations: int = 100,
    fdr_alpha: float = 0.05,
    seed: int = 0,
    backend: str = "numpy",
    n_targets_batch: int = 20000,
    gap: int = 5,
    inner_folds: int = 3,
    min_shift_fraction: float = 0.1,
    atom_model: str = "marginal",
    noise_model: str = "shift",
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
        Circular shifts of the design: the null of ``cv_r``, of each atom's
        effect and of the in-sample R^2 (0: no test, p = 1).
    fdr_alpha : float
        Benjamini-Hochberg level for ``significant``.
    seed : int
        Seeds the shifts.
    backend : {"numpy", "torch", "torch_cuda", "auto"}
        himalaya backend for the ridge and the nulls ("auto": CUDA when available).
    n_targets_batch : int
        Voxels processed at once (memory knob).
    gap : int
        Frames dropped from training on each side of a contiguous test block.
    inner_folds : int
        Contiguous inner blocks for the choice of alpha.
    min_shift_fraction : float
        Smallest circular shift, as a fraction of the run.
    atom_model : {"marginal", "joint"}
        What each atom's effect map is. "marginal" (default): the regression
        of the voxel's cleaned BOLD on that atom alone (the slope is the
        correlation r, both z-scored): where the atom's time course appears
        in the brain. "joint": the atom's OLS coefficient with all atoms in
        one model (its unique contribution). With 64 collinear atoms
        (variance inflation ~240) joint effects are not identifiable: on the
        simulator, the atom that matches a planted word-rate signal at r 0.88
        had a median joint z of -0.1 in the planted map and a median marginal
        z of 3.0 (docs/encoding.md). The cross-validated ridge is always joint.
    noise_model : {"shift", "ar1", "ols"}
        How the atoms' effect variances (and so their z) are estimated.
        "shift" (default): the white-noise OLS variance times the mean square
        of the atom's OLS t value when the design is circularly shifted within
        each run (the same shifts as the CV null), so that any stationary
        autocorrelation of the noise (AR, 1/f) is respected, while a strong
        signal (which the shifted fits leave in their residuals) does not
        inflate the null; z from t with ``n_permutations`` degrees of freedom.
        "ar1" (joint only): nilearn's AR(1) prewhitening (``run_glm``'s model),
        which was measured too liberal with 64 collinear atoms
        (docs/encoding.md); "ols": white-noise t. With ``n_permutations=0``,
        "shift" falls back to "ols" (logged): uncalibrated.
    null : {"normal", "empirical"}
        How ``p`` is read from the circular-shift null. "empirical":
        ``(1 + #null >= observed) / (1 + n_permutations)``, whose resolution
        (>= 1 / (1 + n_permutations)) is too coarse for FDR over a whole brain.
        "normal" (default): the upper tail of a normal null with the voxel's
        null mean and standard deviation, as the predictive Student t with
        ``n_permutations - 1`` degrees of freedom (the mean and sd are
        estimates), which gives p-values below that floor; it agrees with the
        empirical p where both resolve (see docs/encoding.md).
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
    if noise_model not in ("shift", "ar1", "ols"):
        raise UsageError(f"noise_model must be 'shift', 'ar1' or 'ols', got {noise_model!r}")
    if atom_model not in ("marginal", "joint"):
        raise UsageError(f"atom_model must be 'marginal' or 'joint', got {atom_model!r}")
    if noise_model == "ar1" and atom_model != "joint":
        raise UsageError("noise_model='ar1' is implemented for atom_model='joint' only")
    if null == "normal" and 0 < n_permutations < 20:
        raise UsageError("the normal null needs at least 20 circular shifts")
    if noise_model == "shift" and not n_permutations:
        log.warning("no circular shifts (n_permutations=0): the atoms' z maps are white-noise t values, "
                    "not calibrated for autocorrelated noise (docs/encoding.md)")
        noise_model = "ols"
    prep = _prepare(runs, K)
    nb = 0 if runs[0].baseline is None else int(np.shape(runs[0].baseline)[1])
    lengths = [len(k) for k in prep.kept]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    slices = [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    Dc = np.concatenate(prep.D).astype(np.float32)  # (n_total, K)
    Draw = np.concatenate(prep.D_raw)  # the same before confound regression
    folds, scheme = _outer_inner_folds(lengths, cv_folds, gap, inner_folds)
    _check_folds(folds, scheme, sum(lengths), K)
    cleaners = [_FoldCleaner(prep.C, slices, train, test) for train, test, _ in folds]
    shifts = stats.circular_shifts(lengths, n_permutations, min_shift_fraction, seed) if n_permutations else None
    # residual degrees of freedom of each run's atom model (the confounds were regressed out before)
    glm_df = [n - (K if atom_model == "joint" else 1) - c - nb - 1 for n, c in zip(lengths, prep.n_conf)]
    base_folds = None
    if nb:
        Braw = np.concatenate(prep.B_raw).astype(np.float64)
        base_folds = [_BaselineFold(clean(Braw), train, test) for (train, test, _), clean in zip(folds, cleaners)]
    t = time.perf_counter()
    # Small matrices (frames x atoms): one BLAS thread. Several threads on matrices this
    # small spin and wait; on a loaded 2-core machine that was measured 27x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        observed_ops = _ShiftOps(Draw, [0] * len(runs), slices, prep, folds, cleaners, atom_model)
        null_ops = [_ShiftOps(Draw, shifts[k], slices, prep, folds, cleaners, atom_model, base_folds)
                    for k in range(n_permutations)]
    t_ops = time.perf_counter() - t

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
    r2_chance = np.full(n_vox, np.nan, np.float32) if n_permutations else None
    ceiling = np.full(n_vox, np.nan, np.float32) if groups else None
    part = None  # variance partitioning with the baselines: CV R^2 of each model, the unique part's null
    if nb:
        part = {"baseline": np.zeros(n_vox, np.float32), "joint": np.zeros(n_vox, np.float32),
                "unique": np.zeros(n_vox, np.float32), "p_emp": np.ones(n_vox), "mean": np.zeros(n_vox),
                "sd": np.full(n_vox, np.nan), "r_unique": np.zeros(n_vox, np.float32)}
    excluded = np.zeros(n_vox, bool)
    alpha_counts = np.zeros(len(alphas), np.int64)
    timings = {"clean": 0.0, "glm": 0.0, "cv": 0.0, "null": 0.0}
    flops = {"glm": 0.0, "cv": 0.0, "null": 0.0}
    if groups:
        pairs = {g: _repeat_pairs(runs, idx, prep.kept, slices) for g, idx in groups.items()}

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
            if nb:  # the atom maps' model holds the baselines: the BOLD is cleaned of them too
                Yglm = [_residualize(y, Qb) for y, Qb in zip(Yruns, prep.Qb)]
                post_ok &= np.all([y.std(0) > 1e-6 for y in Yglm], axis=0)
                Yglm = [y[:, post_ok] for y in Yglm]
            cols, Yruns = cols[post_ok], [y[:, post_ok] for y in Yruns]
            if not nb:
                Yglm = Yruns
            Yraw = np.concatenate([y[:, post_ok] for y in Yraw])
            valid[:] = False
            valid[cols] = True
            excluded[b0:b1] = ~valid
            gidx = b0 + cols
            timings["clean"] += time.perf_counter() - t
            if cols.size == 0:
                continue
            nv = cols.size

            # effects of the atoms (OLS per run) and in-sample R^2 (runs stacked)
            t = time.perf_counter()
            Yc = np.concatenate(Yglm).astype(np.float32)  # (n_total, v)
            yy = [(y.astype(np.float64) ** 2).sum(0) for y in Yglm]  # cleaned BOLD has mean 0
            sst = np.sum(yy, axis=0)
            Ycb = bk.asarray(Yc)
            yyb = [bk.asarray(v.astype(np.float32)) for v in yy]
            eff_runs, se_runs, ess = observed_ops.glm(Ycb, slices, yyb, glm_df, bk)
            eff_runs = [bk.to_numpy(e).astype(np.float64) for e in eff_runs]
            se_runs = [bk.to_numpy(e).astype(np.float64) for e in se_runs]
            r2_in[gidx] = bk.to_numpy(ess) / sst
            flops["glm"] += observed_ops.glm_flops(nv)
            if noise_model == "ols":
                effect[:, gidx], variance[:, gidx], zmap[:, gidx] = _fixed_effects(
                    eff_runs, [se**2 for se in se_runs], sum(glm_df))
            elif noise_model == "ar1":
                fits = [_glm_run(Yglm[i], prep.D[i].astype(np.float64), prep.n_conf[i] + nb, noise_model)
                        for i in range(len(runs))]
                effect[:, gidx], variance[:, gidx], zmap[:, gidx] = _fixed_effects(
                    [f[0] for f in fits], [f[1] for f in fits], sum(f[2] for f in fits))
            if groups:  # of the BOLD cleaned of the confounds only: the baselines' signal is repeatable too
                Yconf = np.concatenate(Yruns).astype(np.float32) if nb else Yc
                ceiling[gidx] = np.mean([_noise_ceiling(Yconf, pr) for pr in pairs.values()], axis=0)
                del Yconf
            del Yruns, Yglm
            timings["glm"] += time.perf_counter() - t

            # cross-validated ridge
            t = time.perf_counter()
            fold_cache, joint_cache = [], []
            r_sum = 0.0
            sse = 0.0
            sst_cv = 0.0
            sse_base = sse_joint = ru_sum = 0.0
            for f, ((train, test, inner), clean) in enumerate(zip(folds, cleaners)):
                Yb = bk.asarray(clean(Yraw))
                Xb = bk.asarray(clean(Draw))
                Xtr, Ytr = Xb[train], Yb[train]
                mx, my = Xtr.mean(0), Ytr.mean(0)
                Xtr, Ytr = Xtr - mx, Ytr - my
                best, coefs, _ = solve_ridge_cv_svd(
                    Xtr, Ytr, alphas=bk.asarray(alphas.astype(np.float32)), cv=inner,
                    local_alpha=True, n_targets_batch=n_targets_batch, warn=False,
                )
                coefs = bk.asarray(coefs)
                Yte = Yb[test]
                pred = (Xb[test] - mx) @ coefs + my
                r_sum = r_sum + stats.pearson_columns(pred, Yte)
                sse = sse + ((Yte - pred) ** 2).sum(0)
                sst_cv = sst_cv + ((Yte - Yte.mean(0)) ** 2).sum(0)
                best_np = bk.to_numpy(best)
                alpha_counts += np.bincount(np.abs(np.log(alphas)[:, None] - np.log(best_np)[None]).argmin(0),
                                            minlength=len(alphas))
                Yte_c = Yte - Yte.mean(0)
                Yte_n = Yte_c / ((Yte_c**2).sum(0) ** 0.5 + 1e-12)
                fold_cache.append((Ytr, Yte_n, bk.asarray(best)))
                flops["cv"] += _ridge_cv_flops(len(train), len(test), inner, len(alphas),
                                               len(np.unique(best_np)), K, nv) + clean.flops(nv)
                if nb:  # baselines alone (OLS), and baselines (unpenalized) + atoms (ridge)
                    bf = base_folds[f]
                    Btr, Bte, P = (bk.asarray(a) for a in (bf.Btr, bf.Bte, bf.P))
                    PY = P @ Ytr
                    pred_b = Bte @ PY + my
                    PX = P @ Xtr
                    Xtr_b = Xtr - Btr @ PX
                    best_j, coefs_j, _ = solve_ridge_cv_svd(
                        Xtr_b, Ytr - Btr @ PY, alphas=bk.asarray(alphas.astype(np.float32)), cv=inner,
                        local_alpha=True, n_targets_batch=n_targets_batch, warn=False,
                    )
                    pred_a = ((Xb[test] - mx) - Bte @ PX) @ bk.asarray(coefs_j)  # the atoms' part
                    resid = Yte - pred_b
                    sse_base = sse_base + (resid ** 2).sum(0)
                    sse_joint = sse_joint + ((resid - pred_a) ** 2).sum(0)
                    ru_sum = ru_sum + stats.pearson_columns(pred_a, resid)
                    resid = resid - resid.mean(0)
                    joint_cache.append((Ytr, resid / ((resid**2).sum(0) ** 0.5 + 1e-12), bk.asarray(best_j)))
                    flops["cv"] += 2 * _ridge_cv_flops(len(train), len(test), inner, len(alphas),
                                                       len(np.unique(bk.to_numpy(best_j))), K, nv)
            obs = bk.to_numpy(r_sum / len(folds))
            cv_r[gidx] = obs
            cv_r2[gidx] = bk.to_numpy(1.0 - sse / sst_cv)
            if nb:
                r2_base = bk.to_numpy(1.0 - sse_base / sst_cv).astype(np.float64)
                uniq = bk.to_numpy(1.0 - sse_joint / sst_cv).astype(np.float64) - r2_base
                part["baseline"][gidx] = r2_base
                part["joint"][gidx] = r2_base + uniq
                part["unique"][gidx] = uniq
                ru_obs = bk.to_numpy(ru_sum / len(folds)).astype(np.float64)
                part["r_unique"][gidx] = ru_obs
            timings["cv"] += time.perf_counter() - t

            # circular-shift null: the same statistics with the design shifted within runs
            t = time.perf_counter()
            if n_permutations:
                exceed = np.zeros(nv, np.int64)
                s1 = np.zeros(nv)
                s2 = np.zeros(nv)
                t_sq = [bk.zeros_like(Ycb, shape=(K, nv)) for _ in runs]
                r2_sum = bk.zeros_like(Ycb, shape=(nv,))
                obs_b = bk.asarray(obs)
                u_exceed = np.zeros(nv, np.int64)
                u1 = np.zeros(nv)
                u2 = np.zeros(nv)
                for ops in null_ops:
                    e_null, se_null, ess_null = ops.glm(Ycb, slices, yyb, glm_df, bk)
                    for acc, e, se in zip(t_sq, e_null, se_null):
                        t_val = e / (se + 1e-30)
                        acc += t_val * t_val
                    r2_sum += ess_null
                    r_null = ops.cv_r(fold_cache, bk)
                    exceed += bk.to_numpy(r_null >= obs_b).astype(np.int64)
                    r_np = bk.to_numpy(r_null).astype(np.float64)
                    s1 += r_np
                    s2 += r_np**2
                    flops["null"] += ops.glm_flops(nv) + ops.cv_flops(nv)
                    if nb:  # the unique part's r with the atoms shifted and the baselines in place
                        u = bk.to_numpy(ops.cv_unique_r(joint_cache, bk)).astype(np.float64)
                        u_exceed += u >= ru_obs
                        u1 += u
                        u2 += u * u
                p_emp[gidx] = stats.permutation_p(obs, exceed, n_permutations)
                null_mean[gidx] = s1 / n_permutations
                null_sd[gidx] = np.sqrt(np.maximum(s2 - s1**2 / n_permutations, 0) / max(n_permutations - 1, 1))
                r2_chance[gidx] = bk.to_numpy(r2_sum).astype(np.float64) / n_permutations / sst
                if nb:
                    part["p_emp"][gidx] = stats.permutation_p(ru_obs, u_exceed, n_permutations)
                    part["mean"][gidx] = u1 / n_permutations
                    part["sd"][gidx] = np.sqrt(np.maximum(u2 - u1**2 / n_permutations, 0)
                                               / max(n_permutations - 1, 1))
                if noise_model == "shift":
                    # variance = white-noise variance x the mean square of t under the shifts
                    calibrated = [se**2 * bk.to_numpy(acc).astype(np.float64) / n_permutations
                                  for se, acc in zip(se_runs, t_sq)]
                    effect[:, gidx], variance[:, gidx], zmap[:, gidx] = _fixed_effects(
                        eff_runs, calibrated, n_permutations)
                del t_sq
            timings["null"] += time.perf_counter() - t
            del fold_cache, joint_cache, Yc, Ycb, Yraw
    finally:
        set_backend(prev_backend)

    ok = ~excluded
    if null == "normal" and n_permutations:
        p = np.ones(n_vox, np.float64)
        p[ok] = stats.normal_p(cv_r[ok], null_mean[ok], null_sd[ok], n_permutations)
    else:
        p = p_emp
    significant = np.zeros(n_vox, bool)
    if n_permutations and ok.any():
        significant[ok] = stats.fdr_bh(p[ok], fdr_alpha)[0]
    partition = None
    if nb:
        if null == "normal" and n_permutations:
            p_u = np.ones(n_vox)
            p_u[ok] = stats.normal_p(part["r_unique"][ok], part["mean"][ok], part["sd"][ok], n_permutations)
        else:
            p_u = part["p_emp"]
        sig_u = np.zeros(n_vox, bool)
        if n_permutations and ok.any():
            sig_u[ok] = stats.fdr_bh(p_u[ok], fdr_alpha)[0]
        partition = {"cv_r2_baseline": part["baseline"], "cv_r2_joint": part["joint"],
                     "cv_r2_unique": part["unique"], "cv_r_unique": part["r_unique"], "p_unique": p_u,
                     "significant_unique": sig_u}
    n_exc = int(excluded.sum())
    if n_exc:
        log.warning("%d of %d voxels excluded (non-finite or constant in a run); their outputs are 0, p = 1",
                    n_exc, n_vox)
    seconds = time.perf_counter() - t0
    info = {
        "atom_model": atom_model,
        "noise_model": noise_model,
        "atom_null": (f"effect variance = OLS variance x mean square of the OLS t over {n_permutations} "
                      f"circular shifts of the design; z from t with {n_permutations} df"
                      if noise_model == "shift" else f"parametric ({noise_model})"),
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
        "noise_ceiling": (f"sqrt of the mean between-repeat r over story frames aligned by story time "
                          f"(frames up to {CEILING_TAIL_S:g} s after the last word)") if groups else None,
        "in_sample_r2_chance": "mean in-sample R^2 under the circular shifts" if n_permutations else None,
        "n_baselines": nb,
        "atom_maps_adjusted_for_baselines": bool(nb),
        "partition": ("CV R^2 of the baselines alone (OLS), of the atoms alone (ridge), of both (baselines "
                      "unpenalized + atoms ridge, alpha chosen on inner folds); unique = both - baselines. "
                      "Its test: r between the atoms' part of the joint prediction and what the baselines' "
                      "prediction leaves of the held-out BOLD (mean over folds), under the atoms circularly "
                      "shifted with the baselines in place, ridge refit with the selected alphas; p " + null)
        if nb else None,
        "n_significant_unique": int(partition["significant_unique"].sum()) if nb else None,
        "n_frames": lengths,
        "backend": bk.name,
        "seconds": round(seconds, 2),
        "seconds_by_stage": {"prepare": round(t_ops, 2), **{k: round(v, 2) for k, v in timings.items()}},
        "matmul_flops": {k: float(v) for k, v in flops.items()},
    }
    log.info("encoding done in %.1f s: %d voxels, %d significant, %d excluded", seconds, n_vox,
             info["n_significant"], n_exc)
    return EncodingResult(effect=effect, variance=variance, z=zmap, cv_r=cv_r, cv_r2=cv_r2, p=p,
                          significant=significant, in_sample_r2=r2_in, noise_ceiling=ceiling,
                          design=Dc, in_sample_r2_chance=r2_chance, info=info,
                          **(partition or {}))


def _fixed_effects(effects: list, variances: list, df):
    """Inverse-variance combination over runs: effect, its variance and z (t with ``df`` -> z)."""
    den = sum(1.0 / np.maximum(v, 1e-30) for v in variances)
    effect = sum(e / np.maximum(v, 1e-30) for e, v in zip(effects, variances)) / den
    return effect, 1.0 / den, stats.t_to_z(effect * np.sqrt(den), df)


def _ridge_cv_flops(n_train: int, n_test: int, inner, n_alphas: int, n_used: int, K: int, v: int) -> float:
    """Multiply-adds (x2) of one outer fold of ``solve_ridge_cv_svd`` and its prediction.

    himalaya forms, per inner fold, the (n_alphas, n_val, n_train_inner) hat
    matrices and multiplies them with Y; then refits with the alphas in use.
    """
    f = 0.0
    for tr, va in inner:
        f += 2.0 * n_alphas * len(va) * len(tr) * v
    f += 2.0 * n_used * K * n_train * v  # refit
    f += 2.0 * n_test * K * v  # prediction
    return f


class _ShiftOps:
    """The design-side matrices of every statistic, for one circular shift of the design.

    Built once per shift (not per voxel batch): each run's shifted design,
    cleaned of that run's confounds (the same projection as the observed
    design) and z-scored, as a QR factorisation (the atoms' OLS effects, their
    t values and the residual sum of squares per run); an orthonormal basis of
    the stacked design (in-sample R^2, several runs); and, per outer CV fold,
    the SVD of the fold-cleaned training design and the test design in that
    basis (the ridge refit with each voxel's selected alpha).
    """

    def __init__(self, Draw, shift_row, slices, prep, folds, cleaners, atom_model="marginal",
                 base_folds=None):
        Xs = stats.shift_within_runs(Draw, slices, shift_row) if any(shift_row) else Draw
        cleaned = [_residualize(Xs[sl], Q) for sl, Q in zip(slices, prep.Q_glm)]
        self.marginal = atom_model == "marginal"
        self.runs = []
        for d in cleaned:
            Q, R = np.linalg.qr(d)
            Rinv = np.linalg.pinv(R)
            # joint: Rinv turns Q^T y into the OLS effects; marginal: D^T y / (n - 1) is each atom's r
            W = (d.T / (d.shape[0] - 1)) if self.marginal else Rinv
            self.runs.append((Q.astype(np.float32), W.astype(np.float32),
                              (Rinv**2).sum(1).astype(np.float32)))  # diag((D^T D)^-1)
        self.Q = None
        if len(cleaned) > 1:
            Qs, _ = np.linalg.qr(np.concatenate(cleaned))
            self.Q = Qs.astype(np.float32)  # (n_total, K)
        self.folds, self.joint = [], []
        for f, ((train, test, _), clean) in enumerate(zip(folds, cleaners)):
            Xc = clean(Xs.astype(np.float64))
            Xtr = Xc[train]
            mx = Xtr.mean(0)
            U, s, Vt = np.linalg.svd(Xtr - mx, full_matrices=False)
            self.folds.append((U.T.astype(np.float32), s.astype(np.float32),
                               ((Xc[test] - mx) @ Vt.T).astype(np.float32)))
            if base_folds is not None:  # the atoms with the fold's baselines projected out
                bf = base_folds[f]
                PX = bf.P @ (Xtr - mx)
                U, s, Vt = np.linalg.svd(Xtr - mx - bf.Btr @ PX, full_matrices=False)
                self.joint.append((U.T.astype(np.float32), s.astype(np.float32),
                                   ((Xc[test] - mx - bf.Bte @ PX) @ Vt.T).astype(np.float32)))
        self._bk = {}

    def _on(self, bk):
        if bk.name not in self._bk:
            self._bk = {bk.name: ([tuple(bk.asarray(a) for a in r) for r in self.runs],
                                  None if self.Q is None else bk.asarray(self.Q),
                                  [(bk.asarray(a), bk.asarray(b)[:, None], bk.asarray(c))
                                   for a, b, c in self.folds],
                                  [(bk.asarray(a), bk.asarray(b)[:, None], bk.asarray(c))
                                   for a, b, c in self.joint])}
        return self._bk[bk.name]

    def glm(self, Yc, slices, yy: list, df: list, bk):
        """OLS per run and the stacked fit's explained sum of squares.

        Parameters
        ----------
        Yc : array, shape (n_total, v)
            Cleaned BOLD, runs stacked.
        yy : list of arrays (v,)
            Each run's total sum of squares.
        df : list of int
            Each run's residual degrees of freedom.

        Returns
        -------
        effects, ses : lists of arrays (K, v), one per run
            OLS effects and their white-noise standard errors.
        ess : array (v,)
            Explained sum of squares of the stacked fit (shared effects over runs).
        """
        runs, Qs, _, _ = self._on(bk)
        effects, ses, ess = [], [], 0.0
        for (Q, W, c), sl, yy_r, df_r in zip(runs, slices, yy, df):
            Yr = Yc[sl]
            G = Q.T @ Yr
            e2 = (G * G).sum(0)
            if self.marginal:  # slope of the z-scored BOLD on one z-scored atom = its r
                r = W @ Yr
                one_minus = 1.0 - r * r
                effects.append(r)
                ses.append((one_minus * (one_minus > 0) / df_r) ** 0.5)
            else:
                effects.append(W @ G)
                rss = yy_r - e2
                rss = rss * (rss > 0)
                ses.append((c[:, None] * (rss / df_r)[None]) ** 0.5)
            ess = ess + e2
        if Qs is not None:
            G = Qs.T @ Yc
            ess = (G * G).sum(0)
        return effects, ses, ess

    def glm_flops(self, v: int) -> float:
        f = sum(2.0 * Q.size * v + 2.0 * W.size * v for Q, W, _ in self.runs)
        return f + (0.0 if self.Q is None else 2.0 * self.Q.size * v)

    def cv_r(self, fold_cache, bk):
        """Mean over outer folds of r(ridge prediction, held-out BOLD) with this design."""
        _, _, folds, _ = self._on(bk)
        r = 0.0
        for (Ut, sb, M), (Ytr, Yte_n, best) in zip(folds, fold_cache):
            pred = M @ (sb / (sb**2 + best[None]) * (Ut @ Ytr))
            pred = pred - pred.mean(0)
            r = r + (pred * Yte_n).sum(0) / ((pred**2).sum(0) ** 0.5 + 1e-12)
        return r / len(folds)

    def cv_unique_r(self, joint_cache, bk):
        """Mean over folds of r(the shifted atoms' part of the joint prediction, the baselines' residual).

        The atoms' unique R^2 itself is not the test statistic: with each voxel's
        ridge alpha chosen on the observed design, its null was measured
        conservative (median p 0.8 on null data), while this r, which does not
        depend on the prediction's scale, is calibrated (docs/encoding.md).
        """
        _, _, _, folds = self._on(bk)
        r = 0.0
        for (Ut, sb, M), (Ytr, resid_n, best) in zip(folds, joint_cache):
            # U is orthogonal to the fold's baselines, so U^T y = U^T (y with the baselines projected out)
            pred = M @ (sb / (sb**2 + best[None]) * (Ut @ Ytr))
            pred = pred - pred.mean(0)
            r = r + (pred * resid_n).sum(0) / ((pred**2).sum(0) ** 0.5 + 1e-12)
        return r / len(folds)

    def cv_flops(self, v: int) -> float:
        return sum(2.0 * Ut.size * v + 2.0 * M.size * v for Ut, _, M in self.folds + self.joint)


class _BaselineFold:
    """One outer fold's baselines, cleaned like the atoms and centred on the training frames.

    ``P`` is the pseudo-inverse of the training baselines: the OLS coefficients of
    any training columns on them (the baselines are few and not penalized).
    """

    def __init__(self, Bc: np.ndarray, train: np.ndarray, test: np.ndarray):
        mb = Bc[train].mean(0)
        self.Btr = Bc[train] - mb
        self.Bte = Bc[test] - mb
        self.P = np.linalg.pinv(self.Btr, rcond=1e-8)


def _repeat_pairs(runs, idx: list, kept: list, slices: list) -> list:
    """Rows of the stacked data that show the same story time in two presentations.

    For each pair of repeats (a, b): the kept frames of a inside the story
    (audio time from 0 to ``CEILING_TAIL_S`` after the last word), each matched
    to the kept frame of b nearest in story time, within half a TR. Without
    story times (``RunData.story_time`` None) frames are matched by index.
    """
    out = []
    for ia in range(len(idx)):
        for ib in range(ia + 1, len(idx)):
            a, b = runs[idx[ia]], runs[idx[ib]]
            ka, kb = kept[idx[ia]], kept[idx[ib]]
            if a.story_time is None or b.story_time is None:
                common = np.intersect1d(ka, kb)
                ra = slices[idx[ia]].start + np.searchsorted(ka, common)
                rb = slices[idx[ib]].start + np.searchsorted(kb, common)
            else:
                ta = np.asarray(a.story_time, float)[ka]
                tb = np.asarray(b.story_time, float)[kb]
                end = np.inf if a.story_end is None else a.story_end + CEILING_TAIL_S
                inside = np.flatnonzero((ta >= 0) & (ta <= end))
                j = np.clip(np.searchsorted(tb, ta[inside]), 1, max(len(tb) - 1, 1))
                j = np.where(np.abs(tb[j - 1] - ta[inside]) <= np.abs(tb[np.minimum(j, len(tb) - 1)] - ta[inside]),
                             j - 1, np.minimum(j, len(tb) - 1))
                half_tr = 0.5 * np.median(np.diff(tb)) if len(tb) > 1 else 0.0
                close = np.abs(tb[j] - ta[inside]) <= half_tr + 1e-6
                ra = slices[idx[ia]].start + inside[close]
                rb = slices[idx[ib]].start + j[close]
            if len(ra) < 10:
                raise DataError(f"{_label(a, idx[ia])} and {_label(b, idx[ib])}: fewer than 10 story frames "
                                "in common for the noise ceiling")
            out.append((ra, rb))
    return out


def _noise_ceiling(Yc: np.ndarray, pairs: list) -> np.ndarray:
    """Ceiling of a single-run prediction's r: ``sqrt(max(mean between-repeat r, 0))``.

    A model that predicted a voxel's repeatable (stimulus-driven) signal
    perfectly would correlate with one presentation at ``sqrt(r_rep)``, where
    ``r_rep`` is the correlation between two presentations (not
    Spearman-Brown's reliability of their mean, which answers another question).
    """
    r = np.mean([stats.pearson_columns(Yc[ra], Yc[rb]) for ra, rb in pairs], axis=0)
    return np.sqrt(np.clip(r, 0.0, None)).astype(np.float32)
