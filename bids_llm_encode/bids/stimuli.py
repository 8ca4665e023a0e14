"""Word timing of a story -> :class:`~bids_llm_encode.records.Story`.

Readers for the formats word alignments come in:

- Gentle ``align.csv`` (no header; ``word, alignedWord, start, end``; words the
  aligner could not place have empty times),
- Gentle ``align.json`` (``{"transcript", "words": [{"word", "alignedWord",
  "case", "start", "end", "phones"}]}``; ``case`` is ``success`` or
  ``not-found-in-audio``; ``phones`` = ``[{"phone": "dh_B", "duration": 0.07}, ...]``,
  consecutive from the word's ``start``),
- Praat TextGrid (long or short text format; the word tier; empty intervals
  skipped; the phone onsets of a ``phones`` tier when there is one),
- word rows of a BIDS ``events.tsv`` (rows with a ``word`` value or
  ``trial_type == 'word'``; times are then relative to the scan).

Words the aligner could not place get times linearly interpolated between their
aligned neighbours (extrapolated at the mean word duration at the ends) and
``aligned == False``. Gentle ``<unk>`` words that have times are aligned; the
transcript word is kept.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError, MissingInputError
from ..records import Story
from .tables import read_tsv

log = logging.getLogger(__name__)

__all__ = ["read_gentle_csv", "read_gentle_json", "read_gentle_phones", "read_textgrid",
           "read_events_words", "load_story", "fill_unaligned", "story_name_for"]


def story_name_for(path: Path) -> str:
    """Default story name: the Gentle folder (``gentle/<story>/align.csv``) or the file stem."""
    path = Path(path)
    if path.name in ("align.csv", "align.json"):
        return path.parent.name
    return path.stem.split("_events")[0]


def _check_exists(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"word timing file {path} does not exist")
    return path


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            return raw.decode(enc)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc


def _float(value, path: Path, where: str, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{path}, {where}: {what} {value!r} is not a number") from None
    if not math.isfinite(out):
        raise DataError(f"{path}, {where}: {what} {value!r} is not a finite number")
    return out


def _check_interval(start: float, end: float, path: Path, where: str) -> None:
    if end < start:
        raise DataError(f"{path}, {where}: end {end} is before start {start}")
    if start < 0:
        raise DataError(f"{path}, {where}: negative start time {start}")


def _append_times(starts: list, ends: list, aligned: list, times, path: Path, where: str) -> None:
    """Append one word's (start, end), checked, or NaNs when ``times`` is None (not aligned)."""
    if times is None:
        starts.append(np.nan)
        ends.append(np.nan)
        aligned.append(False)
        return
    start = _float(times[0], path, where, "start time")
    end = _float(times[1], path, where, "end time")
    _check_interval(start, end, path, where)
    starts.append(start)
    ends.append(end)
    aligned.append(True)


def fill_unaligned(starts: np.ndarray, ends: np.ndarray, aligned: np.ndarray,
                   source: Path | str = "<words>") -> tuple[np.ndarray, np.ndarray]:
    """Interpolate the times of words the aligner could not place.

    A run of ``m`` unaligned words between two aligned neighbours shares the gap
    from the end of the left neighbour to the start of the right one in ``m``
    equal slots (zero width when the neighbours overlap). Leading/trailing
    unaligned words are extrapolated at the mean aligned word duration (leading
    times are clipped at 0).

    Parameters
    ----------
    starts, ends : ndarray, shape (n_words,)
        Times; entries of unaligned words are ignored (may be NaN).
    aligned : ndarray of bool, shape (n_words,)
    source : path-like
        Named in the error message.

    Returns
    -------
    starts, ends : ndarray, shape (n_words,), float64
        Complete times.

    Raises
    ------
    DataError
        When no word at all is aligned.
    """
    starts = np.array(starts, dtype=float)
    ends = np.array(ends, dtype=float)
    aligned = np.asarray(aligned, dtype=bool)
    n = len(aligned)
    if n == 0:
        return starts, ends
    idx = np.flatnonzero(aligned)
    if idx.size == 0:
        raise DataError(f"{source}: none of the {n} words has times; cannot place the story in time")
    if idx.size == n:
        return starts, ends
    dur = float(np.mean(ends[idx] - starts[idx]))
    i = 0
    while i < n:
        if aligned[i]:
            i += 1
            continue
        j = i
        while j < n and not aligned[j]:
            j += 1
        m = j - i  # words i .. j-1 are unaligned
        if i == 0:  # leading: extrapolate backwards from the first aligned word
            first = starts[j]
            for k in range(m):
                s = first - (m - k) * dur
                starts[k], ends[k] = max(s, 0.0), max(s + dur, 0.0)
        elif j == n:  # trailing
            last = ends[i - 1]
            for k in range(m):
                starts[i + k], ends[i + k] = last + k * dur, last + (k + 1) * dur
        else:
            lo, hi = ends[i - 1], starts[j]
            step = max(hi - lo, 0.0) / m
            for k in range(m):
                starts[i + k], ends[i + k] = lo + k * step, lo + (k + 1) * step
        i = j
    return starts, ends


