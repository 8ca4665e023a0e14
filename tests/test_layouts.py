"""Real layouts (issue 11): runs with several stories, output names per story, 4D masks,
multi-echo runs, sessions, completion records, the participant as the group's unit, and
the saved PyBIDS index (--bids-database-dir).

Everything but the one end-to-end run is model-free and takes seconds.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.bids.inputs import find_runs, run_summary
from bids_llm_encode.bids.outputs import DerivativesWriter, OutputFiles
from bids_llm_encode.cli import run
from bids_llm_encode.config import Config
from bids_llm_encode.errors import EXIT_NO_INPUT, EXIT_USAGE, UsageError
from layouts import make_layout, tree_checksums, write_tiny_atlas

REPO = Path(__file__).resolve().parents[1]
WORDS = [(f"w{i}", f"w{i}", 0.5 + 0.4 * i, 0.8 + 0.4 * i) for i in range(60)]  # 24 s of speech


def _cfg(root: Path, **kw) -> Config:
    return Config(bids_dir=root, output_dir=root.parent / "out", analysis_level="participant", **kw)


def _schema(root: Path, **kw) -> Path:
    """Narratives' task-schema shape: one run, two stories (friends at 5 s, bigbang at 60 s), a movie between."""
    opts = dict(task="schema", story="friends", extra_stories=[("bigbang", 60.0)], n_frames=100,
                story_words=WORDS, story_onset=5.0, music_s=None)
    return make_layout(root, **{**opts, **kw})


# ----------------------------------------------------------------------------- inputs


def test_a_run_with_two_stories_gives_one_segment_per_story_at_its_onset(tmp_path, caplog):
    root = _schema(tmp_path / "ds")
    events = (root / "sub-01" / "func" / "sub-01_task-schema_events.tsv").read_text()
    assert "movie\tn/a" in events  # a segment without a story: no input
    with caplog.at_level(logging.INFO, logger="bids_llm_encode.bids.inputs"):
        runs = find_runs(_cfg(root))
    assert [(r.story.name, r.story_onset) for r in runs] == [("friends", 5.0), ("bigbang", 60.0)]
    assert len({r.bold for r in runs}) == 1 and all(r.task == "schema" for r in runs)
    rows = [run_summary(r) for r in runs]  # the summary lists every story of the run
    assert [r["story"] for r in rows] == ["friends", "bigbang"]
    assert rows[1]["story_first_frame"] == int(np.ceil((60.0 + 0.5) / 1.5))
    assert "2 stories in one run" in caplog.text and "1 BOLD run(s)" in caplog.text


def test_a_story_of_a_two_story_run_without_timing_is_exit_66_naming_it(tmp_path, capsys):
    root = _schema(tmp_path / "ds")
    (root / "stimuli" / "gentle" / "bigbang" / "align.csv").unlink()
    code = run([str(root), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == EXIT_NO_INPUT and "story 'bigbang'" in err and "bigbang/align.csv" in err, err


def test_multi_echo_uses_the_combined_series_and_ignores_single_echoes(tmp_path, caplog):
    root = make_layout(tmp_path / "ds", echoes=3)
    raw = sorted(p.name for p in (root / "sub-01" / "func").glob("*_bold.nii.gz"))
    assert raw == [f"sub-01_task-pieman_echo-{e}_bold.nii.gz" for e in (1, 2, 3)]
    with caplog.at_level(logging.INFO, logger="bids_llm_encode.bids.inputs"):
        (r,) = find_runs(_cfg(root))
    assert "echo" not in r.bold.name and r.bold.name.endswith("_desc-preproc_bold.nii.gz")
    assert "3 single-echo desc-preproc_bold file(s) ignored" in caplog.text
    assert "single echoes are ignored" in caplog.text


def test_a_4d_mask_of_one_volume_is_used_as_3d(tmp_path):
    from bids_llm_encode.workflows.participant import _common_mask

    root = make_layout(tmp_path / "ds", mask_4d=True, runs=(1, 2))
    runs = find_runs(_cfg(root))
    assert nib.load(runs[0].mask).shape == (4, 4, 4, 1)
    mask = _common_mask(runs)
    assert mask.shape == (4, 4, 4) and int(np.asarray(mask.dataobj).sum()) == 8


# ----------------------------------------------------------------------------- names


def test_two_stories_under_one_task_get_distinct_valid_names(tmp_path):
    from bids_llm_encode.bids.validate import validate_derivatives

    root = _schema(tmp_path / "ds", session="01")
    runs = find_runs(_cfg(root))
    cfg = _cfg(root)
    w = DerivativesWriter(cfg.output_dir, cfg)
    files = OutputFiles(w, cfg.space)
    paths = set()
    for r in runs:
        ent = files.story_entities(r.subject, r.session, r.story.name)
        for p in (files.statmap(ent, "atom00", "effect"), files.fdr_mask(ent),
                  files.design(files.run_entities(r)), files.table(ent, "CA12", "links")):
            assert p not in paths
            paths.add(p)
    names = sorted(p.name for p in paths)
    assert "sub-01_ses-01_task-friends_space-MNI152NLin2009cAsym_desc-cvfdr_mask.nii.gz" in names
    assert "sub-01_ses-01_task-bigbang_space-MNI152NLin2009cAsym_desc-cvfdr_mask.nii.gz" in names
    img = nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4))
    for p in paths:  # the real validator on what these names give
        if p.name.endswith(".nii.gz"):
            w.write_nifti(img, p, {"Description": "x"})
        else:
            w.write_tsv(pd.DataFrame({"a": [1]}), p, {"Description": "x"})
    report = validate_derivatives(cfg.output_dir)
    assert report["errors"] == [], report["errors"][:5]


