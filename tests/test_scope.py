"""--dictionary-scope (issue 11, items 1 and 2): one dictionary per model over the dataset's
stories, shared by every participant and story; the group level over participants.

The dataset: Narratives' shape in small. Task ``schema``: one run holding two stories
(friends at 5 s, bigbang at 60 s); task ``pieman``: one story. sub-01 and sub-04 heard the
schema run, sub-02 both tasks, sub-03 pieman only. The BOLD is noise (tests/layouts.py): these
tests check what is shared, named and combined, not what is found (the planted truth is
tests/test_pipeline.py's).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.bids.inputs import dataset_stories, find_runs
from bids_llm_encode.cli import run
from bids_llm_encode.config import Config
from bids_llm_encode.errors import UsageError
from layouts import make_layout, write_tiny_atlas

WORDS = [(f"w{i}", f"w{i}", 0.5 + 0.4 * i, 0.8 + 0.4 * i) for i in range(60)]  # 24 s of speech
PIEMAN = [(f"p{i}", f"p{i}", 0.3 + 0.5 * i, 0.6 + 0.5 * i) for i in range(40)]  # 20 s, other words
SPACE = "MNI152NLin2009cAsym"


def _dataset(root: Path) -> Path:
    make_layout(root, subjects=("01", "02", "04"), task="schema", story="friends",
                extra_stories=[("bigbang", 60.0)], n_frames=100, story_words=WORDS, story_onset=5.0,
                music_s=None)
    return make_layout(root, subjects=("02", "03"), task="pieman", story="pieman", story_words=PIEMAN,
                       n_frames=80, story_onset=10.0, music_s=None)


def _cfg(root: Path, **kw) -> Config:
    return Config(bids_dir=root, output_dir=root.parent / "out", analysis_level="participant", **kw)


def test_the_dataset_stories_do_not_depend_on_the_participant_selection(tmp_path):
    root = _dataset(tmp_path / "ds")
    every = [s.name for s in dataset_stories(_cfg(root))]
    assert every == ["bigbang", "friends", "pieman"]
    for sel in (dict(participant_label=["03"]), dict(participant_label=["01"]), dict(task_label=["schema"])):
        assert [s.name for s in dataset_stories(_cfg(root, **sel))] == every, sel
    assert {r.story.name for r in find_runs(_cfg(root, participant_label=["03"]))} == {"pieman"}
    assert [s.name for s in dataset_stories(_cfg(root, dictionary_tasks=["pieman"]))] == ["pieman"]
    # the stories are those the runs get (same words and times)
    runs = {r.story.name: r.story for r in find_runs(_cfg(root))}
    for s in dataset_stories(_cfg(root)):
        assert s.words == runs[s.name].words and np.array_equal(s.starts, runs[s.name].starts)


def test_a_story_without_word_timing_is_left_out_of_the_dictionary(tmp_path, caplog):
    root = _dataset(tmp_path / "ds")
    (root / "stimuli" / "gentle" / "pieman" / "align.csv").unlink()
    import logging

    with caplog.at_level(logging.INFO, logger="bids_llm_encode.bids.inputs"):
        names = [s.name for s in dataset_stories(_cfg(root))]
    assert names == ["bigbang", "friends"] and "without word timing left out: pieman" in caplog.text


def test_dictionary_tasks_needs_model_scope_and_labels(tmp_path):
    root = _dataset(tmp_path / "ds")
    with pytest.raises(UsageError, match="--dictionary-tasks"):
        _cfg(root, dictionary_tasks=["pieman"], dictionary_scope="story").validate()
    with pytest.raises(UsageError):
        _cfg(root, dictionary_tasks=["pie man!"]).validate()
    with pytest.raises(UsageError, match="--dictionary-scope"):
        _cfg(root, dictionary_scope="dataset").validate()


def test_group_output_names_of_the_dataset_level_have_no_task(tmp_path):
    from bids_llm_encode.bids.outputs import DerivativesWriter, OutputFiles

    cfg = _cfg(tmp_path / "ds")
    files = OutputFiles(DerivativesWriter(cfg.output_dir, cfg), SPACE)
    out = cfg.output_dir
    assert files.group_statmap(None, "atom03", "z") == out / "group" / f"space-{SPACE}_desc-atom03_stat-z_statmap.nii.gz"
    assert files.group_table(None, "CA12", "links") == out / "group" / "desc-CA12_links.tsv"
    assert files.group_table("pieman", "CA12", "links") == out / "group" / "pieman" / "task-pieman_desc-CA12_links.tsv"
    assert files.model("smollm2-135m", "loadings") == out / "stimuli" / "model-smollm2-135m" / "loadings.npz"
    with pytest.raises(ValueError, match="unknown model-level file"):
        files.model("smollm2-135m", "neurons")


def test_one_story_model_scope_is_the_story_dictionary(tmp_path):
    """The demo's case: a dataset of one story gets the same atoms at both scopes (one cache entry)."""
    from bids_llm_encode.cache import Cache
    from bids_llm_encode.workflows import stimulus

    root = make_layout(tmp_path / "ds", story_words=PIEMAN, n_frames=40)
    cfg = _cfg(root, model="minilm-l6", n_atoms=3, restarts=1, cache_dir=tmp_path / "cache")
    cache = Cache(tmp_path / "cache")
    (story,) = dataset_stories(cfg)
    model = stimulus.model_dictionary([story], cfg, cache)
    _, own = stimulus.story_dictionary(story, cfg, cache)
    assert np.array_equal(model.atoms, own.atoms) and (model.loadings != own.loadings).nnz == 0
    assert model.info["stories"] == [{"story": "pieman", "first_frame": 0, "n_frames": len(own.frame_times),
                                      "n_words": 40, "source": str(story.source)}]
    assert len([p for p in (tmp_path / "cache" / "dictionary").iterdir() if not p.name.startswith(".")]) == 1