#: How far (s) a word may start before the previous aligned word and still be accepted:
#: aligners place neighbouring words with small overlaps; more is a misordered file.
BACKWARDS_TOLERANCE_S = 0.5


def check_monotonic(starts, aligned, source: Path, where: Sequence[str]) -> None:
    """Refuse word times that go backwards by more than :data:`BACKWARDS_TOLERANCE_S`.

    Each aligned word's start is compared with the latest start of the aligned
    words before it; ``where[i]`` names word ``i``'s place in ``source``
    (``"line 12"``, ``"words[11]"``). Unaligned words (NaN) are skipped.

    Raises
    ------
    DataError (65)
    """
    latest, latest_at = -np.inf, None
    for i, (s, ok) in enumerate(zip(starts, aligned)):
        if not ok or not np.isfinite(s):
            continue
        if s < latest - BACKWARDS_TOLERANCE_S:
            raise DataError(f"{source}, {where[i]}: the word starts at {s:g} s, {latest - s:.3g} s before "
                            f"an earlier word ({latest_at}, {latest:g} s); word times must not go "
                            f"backwards by more than {BACKWARDS_TOLERANCE_S} s. Fix the order of the "
                            "alignment (or realign the story).")
        if s > latest:
            latest, latest_at = s, where[i]


def _make_story(name: str, words: Sequence[str], starts, ends, aligned, source: Path,
                where: Optional[Sequence[str]] = None, phone_starts=None) -> Story:
    aligned = np.asarray(aligned, dtype=bool)
    check_monotonic(starts, aligned, source, where or [f"word {i + 1}" for i in range(len(words))])
    starts, ends = fill_unaligned(starts, ends, aligned, source)
    n_un = int((~aligned).sum())
    if n_un:
        log.info("%s: %d of %d words were not aligned; their times were interpolated",
                 source, n_un, len(words))
    return Story(name=name, words=tuple(words), starts=starts, ends=ends, aligned=aligned,
                 source=Path(source), phone_starts=phone_starts)


def read_gentle_csv(path: Path, name: Optional[str] = None) -> Story:
    """Read a Gentle ``align.csv`` (no header: word, alignedWord, start, end).

    Parameters
    ----------
    path : Path
    name : str, optional
        Story name; default the Gentle folder name.

    Returns
    -------
    Story
        Audio-relative times; ``aligned`` False where the times were empty.

    Raises
    ------
    MissingInputError
        The file does not exist.
    DataError
        A row with the wrong number of columns, a non-numeric time, only one of
        the two times, or end < start (the message gives the line number).
    """
    path = _check_exists(path)
    text = _read_text(path)
    words, starts, ends, aligned, lines = [], [], [], [], []
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 4:
            raise DataError(f"{path}, line {lineno}: expected 4 columns (word, alignedWord, start, end), "
                            f"found {len(row)}: {row!r}")
        word, _aw, s, e = (c.strip() for c in row)
        if lineno == 1 and s.lower() == "start" and e.lower() == "end":
            continue  # tolerate a header row
        if not word:
            raise DataError(f"{path}, line {lineno}: empty word")
        if (s == "") != (e == ""):
            raise DataError(f"{path}, line {lineno}: only one of start/end is given ({s!r}, {e!r})")
        words.append(word)
        lines.append(f"line {lineno}")
        _append_times(starts, ends, aligned, None if s == "" else (s, e), path, f"line {lineno}")
    if not words:
        raise DataError(f"{path}: no words")
    return _make_story(name or story_name_for(path), words, starts, ends, aligned, path, lines)