def test_story_names_that_collide_are_refused(tmp_path):
    from bids_llm_encode.workflows.participant import story_groups

    root = _schema(tmp_path / "ds")
    runs = find_runs(_cfg(root))
    from dataclasses import replace

    clash = [runs[0], replace(runs[1], story=replace(runs[1].story, name="fri-ends"))]
    with pytest.raises(UsageError, match="same letters and digits"):
        story_groups(clash)


# ----------------------------------------------------------------------------- group level

ATOMS = ["atom00", "atom01"]


def _outputs(tmp_path: Path, units: dict, model: str = "smollm2-135m"):
    """Participant outputs of story pieman as the participant level writes them (fake maps).

    ``units``: sub -> list of sessions (None: no session) -> written with a completion record
    unless the sub is in ``units["_incomplete"]`` or its model in ``units["_models"]``.
    """
    root = make_layout(tmp_path / "ds", subjects=[s for s in units if not s.startswith("_")])
    out = tmp_path / "out"
    cfg = Config(bids_dir=root, output_dir=out, analysis_level="group", cache_dir=tmp_path / "cache")
    w = DerivativesWriter(out, cfg)
    files = OutputFiles(w, cfg.space)
    w.write_tsv(pd.DataFrame({"time": [0.0, 1.5], "atom00": [1.0, 0.0], "atom01": [0.0, 1.0]}),
                files.story("pieman", model, "atoms"), {"Description": "atoms"})
    w.write_json({"dictionary_r2": 0.5}, files.story("pieman", model, "modelcard"))
    w.write_tsv(pd.DataFrame({"atom": [0, 1], "size": [2, 2], "layer_00": [2, 2]}),
                files.story("pieman", model, "subgroups"), {"Description": "subgroups"})
    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    maps = {}
    for sub, sessions in units.items():
        if sub.startswith("_"):
            continue
        for ses in sessions:
            ent = files.story_entities(sub, ses, "pieman")
            for name in ATOMS:
                eff = rng.normal(0.3, 0.1, (4, 4, 4)).astype(np.float32)
                var = rng.uniform(0.01, 0.05, (4, 4, 4)).astype(np.float32)
                maps[(sub, ses, name)] = (eff, var)
                for stat, v in (("effect", eff), ("variance", var), ("z", eff / np.sqrt(var))):
                    w.write_nifti(nib.Nifti1Image(v, aff), files.statmap(ent, name, stat), {"Description": stat})
            for desc, stat in (("cv", "r"), ("cv", "rsquared")):
                w.write_nifti(nib.Nifti1Image(rng.uniform(0.05, 0.2, (4, 4, 4)).astype(np.float32), aff),
                              files.statmap(ent, desc, stat), {"Description": stat})
            w.write_nifti(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), aff), files.fdr_mask(ent),
                          {"Description": "fdr"})
        w.write_tsv(pd.DataFrame({"subject": [sub]}), files.summary(sub), {"Description": "runs"})
        if sub not in units.get("_incomplete", ()):
            w.write_json({"participant": sub, "model": units.get("_models", {}).get(sub, model),
                          "stories": [{"story": "pieman", "session": s} for s in sessions]},
                         files.completion(sub))
    atlas = tmp_path / "atlas.nii.gz"
    data = np.zeros((4, 4, 4), np.int16)
    data[:2], data[2:] = 1, 2
    nib.save(nib.Nifti1Image(data, aff), atlas)
    (tmp_path / "atlas.tsv").write_text("index\tname\n1\tA\n2\tB\n")
    argv = [str(root), str(out), "group", "--cache-dir", str(tmp_path / "cache"), "--fbn-atlas", str(atlas),
            "--n-spatial-null", "100", "--n-consistency-null", "100", "--dictionary-scope", "story"]
    return argv, files, maps


