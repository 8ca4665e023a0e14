"""The group noise ceiling: leave-one-participant-out inter-subject correlation (ISC).

For a story heard by at least 3 participants, each voxel's ceiling is the mean
over participants of the correlation between that participant's BOLD and the
mean of all the others' (Nastase et al. 2019), on story frames (audio time 0
to ``CEILING_TAIL_S`` after the last word) put on one story-time grid: the
part of a voxel's response that is shared across people, which is the most a
model of the stimulus could predict in one participant. Each participant's
BOLD is cleaned of its confounds and z-scored as the encoding does.

Memory: one (frames x voxels) sum and one participant's run at a time (each
run is read twice).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
from nilearn import signal

from ..bids.images import load_bold
from ..errors import DataError
from ..records import RunInputs
from .confounds import load_confounds
from .fit import CEILING_TAIL_S

log = logging.getLogger(__name__)


def _story_series(run: RunInputs, mask: np.ndarray, grid: np.ndarray, strategy: str, scrub: bool):
    """The run's cleaned BOLD at the story-time grid, z-scored, (len(grid), V); NaN rows where no frame is near."""
    conf, sample_mask = load_confounds(run.bold, run.confounds, strategy, scrub)
    Y = load_bold(run.bold, mask)  # the checked reader: a broken file is exit 65 naming it
    kept = np.arange(Y.shape[0]) if sample_mask is None else np.asarray(sample_mask)
    clean = signal.clean(Y.astype(np.float64), confounds=conf, sample_mask=sample_mask, detrend=False,
                         standardize=None, standardize_confounds=True, filter=False)
    t = run.frame_times[kept] - run.story_onset
    j = np.clip(np.searchsorted(t, grid), 1, max(len(t) - 1, 1))
    j = np.where(np.abs(t[j - 1] - grid) <= np.abs(t[j] - grid), j - 1, j)
    out = clean[j]
    far = np.abs(t[j] - grid) > run.tr / 2 + 1e-6
    near = out[~far]
    sd = near.std(axis=0)
    out = (out - near.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    out[far] = np.nan
    return out


def isc_ceiling(runs: Sequence[RunInputs], mask: np.ndarray, strategy: str = "narratives",
                scrub: bool = False) -> np.ndarray:
    """Leave-one-participant-out ISC per voxel, shape (n_mask_voxels,).

    Parameters
    ----------
    runs : sequence of RunInputs
        One run of the story per participant (>= 3), on the mask's grid.
    mask : ndarray of bool, 3D
        The voxels (a group mask inside every participant's brain mask).
    """
    if len(runs) < 3:
        raise DataError(f"the ISC ceiling needs >= 3 participants, got {len(runs)}")
    tr = min(r.tr for r in runs)
    end = float(np.nanmax(runs[0].story.ends)) + CEILING_TAIL_S
    grid = (np.arange(int(np.floor(end / tr)) + 1) + 0.5) * tr
    total = None
    valid = np.ones(len(grid), bool)
    for r in runs:  # pass 1: the sum of everyone's series
        y = _story_series(r, mask, grid, strategy, scrub)
        valid &= np.isfinite(y).all(axis=1)
        total = np.nan_to_num(y) if total is None else total + np.nan_to_num(y)
    if valid.sum() < 10:
        raise DataError(f"fewer than 10 story frames shared by the {len(runs)} participants "
                        "for the ISC ceiling")
    total = total[valid]

    def z(a):
        a = a - a.mean(axis=0)
        sd = a.std(axis=0)
        return a / np.where(sd > 0, sd, 1.0)

    rsum = np.zeros(total.shape[1])
    for r in runs:  # pass 2: each participant against the mean of the others
        y = np.nan_to_num(_story_series(r, mask, grid, strategy, scrub))[valid]
        rsum += (z(y) * z(total - y)).mean(axis=0)
    log.info("ISC ceiling: %d participants, %d story frames", len(runs), int(valid.sum()))
    return (rsum / len(runs)).astype(np.float32)