def read_gentle_json(path: Path, name: Optional[str] = None) -> Story:
    """Read a Gentle ``align.json``.

    Words with ``case == 'success'`` and both times are aligned; any other case
    (``not-found-in-audio``) is interpolated. The ``phones`` of aligned words
    (consecutive from the word's ``start``, each lasting its ``duration``) give
    ``Story.phone_starts`` when any word has phones (else None).

    Raises
    ------
    MissingInputError, DataError
        As :func:`read_gentle_csv`; JSON syntax errors give the line number,
        content errors the index of the word (``words[i]``); a phone without a
        finite duration >= 0 names the word and the phone (``words[i] ('the'),
        phones[1]``).
    """
    items = _gentle_words(path)
    words, starts, ends, aligned, phones = [], [], [], [], []
    any_phones = False
    for i, item in enumerate(items):
        where = f"words[{i}]"
        if not isinstance(item, dict) or not str(item.get("word", "")).strip():
            raise DataError(f"{path}, {where}: expected an object with a non-empty 'word'")
        words.append(str(item["word"]).strip())
        ok = item.get("case", "success") == "success" and item.get("start") is not None \
            and item.get("end") is not None
        _append_times(starts, ends, aligned, (item["start"], item["end"]) if ok else None, path, where)
        if ok and item.get("phones") is not None:
            any_phones |= _append_phones(phones, item["phones"], starts[-1], path,
                                         f"{where} ({words[-1]!r})")
    if not words:
        raise DataError(f"{path}: no words")
    return _make_story(name or story_name_for(path), words, starts, ends, aligned, path,
                       [f"words[{i}]" for i in range(len(words))],
                       phone_starts=np.sort(np.array(phones, dtype=float)) if any_phones else None)


def _gentle_words(path: Path) -> list:
    """The ``words`` list of a Gentle ``align.json`` (checked: exists, JSON, an object with ``words``)."""
    path = _check_exists(path)
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg})") from exc
    items = data.get("words") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected an object with a 'words' list (Gentle align.json)")
    return items


def read_gentle_phones(path: Path) -> Optional[np.ndarray]:
    """The phone onsets (s, sorted) of a Gentle ``align.json``, or None when no word has phones.

    Only the aligned words' ``start`` and ``phones`` are read (checked as in
    :func:`read_gentle_json`): this is how the phones of an ``align.csv`` story
    are found in the ``align.json`` beside it.
    """
    path = Path(path)
    phones, any_phones = [], False
    for i, item in enumerate(_gentle_words(path)):
        if not isinstance(item, dict) or item.get("case", "success") != "success" \
                or item.get("start") is None or item.get("phones") is None:
            continue
        where = f"words[{i}] ({str(item.get('word', '')).strip()!r})"
        start = _float(item["start"], path, where, "start time")
        any_phones |= _append_phones(phones, item["phones"], start, path, where)
    return np.sort(np.array(phones, dtype=float)) if any_phones else None


def _append_phones(out: list, phones, start: float, path: Path, where: str) -> bool:
    """Append the onsets of one Gentle word's phones (consecutive from ``start``); True if any.

    Raises
    ------
    DataError
        ``phones`` not a list of objects, or a duration that is missing, not a
        finite number, or negative (the message names the file, word and phone).
    """
    if not isinstance(phones, list):
        raise DataError(f"{path}, {where}: 'phones' must be a list of {{'phone', 'duration'}} objects, "
                        f"found {type(phones).__name__}")
    t = float(start)
    for j, ph in enumerate(phones):
        at = f"{where}, phones[{j}]"
        if not isinstance(ph, dict) or "duration" not in ph:
            raise DataError(f"{path}, {at}: expected an object with 'phone' and 'duration', found {ph!r}")
        d = _float(ph["duration"], path, at, "phone duration")
        if d < 0:
            raise DataError(f"{path}, {at}: negative phone duration {d}")
        out.append(t)
        t += d
    return len(phones) > 0


_TOKEN = re.compile(r'"(?:[^"]|"")*"|<exists>|<absent>|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?')
_BRACKET = re.compile(r"\[\s*\d*\s*\]")


class _Bad(str):
    """Unparseable TextGrid content (reported where a value is expected)."""


