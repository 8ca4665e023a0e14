"""Low-level baseline regressors of one run (method.md section 4; docs/method.md "Baselines").

Every neuron's frame series carries its mean activation times the HRF-convolved
word rate, so the atoms are partly low-level signals. The encoding fits these
baselines beside the atoms (variance partitioning): per BOLD run a matrix
``(n_frames, n_baselines)``, each column HRF-convolved, sampled at the run's
frames and z-scored over them.

- ``word_rate``: a unit impulse at each word onset (``Story.starts``, unaligned
  words at their interpolated times), through :func:`~.frames.words_to_frame_matrix`
  (the neurons' own construction, equal to nilearn's ``compute_regressor``).
- ``phoneme_rate``: a unit impulse at each phone onset (``Story.phone_starts``:
  Gentle ``align.json`` phones, a TextGrid phones tier).
- ``envelope``: the broadband amplitude envelope of the story's WAV: the mono
  mix, its mean removed, rectified (``|x|``) and averaged in bins of
  1/:data:`ENVELOPE_RATE` s; each bin is an event from its first sample for its
  length with the bin's mean as amplitude, which is what nilearn's
  ``compute_regressor`` gets from one event per envelope sample.
- user regressors: ``<--baseline-regressors>/<story>.tsv`` (``onset``, optional
  ``duration``, numeric value columns; docs/usage.md), each value column one
  regressor named after it, events as nilearn's (boxcars of their duration).

Times are relative to the start of the story's audio (``frame_times_audio``, as
``workflows/stimulus.run_design``). Events earlier than 24 s before the first
frame are left out (as :mod:`.frames` does for words). A regressor that is
constant at the run's frames (e.g. a run that misses the story) is dropped with
a warning: the encoding's design check refuses constant columns.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import BASELINES, Config
from ..errors import DataError, MissingInputError, UsageError
from ..records import Story
from .frames import MIN_ONSET, _check_frame_times, hrf_fine_grid, words_to_frame_matrix

log = logging.getLogger(__name__)

__all__ = ["BASELINES", "ENVELOPE_RATE", "BaselineStatus", "UserRegressors", "baseline_design",
           "baseline_status", "check_baselines", "describe_baselines", "events_to_frames",
           "audio_envelope", "envelope_regressor", "read_user_regressors", "user_regressor_file",
           "requested_baselines"]

#: Bins per second of the audio envelope (10 ms: far finer than the HRF, which passes < 1 Hz).
ENVELOPE_RATE = 100
#: Text columns a user regressor TSV may carry besides ``onset``/``duration`` (ignored).
USER_TEXT_COLUMNS = ("word",)
#: Events per block when summing the word-rate matrix (bounds memory on long stories).
_BLOCK = 2048


# ---------------------------------------------------------------------------- regressors

def events_to_frames(onsets, durations, values, frame_times, hrf: str = "spm",
                     oversampling: int = 50) -> np.ndarray:
    """nilearn's ``compute_regressor`` for one condition, without its Python loops over events.

    Each event adds ``value`` on nilearn's fine grid from the grid point at its
    onset up to the one at ``onset + duration`` (at least one point: a zero
    duration is an impulse), the result is convolved with the HRF and linearly
    interpolated at the frames. Events earlier than ``frame_times[0] - 24`` s are
    left out (as :func:`~.frames.words_to_frame_matrix`).

    Parameters
    ----------
    onsets, durations, values : array-like, shape (n_events,)
        Seconds, seconds (>= 0; a scalar applies to all), amplitudes.
    frame_times : array-like, shape (n_frames,)
    hrf : {"spm", "glover"}
    oversampling : int

    Returns
    -------
    ndarray, shape (n_frames,), float64
        Not z-scored.
    """
    ft = _check_frame_times(frame_times)
    grid, kernel = hrf_fine_grid(ft, hrf, oversampling)
    on = np.asarray(onsets, dtype=float).ravel()
    du = np.broadcast_to(np.asarray(durations, dtype=float), on.shape).ravel()
    va = np.broadcast_to(np.asarray(values, dtype=float), on.shape).ravel()
    if not (np.all(np.isfinite(on)) and np.all(np.isfinite(du)) and np.all(np.isfinite(va))):
        raise DataError("event onsets, durations and values must be finite")
    if np.any(du < 0):
        raise DataError("event durations must be >= 0")
    keep = on >= ft[0] + MIN_ONSET
    on, du, va = on[keep], du[keep], va[keep]
    tmax = grid.size
    t_on = np.minimum(np.searchsorted(grid, on), tmax - 1)
    t_off = np.minimum(np.searchsorted(grid, on + du), tmax - 1)
    t_off[(t_off < tmax - 1) & (t_off == t_on)] += 1  # nilearn: a zero duration lasts one grid step
    fine = np.cumsum(np.bincount(t_on, va, minlength=tmax) - np.bincount(t_off, va, minlength=tmax))
    conv = np.convolve(fine, kernel)[:tmax]
    return np.interp(ft, grid, conv)


def impulse_rate(onsets, frame_times, hrf: str = "spm", oversampling: int = 50) -> np.ndarray:
    """Unit impulses at ``onsets``, HRF-convolved at the frames: the sum of the word matrix's columns.

    Returns
    -------
    ndarray, shape (n_frames,), float64
    """
    on = np.asarray(onsets, dtype=float).ravel()
    out = np.zeros(np.asarray(frame_times).size)
    for b in range(0, on.size, _BLOCK):
        out += words_to_frame_matrix(on[b:b + _BLOCK], frame_times, hrf, oversampling).sum(axis=1)
    return out


# ---------------------------------------------------------------------------- audio

@dataclass(frozen=True)
class Envelope:
    """The binned amplitude envelope of one WAV file.

    Attributes
    ----------
    onsets, durations : ndarray, shape (n_bins,)
        Time of each bin's first sample and the bin's length (s).
    values : ndarray, shape (n_bins,)
        Mean rectified amplitude in the bin (full scale = 1).
    sample_rate : int
    n_samples : int
    """

    onsets: np.ndarray
    durations: np.ndarray
    values: np.ndarray
    sample_rate: int
    n_samples: int

    @property
    def duration(self) -> float:
        return self.n_samples / self.sample_rate


def _full_scale(dtype: np.dtype) -> float:
    """The full scale of a WAV sample type (8-bit unsigned: 128 around 128; float: 1)."""
    if dtype == np.uint8:
        return 128.0
    if np.issubdtype(dtype, np.integer):
        return float(2 ** (8 * dtype.itemsize - 1))
    return 1.0


def audio_envelope(path: Path) -> Envelope:
    """Read a WAV file and bin its broadband amplitude envelope at :data:`ENVELOPE_RATE` Hz.

    The channels are averaged (mono mix), the mean of the whole file removed
    (the DC offset, e.g. of 8-bit unsigned samples), the signal rectified and
    averaged in bins of ``1/ENVELOPE_RATE`` s (bin ``k`` holds samples
    ``ceil(k sr / R)`` to ``ceil((k + 1) sr / R) - 1``). Any sample rate >=
    ``ENVELOPE_RATE`` and any sample type scipy reads (8-bit unsigned, 16/24/32-bit
    integer, 32/64-bit float). Cached per file (path, size and modification time).

    Raises
    ------
    MissingInputError (66)
        The file does not exist.
    DataError (65)
        Not a WAV scipy can read (the message names the file), no samples, a
        sample rate below ``ENVELOPE_RATE``, non-finite float samples.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        raise MissingInputError(f"audio file {path} does not exist") from None
    return _envelope_cached(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _envelope_cached(path: str, size: int, mtime_ns: int) -> Envelope:
    from scipy.io import wavfile

    hint = ("; give a readable WAV (PCM or float), or leave the envelope out (--baselines word_rate "
            "phoneme_rate)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            rate, data = wavfile.read(path, mmap=False)
        except Exception as exc:  # noqa: BLE001 - scipy raises ValueError, EOFError, struct.error ...
            raise DataError(f"audio file {path}: cannot read it as a WAV file "
                            f"({type(exc).__name__}: {exc}){hint}") from None
    for w in caught:
        log.debug("audio file %s: %s", path, w.message)
    rate = int(rate)
    if data.ndim not in (1, 2) or data.shape[0] == 0 or (data.ndim == 2 and data.shape[1] == 0):
        raise DataError(f"audio file {path}: no samples (shape {data.shape}){hint}")
    if rate < ENVELOPE_RATE:
        raise DataError(f"audio file {path}: sample rate {rate} Hz is below {ENVELOPE_RATE} Hz; not an "
                        f"audio recording{hint}")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise DataError(f"audio file {path}: unsupported sample type {data.dtype}{hint}")
    n = int(data.shape[0])
    scale = _full_scale(data.dtype)
    # the mean over all samples and channels = the mono mix's; it also removes the 128 of 8-bit unsigned
    dc = float(np.mean(data, dtype=np.float64))
    if not math.isfinite(dc):
        raise DataError(f"audio file {path}: samples are not finite numbers{hint}")
    n_bins = -(-n * ENVELOPE_RATE // rate)
    starts = -(-np.arange(n_bins + 1, dtype=np.int64) * rate // ENVELOPE_RATE)  # ceil(k sr / R)
    starts[-1] = n
    values = np.empty(n_bins)
    step = 60 * ENVELOPE_RATE  # one minute of bins per block: bounded memory, no per-sample loop
    for b0 in range(0, n_bins, step):
        b1 = min(b0 + step, n_bins)
        s0, s1 = int(starts[b0]), int(starts[b1])
        x = data[s0:s1].astype(np.float64)
        if x.ndim == 2:
            x = x.mean(axis=1)
        np.abs(x - dc, out=x)
        values[b0:b1] = np.add.reduceat(x, starts[b0:b1] - s0)
    counts = np.diff(starts)
    values /= counts * scale
    out = Envelope(onsets=starts[:-1] / rate, durations=counts / rate, values=values,
                   sample_rate=rate, n_samples=n)
    for arr in (out.onsets, out.durations, out.values):
        arr.setflags(write=False)
    log.info("audio %s: %.1f s at %d Hz, %s%s; envelope in %d bins of %g ms", path, out.duration, rate,
             data.dtype, f" x {data.shape[1]} channels (mixed to mono)" if data.ndim == 2 else "",
             n_bins, 1000 / ENVELOPE_RATE)
    return out


def envelope_regressor(path: Path, frame_times_audio, hrf: str = "spm", oversampling: int = 50) -> np.ndarray:
    """The HRF-convolved audio envelope at the frames (not z-scored), shape (n_frames,)."""
    env = audio_envelope(path)
    return events_to_frames(env.onsets, env.durations, env.values, frame_times_audio, hrf, oversampling)


# ---------------------------------------------------------------------------- user regressors

@dataclass(frozen=True)
class UserRegressors:
    """The events of a ``<story>.tsv`` of ``--baseline-regressors``.

    Attributes
    ----------
    onsets, durations : ndarray, shape (n_rows,)
        Seconds relative to the story's audio; durations >= 0 (0 = impulse).
    values : ndarray, shape (n_rows, n_columns)
    names : tuple of str
        The value columns, in file order.
    path : Path
    """

    onsets: np.ndarray
    durations: np.ndarray
    values: np.ndarray
    names: tuple
    path: Path


def user_regressor_file(config: Config, story: str) -> Optional[Path]:
    """``<--baseline-regressors>/<story>.tsv``, or None without the option."""
    if config.baseline_regressors is None:
        return None
    return Path(config.baseline_regressors) / f"{story}.tsv"


def read_user_regressors(path: Path) -> UserRegressors:
    """Read and check a user regressor table (tab-separated, header row; docs/usage.md).

    Columns: ``onset`` (s, relative to the story's audio start; required),
    ``duration`` (s, >= 0; optional, default 0 = impulse), ``word`` (text,
    optional, ignored) and one or more numeric value columns, each one
    regressor named after its column. ``n/a`` and empty cells are refused (a
    regressor needs a value at every event). Cached per file.

    Raises
    ------
    MissingInputError (66)
        The file does not exist (the message lists the tables in the folder).
    DataError (65)
        No ``onset`` column, no value column, duplicate or built-in column
        names, a row of the wrong length, a value that is not a finite number,
        a negative duration (the message names the file, the line and the column).
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        have = sorted(p.name for p in path.parent.glob("*.tsv")) if path.parent.is_dir() else []
        raise MissingInputError(
            f"no user baseline regressors for story {path.stem!r}: {path} does not exist (--baseline-"
            f"regressors {path.parent} holds {have or 'no .tsv files'}). Add <story>.tsv for every "
            "story analysed (docs/usage.md)") from None
    return _read_user_cached(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _read_user_cached(path_s: str, size: int, mtime_ns: int) -> UserRegressors:
    from ..bids.tables import read_tsv

    path = Path(path_s)
    fix = "Fix the file (docs/usage.md, 'User baseline regressors')."
    # text, header, ragged and truncated lines checked by the one TSV reader; cells as written
    table = read_tsv(path, "baseline regressors file", required=("onset",), strings=True)
    header = list(table.columns)
    value_cols = [h for h in header if h not in ("onset", "duration") + USER_TEXT_COLUMNS]
    if not value_cols:
        raise DataError(f"{path}, line 1: no value column besides {header}; give one or more numeric "
                        f"columns (each becomes one regressor). {fix}")
    clash = [h for h in value_cols if h in BASELINES]
    if clash:
        raise DataError(f"{path}, line 1: column {clash[0]!r} has the name of a built-in baseline; "
                        f"rename it. {fix}")
    numeric = ["onset"] + (["duration"] if "duration" in header else []) + value_cols
    rows = []
    for lineno, cells in table[numeric].iterrows():
        row = []
        for c, cell in zip(numeric, cells):
            try:
                v = float(cell) if cell.lower() not in ("", "n/a", "nan") else math.nan
            except ValueError:
                raise DataError(f"{path}, line {lineno}, column {c!r}: {cell!r} is not a number. "
                                f"{fix}") from None
            if not math.isfinite(v):
                shown = repr(cell) if cell else "an empty cell"
                raise DataError(f"{path}, line {lineno}, column {c!r}: {shown} is not a finite number "
                                f"(n/a and empty cells are not allowed: every event needs a value; drop "
                                f"the row or give 0). {fix}")
            if c == "duration" and v < 0:
                raise DataError(f"{path}, line {lineno}, column 'duration': negative duration {v}. {fix}")
            row.append(v)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: a header but no rows. {fix}")
    arr = np.array(rows, dtype=float)
    has_dur = "duration" in header
    out = UserRegressors(onsets=arr[:, 0], durations=arr[:, 1] if has_dur else np.zeros(len(arr)),
                         values=arr[:, 2 if has_dur else 1:], names=tuple(value_cols), path=path)
    for a in (out.onsets, out.durations, out.values):
        a.setflags(write=False)
    return out


# ---------------------------------------------------------------------------- selection

@dataclass(frozen=True)
class BaselineStatus:
    """Whether one built-in baseline can be made for a story, and why (for logs and errors).

    Attributes
    ----------
    name : str
    available : bool
        The inputs allow it (words; phones in the alignment; the WAV exists).
    requested : bool
        ``--baselines`` asks for it (by name, or through ``auto``).
    explicit : bool
        ``--baselines`` named it (then unavailable is an error, not a skip).
    detail : str
        What it is made from, or why it cannot be made.
    """

    name: str
    available: bool
    requested: bool
    explicit: bool
    detail: str

    @property
    def used(self) -> bool:
        return self.available and self.requested

    @property
    def reason(self) -> str:
        if self.used:
            return self.detail
        if not self.requested:
            return "not requested (--baselines)"
        return ("requested but " if self.explicit else "auto: ") + self.detail


def requested_baselines(config: Config) -> tuple[tuple[str, ...], bool]:
    """(built-in names asked for, whether they were named explicitly) from ``--baselines``."""
    from ..config import normalize_baselines

    chosen = normalize_baselines(config.baselines)
    if chosen == ["auto"]:
        return BASELINES, False
    if chosen == ["none"]:
        return (), True
    return tuple(b for b in BASELINES if b in chosen), True


def baseline_status(story: Story, config: Config, audio_path: Optional[Path] = None) -> list[BaselineStatus]:
    """Which built-in baselines the inputs allow for ``story``, which are asked for, and why.

    Reads nothing (the WAV's content is checked by :func:`check_baselines`).
    """
    wanted, explicit = requested_baselines(config)
    out = []
    n_ph = 0 if story.phone_starts is None else int(np.size(story.phone_starts))
    for name in BASELINES:
        req = name in wanted
        if name == "word_rate":
            ok = story.n_words > 0
            why = f"{story.n_words} word onsets from {story.source.name}" if ok else "the story has no words"
        elif name == "phoneme_rate":
            ok = n_ph > 0
            why = (f"{n_ph} phone onsets" if ok else
                   f"the alignment of story {story.name!r} ({story.source}) has no phones (Gentle "
                   "align.json 'phones' (also read next to an align.csv) or a TextGrid 'phones' tier)")
        else:
            if audio_path is None:
                ok, why = False, f"no audio file is known for story {story.name!r} (no stim_file)"
            elif not Path(audio_path).is_file():
                ok, why = False, f"the audio file {audio_path} does not exist"
            else:
                ok, why = True, f"audio {audio_path}"
        out.append(BaselineStatus(name, ok, req, req and explicit, why))
    return out


def describe_baselines(statuses: list[BaselineStatus], user: Optional[UserRegressors] = None) -> str:
    """One log line: the baselines used and the ones skipped, with reasons."""
    used = [f"{s.name} ({s.detail})" for s in statuses if s.used]
    skipped = [f"{s.name} ({s.reason})" for s in statuses if not s.used]
    parts = ["baselines: " + (", ".join(used) if used else "no built-in one")]
    if user is not None:
        parts.append(f"user regressors {', '.join(user.names)} ({len(user.onsets)} rows of {user.path})")
    if skipped:
        parts.append("skipped: " + "; ".join(skipped))
    return "; ".join(parts)


def check_baselines(story: Story, config: Config, audio_path: Optional[Path] = None) -> list[BaselineStatus]:
    """Check, before the model runs, that every requested baseline of ``story`` can be made.

    Reads (and caches) the WAV when the envelope is used and the user table of
    ``--baseline-regressors``; logs which baselines are used and which skipped.

    Raises
    ------
    UsageError (64)
        A baseline named in ``--baselines`` that the inputs cannot provide.
    DataError (65)
        A broken WAV or user table (the message names the file).
    MissingInputError (66)
        ``--baseline-regressors`` without ``<story>.tsv``.
    """
    statuses = baseline_status(story, config, audio_path)
    for s in statuses:
        if s.explicit and not s.available:
            raise _unavailable(s, story)
    if any(s.used and s.name == "envelope" for s in statuses):
        env = audio_envelope(Path(audio_path))
        last = float(np.nanmax(story.ends)) if story.n_words else 0.0
        if env.duration < last - 1.0:
            log.warning("story %s: the audio %s lasts %.1f s but the last word ends at %.1f s; is it the "
                        "story's audio?", story.name, audio_path, env.duration, last)
    ufile = user_regressor_file(config, story.name)
    user = read_user_regressors(ufile) if ufile is not None else None
    log.info("story %s: %s", story.name, describe_baselines(statuses, user))
    return statuses


def _unavailable(s: BaselineStatus, story: Story) -> UsageError:
    return UsageError(f"--baselines {s.name}: cannot be made for story {story.name!r}: {s.detail}. Drop "
                      f"it from --baselines, or use --baselines auto (every baseline the inputs allow).")


# ---------------------------------------------------------------------------- the entry point

def _zscore(x: np.ndarray) -> Optional[np.ndarray]:
    mean, std = float(x.mean()), float(x.std())
    if not std > 1e-12 * max(1.0, abs(mean)):
        return None
    return (x - mean) / std


def baseline_design(story: Story, frame_times_audio, config: Config,
                    audio_path: Optional[Path] = None) -> tuple[np.ndarray, list[str]]:
    """The baseline regressors of one run.

    Parameters
    ----------
    story : Story
    frame_times_audio : array-like, shape (n_frames,)
        The run's frame times (s) relative to the start of the story's audio
        (``run.frame_times - run.story_onset``).
    config : Config
        ``baselines``, ``baseline_regressors`` and ``hrf`` are used.
    audio_path : Path, optional
        The story's WAV (``bids_dir/stimuli/<stim_file>``); the envelope is
        skipped (logged) when it is None or missing and ``--baselines`` is auto.

    Returns
    -------
    X : ndarray, shape (n_frames, n_baselines), float64
        Columns z-scored over the frames: the built-in baselines in the order of
        :data:`BASELINES`, then the user columns in file order. A column that is
        constant at these frames is dropped (warning).
    names : list of str
        ``word_rate``, ``phoneme_rate``, ``envelope``, user column names.

    Raises
    ------
    UsageError, DataError, MissingInputError
        As :func:`check_baselines`.
    """
    ft = _check_frame_times(frame_times_audio)
    statuses = baseline_status(story, config, audio_path)
    cols, names = [], []
    for s in statuses:
        if not s.requested:
            continue
        if not s.available:
            if s.explicit:
                raise _unavailable(s, story)
            log.debug("story %s: baseline %s skipped: %s", story.name, s.name, s.reason)
            continue
        if s.name == "word_rate":
            x = impulse_rate(story.starts, ft, config.hrf)
        elif s.name == "phoneme_rate":
            x = impulse_rate(story.phone_starts, ft, config.hrf)
        else:
            x = envelope_regressor(Path(audio_path), ft, config.hrf)
        cols.append(x)
        names.append(s.name)
    ufile = user_regressor_file(config, story.name)
    if ufile is not None:
        user = read_user_regressors(ufile)
        for k, name in enumerate(user.names):
            cols.append(events_to_frames(user.onsets, user.durations, user.values[:, k], ft, config.hrf))
            names.append(name)
    out, kept = [], []
    for x, name in zip(cols, names):
        z = _zscore(x)
        if z is None:
            log.warning("story %s: baseline %s is constant at this run's %d frames (%.1f to %.1f s of "
                        "audio time) and is dropped", story.name, name, ft.size, ft[0], ft[-1])
            continue
        out.append(z)
        kept.append(name)
    X = np.column_stack(out) if out else np.zeros((ft.size, 0))
    return X, kept
