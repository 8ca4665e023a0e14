"""Word events -> HRF -> frame times (method.md, section 2, last step).

Each word is an impulse at its onset (scan time, s) scaled by a neuron's
activation, convolved with the canonical HRF on a fine grid (TR / oversampling)
and sampled at the frame times. This is linear in the activations, so the whole
computation is one matrix: ``X = H @ values`` with ``H`` of shape
(n_frames, n_words), built once per run. ``H`` reproduces nilearn's
``compute_regressor`` (zero-duration events, same grid, same HRF, same linear
interpolation) column by column.
"""

from __future__ import annotations

import logging

import numpy as np
from nilearn.glm.first_level.hemodynamic_models import glover_hrf, spm_hrf

from ..errors import DataError, UsageError

log = logging.getLogger(__name__)

HRFS = {"spm": spm_hrf, "glover": glover_hrf}
MIN_ONSET = -24.0  # nilearn's default: events earlier than frame_times[0] - 24 s are ignored


def _check_frame_times(frame_times) -> np.ndarray:
    ft = np.asarray(frame_times, dtype=float)
    if ft.ndim != 1 or ft.size < 2:
        raise DataError(f"frame_times must be a 1-D array of at least 2 times, got shape {ft.shape}")
    if not np.all(np.isfinite(ft)) or np.any(np.diff(ft) <= 0):
        raise DataError("frame_times must be finite and strictly increasing")
    return ft


