"""Word-timing readers: real Gentle excerpts and CSV/JSON/TextGrid/events files written here."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest

from bids_llm_encode.bids.stimuli import (fill_unaligned, load_story, read_events_words,
                                          read_gentle_csv, read_gentle_json, read_textgrid)
from bids_llm_encode.errors import DataError, MissingInputError

from layouts import DEFAULT_WORDS, write_alignment


def _rows(path):
    return list(csv.reader(path.read_text().splitlines()))


def test_real_pieman_excerpt(narratives):
    path = narratives / "stimuli/gentle/pieman/align_excerpt.csv"
    rows = _rows(path)
    story = read_gentle_csv(path, "pieman")
    assert story.n_words == len(rows)
    assert story.words == tuple(r[0] for r in rows)  # transcript words, never <unk>
    unk = [i for i, r in enumerate(rows) if r[1] == "<unk>"]
    assert unk and all(story.aligned[i] for i in unk)
    assert "<unk>" not in story.words
    i = unk[0]
    assert story.starts[i] == pytest.approx(float(rows[i][2]))
    assert story.ends[i] == pytest.approx(float(rows[i][3]))
    assert story.n_unaligned == sum(1 for r in rows if r[2] == "")
    assert np.all(story.ends >= story.starts)
    assert story.name == "pieman"


def test_real_black_excerpt_interpolates(narratives, caplog):
    path = narratives / "stimuli/gentle/black/align_excerpt.csv"
    rows = _rows(path)
    missing = [i for i, r in enumerate(rows) if r[2] == ""]
    assert missing, "fixture should contain unaligned words"
    with caplog.at_level(logging.INFO, logger="bids_llm_encode.bids.stimuli"):
        story = read_gentle_csv(path, "black")
    assert f"{len(missing)} of {len(rows)} words were not aligned" in caplog.text
    assert story.n_unaligned == len(missing)
    for i in missing:
        assert not story.aligned[i]
        # inside the gap between aligned neighbours
        lo = max(float(rows[j][3]) for j in range(i) if rows[j][2] != "")
        hi = min(float(rows[j][2]) for j in range(i + 1, len(rows)) if rows[j][2] != "")
        assert lo - 1e-9 <= story.starts[i] <= story.ends[i] <= hi + 1e-9
    assert np.all(np.diff(story.starts) >= -1e-9)


def test_fill_unaligned_gap_and_ends():
    starts = np.array([np.nan, 1.0, np.nan, np.nan, 4.0, np.nan])
    ends = np.array([np.nan, 2.0, np.nan, np.nan, 5.0, np.nan])
    aligned = ~np.isnan(starts)
    s, e = fill_unaligned(starts, ends, aligned)
    dur = 1.0  # mean aligned duration
    assert s[0] == pytest.approx(1.0 - dur) and e[0] == pytest.approx(1.0)
    assert (s[2], e[2], s[3], e[3]) == pytest.approx((2.0, 3.0, 3.0, 4.0))
    assert (s[5], e[5]) == pytest.approx((5.0, 5.0 + dur))
    with pytest.raises(DataError):
        fill_unaligned(np.full(2, np.nan), np.full(2, np.nan), np.zeros(2, bool), "x.csv")


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_gentle_written_unaligned_and_unk(tmp_path, fmt):
    path = write_alignment(tmp_path, "pieman", DEFAULT_WORDS, fmt)
    story = load_story(path)
    assert story.name == "pieman"
    assert story.words == tuple(w[0] for w in DEFAULT_WORDS)
    expect_aligned = np.array([w[2] is not None for w in DEFAULT_WORDS])
    np.testing.assert_array_equal(story.aligned, expect_aligned)
    k = next(i for i, w in enumerate(DEFAULT_WORDS) if w[2] is None)
    assert story.starts[k] == pytest.approx(DEFAULT_WORDS[k - 1][3])
    assert story.ends[k] == pytest.approx(DEFAULT_WORDS[k + 1][2])
    u = next(i for i, w in enumerate(DEFAULT_WORDS) if w[1] == "<unk>")
    assert story.aligned[u] and story.starts[u] == pytest.approx(DEFAULT_WORDS[u][2])


def test_textgrid_skips_empty_intervals(tmp_path):
    path = write_alignment(tmp_path, "pieman", DEFAULT_WORDS, "textgrid")
    story = read_textgrid(path)
    placed = [w for w in DEFAULT_WORDS if w[2] is not None]
    assert story.words == tuple(w[0] for w in placed)
    np.testing.assert_allclose(story.starts, [w[2] for w in placed])
    np.testing.assert_allclose(story.ends, [w[3] for w in placed])
    assert story.aligned.all()


def test_textgrid_short_format(tmp_path):
    path = tmp_path / "s.TextGrid"
    path.write_text('"ooTextFile"\n"TextGrid"\n0\n3\n<exists>\n1\n"IntervalTier"\n"words"\n0\n3\n3\n'
                    '0\n1\n""\n1\n2\n"hello"\n2\n3\n"say ""hi"""\n')
    story = read_textgrid(path)
    assert story.words == ("hello", 'say "hi"')
    np.testing.assert_allclose(story.starts, [1, 2])


