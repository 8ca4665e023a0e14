"""Find the inputs of every selected BOLD run with PyBIDS -> :class:`~bids_llm_encode.records.RunInputs`.

For each raw BOLD run picked by the labels and the filter file this finds, in
the fMRIPrep derivatives: the preprocessed BOLD in the requested space (any
``res-``), its brain mask, its confounds (``desc-confounds_timeseries`` of
fMRIPrep >= 20.2 or ``desc-confounds_regressors`` of 20.0.x), the TR and the
slice-time reference (with ``--space fsLR``: fMRIPrep's ``--cifti-output`` BOLD
``space-fsLR_den-91k_bold.dtseries.nii`` instead, with no mask, and the same
confounds file); in the raw dataset: the events.tsv, the story (from
``stim_file``), its word timing and the story onset.

Nothing is ever written inside ``bids_dir``: the PyBIDS layouts are built in
memory with ``validate=False`` (validation is ``bids.validate``), or, with
``--bids-database-dir``, indexed once into that folder and loaded from it by
every later process (:func:`saved_layout`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Optional

import numpy as np

from ..config import Config, normalize_labels
from ..errors import CantCreateError, DataError, IOFailure, MissingInputError, NoMatchError, UsageError
from ..records import RunInputs, Story
from .images import CIFTI_DENSITY, check_bold, check_cifti_bold, check_mask, is_cifti_space
from .stimuli import load_story, read_events_words, read_gentle_phones
from .tables import check_confounds, read_events, read_text

log = logging.getLogger(__name__)

__all__ = ["normalize_labels", "find_runs", "find_runs_and_stories", "dataset_stories", "index_dataset", "run_summary", "load_filters", "story_name",
           "timing_candidates", "stim_path", "check_run_baselines"]

#: Entities a raw BOLD and its fMRIPrep outputs share. Not ``echo``: fMRIPrep's ``desc-preproc_bold``
#: of a multi-echo run is the optimally combined series, without an echo entity.
_ENTITIES_MATCHED = ("subject", "session", "task", "run", "acquisition", "direction",
                     "reconstruction", "ceagent")


def load_filters(path: Optional[Path]) -> dict:
    """The ``"bold"`` entry of a ``--bids-filter-file`` (fMRIPrep's format), as PyBIDS query args.

    ``null`` becomes ``Query.NONE`` and ``"*"`` becomes ``Query.ANY``-like ``Query.REQUIRED``.

    Raises
    ------
    MissingInputError
        The file does not exist.
    UsageError
        Not JSON, not an object, or the ``bold`` entry is not an object.
    """
    if path is None:
        return {}
    from bids.layout import Query

    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"BIDS filter file {path} does not exist")
    try:  # the checked reader: not UTF-8, binary or gzip is named, not a traceback
        text = read_text(path, "BIDS filter file")
    except DataError as exc:
        raise UsageError(str(exc)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"BIDS filter file {path}, line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"BIDS filter file {path}: expected a JSON object keyed by query name "
                         f"(e.g. {{\"bold\": {{\"session\": \"01\"}}}})")
    unknown = set(data) - {"bold", "t1w", "t2w", "flair", "fmap", "sbref", "roi", "dwi", "asl",
                           "pet", "anat", "func", "events"}
    if unknown:
        log.warning("BIDS filter file %s: ignoring entries %s (only 'bold' applies here)", path,
                    sorted(unknown))
    bold = data.get("bold", {})
    if not isinstance(bold, dict):
        raise UsageError(f"BIDS filter file {path}: the 'bold' entry must be an object of entity filters")
    out = {}
    for key, val in bold.items():
        if val is None:
            val = Query.NONE
        elif val == "*":
            val = Query.REQUIRED
        out[key] = val
    return out


def story_name(stim_file: str) -> str:
    """Narratives story name: the ``stim_file`` base name without ``_audio.wav`` (or its extension)."""
    base = PurePosixPath(stim_file.replace("\\", "/")).name
    for suffix in ("_audio.wav", "_audio.mp3", "_audio.flac"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base.rsplit(".", 1)[0] if "." in base else base


def timing_candidates(bids_dir: Path, story: str, stim_file: Optional[str] = None) -> list[Path]:
    """Files that may hold the word timing of ``story``, in the order they are tried.

    ``stimuli/gentle/<story>/align.csv``, ``.../align.json``, ``stimuli/<story>.TextGrid``,
    ``stimuli/<stim stem>.TextGrid``, then ``stimuli/<story>/*.TextGrid`` (sorted).
    """
    stim = Path(bids_dir) / "stimuli"
    out = [stim / "gentle" / story / "align.csv", stim / "gentle" / story / "align.json",
           stim / f"{story}.TextGrid"]
    if stim_file:
        stem = PurePosixPath(stim_file).with_suffix("")
        extra = stim / f"{stem}.TextGrid"
        if extra not in out:
            out.append(extra)
    folder = stim / story
    tg = sorted(folder.glob("*.TextGrid")) if folder.is_dir() else []
    out.extend(tg or [folder / "*.TextGrid"])
    return out


def stim_path(bids_dir: Path, stim_file: Optional[str]) -> Optional[Path]:
    """The file a run's ``stim_file`` names: ``bids_dir/stimuli/<stim_file>`` (None without one).

    BIDS ``stim_file`` paths are relative to ``stimuli/``; ``_check_stim_file``
    has already refused absolute ones and ones leading outside the dataset.
    """
    if not stim_file:
        return None
    return Path(bids_dir) / "stimuli" / Path(*PurePosixPath(stim_file.replace("\\", "/")).parts)


def _check_stim_file(stim_file: str, bids_dir: Path, events: Path, lineno: int) -> None:
    p = PurePosixPath(stim_file.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", stim_file):
        raise DataError(f"{events}, line {lineno}: stim_file {stim_file!r} is an absolute path; BIDS "
                        f"stim_file paths are relative to {bids_dir / 'stimuli'}")
    root = Path(bids_dir).resolve()
    target = (root / "stimuli" / Path(*p.parts)).resolve()
    if root != target and root not in target.parents:
        raise DataError(f"{events}, line {lineno}: stim_file {stim_file!r} points outside the dataset "
                        f"{bids_dir}")


def _read_events(events: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, cells) of an events file, through the checked reader (exit 65)."""
    table = read_events(events)
    return list(table.columns), [(int(n), list(row)) for n, row in zip(table.index, table.to_numpy())]


def _with_phones(story: Story, timing: Path) -> Story:
    """Phones from the Gentle ``align.json`` beside an ``align.csv`` (the CSV has none; Narratives has both)."""
    sibling = timing.with_name("align.json")
    if story.phone_starts is not None or timing.name != "align.csv" or not sibling.is_file():
        return story
    phones = read_gentle_phones(sibling)
    if phones is None:
        return story
    log.info("Story %s: %d phone onsets from %s", story.name, phones.size, sibling)
    return replace(story, phone_starts=phones)


def _story_from_events(events: Path, bids_dir: Path, task: str,
                       want_phones: bool = False) -> list[tuple[Story, float, str]]:
    """Every story of a run: (story, its audio onset in scan time, its ``stim_file``), in onset order.

    Each distinct ``stim_file`` of the events file is one story (Narratives' task-schema runs hold
    two, ``friends_audio.wav`` and ``bigbang_audio.wav``); its onset is the ``onset`` of the first
    row naming it. Rows whose ``stim_file`` is ``n/a`` (movie, music segments) are no story: they
    get no input. ``want_phones``: also read the phones of an ``align.json`` beside the ``align.csv``.
    """
    header, rows = _read_events(events)
    col = {c: i for i, c in enumerate(header)}
    stims = []  # (lineno, stim_file, onset, trial_type)
    if "stim_file" in col:
        for lineno, cells in rows:
            sf = cells[col["stim_file"]]
            if sf and sf != "n/a":
                _check_stim_file(sf, bids_dir, events, lineno)
                tt = cells[col["trial_type"]] if "trial_type" in col else ""
                stims.append((lineno, sf, cells[col["onset"]] if "onset" in col else "", tt))
    if not stims:
        story = read_events_words(events, task)
        if story is None:
            raise MissingInputError(
                f"{events}: no stim_file column/values and no word rows; cannot tell which story was heard "
                f"nor when its words were spoken")
        log.info("%s: %d words from events.tsv word rows (scan-relative times)", events, story.n_words)
        return [(story, 0.0, "")]
    distinct = list(dict.fromkeys(s[1] for s in stims))
    if len(distinct) > 1:
        log.info("%s: %d stories in one run (%s); each is analysed with its own atoms at its own onset, "
                 "the rest of the run is no input for it", events, len(distinct), ", ".join(distinct))
    out = []
    for sf in distinct:
        lineno, _, onset_s, _ = next(s for s in stims if s[1] == sf)
        try:
            onset = float(onset_s)
        except ValueError:
            raise DataError(f"{events}, line {lineno}: onset {onset_s!r} is not a number") from None
        out.append(_story_timing(events, bids_dir, sf, onset, want_phones, several=len(distinct) > 1))
    names = [o[0].name for o in out]
    if len(set(names)) < len(names):
        raise DataError(f"{events}: stim_files {distinct} give the same story name twice ({names}); "
                        "each story of a run needs its own name (the stim_file without _audio.wav)")
    return sorted(out, key=lambda o: o[1])


def _story_timing(events: Path, bids_dir: Path, sf: str, onset: float, want_phones: bool,
                  several: bool) -> tuple[Story, float, str]:
    """The word timing of the story whose audio is ``sf``; word rows only when the run has one story."""
    name = story_name(sf)
    tried = timing_candidates(bids_dir, name, sf)
    for cand in tried:
        if cand.is_file():
            story = load_story(cand, name)
            if want_phones:
                story = _with_phones(story, cand)
            log.info("Story %s: %d words (%d unaligned) from %s; audio starts at %.3f s",
                     name, story.n_words, story.n_unaligned, cand, onset)
            return story, onset, sf
    words = None if several else read_events_words(events, name)
    if words is not None:
        log.info("Story %s: %d words from events.tsv word rows", name, words.n_words)
        return words, 0.0, sf
    tried_txt = "\n  ".join(str(p) for p in [*tried, *([] if several else [events])])
    rows = "" if several else "(the last one for word rows: a 'word' column or trial_type 'word'). "
    raise MissingInputError(
        f"no word timing for story {name!r} (stim_file {sf!r} in {events}); tried:\n  {tried_txt}\n"
        f"{rows}Add a Gentle alignment or a TextGrid at one of these paths.")


def _slice_time_ref(meta: dict, tr: float, where: Optional[Path] = None) -> float:
    """``StartTime / TR``; without a usable ``StartTime``, 0.5 if slice-timing corrected, else 0.

    A ``StartTime`` that is not a number is not silently ignored: the fallback is
    logged (a warning naming the sidecar).
    """
    fallback = 0.5 if meta.get("SliceTimingCorrected") else 0.0
    if meta.get("StartTime") is not None:
        try:
            return float(meta["StartTime"]) / tr
        except (TypeError, ValueError):
            log.warning("%s: StartTime %r is not a number; using a slice-time reference of %g (%s)",
                        where or "BOLD sidecar", meta["StartTime"], fallback,
                        "SliceTimingCorrected" if fallback else "the start of each frame")
    return fallback


def _float_tr(meta: dict, where: Path) -> Optional[float]:
    if "RepetitionTime" not in meta:
        return None
    try:
        tr = float(meta["RepetitionTime"])
    except (TypeError, ValueError):
        raise DataError(f"{where}: RepetitionTime {meta['RepetitionTime']!r} is not a number") from None
    if not tr > 0:
        raise DataError(f"{where}: RepetitionTime {tr} is not positive")
    return tr


def _layouts(config: Config):
    bids_dir = Path(config.bids_dir)
    if not (bids_dir / "dataset_description.json").is_file():
        if not bids_dir.is_dir():
            raise MissingInputError(f"BIDS dataset folder {bids_dir} does not exist")
        raise MissingInputError(f"{bids_dir} has no dataset_description.json: is it a BIDS dataset?")
    deriv = Path(config.derivatives) if config.derivatives else bids_dir / "derivatives" / "fmriprep"
    if not deriv.is_dir():
        raise MissingInputError(f"fMRIPrep derivatives folder {deriv} does not exist; pass it with "
                                f"--derivatives")
    db = config.bids_database_dir
    if db is None:
        log.info("Indexing %s and %s", bids_dir, deriv)
    raw = saved_layout(bids_dir, db, "raw", validate=False, derivatives=False)
    der = saved_layout(deriv, db, "derivatives", validate=False, is_derivative=True)
    return bids_dir, deriv, raw, der


#: The PyBIDS index file inside a ``database_path`` folder.
_DB_FILE = "layout_index.sqlite"


def saved_layout(root: Path, database_dir: Optional[Path], name: str, **kwargs):
    """A PyBIDS layout of ``root``: in memory, or saved under ``database_dir/name`` and reused.

    With ``--bids-database-dir`` the first process indexes ``root`` and saves the
    index (into a temporary folder renamed into place, under a lock, so that
    processes started at once index it once and a killed one leaves no half
    index); every later process loads it instead of indexing again (as fMRIPrep's
    ``--bids-database-dir``). Nothing is written inside ``root``.

    Raises
    ------
    UsageError (64)
        The saved index is of another dataset folder.
    CantCreateError (73), IOFailure (74)
        The folder cannot be created, or locked / written.
    """
    import shutil
    import tempfile

    from bids import BIDSLayout

    if database_dir is None:
        return BIDSLayout(root, database_path=None, **kwargs)
    from filelock import FileLock

    database_dir, final = Path(database_dir), Path(database_dir) / name
    try:
        database_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(database_dir / f".{name}.lock")):
            if not (final / _DB_FILE).is_file():
                t0 = time.perf_counter()
                tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=database_dir))
                BIDSLayout(root, database_path=tmp, **kwargs)
                if final.exists():  # a folder without an index (emptied by hand): replaced
                    shutil.rmtree(final)
                os.rename(tmp, final)
                log.info("Indexed %s in %.1f s; index saved to %s (reused by later runs)", root,
                         time.perf_counter() - t0, final)
    except PermissionError as exc:
        raise CantCreateError(f"--bids-database-dir {database_dir}: cannot write the PyBIDS index there "
                              f"({exc.strerror}); give a writable folder") from None
    except OSError as exc:
        raise IOFailure(f"--bids-database-dir {database_dir}: {exc.strerror or exc} while saving or locking "
                        "the PyBIDS index; give a folder on a local file system") from None
    layout = BIDSLayout(root, database_path=final, **kwargs)  # loads the saved index: no indexing
    if Path(os.path.realpath(layout.root)) != Path(os.path.realpath(root)):
        raise UsageError(f"--bids-database-dir {database_dir}: its index {final} is of {layout.root}, not "
                         f"{root}; give another folder (one per dataset) or delete it to index again")
    log.info("PyBIDS index of %s loaded from %s", root, final)
    return layout


def _choose(files: list, what: str, key: str) -> Optional[str]:
    unique: dict[str, str] = {}  # resolved path -> the shortest way to it (links, cycles)
    for f in sorted(files, key=lambda f: (len(Path(f.path).parts), f.path)):
        unique.setdefault(os.path.realpath(f.path), f.path)
    paths = sorted(unique.values())
    if not paths:
        return None
    if len(paths) > 1:
        log.info("Several %s for %s: %s; using %s", what, key, [Path(p).name for p in paths],
                 Path(paths[0]).name)
    return paths[0]


def find_runs(config: Config) -> list[RunInputs]:
    """Find every selected BOLD run and all it needs.

    Parameters
    ----------
    config : Config
        Uses ``bids_dir``, ``derivatives``, ``space``, ``participant_label``,
        ``session_label``, ``task_label`` and ``bids_filter_file``.

    Returns
    -------
    list of RunInputs
        One per (run, story): a run whose events name several stories (``stim_file``
        values) gives one per story, each with that story's onset. Sorted by subject,
        session, task, run, story onset. A multi-echo run is one run (the combined series).

    Raises
    ------
    MissingInputError (66)
        No derivatives for a selected participant, a missing mask, confounds,
        events.tsv, or story timing (the message lists every path tried).
    NoMatchError (18)
        Labels or filters that select nothing (the message says what exists).
    DataError (65)
        A ``stim_file`` outside the dataset, BOLD and confounds of different
        lengths, a bad TR, a malformed timing file.
    UsageError (64)
        A bad filter file or label; a baseline named in ``--baselines`` that
        the inputs cannot give (:func:`check_run_baselines`, which also refuses a
        broken WAV or ``--baseline-regressors`` table with 65, a missing table
        with 66).
    """
    return _find_runs(config, _layouts(config))


def index_dataset(config: Config) -> None:
    """Build (or load) the PyBIDS index of ``bids_dir`` and the derivatives: with
    ``--bids-database-dir``, saved for every later process (the cluster's first step)."""
    _layouts(config)


def find_runs_and_stories(config: Config) -> tuple[list[RunInputs], list[Story]]:
    """:func:`find_runs` and :func:`dataset_stories` on one PyBIDS index (the dataset indexed once)."""
    layouts = _layouts(config)
    return _find_runs(config, layouts), dataset_stories(config, layouts[2])


def dataset_stories(config: Config, raw=None) -> list[Story]:
    """Every story of the dataset that has word timing: what the model-level dictionary is learned on.

    The stories are those of **every** events.tsv of ``bids_dir`` (each distinct ``stim_file``;
    word rows of an events file without one: a story named by its task), whatever
    ``--participant-label``, ``--session-label``, ``--task-label`` or ``--bids-filter-file`` select,
    so that participant jobs run in parallel (one participant each) all learn, and share, the same
    dictionary. Only ``--dictionary-tasks`` restricts them (to the events of those tasks). A story
    is read from the first events file (sorted by path) that names it, as :func:`find_runs` reads
    it; a story without word timing is left out (logged): it cannot be given to the model.

    Returns
    -------
    list of Story
        Sorted by name (the order of the dictionary's frames).

    Raises
    ------
    DataError (65)
        A malformed events file (named) or timing file.
    NoMatchError (18)
        No story with word timing (in the ``--dictionary-tasks``).
    """
    if raw is None:
        raw = _layouts(config)[2]
    bids_dir = Path(config.bids_dir)
    tasks = normalize_labels(config.dictionary_tasks, "task")
    query = dict(suffix="events", extension=".tsv")
    if tasks:
        query["task"] = tasks
    files = {os.path.realpath(f.path): f for f in raw.get(**query)}.values()  # a file once (links)
    first: dict[str, tuple[Path, str, str]] = {}  # story -> (events, stim_file, task)
    for f in sorted(files, key=lambda f: f.path):
        events = Path(f.path)
        task = str(f.get_entities().get("task", ""))
        header, rows = _read_events(events)
        stims = []
        if "stim_file" in header:
            i = header.index("stim_file")
            for lineno, cells in rows:
                sf = cells[i]
                if sf and sf != "n/a" and sf not in stims:
                    _check_stim_file(sf, bids_dir, events, lineno)
                    stims.append(sf)
        for sf in stims or [""]:
            name = story_name(sf) if sf else task
            if name and name not in first:
                first[name] = (events, sf, task)
    stories, without = [], []
    for name, (events, sf, task) in sorted(first.items()):
        try:
            if sf:
                story = _story_timing(events, bids_dir, sf, 0.0, False, several=False)[0]
            else:
                story = read_events_words(events, task)
                if story is None:
                    raise MissingInputError(f"{events}: no stim_file and no word rows")
        except MissingInputError:
            without.append(name)
            continue
        stories.append(story)
    if without:
        log.info("dictionary: %d story(ies) without word timing left out: %s", len(without),
                 ", ".join(without))
    if not stories:
        raise NoMatchError(f"no story with word timing in {bids_dir}"
                           + (f" for --dictionary-tasks {tasks}" if tasks else "")
                           + "; the model-level dictionary needs at least one")
    log.info("dictionary: %d story(ies) of the dataset with word timing: %s", len(stories),
             ", ".join(s.name for s in stories))
    return stories


def _find_runs(config: Config, layouts) -> list[RunInputs]:
    from bids.layout import Query

    from ..signal.baselines import requested_baselines

    bids_dir, deriv, raw, der = layouts
    want_phones = "phoneme_rate" in requested_baselines(config)[0]
    subjects = normalize_labels(config.participant_label, "sub")
    sessions = normalize_labels(config.session_label, "ses")
    tasks = normalize_labels(config.task_label, "task")
    filters = load_filters(config.bids_filter_file)

    have_subjects = sorted(raw.get_subjects())
    for asked, have, what in ((subjects, have_subjects, "participant"),
                              (sessions, sorted(raw.get_sessions()), "session"),
                              (tasks, sorted(raw.get_tasks()), "task")):
        missing = [a for a in asked if a not in have]
        if missing:
            raise NoMatchError(f"{what} label(s) {missing} not found in {bids_dir}; it has "
                               f"{what}s {have or 'none'}")

    query = dict(datatype="func", suffix="bold", extension=[".nii.gz", ".nii"])
    if subjects:
        query["subject"] = subjects
    if sessions:
        query["session"] = sessions
    if tasks:
        query["task"] = tasks
    for k, v in filters.items():
        if k in ("suffix", "extension", "datatype") and v != query.get(k):
            log.warning("bids filter %s=%r replaces %r", k, v, query.get(k))
        query[k] = v
    try:
        bolds = raw.get(**query)
    except ValueError as exc:
        raise UsageError(f"bad BIDS filter ({config.bids_filter_file}): {exc}") from exc
    if not bolds:
        shown = {k: (str(v) if isinstance(v, Query) else v) for k, v in query.items()}
        raise NoMatchError(
            f"no BOLD runs in {bids_dir} match {shown}; the dataset has participants "
            f"{have_subjects}, sessions {sorted(raw.get_sessions()) or 'none'}, tasks "
            f"{sorted(raw.get_tasks())}")

    der_subjects = set(der.get_subjects())
    selected_subjects = sorted({b.entities["subject"] for b in bolds})
    lacking = [s for s in selected_subjects if s not in der_subjects]
    if lacking:
        raise MissingInputError(f"no fMRIPrep derivatives for participant(s) "
                                f"{', '.join('sub-' + s for s in lacking)} in {deriv}")

    runs, seen, dupes, echoes = [], {}, [], defaultdict(list)
    for bold in sorted(bolds, key=lambda f: (len(Path(f.path).parts), f.path)):
        real = os.path.realpath(bold.path)  # one file reached through links (a cycle) counts once
        if real in seen:
            dupes.append(bold.path)
            continue
        seen[real] = bold.path
        ents = bold.get_entities()
        if "echo" in ents:  # multi-echo: one run, fMRIPrep's optimally combined series
            key = tuple(str(ents.get(k)) for k in _ENTITIES_MATCHED)
            echoes[key].append(Path(bold.path).name)
            if len(echoes[key]) > 1:
                continue
        runs.extend(_run_inputs(bold, raw, der, bids_dir, deriv, config.space, want_phones))
    for names in echoes.values():
        log.info("multi-echo run (%d echo file(s): %s): using fMRIPrep's optimally combined "
                 "desc-preproc_bold (no echo entity); the single echoes are ignored", len(names),
                 ", ".join(names))
    if dupes:
        log.warning("%d BOLD path(s) lead to files already found (symbolic links, e.g. a link to a "
                    "parent folder); each file is counted once: %s", len(dupes),
                    ", ".join(sorted(dupes)[:3]) + (" ..." if len(dupes) > 3 else ""))
    runs.sort(key=lambda r: (r.subject, r.session or "", r.task, -1 if r.run is None else r.run,
                             r.story_onset))
    n_bold = len({r.bold for r in runs})
    log.info("Found %d BOLD run(s) for %d participant(s)%s", n_bold, len(selected_subjects),
             f"; {len(runs)} story segment(s) (runs with several stories)" if len(runs) > n_bold else "")
    check_run_baselines(runs, config)
    return runs


def check_run_baselines(runs: list[RunInputs], config: Config) -> None:
    """Check the low-level baselines of every story heard in ``runs``, before the model runs.

    Once per (story, audio file): a baseline named in ``--baselines`` that the
    inputs cannot give is exit 64; a broken WAV or ``--baseline-regressors``
    table exit 65; a missing table exit 66. Logs which baselines are used and
    which skipped, and why (``signal.baselines.check_baselines``).
    """
    from ..signal.baselines import check_baselines

    seen = set()
    for r in runs:
        audio = stim_path(config.bids_dir, r.stim_file)
        key = (r.story.name, r.story.source, audio)
        if key not in seen:
            seen.add(key)
            check_baselines(r.story, config, audio)


def _run_inputs(bold, raw, der, bids_dir: Path, deriv: Path, space: str,
                want_phones: bool = False) -> list[RunInputs]:
    """The inputs of one BOLD run: one :class:`RunInputs` per story the run holds (in onset order)."""
    from bids.layout import Query

    ents = bold.get_entities()
    match = {k: (ents[k] if k in ents else Query.NONE) for k in _ENTITIES_MATCHED}
    match["echo"] = Query.NONE  # the combined series of a multi-echo run; single echoes are not used
    key = Path(bold.path).name
    if is_cifti_space(space):
        preproc, mask, img = _cifti_bold(der, match, space, key, deriv)
        n_frames = int(img.shape[0])
        hdr_tr = float(img.header.get_axis(0).step)
        pent = der.get_file(preproc).get_entities()
    else:
        preproc, mask, img, pent = _volume_bold(der, match, space, key, deriv)
        n_frames = int(img.shape[3])
        hdr_tr = float(img.header.get_zooms()[3])
    conf = der.get(**match, desc="confounds", suffix=["timeseries", "regressors"], extension=".tsv")
    confounds = _choose(conf, "confounds files", key)
    if confounds is None:
        raise MissingInputError(f"no confounds file (desc-confounds_timeseries.tsv or "
                                f"desc-confounds_regressors.tsv) for {key} in {Path(preproc).parent}")

    # TR and slice timing: derivative sidecar, then the raw one
    der_json = Path(preproc).with_name(Path(preproc).name.split(".")[0] + ".json")
    der_meta = der.get_metadata(preproc)
    raw_meta = raw.get_metadata(bold.path)
    tr = _float_tr(der_meta, der_json) or _float_tr(raw_meta, Path(bold.path))
    if tr is None:
        raise DataError(f"no RepetitionTime in the sidecars of {preproc} nor of {bold.path}")
    if hdr_tr > 0 and not np.isclose(hdr_tr, tr, atol=1e-3) and not np.isclose(hdr_tr / 1000, tr, atol=1e-3):
        log.warning("%s: header TR %.4g differs from RepetitionTime %.4g; using the sidecar",
                    Path(preproc).name, hdr_tr, tr)
    stref = _slice_time_ref(der_meta, tr, der_json)

    check_confounds(Path(confounds), n_frames, Path(preproc))  # text, numbers, one row per frame

    ev_query = {k: v for k, v in match.items() if k in ("subject", "session", "task", "run",
                                                         "acquisition")}
    events = raw.get(**ev_query, suffix="events", extension=".tsv")
    events_path = _choose(events, "events files", key)
    if events_path is None:
        near = raw.get_nearest(bold.path, suffix="events", extension=".tsv", strict=False)
        events_path = near if near else None
    if events_path is None:
        raise MissingInputError(f"no events.tsv for {bold.path} (needed for the story and its onset)")
    stories = _story_from_events(Path(events_path), bids_dir, str(ents["task"]), want_phones)

    run = ents.get("run")
    raw_json = Path(bold.path.split(".")[0] + ".json")
    return [RunInputs(
        subject=str(ents["subject"]), session=ents.get("session"), task=str(ents["task"]),
        run=int(run) if run is not None else None, bold=Path(preproc),
        mask=Path(mask) if mask is not None else None,
        confounds=Path(confounds), bold_json=der_json if der_json.is_file() else (
            raw_json if raw_json.is_file() else None),
        events=Path(events_path), raw_bold=Path(bold.path), tr=float(tr), n_frames=n_frames,
        slice_time_ref=float(stref), story=story, story_onset=float(onset), stim_file=stim_file)
        for story, onset, stim_file in stories]


def run_summary(run: RunInputs) -> dict:
    """A JSON-ready description of one run for the per-run summary table.

    Returns
    -------
    dict
        subject, session, task, run, tr, n_frames, n_words, n_unaligned, story,
        story_onset, story_first_frame / story_last_frame (frames whose acquisition
        time falls within [onset of the first word, end of the last word] in scan
        time; None when no frame does), bold (file name), slice_time_ref.
    """
    ft = run.frame_times
    first = last = None
    if run.story.n_words:
        t0 = run.story_onset + float(np.min(run.story.starts))
        t1 = run.story_onset + float(np.max(run.story.ends))
        inside = np.flatnonzero((ft >= t0) & (ft <= t1))
        if inside.size:
            first, last = int(inside[0]), int(inside[-1])
    return {"subject": run.subject, "session": run.session, "task": run.task, "run": run.run,
            "tr": run.tr, "n_frames": run.n_frames, "slice_time_ref": run.slice_time_ref,
            "n_words": run.story.n_words, "n_unaligned": run.story.n_unaligned,
            "story": run.story.name, "story_onset": run.story_onset,
            "story_first_frame": first, "story_last_frame": last, "bold": run.bold.name}


def _volume_bold(der, match: dict, space: str, key: str, deriv: Path):
    """The desc-preproc_bold of a run in a volume space, its brain mask, image and entities."""
    from bids.layout import Query

    single = der.get(**dict(match, echo=Query.REQUIRED), space=space, desc="preproc", suffix="bold",
                     extension=[".nii.gz", ".nii"])
    if single:
        log.info("%s: %d single-echo desc-preproc_bold file(s) ignored (%s); the optimally combined "
                 "series is used", key, len(single), ", ".join(sorted(Path(f.path).name for f in single)))
    pre = der.get(**match, space=space, desc="preproc", suffix="bold", extension=[".nii.gz", ".nii"])
    preproc = _choose(pre, f"preprocessed BOLD files in space {space}", key)
    if preproc is None:
        spaces = sorted({f.entities.get("space") for f in der.get(**match, desc="preproc", suffix="bold",
                                                                   extension=[".nii.gz", ".nii"])} - {None})
        raise MissingInputError(
            f"no preprocessed BOLD (desc-preproc_bold) in space {space} for {key} in {deriv}; "
            f"spaces found for this run: {spaces or 'none'}")
    pent = der.get_file(preproc).get_entities()
    res = pent.get("res", Query.NONE)
    masks = der.get(**match, space=space, res=res, desc="brain", suffix="mask",
                    extension=[".nii.gz", ".nii"])
    mask = _choose(masks, "brain masks", key)
    if mask is None:
        raise MissingInputError(f"no brain mask (space-{space}"
                                f"{'_res-' + str(pent['res']) if 'res' in pent else ''}_desc-brain_mask) "
                                f"for {Path(preproc).name} in {Path(preproc).parent}")
    img = check_bold(Path(preproc))  # header (+ gzip trailer): before the model runs
    check_mask(Path(mask), Path(preproc), img)  # readable, 3D, not empty, on the BOLD's grid
    return preproc, mask, img, pent


def _cifti_bold(der, match: dict, space: str, key: str, deriv: Path):
    """fMRIPrep's CIFTI BOLD of a run (``space-fsLR_den-91k_bold.dtseries.nii``, no mask), and its image.

    fMRIPrep's ``--cifti-output`` writes it without a ``desc`` entity; a
    ``desc-preproc`` one is taken too. All grayordinates are the "mask".
    """
    pre = der.get(**match, space=space, den=CIFTI_DENSITY, suffix="bold", extension=".dtseries.nii")
    preproc = _choose(pre, f"CIFTI BOLD files in space {space}", key)
    if preproc is None:
        have = sorted({f"space-{f.entities.get('space')}_den-{f.entities.get('den')}"
                       for f in der.get(**match, suffix="bold", extension=".dtseries.nii")})
        raise MissingInputError(
            f"no CIFTI BOLD (space-{space}_den-{CIFTI_DENSITY}_bold.dtseries.nii, fMRIPrep's --cifti-output) "
            f"for {key} in {deriv}; CIFTI BOLD found for this run: {have or 'none'}. For a volume space "
            "give --space MNI152NLin2009cAsym (or the space fMRIPrep wrote).")
    img = check_cifti_bold(Path(preproc))  # header + size: before the model runs
    return preproc, None, img
