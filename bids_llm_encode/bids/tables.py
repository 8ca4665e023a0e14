"""The one checked reader of tab-separated tables (the companion of ``bids/images.py``), and of text.

Every TSV the app reads goes through :func:`read_tsv`: fMRIPrep's confounds,
the raw dataset's events files, user atlases' label tables, and, at the group
level, the participant level's own tables. A broken or wrong file is a
:class:`~bids_llm_encode.errors.DataError` (exit 65) that names the file and
says what is wrong, never a traceback from pandas or a silently shifted column:

- not text (binary, gzip, not UTF-8), empty, no header;
- not tab-separated (a one-column header with commas: a CSV), an empty or
  repeated column name, required columns missing (the message lists those found);
- a line with another number of cells than the header (file and line named);
  a last line that is short and has no line end is reported as a truncated file;
- a cell of a numeric column that is not a number (line and column named;
  ``n/a`` is a missing value, an empty cell is refused).

:func:`check_confounds` and :func:`read_events` are the two BIDS inputs'
readers; both run when the runs are found (``bids/inputs.find_runs``), before
the language model, so that a broken confounds or events file of the last run
stops the app in seconds. ``check_confounds`` also compares the rows with the
BOLD's frames. :func:`read_text` and :func:`read_json` give the same checks
(text, UTF-8; valid JSON with its line) to a list of names or a JSON file.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd

from ..errors import DataError, MissingInputError

#: The missing-value marker of BIDS tables.
NA = "n/a"

#: Bytes read to tell a binary file from text.
_SNIFF = 8192


def _text(path: Path, what: str) -> str:
    if not path.is_file():
        raise MissingInputError(f"{what} {path} does not exist" if not path.exists()
                                else f"{what} {path} is not a file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    head = raw[:_SNIFF]
    if head.startswith(b"\x1f\x8b"):
        raise DataError(f"{path}: the {what} is gzip-compressed, not a text file; give it uncompressed")
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            try:
                return raw.decode(enc)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: the {what} is not valid {enc} text ({exc})") from None
    if b"\x00" in head:
        raise DataError(f"{path}: the {what} is a binary file (it holds NUL bytes), not a text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: the {what} is not UTF-8 text (byte {raw[exc.start]:#04x} at offset "
                        f"{exc.start}); BIDS text files are UTF-8") from None


def _rows(text: str, quoted: bool) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every line that is not empty (pandas skips the same ones)."""
    if quoted:  # the app's own tables (pandas quotes a cell holding a tab, a quote or a line end)
        reader = csv.reader(io.StringIO(text), delimiter="\t", quotechar='"', strict=False)
        out, start = [], 1
        for cells in reader:
            if cells:
                out.append((start, cells))
            start = reader.line_num + 1
        return out
    lines = text.split("\n")
    return [(i, ln.rstrip("\r").split("\t")) for i, ln in enumerate(lines, 1) if ln.rstrip("\r")]


