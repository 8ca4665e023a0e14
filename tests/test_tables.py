"""The checked table reader, and every boundary routed through a checked reader.

A broken confounds or events TSV, user atlas or participant output is exit 65
naming the file and what is wrong, before the model runs where it can be
known, with no traceback and the input untouched.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.bids.inputs import find_runs
from bids_llm_encode.bids.tables import check_confounds, read_events, read_json, read_tsv
from bids_llm_encode.cli import run
from bids_llm_encode.config import Config
from bids_llm_encode.errors import EXIT_DATA, DataError, MissingInputError

from layouts import make_layout, tree_checksums

DER = Path("derivatives/fmriprep/sub-01/func")
CONF = DER / "sub-01_task-pieman_desc-confounds_timeseries.tsv"
EVENTS = Path("sub-01/func/sub-01_task-pieman_events.tsv")


# ----------------------------------------------------------------------------- the reader


@pytest.mark.parametrize("content, what", [
    (b"a\tb\n1\t2\n3", "truncated: its last line (line 3) has 1 of 2 columns and no line end"),
    (b"a\tb\n1\t2\n3\n4\t5\n", "line 3: 1 cells where the header has 2 columns"),
    (b"a,b,c\n1,2,3\n", "not tab-separated"),
    (b"", "empty"),
    (b"\n\n", "empty"),
    (gzip.compress(b"a\tb\n1\t2\n"), "gzip-compressed"),
    (b"a\tb\n\x00\x01\x02\n", "binary"),
    (b"a\tb\n\xe9t\xe9\t2\n", "not UTF-8"),
    (b"a\ta\n1\t2\n", "repeats column"),
    (b"a\t\tb\n1\t2\t3\n", "empty column name"),
])
def test_broken_tables_are_data_errors_naming_the_file(tmp_path, content, what):
    p = tmp_path / "t.tsv"
    p.write_bytes(content)
    with pytest.raises(DataError) as info:
        read_tsv(p, "table")
    assert str(p) in str(info.value) and what in str(info.value), str(info.value)
    assert info.value.exit_code == EXIT_DATA


def test_numbers_columns_and_values(tmp_path):
    p = tmp_path / "t.tsv"
    p.write_text("onset\tduration\tx\n1.5\tn/a\tfoo\n2\t0.5\t\n")
    df = read_tsv(p, "t", numeric=("onset", "duration"))
    assert df["onset"].tolist() == [1.5, 2.0] and np.isnan(df["duration"][0])
    s = read_tsv(p, "t", strings=True)
    assert s.index.tolist() == [2, 3] and s.loc[2, "duration"] == "n/a" and s.loc[3, "x"] == ""
    with pytest.raises(DataError, match=r"line 2, column 'x': 'foo' is not a number"):
        read_tsv(p, "t", numeric=("onset", "x"))
    q = tmp_path / "u.tsv"
    q.write_text("x\ty\n1\t2\n\t3\n")
    with pytest.raises(DataError, match=r"line 3, column 'x': an empty cell \(write n/a"):
        read_tsv(q, "t", numeric=("x",))
    with pytest.raises(DataError, match=r"no column\(s\) \['stim'\]"):
        read_tsv(p, "t", required=("stim",))
    with pytest.raises(MissingInputError):
        read_tsv(tmp_path / "absent.tsv", "t")


def test_quoted_cells_of_the_apps_own_tables_round_trip(tmp_path):
    p = tmp_path / "t.tsv"
    df = pd.DataFrame({"name": ['say "hi"', "plain"], "v": [1.0, np.nan]})
    p.write_text(df.to_csv(sep="\t", na_rep="n/a", index=False, lineterminator="\n"))
    back = read_tsv(p, "t", quoted=True)
    assert back["name"].tolist() == ['say "hi"', "plain"] and np.isnan(back["v"][1])


def test_events_need_onset_and_duration(tmp_path):
    p = tmp_path / "e_events.tsv"
    p.write_text("onset\ttrial_type\n1\tstory\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['duration'\]"):
        read_events(p)
    p.write_text("onset\tduration\n1\tn/a\nsoon\t2\n")
    with pytest.raises(DataError, match=r"line 3, column 'onset': 'soon' is not a number"):
        read_events(p)


def test_read_json_names_file_and_line(tmp_path):
    p = tmp_path / "card.json"
    p.write_text('{"a": 1,\n"b": ')
    with pytest.raises(DataError, match=r"card.json, line 2: the model card is not valid JSON"):
        read_json(p, "model card")


def test_confounds_rows_must_match_the_frames(tmp_path):
    p = tmp_path / "c_desc-confounds_timeseries.tsv"
    p.write_text("a\tb\n" + "1\t2\n" * 5)
    assert check_confounds(p, 5).shape == (5, 2)
    with pytest.raises(DataError, match=r"5 rows but the BOLD .*bold.nii.gz has 6 frames"):
        check_confounds(p, 6, Path("bold.nii.gz"))


# ----------------------------------------------------------------------------- the app, end to end


def _truncate_tsv(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3])  # ends in the middle of a row


def _more_rows(path: Path) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + lines[-3:]) + "\n")


def _events_csv(path: Path) -> None:
    path.write_text(path.read_text().replace("\t", ","))


def _events_binary(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))


CASES = {
    "confounds-truncated": (CONF, _truncate_tsv, "truncated"),
    "confounds-wrong-rows": (CONF, _more_rows, "43 rows but the BOLD"),
    "events-csv": (EVENTS, _events_csv, "not tab-separated"),
    "events-binary": (EVENTS, _events_binary, "binary"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_table_exit_65_before_the_model(tmp_path, capsys, case):
    root = make_layout(tmp_path / "ds")
    target, damage, what = CASES[case]
    damage(root / target)
    with pytest.raises(DataError, match=what):
        find_runs(Config(bids_dir=root, output_dir=tmp_path / "o", analysis_level="participant"))
    before = tree_checksums(root)
    cache = tmp_path / "cache"
    code = run([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                "--cache-dir", str(cache), "--model", "minilm-l6"])
    err = capsys.readouterr().err
    assert code == EXIT_DATA, err
    assert str(root / target) in err and what in err and "Traceback" not in err
    assert tree_checksums(root) == before
    assert not cache.exists() or not any(cache.iterdir())  # found before the model ran


def test_load_confounds_reads_through_the_checked_reader(tmp_path):
    from bids_llm_encode.encoding.confounds import load_confounds

    root = make_layout(tmp_path / "ds")
    _truncate_tsv(root / CONF)
    bold = next((root / DER).glob("*desc-preproc_bold.nii.gz"))
    with pytest.raises(DataError, match="truncated") as info:
        load_confounds(bold, root / CONF)
    assert str(root / CONF) in str(info.value)


def _atlas(path: Path, like: Path) -> Path:
    data = np.zeros((4, 4, 4), dtype=np.int16)
    data[1:3, 1:3, 1:2], data[1:3, 1:3, 2:3] = 1, 2
    img = nib.Nifti1Image(data, nib.load(like).affine)  # on the mask's grid
    nib.save(img, path)
    path.with_name(path.name.replace(".nii.gz", ".tsv")).write_text("index\tname\n1\tA\n2\tB\n")
    return path


@pytest.mark.parametrize("damage, what", [
    (lambda p: p.write_bytes(p.read_bytes()[:-40]), "truncated"),
    (lambda p: p.write_bytes(gzip.compress(b"not an image\n" * 40)), "NIfTI"),
    (lambda p: p.with_name("atlas.tsv").write_text("index,name\n1,A\n"), "not tab-separated"),
])
def test_broken_user_atlas_exit_65_before_the_model(tmp_path, capsys, damage, what):
    from bids_llm_encode.networks.atlases import check_user_atlases, load_atlas

    root = make_layout(tmp_path / "ds")
    mask = next((root / DER).glob("*desc-brain_mask.nii.gz"))
    atlas = _atlas(tmp_path / "atlas.nii.gz", mask)
    assert list(load_atlas(str(atlas), str(mask)).labels) == ["A", "B"]
    damage(atlas)
    with pytest.raises(DataError, match=what):
        check_user_atlases(["CA12", str(atlas)])
    cache = tmp_path / "cache"
    code = run([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                "--cache-dir", str(cache), "--model", "minilm-l6", "--fbn-atlas", str(atlas)])
    err = capsys.readouterr().err
    assert code == EXIT_DATA, err
    assert "atlas" in err and what in err and "Traceback" not in err
    assert str(atlas) in err or str(atlas.with_name("atlas.tsv")) in err
    assert not cache.exists() or not any(cache.iterdir())


def _group_outputs(tmp_path):
    from bids_llm_encode.bids.outputs import DerivativesWriter, OutputFiles
    from bids_llm_encode.workflows.group import GroupStory

    root = make_layout(tmp_path / "ds")
    out = tmp_path / "out"
    cfg = Config(bids_dir=root, output_dir=out, analysis_level="group", cache_dir=tmp_path / "cache")
    w = DerivativesWriter(out, cfg)
    files = OutputFiles(w, cfg.space)
    w.write_tsv(pd.DataFrame({"session": ["n/a"], "task": ["pieman"], "story": ["pieman"]}),
                files.summary("01"), {"Description": "runs"})
    w.write_json({"participant": "01", "model": cfg.model, "stories": [{"story": "pieman", "session": None}]},
                 files.completion("01"))  # the participant run finished
    w.write_tsv(pd.DataFrame({"time": [0.0], "atom00": [1.0], "atom01": [0.5]}),
                files.story("pieman", "smollm2-135m", "atoms"), {"Description": "atoms"})
    w.write_json({"dictionary_r2": 0.5}, files.story("pieman", "smollm2-135m", "modelcard"))
    w.write_tsv(pd.DataFrame({"atom": [0, 1]}), files.story("pieman", "smollm2-135m", "subgroups"),
                {"Description": "subgroups"})
    ent = {"sub": "01", "task": "pieman"}
    needed = GroupStory("pieman", [ent], cfg, None, w, None)._needed(ent, ["atom00", "atom01"])
    rng = np.random.default_rng(0)
    for f in needed:
        img = nib.Nifti1Image(rng.standard_normal((4, 4, 4)).astype(np.float32), np.diag([2.0] * 3 + [1.0]))
        w.write_nifti(img, f, {"Description": "map"})
    return root, out, files, needed


def test_group_level_reading_a_truncated_participant_map_exit_65(tmp_path, capsys):
    root, out, _, needed = _group_outputs(tmp_path)
    broken = needed[3]  # atom01's z map
    broken.write_bytes(broken.read_bytes()[:-30])
    code = run([str(root), str(out), "group", "--cache-dir", str(tmp_path / "cache"), "--dictionary-scope", "story"])
    err = capsys.readouterr().err
    assert code == EXIT_DATA, err
    assert str(broken) in err and "truncated" in err and "sub-01" in err and "Traceback" not in err
    assert not (out / "group.html").exists()


def test_group_level_reading_a_broken_participant_table_exit_65(tmp_path, capsys):
    root, out, files, _ = _group_outputs(tmp_path)
    atoms = files.story("pieman", "smollm2-135m", "atoms")
    atoms.write_text("time\tatom00\tatom01\n0.0\t1.0\t")
    code = run([str(root), str(out), "group", "--cache-dir", str(tmp_path / "cache"), "--dictionary-scope", "story"])
    err = capsys.readouterr().err
    assert code == EXIT_DATA, err
    assert str(atoms) in err and "Traceback" not in err


def test_a_broken_model_card_is_rewritten_not_a_traceback(tmp_path, caplog, monkeypatch):
    """The participant level reads its own modelcard.json to skip rewriting the story's files."""
    import logging

    import scipy.sparse as sp

    from bids_llm_encode.bids.outputs import DerivativesWriter, OutputFiles, model_label
    from bids_llm_encode.records import Dictionary, Story, WordActivations
    from bids_llm_encode.workflows import participant as wp

    cfg = Config(bids_dir=tmp_path / "ds", output_dir=tmp_path / "out", analysis_level="participant")
    w = DerivativesWriter(cfg.output_dir, cfg)
    story = Story("pieman", ("a", "b"), np.array([0.5, 1.0]), np.array([0.9, 1.4]), np.ones(2, bool),
                  tmp_path / "align.csv")
    acts = WordActivations(values=np.ones((2, 3), np.float32), layer=np.zeros(3, int), unit=np.arange(3),
                           card={"cache_key": "k"})
    dic = Dictionary(atoms=np.ones((4, 1)), loadings=sp.csr_matrix(np.ones((1, 3))), frame_times=np.arange(4.0),
                     r2=0.5, objective=1.0, alpha=0.1, info={})
    card = OutputFiles(w, cfg.space).story("pieman", model_label(cfg), "modelcard")
    card.parent.mkdir(parents=True)
    card.write_text('{"settings_digest": ')  # cut short
    written = []
    for name in ("write_tsv", "write_npz", "write_npy", "write_json"):
        monkeypatch.setattr(DerivativesWriter, name, lambda self, x, p, *a, **k: written.append(p))
    monkeypatch.setattr(wp.stimulus, "neuron_series", lambda *a: np.zeros((4, 3)))
    with caplog.at_level(logging.WARNING):
        wp.write_stimulus_outputs(w, story, acts, dic, pd.DataFrame({"atom": [0]}), cfg)
    assert card in written  # written again
    assert "not valid JSON" in caplog.text and str(card) in caplog.text