def _opts(tmp_path: Path, atlas: Path) -> list[str]:
    return ["--skip-bids-validation", "--cache-dir", str(tmp_path / "cache"), "--model", "minilm-l6",
            "--n-atoms", "4", "--restarts", "1", "--n-permutations", "20", "--cv-folds", "2",
            "--fbn-atlas", str(atlas), "--n-spatial-null", "20", "--n-consistency-null", "100",
            "--bids-database-dir", str(tmp_path / "db")]


def test_model_scope_end_to_end(tmp_path):
    """Participants one job each (as a cluster array), then the group level over participants."""
    import scipy.sparse as sp

    from bids_llm_encode.bids.validate import validate_derivatives
    from bids_llm_encode.patterns.dictionary import project_atoms
    from bids_llm_encode.workflows import stimulus

    root = _dataset(tmp_path / "ds")
    write_tiny_atlas(root, tmp_path)
    out = tmp_path / "out"
    opts = _opts(tmp_path, tmp_path / "atlas.nii.gz")
    for sub in ("03", "01", "02", "04"):  # one participant per process: each sees the whole dataset's stories
        assert run([str(root), str(out), "participant", "--participant-label", sub, *opts]) == 0, sub

    model = out / "stimuli" / "model-minilm-l6"
    card = json.loads((model / "modelcard.json").read_text())
    assert [s["story"] for s in card["stories"]] == ["bigbang", "friends", "pieman"]
    assert card["dictionary_scope"] == "model" and card["n_words"] == 60 + 60 + 40
    atoms = pd.read_csv(model / "atoms.tsv", sep="\t")
    assert atoms["story"].tolist() == sum(([s["story"]] * s["n_frames"] for s in card["stories"]), [])
    assert len(atoms) == card["n_frames"] and not (out / "stimuli" / "pieman" / "model-minilm-l6" / "modelcard.json").exists()
    records = [json.loads((out / f"sub-{s}" / f"sub-{s}_completion.json").read_text()) for s in ("01", "02", "03", "04")]
    assert {r["dictionary"] for r in records} == {card["dictionary_key"]}  # one dictionary for all
    assert all(r["dictionary_scope"] == "model" for r in records)

    # every participant-story's design: its run's neuron series projected on the one set of loadings
    loadings = sp.load_npz(model / "loadings.npz")
    cfg = Config(bids_dir=root, output_dir=out, analysis_level="participant", model="minilm-l6",
                 cache_dir=tmp_path / "cache")
    from bids_llm_encode.cache import Cache

    cache = Cache(tmp_path / "cache")
    for r in find_runs(cfg):
        acts = stimulus.story_activations(r.story, cfg, cache)
        want = project_atoms(stimulus.neuron_series(r.story, acts, r.frame_times - r.story_onset, cfg), loadings)
        ses = f"_ses-{r.session}" if r.session else ""
        got = pd.read_csv(out / f"sub-{r.subject}" / "func" /
                          f"sub-{r.subject}{ses}_task-{r.story.name}_desc-atoms_design.tsv", sep="\t").to_numpy()
        np.testing.assert_allclose(got, want, atol=1e-5)
    # per story: its rows of the model-level atoms
    per = pd.read_csv(out / "stimuli" / "pieman" / "model-minilm-l6" / "atoms.tsv", sep="\t")
    mine = atoms[atoms["story"] == "pieman"]
    np.testing.assert_allclose(per.drop(columns="time").to_numpy(), mine.filter(like="atom").to_numpy())
    assert validate_derivatives(out)["errors"] == []

    assert run([str(root), str(out), "group", *opts, "--group-model", "random"]) == 0
    group = out / "group"
    z = group / f"space-{SPACE}_desc-atom00_stat-z_statmap.nii.gz"
    side = json.loads(z.with_name(z.name.replace(".nii.gz", ".json")).read_text())
    assert side["Participants"] == ["01", "02", "03", "04"] and side["GroupModel"] == "random"
    assert side["Stories"] == ["bigbang", "friends", "pieman"]
    for table in ("links", "overlap", "agreement", "networks"):
        assert (group / f"desc-atlas_{table}.tsv").is_file(), table
    metrics = json.loads((group / "desc-atlas_metrics.json").read_text())
    assert metrics["story"] == "all" and metrics["participants"] == 4
    # per story where >= 3 participants heard it: friends and bigbang (01, 02, 04), not pieman (02, 03)
    assert (group / "friends" / "task-friends_desc-atlas_links.tsv").is_file()
    assert (group / "bigbang" / "task-bigbang_desc-atlas_links.tsv").is_file()
    assert not (group / "pieman").exists()

    # the dataset-level effect: each participant's stories (and runs) by fixed effects first, then the mean
    from nilearn.glm import compute_fixed_effects

    def stat(sub, story, s):
        return out / f"sub-{sub}" / "func" / f"sub-{sub}_task-{story}_space-{SPACE}_desc-atom00_stat-{s}_statmap.nii.gz"

    brain = nib.load(group / f"space-{SPACE}_desc-cvfdr_stat-fraction_statmap.nii.gz")
    inside = np.ones(brain.shape, bool)
    for sub, stories in (("01", ["bigbang", "friends"]), ("02", ["bigbang", "friends", "pieman"]),
                         ("03", ["pieman"]), ("04", ["bigbang", "friends"])):
        for story in stories:
            cv = out / f"sub-{sub}" / "func" / f"sub-{sub}_task-{story}_space-{SPACE}_desc-cv_stat-r_statmap.nii.gz"
            inside &= np.asarray(nib.load(cv).dataobj) != 0
    mask_img = nib.Nifti1Image(inside.astype(np.uint8), brain.affine)
    units = []
    for sub, stories in (("01", ["bigbang", "friends"]), ("02", ["bigbang", "friends", "pieman"]),
                         ("03", ["pieman"]), ("04", ["bigbang", "friends"])):
        if len(stories) == 1:
            units.append(np.asarray(nib.load(stat(sub, stories[0], "effect")).dataobj))
            continue
        eff, _, _, _ = compute_fixed_effects([nib.load(stat(sub, s, "effect")) for s in stories],
                                             [nib.load(stat(sub, s, "variance")) for s in stories],
                                             mask=mask_img, precision_weighted=True)
        units.append(np.asarray(eff.dataobj))
    effect = np.asarray(nib.load(group / f"space-{SPACE}_desc-atom00_stat-effect_statmap.nii.gz").dataobj)
    np.testing.assert_allclose(effect[inside], np.mean(units, axis=0)[inside], rtol=1e-4, atol=1e-5)

    # a participant made with the other scope is skipped, with why
    rec = out / "sub-03" / "sub-03_completion.json"
    rec.write_text(json.dumps(dict(records[2], dictionary_scope="story")))
    assert run([str(root), str(out), "group", *opts, "--group-model", "random"]) == 0
    side = json.loads(z.with_name(z.name.replace(".nii.gz", ".json")).read_text())
    assert side["Participants"] == ["01", "02", "04"]
    assert "--dictionary-scope story" in (out / "group.html").read_text()


def test_group_at_model_scope_without_the_model_level_dictionary_is_exit_66(tmp_path, capsys):
    from bids_llm_encode.bids.outputs import DerivativesWriter
    from bids_llm_encode.errors import EXIT_NO_INPUT

    root = make_layout(tmp_path / "ds")
    out = tmp_path / "out"
    DerivativesWriter(out, Config(bids_dir=root, output_dir=out, analysis_level="group"))  # a folder, no outputs
    assert run([str(root), str(out), "group", "--cache-dir", str(tmp_path / "cache")]) == EXIT_NO_INPUT
    err = capsys.readouterr().err
    assert "stimuli/model-smollm2-135m/modelcard.json" in err and "--dictionary-scope" in err, err
