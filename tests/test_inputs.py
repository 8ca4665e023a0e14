"""find_runs on small real BIDS datasets (tests/layouts.py) and real Narratives metadata."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from bids_llm_encode.bids.inputs import find_runs, normalize_labels, run_summary, story_name
from bids_llm_encode.config import Config
from bids_llm_encode.errors import DataError, MissingInputError, NoMatchError, UsageError

from layouts import DEFAULT_WORDS, make_layout, tree_checksums


def cfg(root: Path, **kw) -> Config:
    return Config(bids_dir=root, output_dir=root.parent / "out", analysis_level="participant", **kw)


def real_words(path: Path):
    rows = list(csv.reader(path.read_text().splitlines()))
    return [(w, aw, float(s) if s else None, float(e) if e else None) for w, aw, s, e in rows]


@pytest.mark.parametrize("confounds_name", ["timeseries", "regressors"])
@pytest.mark.parametrize("res", ["2", "native", None])
def test_confounds_names_and_resolutions(tmp_path, confounds_name, res):
    root = make_layout(tmp_path / "ds", confounds_name=confounds_name, res=res, n_frames=33)
    (run,) = find_runs(cfg(root))
    assert run.confounds.name == f"sub-01_task-pieman_desc-confounds_{confounds_name}.tsv"
    tag = f"_res-{res}" if res else ""
    assert run.bold.name == f"sub-01_task-pieman_space-MNI152NLin2009cAsym{tag}_desc-preproc_bold.nii.gz"
    assert run.mask.name == f"sub-01_task-pieman_space-MNI152NLin2009cAsym{tag}_desc-brain_mask.nii.gz"
    assert run.n_frames == 33 and run.tr == 1.5
    assert run.events.name == "sub-01_task-pieman_events.tsv"
    assert run.story.name == "pieman" and run.story.n_words == len(DEFAULT_WORDS)


def test_several_resolutions_takes_first_sorted(tmp_path, caplog):
    root = make_layout(tmp_path / "ds", res="native", extra_res=("2",))
    with caplog.at_level(logging.INFO, logger="bids_llm_encode.bids.inputs"):
        (run,) = find_runs(cfg(root))
    assert "_res-2_" in run.bold.name and "_res-2_" in run.mask.name
    assert "Several preprocessed BOLD" in caplog.text


def test_story_heard_twice(tmp_path):
    root = make_layout(tmp_path / "ds", runs=(1, 2))
    runs = find_runs(cfg(root))
    assert [r.run for r in runs] == [1, 2]
    assert [r.raw_bold.name for r in runs] == [f"sub-01_task-pieman_run-0{i}_bold.nii.gz" for i in (1, 2)]
    assert [r.bold.name.split("_space")[0] for r in runs] == ["sub-01_task-pieman_run-1", "sub-01_task-pieman_run-2"]
    assert runs[0].story.name == runs[1].story.name == "pieman"
    assert runs[0].story.words == runs[1].story.words
    assert runs[0].entities == {"subject": "01", "task": "pieman", "run": 1}


def test_real_narratives_metadata(tmp_path, narratives):
    """Real events.tsv/bold.json: TR per run (1.52 vs 1.5) and audio onsets (pieman, black)."""
    root = tmp_path / "ds"
    func = narratives / "sub-001" / "func"
    pieman = real_words(narratives / "stimuli/gentle/pieman/align_excerpt.csv")
    for run in (1, 2):
        make_layout(root, subjects=("001",), task="pieman", runs=(run,), story="pieman", story_words=pieman,
                    events_text=(func / f"sub-001_task-pieman_run-{run}_events.tsv").read_text(),
                    raw_sidecar=json.loads((func / f"sub-001_task-pieman_run-{run}_bold.json").read_text()))
    black = real_words(narratives / "stimuli/gentle/black/align_excerpt.csv")
    f127 = narratives / "sub-127" / "func"
    make_layout(root, subjects=("127",), task="black", story="black", story_words=black,
                events_text=(f127 / "sub-127_task-black_events.tsv").read_text(),
                raw_sidecar=json.loads((f127 / "sub-127_task-black_bold.json").read_text()))
    f115 = narratives / "sub-115" / "func"
    meta115 = json.loads((f115 / "sub-115_task-milkyway_bold.json").read_text())
    make_layout(root, subjects=("115",), task="milkyway", story="milkywaysynonyms", tr=meta115["RepetitionTime"],
                events_text=(f115 / "sub-115_task-milkyway_events.tsv").read_text(), raw_sidecar=meta115)
    runs = {(r.subject, r.run): r for r in find_runs(cfg(root))}
    assert set(runs) == {("001", 1), ("001", 2), ("127", None), ("115", None)}

    # TR read per run: 1.52 for milkywaysynonyms, 1.5 elsewhere
    assert runs[("115", None)].tr == pytest.approx(1.52)
    assert runs[("001", 1)].tr == pytest.approx(1.5)
    assert runs[("115", None)].story.name == "milkywaysynonyms"

    # pieman: the audio (13 s of music, then the story) starts at the first row with its stim_file;
    # its first word falls at the 'story' row onset (15.0 s) in scan time
    ev = [ln.split("\t") for ln in (func / "sub-001_task-pieman_run-1_events.tsv").read_text().splitlines()[1:]]
    story_row = next(r for r in ev if r[2] == "story")
    for run in (1, 2):
        p = runs[("001", run)]
        assert p.story_onset == pytest.approx(float(ev[0][0]))
        assert p.stim_file == "pieman_audio.wav"
        first_word_scan = p.story_onset + p.story.starts[0]
        assert abs(first_word_scan - float(story_row[0])) < 0.5
    # black: no music, the audio starts at 12.0
    b = runs[("127", None)]
    ev127 = (f127 / "sub-127_task-black_events.tsv").read_text().splitlines()[1].split("\t")
    assert b.story_onset == pytest.approx(float(ev127[0]))
    assert b.story.n_unaligned == sum(1 for w in black if w[2] is None) > 0


@pytest.mark.parametrize("align", ["csv", "json", "textgrid"])
def test_alignment_formats(tmp_path, align):
    root = make_layout(tmp_path / "ds", align=align, story_onset=9.0, music_s=None)
    (run,) = find_runs(cfg(root))
    assert run.story_onset == 9.0
    expect = {"csv": "align.csv", "json": "align.json", "textgrid": "pieman.TextGrid"}[align]
    assert run.story.source.name == expect
    n_placed = sum(1 for w in DEFAULT_WORDS if w[2] is not None)
    assert run.story.n_words == (n_placed if align == "textgrid" else len(DEFAULT_WORDS))


def test_events_word_rows_scan_relative(tmp_path):
    root = make_layout(tmp_path / "ds", align="events", story_onset=6.0)
    (run,) = find_runs(cfg(root))
    assert run.story_onset == 0.0
    placed = [w for w in DEFAULT_WORDS if w[2] is not None]
    np.testing.assert_allclose(run.story.starts, [6.0 + w[2] for w in placed], atol=1e-3)
    assert run.story.source == run.events


@pytest.mark.parametrize("sidecar, expect", [({}, 0.0), ({"SliceTimingCorrected": True}, 0.5),
                                             ({"SliceTimingCorrected": True, "StartTime": 0.6}, 0.4)])
def test_slice_time_ref(tmp_path, sidecar, expect):
    root = make_layout(tmp_path / "ds", deriv_sidecar=sidecar)
    (run,) = find_runs(cfg(root))
    assert run.slice_time_ref == pytest.approx(expect)


def test_normalize_labels(tmp_path):
    f = tmp_path / "labels.txt"
    f.write_text("sub-03\n\n# a comment\n04\n")
    assert normalize_labels(["sub-01", "02", str(f), "01"], "sub") == ["01", "02", "03", "04"]
    assert normalize_labels("ses-1", "ses-") == ["1"]
    assert normalize_labels(None, "task") == []


def test_selection_labels_and_filter_file(tmp_path):
    root = tmp_path / "ds"
    make_layout(root, subjects=("01", "02"), session="1", runs=(1, 2))
    make_layout(root, subjects=("01",), session="2", task="tunnel", story="tunnel")
    runs = find_runs(cfg(root, participant_label=["sub-01"], task_label=["task-pieman"]))
    assert [(r.subject, r.session, r.run) for r in runs] == [("01", "1", 1), ("01", "1", 2)]
    runs = find_runs(cfg(root, session_label=["ses-2"]))
    assert [(r.subject, r.task) for r in runs] == [("01", "tunnel")]
    filt = tmp_path / "filter.json"
    filt.write_text(json.dumps({"bold": {"run": 2, "session": "1"}}))
    runs = find_runs(cfg(root, bids_filter_file=filt))
    assert [(r.subject, r.run) for r in runs] == [("01", 2), ("02", 2)]

    filt.write_text(json.dumps({"bold": {"run": 7}}))
    with pytest.raises(NoMatchError) as exc:
        find_runs(cfg(root, bids_filter_file=filt))
    assert exc.value.exit_code == 18 and "'run': 7" in str(exc.value) and "['01', '02']" in str(exc.value)
    with pytest.raises(NoMatchError) as exc:
        find_runs(cfg(root, participant_label=["09"]))
    assert exc.value.exit_code == 18 and "['09']" in str(exc.value) and "'01', '02'" in str(exc.value)


@pytest.mark.parametrize("content, words", [(b'{"bold": {"run": 2,}}', "line 1: invalid JSON"),
                                            ('{"bold": {"task": "caf\u00e9"}}'.encode("latin-1"), "not UTF-8"),
                                            (b"\x00\x01\x02", "binary"),
                                            (b"[1, 2]", "expected a JSON object")])
def test_bad_filter_file_exit_64_naming_it(tmp_path, content, words):
    root = tmp_path / "ds"
    make_layout(root, subjects=("01",))
    filt = tmp_path / "filter.json"
    filt.write_bytes(content)
    with pytest.raises(UsageError) as exc:
        find_runs(cfg(root, bids_filter_file=filt))
    assert exc.value.exit_code == 64 and str(filt) in str(exc.value) and words in str(exc.value)


def test_no_derivatives_for_participant(tmp_path):
    root = make_layout(tmp_path / "ds", subjects=("01", "02"), deriv_subjects=("01",))
    assert len(find_runs(cfg(root, participant_label=["01"]))) == 1
    with pytest.raises(MissingInputError) as exc:
        find_runs(cfg(root, participant_label=["02"]))
    assert exc.value.exit_code == 66
    assert "sub-02" in str(exc.value) and str(root / "derivatives" / "fmriprep") in str(exc.value)


def test_no_derivatives_folder(tmp_path):
    root = make_layout(tmp_path / "ds", derivatives=False)
    with pytest.raises(MissingInputError, match="derivatives"):
        find_runs(cfg(root))


def test_story_without_timing_lists_paths(tmp_path):
    root = make_layout(tmp_path / "ds", align=None)
    with pytest.raises(MissingInputError) as exc:
        find_runs(cfg(root))
    msg = str(exc.value)
    assert exc.value.exit_code == 66
    for p in ("stimuli/gentle/pieman/align.csv", "stimuli/gentle/pieman/align.json",
              "stimuli/pieman.TextGrid", "stimuli/pieman/*.TextGrid", "sub-01/func/sub-01_task-pieman_events.tsv"):
        assert str(root / p) in msg


@pytest.mark.parametrize("stim_file", ["/etc/pieman_audio.wav", "../../outside_audio.wav"])
def test_stim_file_outside_dataset(tmp_path, stim_file):
    root = make_layout(tmp_path / "ds", stim_file=stim_file)
    with pytest.raises(DataError) as exc:
        find_runs(cfg(root))
    assert exc.value.exit_code == 65 and stim_file in str(exc.value)


def test_confounds_length_mismatch(tmp_path):
    root = make_layout(tmp_path / "ds", n_frames=40, confound_frames=38)
    with pytest.raises(DataError) as exc:
        find_runs(cfg(root))
    msg = str(exc.value)
    assert exc.value.exit_code == 65 and "desc-preproc_bold.nii.gz" in msg and "desc-confounds" in msg
    assert "40" in msg and "38" in msg


@pytest.mark.parametrize("what", ["mask", "confounds"])
def test_missing_mask_or_confounds(tmp_path, what):
    root = make_layout(tmp_path / "ds", write_mask=(what != "mask"), write_confounds=(what != "confounds"))
    with pytest.raises(MissingInputError) as exc:
        find_runs(cfg(root))
    assert exc.value.exit_code == 66 and what.rstrip("s") in str(exc.value)


def test_missing_space(tmp_path):
    root = make_layout(tmp_path / "ds", space="MNI152NLin6Asym")
    with pytest.raises(MissingInputError, match="MNI152NLin6Asym"):
        find_runs(cfg(root))


def test_raw_dataset_unchanged(tmp_path):
    root = make_layout(tmp_path / "ds", runs=(1, 2))
    before = tree_checksums(root)
    find_runs(cfg(root))
    assert tree_checksums(root) == before


def test_run_summary(tmp_path):
    root = make_layout(tmp_path / "ds", tr=2.0, n_frames=30, story_onset=4.0, music_s=None,
                       deriv_sidecar={"SliceTimingCorrected": True})
    (run,) = find_runs(cfg(root))
    s = run_summary(run)
    t = (np.arange(30) + 0.5) * 2.0
    w0 = 4.0 + min(w[2] for w in DEFAULT_WORDS if w[2] is not None)
    w1 = 4.0 + max(w[3] for w in DEFAULT_WORDS if w[3] is not None)
    inside = np.flatnonzero((t >= w0) & (t <= w1))
    assert (s["story_first_frame"], s["story_last_frame"]) == (inside[0], inside[-1])
    assert s["n_words"] == len(DEFAULT_WORDS) and s["n_unaligned"] == 1
    assert s["tr"] == 2.0 and s["n_frames"] == 30 and s["story"] == "pieman" and s["story_onset"] == 4.0
    assert s["bold"] == run.bold.name and s["subject"] == "01" and s["run"] is None
    json.dumps(s)


def test_story_name():
    assert story_name("pieman_audio.wav") == "pieman"
    assert story_name("milkywaysynonyms_audio.wav") == "milkywaysynonyms"
    assert story_name("sub/x.wav") == "x"


def test_malformed_start_time_fallback_is_logged_with_the_file(tmp_path, caplog):
    root = make_layout(tmp_path / "ds", deriv_sidecar={"SliceTimingCorrected": True, "StartTime": "half"})
    with caplog.at_level(logging.WARNING, logger="bids_llm_encode.bids.inputs"):
        (run,) = find_runs(cfg(root))
    assert run.slice_time_ref == 0.5
    (rec,) = [r for r in caplog.records if "StartTime" in r.getMessage()]
    assert "desc-preproc_bold.json" in rec.getMessage() and "'half'" in rec.getMessage()