def _textgrid_tokens(text: str) -> list[tuple[object, int]]:
    """Tokens (number, string or flag) of a TextGrid in long or short format, with line numbers."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("!"):
            continue
        # drop a leading label ("xmin =", "item [1]:", "intervals: size =") outside quotes
        q = s.find('"')
        head = s if q < 0 else s[:q]
        if "=" in head:
            s = s[head.index("=") + 1:]
        elif q < 0:
            s = _BRACKET.sub("", s)
            if s.endswith(":"):
                continue
        residual = _TOKEN.sub(" ", s).split()
        bad = [r for r in residual if not r.endswith(("?", ":"))]
        if bad:  # text that is neither a number, a quoted string nor a label
            out.append((_Bad(" ".join(bad)), lineno))
            continue
        for m in _TOKEN.finditer(s):
            tok = m.group(0)
            if tok.startswith('"'):
                out.append((tok[1:-1].replace('""', '"'), lineno))
            elif tok.startswith("<"):
                out.append((tok, lineno))
            else:
                out.append((float(tok), lineno))
    return out


def read_textgrid(path: Path, name: Optional[str] = None, tier: Optional[str] = None) -> Story:
    """Read the word tier of a Praat TextGrid (long or short text format).

    Parameters
    ----------
    path : Path
    name : str, optional
        Story name; default the file stem.
    tier : str, optional
        Tier name; default the interval tier named ``words``/``word`` (any case),
        else the first interval tier.

    Returns
    -------
    Story
        One word per non-empty interval; all aligned. ``phone_starts``: the
        starts of the non-silent intervals of a tier named ``phones`` (or
        ``phone``, ``phonemes``), None without one.

    Raises
    ------
    DataError
        Not a TextGrid, a truncated file, a non-numeric value where a time is due,
        or xmax < xmin (with the line number).
    """
    path = _check_exists(path)
    toks = _textgrid_tokens(_read_text(path))
    pos = 0

    def take(kind: type, what: str):
        nonlocal pos
        if pos >= len(toks):
            last = toks[-1][1] if toks else 1
            raise DataError(f"{path}, line {last}: file ends early (expected {what})")
        val, ln = toks[pos]
        pos += 1
        if isinstance(val, _Bad):
            raise DataError(f"{path}, line {ln}: cannot read {str(val)!r} (expected {what})")
        if kind is float and not isinstance(val, float):
            raise DataError(f"{path}, line {ln}: expected a number for {what}, found {val!r}")
        if kind is str and not isinstance(val, str):
            raise DataError(f"{path}, line {ln}: expected a quoted string for {what}, found {val!r}")
        return val, ln

    ftype, ln = take(str, "file type")
    otype, _ = take(str, "object class")
    if ftype != "ooTextFile" or otype != "TextGrid":
        raise DataError(f"{path}, line {ln}: not a Praat TextGrid (file type {ftype!r}, class {otype!r})")
    take(float, "xmin")
    take(float, "xmax")
    flag, ln = toks[pos] if pos < len(toks) else (None, 0)
    if flag in ("<exists>", "<absent>"):
        pos += 1
        if flag == "<absent>":
            raise DataError(f"{path}, line {ln}: the TextGrid has no tiers")
    n_tiers, _ = take(float, "number of tiers")
    tiers = []
    for _t in range(int(n_tiers)):
        cls, _ = take(str, "tier class")
        tname, _ = take(str, "tier name")
        take(float, "tier xmin")
        take(float, "tier xmax")
        n_items, _ = take(float, "number of intervals")
        items = []
        for _k in range(int(n_items)):
            if cls == "IntervalTier":
                a, ln = take(float, "interval xmin")
                b, _ = take(float, "interval xmax")
                txt, _ = take(str, "interval text")
                if b < a:
                    raise DataError(f"{path}, line {ln}: interval ends ({b}) before it starts ({a})")
                items.append((a, b, txt.strip(), ln))
            else:
                t, _ = take(float, "point time")
                take(str, "point mark")
        tiers.append((cls, tname, items))
    interval = [t for t in tiers if t[0] == "IntervalTier"]
    if tier is not None:
        chosen = [t for t in interval if t[1] == tier]
        if not chosen:
            raise DataError(f"{path}: no interval tier named {tier!r} (tiers: {[t[1] for t in tiers]})")
    else:
        chosen = [t for t in interval if t[1].lower() in ("words", "word")] or interval
        if not chosen:
            raise DataError(f"{path}: no interval tier (tiers: {[t[1] for t in tiers]})")
    items = [it for it in chosen[0][2] if it[2] and it[2].lower() not in ("sp", "sil", "<sil>")]
    if not items:
        raise DataError(f"{path}: tier {chosen[0][1]!r} has no non-empty intervals")
    for a, _b, _w, ln in items:
        if a < 0:
            raise DataError(f"{path}, line {ln}: negative start time {a}")
    check_monotonic([it[0] for it in items], [True] * len(items), path, [f"line {it[3]}" for it in items])
    phone_tiers = [t for t in interval if t is not chosen[0] and t[1].lower() in PHONE_TIERS]
    phone_starts = None
    if phone_tiers:
        onsets = [it[0] for it in phone_tiers[0][2] if it[2].strip().lower() not in NOT_PHONES]
        phone_starts = np.sort(np.array(onsets, dtype=float)) if onsets else None
    return Story(name=name or story_name_for(path), words=tuple(it[2] for it in items),
                 starts=np.array([it[0] for it in items]), ends=np.array([it[1] for it in items]),
                 aligned=np.ones(len(items), dtype=bool), source=path, phone_starts=phone_starts)


#: Interval tiers of a TextGrid read as phones (any case), and interval texts that are not phones
#: (silence, short pause, spoken noise: Montreal Forced Aligner's and Praat's labels).
PHONE_TIERS = ("phones", "phone", "phonemes", "phoneme")
NOT_PHONES = ("", "sp", "sil", "<sil>", "spn", "<unk>")


def read_events_words(path: Path, name: Optional[str] = None) -> Optional[Story]:
    """Word rows of a BIDS events.tsv (scan-relative times: story onset is then 0).

    A word row has a non-empty ``word`` value (not ``n/a``), or ``trial_type == 'word'``
    with its text in ``word`` or ``value``. Rows are sorted by onset.

    Returns
    -------
    Story or None
        None when the file has no word rows.

    Raises
    ------
    DataError
        Missing onset/duration columns, non-numeric onset/duration, negative duration
        (with the line number).
    """
    path = _check_exists(path)
    table = read_tsv(path, "events file", strings=True)  # text, tab-separated, no ragged line (exit 65)
    col = {c: i for i, c in enumerate(table.columns)}
    has_word_col = "word" in col
    if not has_word_col and "trial_type" not in col:
        return None
    rows = []
    for lineno, cells in zip(table.index, table.to_numpy()):
        get = lambda c: cells[col[c]] if c in col else ""  # noqa: E731
        word = get("word") if has_word_col else ""
        is_word = (word not in ("", "n/a")) or get("trial_type") == "word"
        if not is_word:
            continue
        if word in ("", "n/a"):
            word = get("value")
        if word in ("", "n/a"):
            raise DataError(f"{path}, line {lineno}: a word row without a word (no 'word' or 'value')")
        if "onset" not in col or "duration" not in col:
            raise DataError(f"{path}: the 'onset' and 'duration' columns are required")
        onset = _float(get("onset"), path, f"line {lineno}", "onset")
        dur_s = get("duration")
        dur = 0.0 if dur_s == "n/a" else _float(dur_s, path, f"line {lineno}", "duration")
        if dur < 0:
            raise DataError(f"{path}, line {lineno}: negative duration {dur}")
        rows.append((onset, onset + dur, word))
    if not rows:
        return None
    rows.sort(key=lambda r: r[0])
    return Story(name=name or story_name_for(path), words=tuple(r[2] for r in rows),
                 starts=np.array([r[0] for r in rows]), ends=np.array([r[1] for r in rows]),
                 aligned=np.ones(len(rows), dtype=bool), source=path)


def load_story(path: Path, name: Optional[str] = None) -> Story:
    """Read word timing from ``path``, choosing the reader by file name.

    ``.csv`` -> Gentle CSV, ``.json`` -> Gentle JSON, ``.TextGrid`` -> Praat,
    ``*events.tsv`` -> word rows.

    Raises
    ------
    DataError
        Unknown format, or an events file without word rows.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_gentle_csv(path, name)
    if suffix == ".json":
        return read_gentle_json(path, name)
    if suffix == ".textgrid":
        return read_textgrid(path, name)
    if suffix == ".tsv":
        story = read_events_words(path, name)
        if story is None:
            raise DataError(f"{path}: no word rows (a 'word' column or trial_type 'word')")
        return story
    raise DataError(f"{path}: unknown word-timing format (expected .csv, .json, .TextGrid or events .tsv)")