def test_events_word_rows(tmp_path):
    path = tmp_path / "sub-01_task-x_events.tsv"
    path.write_text("onset\tduration\ttrial_type\tword\n20.0\t400\tstory\tn/a\n"
                    "21.5\t0.3\tword\tworld\n21.0\t0.4\tword\thello\n")
    story = read_events_words(path, "x")
    assert story.words == ("hello", "world")
    np.testing.assert_allclose(story.starts, [21.0, 21.5])
    np.testing.assert_allclose(story.ends, [21.4, 21.8])
    path2 = tmp_path / "b_events.tsv"
    path2.write_text("onset\tduration\ttrial_type\n0\t10\tstory\n")
    assert read_events_words(path2) is None


@pytest.mark.parametrize("content, line, what", [
    ("a,a,0.1,0.2\nb,b,zero,0.5\n", 2, "not a number"),
    ("a,a,0.1,0.2\nb,b,0.3\n", 2, "expected 4 columns"),
    ("a,a,0.1,0.2\nc,c,0.3,0.4\nb,b,0.9,0.5\n", 3, "before start"),
    ("a,a,0.1,\n", 1, "only one of start/end"),
])
def test_gentle_csv_malformed(tmp_path, content, line, what):
    path = tmp_path / "gentle" / "s" / "align.csv"
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(DataError) as exc:
        read_gentle_csv(path)
    assert exc.value.exit_code == 65
    msg = str(exc.value)
    assert str(path) in msg and f"line {line}" in msg and what in msg


def test_gentle_json_malformed(tmp_path):
    path = tmp_path / "align.json"
    path.write_text('{"words": [\n{"word": "a", "case": "success", "start": 0.1, "end": 0.2},\n')
    with pytest.raises(DataError, match=r"line 3: invalid JSON"):
        read_gentle_json(path)
    path.write_text(json.dumps({"words": [{"word": "a", "case": "success", "start": "x", "end": 1}]}))
    with pytest.raises(DataError, match=r"words\[0\]: start time 'x' is not a number"):
        read_gentle_json(path)
    path.write_text(json.dumps({"words": [{"word": "a", "case": "success", "start": 2, "end": 1}]}))
    with pytest.raises(DataError, match=r"end 1.0 is before start 2.0"):
        read_gentle_json(path)


def test_textgrid_malformed(tmp_path):
    path = tmp_path / "bad.TextGrid"
    path.write_text('"ooTextFile"\n"TextGrid"\n0\n3\n<exists>\n1\n"IntervalTier"\n"words"\n0\n3\n1\n'
                    'zero\n1\n"hello"\n')
    with pytest.raises(DataError, match=r"line 12: cannot read .zero. \(expected interval xmin"):
        read_textgrid(path)
    path.write_text('"ooTextFile"\n"TextGrid"\n0\n3\n<exists>\n1\n"IntervalTier"\n"words"\n0\n3\n1\n'
                    '2\n1\n"hello"\n')
    with pytest.raises(DataError, match=r"line 12: interval ends"):
        read_textgrid(path)


def test_missing_file(tmp_path):
    with pytest.raises(MissingInputError):
        read_gentle_csv(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown word-timing format"):
        (tmp_path / "x.txt").write_text("a")
        load_story(tmp_path / "x.txt")