def test_group_uses_only_complete_participants_and_says_which_it_skipped(tmp_path, caplog):
    argv, files, _ = _outputs(tmp_path, {"01": [None], "02": [None], "03": [None], "04": [None],
                                         "_incomplete": ["02"], "_models": {"03": "minilm-l6"}})
    with caplog.at_level(logging.WARNING, logger="bids_llm_encode.workflows.group"):
        assert run(argv + ["--group-model", "fixed"]) == 0
    assert "sub-02: no completion record" in caplog.text
    assert "sub-03: made with --model minilm-l6" in caplog.text
    side = json.loads(files.group_statmap("pieman", "atom00", "z").with_suffix("").with_suffix(".json").read_text())
    assert side["Participants"] == ["01", "04"]
    html = (tmp_path / "out" / "group.html").read_text()
    assert "Participants skipped" in html and "sub-02" in html


def test_group_with_no_complete_participant_is_exit_66_listing_them(tmp_path, capsys):
    argv, files, _ = _outputs(tmp_path, {"01": [None], "02": [None], "_incomplete": ["01", "02"]})
    (files.completion("02")).write_text('{"participant": ')  # cut short: not complete either
    assert run(argv) == EXIT_NO_INPUT
    err = capsys.readouterr().err
    assert "no participant is complete" in err and "sub-01: no completion record" in err, err
    assert "sub-02:" in err and not list((tmp_path / "out" / "group").glob("*/*statmap*"))


def test_a_participant_with_two_sessions_counts_once(tmp_path):
    """Random effects over participants: sub-01's two sessions are combined by fixed effects first."""
    argv, files, maps = _outputs(tmp_path, {"01": ["1", "2"], "02": [None], "03": [None]})
    assert run(argv + ["--group-model", "random"]) == 0
    group = np.asarray(nib.load(files.group_statmap("pieman", "atom00", "effect")).dataobj)
    (e1, v1), (e2, v2) = maps[("01", "1", "atom00")], maps[("01", "2", "atom00")]
    ffx = (e1 / v1 + e2 / v2) / (1 / v1 + 1 / v2)  # precision-weighted
    expected = (ffx + maps[("02", None, "atom00")][0] + maps[("03", None, "atom00")][0]) / 3
    np.testing.assert_allclose(group, expected, rtol=1e-4, atol=1e-5)
    pseudo = np.mean([e1, e2, maps[("02", None, "atom00")][0], maps[("03", None, "atom00")][0]], axis=0)
    assert np.abs(group - pseudo).max() > 1e-3  # not the four session maps as four participants
    side = json.loads(files.group_statmap("pieman", "atom00", "z").with_suffix("").with_suffix(".json").read_text())
    assert side["Participants"] == ["01", "02", "03"] and side["GroupModel"] == "random"


# ----------------------------------------------------------------------------- --bids-database-dir

COUNT_INDEXING = """
import sys
from pathlib import Path
import bids.layout.index as index
calls = []
original = index.BIDSLayoutIndexer.__call__
def counted(self, layout):
    calls.append(str(layout.root))
    return original(self, layout)
index.BIDSLayoutIndexer.__call__ = counted
from bids_llm_encode.config import Config
from bids_llm_encode.bids.inputs import find_runs
runs = find_runs(Config(bids_dir=Path(sys.argv[1]), output_dir=Path(sys.argv[1]).parent / "out",
                        analysis_level="participant", bids_database_dir=Path(sys.argv[2])))
print(len(runs), len(calls))
"""


