"""Confound regressors of one fMRIPrep BOLD run, through nilearn.

:func:`load_confounds` hands the work to
:func:`nilearn.interfaces.fmriprep.load_confounds`, which finds the confounds
file from the BOLD file's name (same folder, same entities, ``desc-confounds``,
suffix ``_timeseries.tsv`` (fMRIPrep >= 20.2) or ``_regressors.tsv`` (20.0.x)),
reads the JSON sidecar next to it for the aCompCor masks, fills the ``n/a`` of
derivative columns' first row with the second row's value, demeans, and turns
non-steady-state (and, when asked, high-motion) volumes into a ``sample_mask``.

Because our callers already know the confounds file (PyBIDS found it) and it may
not sit where nilearn looks, the files are linked into a temporary folder under
names nilearn recognises, so that exactly the given file is read.

Strategies
----------
``"narratives"`` (default; what the Narratives release used)
    6 motion parameters (``trans_*``, ``rot_*``), the ``cosine*`` high-pass
    regressors, 5 CSF + 5 WM aCompCor components (nilearn
    ``compcor="anat_separated", n_compcor=5``; needs the JSON sidecar — without
    it the first 5 ``a_comp_cor_*`` columns of the TSV are used and a warning is
    logged), non-steady-state volumes removed through ``sample_mask``.
``"simple"``, ``"compcor"``, ``"scrubbing"``
    nilearn's ``load_confounds_strategy`` presets, with their parameters.

``scrub=True`` adds scrubbing (``framewise_displacement > 0.5`` mm; segments
shorter than 5 volumes also removed, nilearn's rule) to any strategy.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from nilearn.interfaces.fmriprep import load_confounds as nl_load_confounds
from nilearn.interfaces.fmriprep.load_confounds_strategy import preset_strategies

from ..bids.images import bold_frames
from ..bids.tables import check_confounds
from ..errors import DataError, MissingInputError, UsageError

log = logging.getLogger(__name__)

STRATEGIES = ("narratives", "simple", "compcor", "scrubbing")

NARRATIVES = {
    "strategy": ("motion", "high_pass", "compcor"),
    "motion": "basic",
    "compcor": "anat_separated",
    "n_compcor": 5,
    "demean": True,
}

#: scrubbing on framewise displacement only (DVARS never triggers).
SCRUB = {"scrub": 5, "fd_threshold": 0.5, "std_dvars_threshold": np.inf}


def _strategy_params(strategy: str, scrub: bool) -> dict:
    if strategy == "narratives":
        params = dict(NARRATIVES)
    elif strategy in ("simple", "compcor", "scrubbing"):
        params = dict(preset_strategies[strategy])
    else:
        raise UsageError(f"unknown confounds strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    params["strategy"] = tuple(params["strategy"])
    if scrub and "scrub" not in params["strategy"]:
        params["strategy"] = params["strategy"] + ("scrub",)
        params.update(SCRUB)
    return params


def _n_frames(bold: Path) -> int:
    """Frames of the BOLD, from its header through the checked image reader (exit 65 naming it)."""
    if not bold.is_file():
        raise MissingInputError(f"BOLD file not found: {bold}")
    return bold_frames(bold)  # volume or CIFTI


def _link_for_nilearn(folder: Path, confounds_file: Path) -> Path:
    """Link the confounds TSV (+ JSON) under names nilearn finds; return the fake BOLD path."""
    suffix = "regressors" if confounds_file.name.endswith("_regressors.tsv") else "timeseries"
    stem = "sub-x_task-x"
    (folder / f"{stem}_desc-confounds_{suffix}.tsv").symlink_to(confounds_file.resolve())
    side = confounds_file.with_suffix(".json")
    if side.is_file():
        (folder / f"{stem}_desc-confounds_{suffix}.json").symlink_to(side.resolve())
    bold = folder / f"{stem}_desc-preproc_bold.nii.gz"
    bold.touch()  # nilearn checks the name only
    return bold


def _call_nilearn(fake_bold: Path, params: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        return nl_load_confounds(str(fake_bold), **params)


def load_confounds(
    bold: Path,
    confounds_file: Path,
    strategy: str = "narratives",
    scrub: bool = False,
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """Load the confound regressors of one run.

    Parameters
    ----------
    bold : Path
        The preprocessed BOLD file (read for its number of frames only).
    confounds_file : Path
        fMRIPrep's ``*_desc-confounds_timeseries.tsv`` or ``*_desc-confounds_regressors.tsv``;
        its JSON sidecar (same name, ``.json``) is used for aCompCor when present.
    strategy : {"narratives", "simple", "compcor", "scrubbing"}
    scrub : bool
        Add framewise-displacement scrubbing (> 0.5 mm) to the strategy.

    Returns
    -------
    confounds : pandas.DataFrame, shape (n_frames, n_confounds)
        Demeaned regressors for all frames (also the removed ones); the ``n/a``
        of the first row (derivative columns) is replaced by the second row's value.
    sample_mask : ndarray of int, shape (n_kept,), or None
        Indices of the frames to keep (non-steady-state and scrubbed volumes
        left out); None when every frame is kept.

    Raises
    ------
    MissingInputError
        The BOLD or confounds file is missing.
    DataError
        The confounds file lacks the columns the strategy needs, has a number of
        rows different from the BOLD's frames, or still has missing values.
    UsageError
        Unknown strategy.
    """
    bold, confounds_file = Path(bold), Path(confounds_file)
    params = _strategy_params(strategy, scrub)
    if not confounds_file.is_file():
        raise MissingInputError(f"confounds file not found: {confounds_file}")
    if not (confounds_file.name.endswith("_timeseries.tsv") or confounds_file.name.endswith("_regressors.tsv")):
        raise DataError(
            f"{confounds_file} is not an fMRIPrep confounds file "
            "(expected *_desc-confounds_timeseries.tsv or *_desc-confounds_regressors.tsv)"
        )
    n_frames = _n_frames(bold)
    raw = check_confounds(confounds_file, n_frames, bold)  # text, numbers, one row per frame (exit 65)
    fallback_acompcor = 0
    with tempfile.TemporaryDirectory(prefix="ble-confounds-") as tmp:
        fake_bold = _link_for_nilearn(Path(tmp), confounds_file)
        has_json = confounds_file.with_suffix(".json").is_file()
        if "compcor" in params["strategy"] and not has_json:
            if strategy != "narratives":
                raise MissingInputError(
                    f"strategy {strategy!r} needs the aCompCor metadata in "
                    f"{confounds_file.with_suffix('.json')}, which is missing"
                )
            log.warning(
                "%s has no JSON sidecar: aCompCor masks unknown, using the first 5 "
                "a_comp_cor_* columns instead of 5 CSF + 5 WM components",
                confounds_file,
            )
            params = dict(params)
            params["strategy"] = tuple(s for s in params["strategy"] if s != "compcor")
            params.pop("compcor"), params.pop("n_compcor")
            fallback_acompcor = 5
        try:
            conf, sample_mask = _call_nilearn(fake_bold, params)
        except Exception as exc:  # nilearn raises ValueError / MissingConfoundError
            raise DataError(f"cannot take confounds ({strategy!r}) from {confounds_file}: {exc}") from exc
    if fallback_acompcor:
        cols = sorted(c for c in raw.columns if c.startswith("a_comp_cor_"))[:fallback_acompcor]
        if len(cols) < fallback_acompcor:
            raise DataError(f"{confounds_file} has {len(cols)} a_comp_cor_* columns, need {fallback_acompcor}")
        extra = raw[cols].astype(float)
        extra = extra - extra.mean()
        conf = pd.concat([conf.reset_index(drop=True), extra.reset_index(drop=True)], axis=1)
    if conf is None:
        conf = pd.DataFrame(index=range(n_frames))
    if len(conf) != n_frames:
        raise DataError(
            f"{confounds_file} has {len(conf)} rows but the BOLD {bold} has {n_frames} frames; "
            "are they from the same run?"
        )
    bad = [c for c in conf.columns if not np.isfinite(conf[c].to_numpy(dtype=float)).all()]
    if bad:
        raise DataError(f"{confounds_file}: missing or non-finite values beyond the first row in {bad}")
    if sample_mask is not None:
        sample_mask = np.asarray(sample_mask, dtype=np.int64)
        log.info("%s: keeping %d of %d frames", confounds_file.name, len(sample_mask), n_frames)
    log.info("%s: %d confound regressors (%s%s)", confounds_file.name, conf.shape[1], strategy,
             ", scrubbed" if scrub else "")
    return conf, sample_mask