def hrf_fine_grid(frame_times, hrf: str = "spm", oversampling: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """The fine time grid and the HRF kernel of nilearn's ``compute_regressor`` for these frames.

    Parameters
    ----------
    frame_times : array-like, shape (n_frames,)
        Acquisition times (s), strictly increasing.
    hrf : {"spm", "glover"}
    oversampling : int
        Fine-grid points per TR (TR = the smallest frame spacing).

    Returns
    -------
    grid : ndarray, shape (n_fine,)
        nilearn's ``_sample_condition`` grid: from ``frame_times[0] - 24`` s to
        ``max * (1 + 1 / (n_frames - 1))``.
    kernel : ndarray, shape (n_taps,)
        The HRF sampled every ``TR / oversampling`` s (nilearn's, sums to 1).
    """
    if hrf not in HRFS:
        raise UsageError(f"unknown HRF {hrf!r}; choose one of {', '.join(HRFS)}")
    if int(oversampling) < 1:
        raise UsageError(f"oversampling must be >= 1, got {oversampling}")
    oversampling = int(oversampling)
    ft = _check_frame_times(frame_times)
    n = ft.size
    t_r = float(np.min(np.diff(ft)))
    kernel = HRFS[hrf](t_r, oversampling)
    mini, maxi = ft.min(), ft.max()
    n_hr = (n - 1) / (maxi - mini) * (maxi * (1 + 1.0 / (n - 1)) - mini - MIN_ONSET) * oversampling + 1
    grid = np.linspace(mini + MIN_ONSET, maxi * (1 + 1.0 / (n - 1)), int(np.rint(n_hr)))
    return grid, kernel


def words_to_frame_matrix(onsets, frame_times, hrf: str = "spm", oversampling: int = 50) -> np.ndarray:
    """The linear map from word amplitudes to HRF-convolved frame values.

    Parameters
    ----------
    onsets : array-like, shape (n_words,)
        Word onsets in scan time (s).
    frame_times : array-like, shape (n_frames,)
        Acquisition times of the frames (s), increasing.
    hrf : {"spm", "glover"}
    oversampling : int
        Fine-grid points per TR.

    Returns
    -------
    H : ndarray, shape (n_frames, n_words), float64
        Column ``w`` is nilearn's ``compute_regressor`` for a single zero-duration
        event of amplitude 1 at ``onsets[w]``. Words earlier than
        ``frame_times[0] - 24`` s get a zero column (as in nilearn).
    """
    ft = _check_frame_times(frame_times)
    grid, kernel = hrf_fine_grid(ft, hrf, oversampling)
    on = np.asarray(onsets, dtype=float).ravel()
    if not np.all(np.isfinite(on)):
        raise DataError("word onsets must be finite (interpolate unaligned words first)")
    t_on = np.minimum(np.searchsorted(grid, on), grid.size - 1)
    early = on < ft[0] + MIN_ONSET
    if early.any():
        log.warning("%d word(s) start more than 24 s before the first frame and are ignored", int(early.sum()))
    # linear interpolation of the fine grid at the frame times (scipy interp1d's rule)
    j = np.clip(np.searchsorted(grid, ft, side="left") - 1, 0, grid.size - 2)
    a = (ft - grid[j]) / (grid[j + 1] - grid[j])
    padded = np.concatenate([kernel, [0.0]])

    def taps(idx):
        lag = idx[:, None] - t_on[None, :]
        ok = (lag >= 0) & (lag < kernel.size)
        return np.where(ok, padded[np.clip(lag, 0, kernel.size)], 0.0)

    H = (1 - a)[:, None] * taps(j) + a[:, None] * taps(j + 1)
    H[:, early] = 0.0
    return H


#: Words per block of the sparse word -> frame matrix, and neurons per block of the products.
WORDS_BLOCK = 2048
NEURONS_BLOCK = 1024


def frame_series(onsets, values, frame_times, *, hrf: str = "spm", oversampling: int = 50,
                 zscore: bool = True, center: bool = False) -> np.ndarray:
    """Neuron time series at the frame times.

    ``H`` (:func:`words_to_frame_matrix`) is built in blocks of
    ``WORDS_BLOCK`` words (a column depends on its word only) and kept sparse
    (an HRF spans about 22 frames), and the products are formed
    ``NEURONS_BLOCK`` neurons at a time in float64: memory is the output plus
    blocks. A dense frames x words matrix was 5.3 GB for a 50,000-word story at
    1.5 s, and several times that while built (benchmarks/memory.py).

    Parameters
    ----------
    onsets : array-like, shape (n_words,)
        Word onsets in scan time (s).
    values : array-like, shape (n_words, n_neurons)
        Activation of each neuron for each word (impulse amplitudes).
    frame_times : array-like, shape (n_frames,)
    hrf : {"spm", "glover"}
    oversampling : int
    zscore : bool
        Z-score each column over frames; constant columns become zeros.
    center : bool
        Remove each column's mean over the words first (``--an-centering mean``),
        block by block: no centred copy of all values is made.

    Returns
    -------
    X : ndarray, shape (n_frames, n_neurons), float32
    """
    vals = np.asarray(values)
    if vals.ndim == 1:
        vals = vals[:, None]
    on = np.asarray(onsets, dtype=float).ravel()
    if vals.ndim != 2 or vals.shape[0] != on.size:
        raise DataError(f"values must have one row per word: {on.size} onsets but values of shape {vals.shape}")
    import scipy.sparse as sp

    blocks = [sp.csc_matrix(words_to_frame_matrix(on[w0:w0 + WORDS_BLOCK], frame_times, hrf, oversampling))
              for w0 in range(0, on.size, WORDS_BLOCK)]
    H = sp.hstack(blocks, format="csr") if blocks else sp.csr_matrix((np.size(frame_times), 0))
    out = np.empty((H.shape[0], vals.shape[1]), dtype=np.float32)
    for c0 in range(0, vals.shape[1], NEURONS_BLOCK):
        v = vals[:, c0:c0 + NEURONS_BLOCK]
        if center:
            v = (v - v.mean(axis=0, dtype=np.float64)).astype(np.float32)
        X = H @ v.astype(np.float64)
        if zscore:
            mean = X.mean(axis=0)
            std = X.std(axis=0)
            flat = std <= 1e-12 * np.maximum(1.0, np.abs(mean))
            X = (X - mean) / np.where(flat, 1.0, std)
            X[:, flat] = 0.0
        out[:, c0:c0 + NEURONS_BLOCK] = X
    return out


def cosine_basis(n_frames: int, tr: float, period_cut: float = 128.0) -> np.ndarray:
    """fMRIPrep's discrete cosine drift regressors (high-pass at ``period_cut`` s), shape (n_frames, n_cos).

    The demo writes them into its confounds; its model-atoms plant chooses atoms
    as they look after them.
    """
    order = int(np.floor(2 * n_frames * tr / period_cut))
    t = np.arange(n_frames)
    cols = [np.sqrt(2.0 / n_frames) * np.cos(np.pi / n_frames * (t + 0.5) * k) for k in range(1, order)]
    return np.column_stack(cols) if cols else np.zeros((n_frames, 0))