def test_database_built_once_and_reused_by_another_process(tmp_path):
    root = make_layout(tmp_path / "ds", subjects=("01", "02"))
    before = tree_checksums(root)
    db = tmp_path / "db"
    env = {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": "/usr/bin:/bin",
           "BIDS_LLM_ENCODE_CACHE": str(tmp_path / "cache")}
    # two processes that start at once: the lock lets one index, the other loads what it saved
    procs = [subprocess.Popen([sys.executable, "-c", COUNT_INDEXING, str(root), str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    counts = sorted(tuple(int(x) for x in out.split()[-2:]) for out, _ in results)
    assert counts == [(2, 0), (2, 2)], counts  # raw + derivatives indexed once, by one of them
    assert (db / "raw" / "layout_index.sqlite").is_file() and (db / "derivatives" / "layout_index.sqlite").is_file()
    assert not [p for p in db.iterdir() if p.name.endswith(".tmp")]
    assert len(find_runs(_cfg(root, bids_database_dir=db))) == 2  # and once more, loaded here
    assert tree_checksums(root) == before  # nothing written inside the dataset


def test_database_of_another_dataset_or_inside_the_input_is_exit_64(tmp_path, capsys):
    a, b = make_layout(tmp_path / "a"), make_layout(tmp_path / "b")
    db = tmp_path / "db"
    find_runs(_cfg(a, bids_database_dir=db))
    with pytest.raises(UsageError, match="give another folder"):
        find_runs(_cfg(b, bids_database_dir=db))
    code = run([str(a), str(tmp_path / "out"), "participant", "--bids-database-dir", str(a / "code" / "db")])
    assert code == EXIT_USAGE and "--bids-database-dir" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end


def test_two_story_multi_echo_4d_mask_session_run_end_to_end(tmp_path):
    """Participant then group level on Narratives' schema shape, multi-echo, 4D masks, a session."""
    from bids_llm_encode.bids.validate import validate_derivatives

    root = _schema(tmp_path / "ds", session="01", echoes=2, mask_4d=True)
    before = tree_checksums(root)
    write_tiny_atlas(root, tmp_path)
    out = tmp_path / "out"
    opts = ["--skip-bids-validation", "--cache-dir", str(tmp_path / "cache"), "--model", "minilm-l6",
            "--n-atoms", "4", "--restarts", "1", "--n-permutations", "20", "--cv-folds", "2",
            "--fbn-atlas", str(tmp_path / "atlas.nii.gz"), "--n-spatial-null", "20",
            "--n-consistency-null", "100", "--bids-database-dir", str(tmp_path / "db"),
            "--dictionary-scope", "story"]  # today's per-story atoms; model scope: the test below
    assert run([str(root), str(out), "participant", *opts]) == 0
    func = out / "sub-01" / "ses-01" / "func"
    for story in ("friends", "bigbang"):
        assert (func / f"sub-01_ses-01_task-{story}_space-MNI152NLin2009cAsym_desc-atom03_stat-z_statmap.nii.gz"
                ).is_file()
    design = {s: pd.read_csv(func / f"sub-01_ses-01_task-{s}_desc-atoms_design.tsv", sep="\t").to_numpy()
              for s in ("friends", "bigbang")}
    # each story's atoms are its own input only: constant (no input) where the other story plays
    assert np.ptp(design["bigbang"][:35], axis=0).max() < 1e-6 < np.ptp(design["bigbang"][40:60], axis=0).min()
    assert np.ptp(design["friends"][45:], axis=0).max() < 1e-6 < np.ptp(design["friends"][3:20], axis=0).min()
    summary = pd.read_csv(out / "sub-01" / "func" / "sub-01_desc-runs_summary.tsv", sep="\t")
    assert summary["story"].tolist() == ["friends", "bigbang"] and set(summary["task"]) == {"schema"}
    record = json.loads((out / "sub-01" / "sub-01_completion.json").read_text())
    assert sorted(s["story"] for s in record["stories"]) == ["bigbang", "friends"]
    assert validate_derivatives(out)["errors"] == []
    assert run([str(root), str(out), "group", *opts, "--group-model", "fixed"]) == 0
    for story in ("friends", "bigbang"):
        assert (out / "group" / story / f"task-{story}_desc-atlas_links.tsv").is_file()
    assert tree_checksums(root) == before