def read_tsv(path: Union[str, os.PathLike], what: str = "table", *, required: Sequence[str] = (),
             numeric: Union[Sequence[str], str] = (), strings: bool = False, quoted: bool = False,
             **pandas_kwargs) -> pd.DataFrame:
    """Read a TSV file after checking it; a bad file is exit 65 naming it.

    Parameters
    ----------
    path : path
    what : str
        What the file is, for messages ("confounds file", "events file", ...).
    required : sequence of str
        Columns that must be present.
    numeric : sequence of str, or "all"
        Columns whose every cell must be a number or ``n/a``.
    strings : bool
        Return every cell as ``str`` (as written), the index being each row's
        line number in the file (1 = the header); else pandas parses the values
        (``n/a`` is NaN; ``pandas_kwargs`` are passed on) on a 0-based index.
    quoted : bool
        Cells may be quoted (``"a\\tb"``), as pandas writes them: for the app's
        own outputs. BIDS tables are not quoted (a ``"`` is a character).

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    MissingInputError (66)
        The file does not exist.
    DataError (65)
        Not text, empty, not tab-separated, missing columns, a ragged or
        truncated line, a non-number in a numeric column.
    """
    path = Path(path)
    text = _text(path, what)
    rows = _rows(text, quoted)
    if not rows:
        raise DataError(f"{path}: the {what} is empty (no header line)")
    head_line, header = rows[0]
    header = [h.strip() for h in header]
    if len(header) == 1 and ("," in header[0] or ";" in header[0]):
        raise DataError(f"{path}: the {what} is not tab-separated: its header {header[0][:80]!r} is one "
                        "column with commas or semicolons (a CSV file?); BIDS tables separate columns "
                        "with tabs")
    for k, h in enumerate(header, 1):
        if not h:
            raise DataError(f"{path}: the {what}'s header (line {head_line}) has an empty column name "
                            f"(column {k})")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise DataError(f"{path}: the {what}'s header repeats column(s) {dupes}")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: the {what} has no column(s) {missing}; its columns are "
                        f"{header[:12]}{' ...' if len(header) > 12 else ''}"
                        + (" (is it tab-separated?)" if len(header) == 1 else ""))
    body = rows[1:]
    ends_cleanly = text.endswith("\n") or text.endswith("\r")
    for i, (lineno, cells) in enumerate(body):
        if len(cells) != len(header):
            if i == len(body) - 1 and len(cells) < len(header) and not ends_cleanly:
                raise DataError(f"{path}: the {what} is truncated: its last line (line {lineno}) has "
                                f"{len(cells)} of {len(header)} columns and no line end. Replace the file "
                                "(copy it again, or rerun what wrote it).")
            raise DataError(f"{path}, line {lineno}: {len(cells)} cells where the header has "
                            f"{len(header)} columns")
    cols = list(header) if numeric == "all" else [c for c in numeric if c in header]
    for c in cols:
        j = header.index(c)
        for lineno, cells in body:
            cell = cells[j].strip()
            if cell == NA:
                continue
            if not cell:
                raise DataError(f"{path}, line {lineno}, column {c!r}: an empty cell (write n/a for a "
                                "missing value)")
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{path}, line {lineno}, column {c!r}: {cell[:40]!r} is not a number") \
                    from None
    if strings:
        return pd.DataFrame([[c.strip() for c in cells] for _, cells in body], columns=header,
                            index=pd.Index([n for n, _ in body], name="line"), dtype=object)
    kwargs = {"na_values": [NA]}
    kwargs.update(pandas_kwargs)
    try:
        return pd.read_csv(io.StringIO(text), sep="\t", quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE,
                           skip_blank_lines=True, **kwargs)
    except (ValueError, pd.errors.ParserError) as exc:  # checked above; a pandas-only complaint
        raise DataError(f"{path}: cannot parse the {what}: {exc}") from None


def numbers(table: pd.DataFrame, column: str, path: Path, allow_na: bool = False) -> np.ndarray:
    """One column of a ``strings=True`` table as float64 (line named on a bad cell)."""
    out = np.empty(len(table))
    for k, (lineno, cell) in enumerate(zip(table.index, table[column])):
        if cell == NA and allow_na:
            out[k] = np.nan
            continue
        try:
            out[k] = float(cell)
        except ValueError:
            raise DataError(f"{path}, line {lineno}, column {column!r}: {cell!r} is not a number") from None
        if not np.isfinite(out[k]):
            raise DataError(f"{path}, line {lineno}, column {column!r}: {cell!r} is not a finite number")
    return out


def check_confounds(path: Union[str, os.PathLike], n_frames: Optional[int] = None,
                    bold: Optional[Path] = None) -> pd.DataFrame:
    """fMRIPrep's confounds TSV, checked: text, tab-separated, numbers or ``n/a``, one row per frame.

    Raises
    ------
    DataError (65)
        What :func:`read_tsv` raises; no column; a number of rows other than
        ``n_frames`` (both files named).
    """
    path = Path(path)
    table = read_tsv(path, "confounds file", numeric="all")
    if table.shape[1] == 0:
        raise DataError(f"{path}: the confounds file has no column")
    if n_frames is not None and len(table) != int(n_frames):
        raise DataError(f"{path}: the confounds file has {len(table)} rows but the BOLD "
                        f"{bold if bold is not None else ''} has {int(n_frames)} frames; they must be the "
                        "same run (one row per frame)")
    return table


def read_events(path: Union[str, os.PathLike]) -> pd.DataFrame:
    """A BIDS events file, checked, as strings indexed by line number.

    ``onset`` and ``duration`` are required (BIDS); ``onset`` must be a number
    on every row, ``duration`` a number or ``n/a``.
    """
    path = Path(path)
    table = read_tsv(path, "events file", required=("onset", "duration"), numeric=("duration",),
                     strings=True)
    numbers(table, "onset", path)
    return table


def read_text(path: Union[str, os.PathLike], what: str) -> str:
    """A text file (a list of names), checked as :func:`read_tsv` checks one: exit 65 naming it."""
    return _text(Path(path), what)


def read_json(path: Union[str, os.PathLike], what: str):
    """A JSON file (the app's own model card, metrics), checked: exit 65 with the line on bad JSON."""
    import json

    path = Path(path)
    try:
        return json.loads(_text(path, what))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: the {what} is not valid JSON ({exc.msg}); a run "
                        "killed while writing it? Rerun what wrote it.") from None
