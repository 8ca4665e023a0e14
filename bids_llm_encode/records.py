"""The small typed records that stages pass to one another.

Each stage is a function from plain data to plain data; these records are the
plain data. Arrays carry their shapes in the attribute docs. Only
``workflows/`` knows the order of stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp


@dataclass(frozen=True)
class Story:
    """The words of one story, timed relative to its audio file (seconds).

    Attributes
    ----------
    name : str
        Story name (Narratives: ``stim_file`` without ``_audio.wav``).
    words : tuple of str
        Words as in the transcript, in order (punctuation attached as written).
    starts, ends : ndarray, shape (n_words,)
        Audio-relative times; unaligned words have interpolated times.
    aligned : ndarray of bool, shape (n_words,)
        True where the aligner placed the word, False where times were interpolated.
    source : Path
        The file the timing came from.
    phone_starts : ndarray, shape (n_phones,), or None
        Audio-relative onsets (s) of the aligned phones, in order, when the
        alignment has phones (Gentle ``align.json`` ``phones``, a TextGrid phones
        tier); None otherwise. Unaligned words have none. The phoneme-rate
        baseline (``signal/baselines.py``) is made from them.
    """

    name: str
    words: tuple[str, ...]
    starts: np.ndarray
    ends: np.ndarray
    aligned: np.ndarray
    source: Path
    phone_starts: Optional[np.ndarray] = None

    @property
    def n_words(self) -> int:
        return len(self.words)

    @property
    def n_unaligned(self) -> int:
        return int((~self.aligned).sum())

    @property
    def text(self) -> str:
        """The words joined by single spaces: what the language model reads."""
        return " ".join(self.words)


@dataclass(frozen=True)
class RunInputs:
    """Everything one story of one BOLD run needs, found by ``bids.inputs``.

    A run that holds several stories (Narratives' task-schema) gives one of
    these per story, each with its own ``story`` and ``story_onset``; the rest of
    the run is no input for that story. ``story_onset`` is the scan time (s) at
    which the audio file starts: the ``onset`` of the first events.tsv row whose
    ``stim_file`` is that audio.
    Scan time of a word = ``story_onset + story.starts``. Frame ``i`` is
    acquired at ``i * tr + slice_time_ref * tr``.
    """

    subject: str
    session: Optional[str]
    task: str
    run: Optional[int]
    bold: Path
    mask: Optional[Path]  # None for a CIFTI run (every grayordinate is in)
    confounds: Path
    bold_json: Optional[Path]
    events: Path
    raw_bold: Optional[Path]
    tr: float
    n_frames: int
    slice_time_ref: float  # fraction of the TR (fMRIPrep's default 0.5 when slice-time corrected)
    story: Story
    story_onset: float
    stim_file: str

    @property
    def frame_times(self) -> np.ndarray:
        """Acquisition time (s) of each frame, shape (n_frames,)."""
        return (np.arange(self.n_frames) + self.slice_time_ref) * self.tr

    @property
    def entities(self) -> dict:
        """BIDS entities of the raw run (outputs are named by ``OutputFiles.run_entities``: task = story)."""
        ent = {"subject": self.subject, "task": self.task}
        if self.session:
            ent["session"] = self.session
        if self.run is not None:
            ent["run"] = self.run
        return ent


@dataclass(frozen=True)
class WordActivations:
    """Language-model neuron responses, one row per word of a story.

    Attributes
    ----------
    values : ndarray, shape (n_words, n_neurons), float32
    layer : ndarray of int, shape (n_neurons,)
        Transformer layer (0-based) of each neuron.
    unit : ndarray of int, shape (n_neurons,)
        Index of the neuron within its layer.
    card : dict
        The model card: model id, class, site, layers, n_neurons, n_tokens,
        n_words, window settings, seconds taken, device, dtype.
    """

    values: np.ndarray
    layer: np.ndarray
    unit: np.ndarray
    card: dict


@dataclass(frozen=True)
class Dictionary:
    """X ~ D A learned once per story and model.

    Attributes
    ----------
    atoms : ndarray, shape (n_frames, n_atoms)
        Temporal patterns on the story's reference grid, unit L2 norm.
    loadings : scipy.sparse.csr_matrix, shape (n_atoms, n_neurons)
    frame_times : ndarray, shape (n_frames,)
        Audio-relative times (s) of the reference grid the atoms were learned on.
    r2 : float
        Reconstruction R^2 of X by D A.
    objective : float
        0.5 ||X - DA||_F^2 + alpha ||A||_1 at the end.
    alpha : float
    """

    atoms: np.ndarray
    loadings: sp.csr_matrix
    frame_times: np.ndarray
    r2: float
    objective: float
    alpha: float
    info: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[1]


@dataclass(frozen=True)
class EncodingResult:
    """Voxel-wise encoding of one participant's BOLD on one story by fixed atom regressors.

    All voxel arrays are over the brain-mask voxels, in mask order.

    Attributes
    ----------
    effect : ndarray, shape (n_atoms, n_voxels)
        OLS coefficients (z-scored BOLD per z-scored regressor).
    variance : ndarray, shape (n_atoms, n_voxels)
        Variance of the effect: by default its mean square under the
        circular-shift null (``info['atom_null']``); NaN where not estimable.
    z : ndarray, shape (n_atoms, n_voxels)
        Calibrated on null data (docs/encoding.md).
    cv_r, cv_r2 : ndarray, shape (n_voxels,)
        Cross-validated prediction accuracy (ridge, held-out blocks or runs).
    p : ndarray, shape (n_voxels,)
        One-sided p-value of cv_r under the autocorrelation-preserving null.
    significant : ndarray of bool, shape (n_voxels,)
        FDR-controlled at ``info['fdr_alpha']``.
    in_sample_r2 : ndarray, shape (n_voxels,)
    noise_ceiling : ndarray or None, shape (n_voxels,)
        Ceiling of a single-run prediction's r, ``sqrt(max(r_repeat, 0))``, when the
        story was heard more than once (story frames only, aligned by story time).
    design : ndarray, shape (n_frames_total, n_atoms)
        The regressors as fitted (runs stacked).
    in_sample_r2_chance : ndarray or None, shape (n_voxels,)
        Mean in-sample R^2 of the same OLS fit under the circular-shift null:
        the chance level of ``in_sample_r2`` (64 atoms on ~300 frames reach ~0.2
        with no signal).
    cv_r2_baseline, cv_r2_joint, cv_r2_unique : ndarray or None, shape (n_voxels,)
        With baseline regressors (word rate, ...): the CV R^2 of the baselines
        alone, of baselines + atoms, and the atoms' unique part (joint - baseline).
    cv_r_unique : ndarray or None, shape (n_voxels,)
        The unique part's test statistic: mean over folds of the r between the
        atoms' part of the joint prediction and the held-out BOLD less the
        baselines' prediction.
    p_unique, significant_unique : ndarray or None, shape (n_voxels,)
        One-sided p of ``cv_r_unique`` under the atoms' circular-shift null (the
        baselines kept in place), and its FDR calls.
    """

    effect: np.ndarray
    variance: np.ndarray
    z: np.ndarray
    cv_r: np.ndarray
    cv_r2: np.ndarray
    p: np.ndarray
    significant: np.ndarray
    in_sample_r2: np.ndarray
    noise_ceiling: Optional[np.ndarray]
    design: np.ndarray
    in_sample_r2_chance: Optional[np.ndarray] = None
    info: dict = field(default_factory=dict)
    cv_r2_baseline: Optional[np.ndarray] = None
    cv_r2_joint: Optional[np.ndarray] = None
    cv_r2_unique: Optional[np.ndarray] = None
    cv_r_unique: Optional[np.ndarray] = None
    p_unique: Optional[np.ndarray] = None
    significant_unique: Optional[np.ndarray] = None


@dataclass(frozen=True)
class Network:
    name: str
    index: int


@dataclass(frozen=True)
class Atlas:
    """Functional brain networks in a voxel grid.

    Attributes
    ----------
    name : str
        e.g. ``CA12``, ``Yeo7``, ``Yeo17``, ``Schaefer400x7``, or a user file's stem.
    maps : ndarray of bool, shape (n_networks, n_voxels)
        Membership of each mask voxel in each network.
    labels : tuple of str
    """

    name: str
    maps: np.ndarray
    labels: tuple[str, ...]
    info: dict = field(default_factory=dict)
