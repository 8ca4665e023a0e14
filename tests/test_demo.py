"""The bundled demo dataset: valid BIDS, complete fMRIPrep-style derivatives, a real story
with a Gentle alignment, a complete ground truth, and planted signals that are really there.

Uses the fast "word-features" plant, the real CA12 atlas projection, the real
BIDS validator and the project's own input finder. One test (model-atoms) runs
the embedded model and is skipped unless ``BIDS_LLM_ENCODE_SLOW_TESTS=1``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import wave
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from bids_llm_encode.demo import generate as gen
from bids_llm_encode.demo.cli import main as demo_main
from bids_llm_encode.demo.plants import Coupling, DemoRun, WordFeaturesPlant, choose_distinct_atoms
from bids_llm_encode.errors import CantCreateError, UsageError

VALIDATOR = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "bids-validator-deno"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return gen.generate_demo(tmp_path_factory.mktemp("demo") / "ds", plant="word-features",
                             n_subjects=3, seed=0)


def _truth(root: Path) -> dict:
    return json.loads((root / "code" / "demo_truth.json").read_text())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- raw BIDS

def test_passes_the_real_bids_validator(demo):
    exe = VALIDATOR if VALIDATOR.exists() else "bids-validator-deno"
    proc = subprocess.run([str(exe), "--format", "json", str(demo)], capture_output=True, text=True,
                          timeout=300)
    report = json.loads(proc.stdout)
    errors = [i for i in report["issues"]["issues"] if i.get("severity") == "error"]
    assert errors == [], errors[:5]
    assert proc.returncode == 0


def test_raw_layout_two_runs_and_events(demo):
    from bids import BIDSLayout

    layout = BIDSLayout(demo, validate=False)
    assert layout.get_subjects() == ["01", "02", "03"]
    assert layout.get_tasks() == [gen.STORY]
    runs2 = layout.get(subject="02", suffix="bold", extension=".nii.gz")
    assert sorted(f.entities.get("run") for f in runs2) == [1, 2]
    for f in layout.get(suffix="bold", extension=".nii.gz"):
        meta = f.get_metadata()
        assert meta["RepetitionTime"] == gen.TR and meta["TaskName"] == gen.STORY
        img = nib.load(f.path)
        assert len(meta["SliceTiming"]) == img.shape[2]
        assert max(meta["SliceTiming"]) < gen.TR
        ev = pd.read_csv(f.path.replace("_bold.nii.gz", "_events.tsv"), sep="\t")
        assert list(ev.columns) == ["onset", "duration", "trial_type", "stim_file"]
        story_rows = ev[ev.stim_file == f"{gen.STORY}_audio.wav"]
        assert len(story_rows) == 1 and story_rows.onset.iloc[0] >= 6.0  # silence before the story
        assert story_rows.onset.iloc[0] + story_rows.duration.iloc[0] < img.shape[3] * gen.TR
    # the two presentations of sub-02 have identical events
    e1, e2 = (pd.read_csv(demo / "sub-02" / "func" / f"sub-02_task-{gen.STORY}_run-{r}_events.tsv",
                          sep="\t") for r in (1, 2))
    pd.testing.assert_frame_equal(e1, e2)


# ---------------------------------------------------------------------------- story and alignment

def test_story_and_gentle_alignment(demo):
    text = gen.story_text()
    assert len(text.split()) >= 900
    rows = list(csv.reader((demo / "stimuli" / "gentle" / gen.STORY / "align.csv").read_text().splitlines()))
    assert all(len(r) == 4 for r in rows)
    assert [r[0] for r in rows] == text.split()  # no header, one row per transcript word
    unaligned = [r for r in rows if r[2] == ""]
    assert 3 <= len(unaligned) and all(r[3] == "" and r[1] == "" for r in unaligned)
    assert any(r[1] == "<unk>" for r in rows)
    aligned = [r for r in rows if r[2] != ""]
    assert all(r[1] == "<unk>" or r[1] == r[1].lower() for r in aligned)
    starts = np.array([float(r[2]) for r in aligned])
    ends = np.array([float(r[3]) for r in aligned])
    assert np.all(ends > starts) and np.all(np.diff(starts) > 0)
    rate = len(rows) / ends[-1]
    assert 2.0 < rate < 3.0, rate
    # longer words last longer
    length = np.array([sum(c.isalpha() for c in r[0]) for r in aligned])
    assert np.corrcoef(length, ends - starts)[0, 1] > 0.7
    # Gentle JSON agrees with the CSV
    js = json.loads((demo / "stimuli" / "gentle" / gen.STORY / "align.json").read_text())
    assert len(js["words"]) == len(rows)
    for w, r in zip(js["words"], rows):
        assert js["transcript"][w["startOffset"]:w["endOffset"]] == w["word"]
        if r[2] == "":
            assert w["case"] == "not-found-in-audio" and "start" not in w
        else:
            assert w["case"] == "success" and w["alignedWord"] == r[1] and w["start"] == float(r[2])
    # the stim_file exists and lasts as long as the story
    with wave.open(str(demo / "stimuli" / f"{gen.STORY}_audio.wav")) as wf:
        assert abs(wf.getnframes() / wf.getframerate() - _truth(demo)["story"]["audio_duration_s"]) < 0.01


# ---------------------------------------------------------------------------- derivatives

def test_derivatives_found_by_the_pipeline_input_finder(demo):
    from bids_llm_encode.bids.inputs import find_runs
    from bids_llm_encode.config import Config

    runs = find_runs(Config(bids_dir=demo, output_dir=demo.parent / "out", analysis_level="participant"))
    assert [(r.subject, r.run) for r in runs] == [("01", None), ("02", 1), ("02", 2), ("03", None)]
    truth_runs = {(t["subject"], t["run"]): t for t in _truth(demo)["runs"]}
    for r in runs:
        t = truth_runs[(r.subject, r.run)]
        assert r.tr == gen.TR and r.n_frames == t["n_frames"] and r.story_onset == t["story_onset"]
        assert r.slice_time_ref == pytest.approx(0.5)
        assert r.story.n_words >= 900 and r.story.n_unaligned > 0
        img = nib.load(r.bold)
        mask = nib.load(r.mask)
        assert img.shape[:3] == mask.shape and img.shape[3] == r.n_frames
        assert np.allclose(img.affine, mask.affine) and np.allclose(img.header.get_zooms()[:3], 4.0)
        assert nib.load(r.raw_bold).shape[3] == r.n_frames
        conf = pd.read_csv(r.confounds, sep="\t")
        assert len(conf) == r.n_frames
    legacy = [r for r in runs if r.subject == "03"][0]
    assert legacy.confounds.name.endswith("desc-confounds_regressors.tsv")
    assert "res-native" in legacy.bold.name


def test_confounds_look_like_fmriprep_and_nilearn_reads_them(demo):
    from nilearn.interfaces.fmriprep import load_confounds

    fdir = demo / "derivatives" / "fmriprep" / "sub-01" / "func"
    tsv = fdir / f"sub-01_task-{gen.STORY}_desc-confounds_timeseries.tsv"
    conf = pd.read_csv(tsv, sep="\t")
    needed = ["global_signal", "csf", "white_matter", "framewise_displacement", "dvars", "std_dvars",
              "rmsd", "cosine00", "non_steady_state_outlier00"]
    for base in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"):
        needed += [base, f"{base}_derivative1", f"{base}_power2", f"{base}_derivative1_power2"]
    needed += [f"a_comp_cor_{i:02d}" for i in range(10)]
    assert not set(needed) - set(conf.columns)
    assert np.isnan(conf["trans_x_derivative1"].iloc[0]) and np.isnan(conf["framewise_displacement"].iloc[0])
    assert conf["trans_x_derivative1"].iloc[1:].notna().all()
    assert conf["non_steady_state_outlier00"].tolist()[:3] == [1, 0, 0]
    meta = json.loads(tsv.with_suffix(".json").read_text())
    masks = [meta[f"a_comp_cor_{i:02d}"]["Mask"] for i in range(10)]
    assert masks == ["CSF"] * 5 + ["WM"] * 5
    assert all(meta[f"a_comp_cor_{i:02d}"]["Method"] == "aCompCor" and meta[f"a_comp_cor_{i:02d}"]["Retained"]
               for i in range(10))
    bold = fdir / f"sub-01_task-{gen.STORY}_space-{gen.SPACE}_desc-preproc_bold.nii.gz"
    conf_n, sample_mask = load_confounds(str(bold), strategy=("motion", "high_pass", "compcor"),
                                         motion="basic", compcor="anat_separated", n_compcor=5)
    assert conf_n.shape == (len(conf), 6 + 10 + conf.filter(like="cosine").shape[1])
    assert sample_mask is not None and 0 not in sample_mask and 1 not in sample_mask
    # motion regressors explain signal in some voxels: confound regression matters there
    data = nib.load(bold).get_fdata(dtype=np.float32)[nib.load(bold.parent / bold.name.replace(
        "desc-preproc_bold", "desc-brain_mask")).get_fdata() > 0][:, 2:].T
    motion = conf[["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]].to_numpy()[2:]
    x = np.column_stack([np.ones(len(motion)), motion, np.linspace(-1, 1, len(motion)),
                         conf.filter(like="cosine").to_numpy()[2:]])
    resid = data - x @ np.linalg.lstsq(x, data, rcond=None)[0]
    x0 = x[:, [0, 7]]
    resid0 = data - x0 @ np.linalg.lstsq(x0, data, rcond=None)[0]
    gain = 1 - resid.var(axis=0) / resid0.var(axis=0)
    assert np.quantile(gain, 0.95) > 0.3 and np.median(gain) < 0.3


# ---------------------------------------------------------------------------- ground truth

def test_truth_file_complete(demo):
    t = _truth(demo)
    assert t["plant"]["kind"] == "word-features"
    assert t["atlas"]["name"] == "CA12"
    assert t["gain_units"].startswith("percent signal change")
    signs = {c["sign"] for c in t["couplings"]}
    assert signs == {"activation", "deactivation"}
    maps = nib.load(demo / t["maps"])
    assert maps.shape[3] == len(t["couplings"])
    mask = nib.load(demo / "derivatives" / "fmriprep" / "sub-01" / "func" /
                    f"sub-01_task-{gen.STORY}_space-{gen.SPACE}_desc-brain_mask.nii.gz").get_fdata() > 0
    w = maps.get_fdata()[mask]  # (n_vox, n_couplings)
    assert np.all(maps.get_fdata()[~mask] == 0)
    for j, c in enumerate(t["couplings"]):
        assert c["network"] in t["atlas"]["labels"] and c["map_volume"] == j
        assert c["n_voxels"] == int((w[:, j] != 0).sum()) == t["atlas"]["n_voxels"][c["network"]]
        assert np.all(np.sign(w[w[:, j] != 0, j]) == np.sign(c["gain"]))
    assert t["undriven"]["n_voxels"] == int((np.all(w == 0, axis=1)).sum()) > mask.sum() / 2
    assert set(t["undriven"]["networks"]).isdisjoint({c["network"] for c in t["couplings"]})
    for r in t["runs"]:
        sig = pd.read_csv(demo / r["signals_tsv"], sep="\t")
        assert len(sig) == r["n_frames"] and set(sig.columns) >= {c["signal"] for c in t["couplings"]}
        assert len(r["gains"]) == len(t["couplings"])
        assert all(np.sign(g) == np.sign(c["gain"]) for g, c in zip(r["gains"], t["couplings"]))


@pytest.mark.parametrize("subject,run", [("01", None), ("02", 2), ("03", None)])
def test_planted_voxels_carry_the_signal(demo, subject, run):
    """After confound regression, BOLD follows the planted time course where (and only where) it was planted."""
    from nilearn import signal

    t = _truth(demo)
    rt = [r for r in t["runs"] if r["subject"] == subject and r["run"] == run][0]
    bold_img = nib.load(demo / rt["preproc_bold"])
    mask_path = str(demo / rt["preproc_bold"]).replace("desc-preproc_bold", "desc-brain_mask")
    mask = nib.load(mask_path).get_fdata() > 0
    y = bold_img.get_fdata(dtype=np.float32)[mask].T  # (T, V)
    conf = pd.read_csv(demo / rt["confounds"], sep="\t")
    cols = [c for c in conf.columns if c.startswith(("trans_", "rot_", "cosine", "a_comp_cor_"))
            and "power2" not in c and "derivative1" not in c]
    keep = slice(2, None)  # non-steady-state frames
    yc = signal.clean(y[keep], confounds=conf[cols].to_numpy()[keep], detrend=True, standardize="zscore_sample")
    sig = pd.read_csv(demo / rt["signals_tsv"], sep="\t")
    w = nib.load(demo / t["maps"]).get_fdata()[mask]
    undriven = np.all(w == 0, axis=1)
    for j, c in enumerate(t["couplings"]):
        s = sig[c["signal"]].to_numpy()[keep]
        s = (s - s.mean()) / s.std()
        r = yc.T @ s / len(s)
        driven = w[:, j] != 0
        assert np.sign(np.median(r[driven])) == np.sign(c["gain"]), c
        assert abs(np.median(r[driven])) > 0.3, (c, np.median(r[driven]))
        assert abs(np.median(r[undriven])) < 0.05
        assert np.quantile(np.abs(r[undriven]), 0.99) < abs(np.median(r[driven]))


def test_two_presentations_share_signals_not_noise(demo):
    t = _truth(demo)
    r1, r2 = sorted((r for r in t["runs"] if r["subject"] == "02"), key=lambda r: r["run"])
    s1 = pd.read_csv(demo / r1["signals_tsv"], sep="\t")
    s2 = pd.read_csv(demo / r2["signals_tsv"], sep="\t")
    pd.testing.assert_frame_equal(s1, s2)
    b1 = nib.load(demo / r1["preproc_bold"]).get_fdata(dtype=np.float32)
    b2 = nib.load(demo / r2["preproc_bold"]).get_fdata(dtype=np.float32)
    assert b1.shape == b2.shape and not np.allclose(b1, b2)


# ---------------------------------------------------------------------------- determinism, plants, CLI

class SineDrive:
    """A user plant: one slow sinusoid (in audio time) driving the Auditory network."""

    kind = "sine"
    atlas = "CA12"
    couplings = (Coupling("sine", "Auditory", 3.0),)

    def prepare(self, stories, work_dir):
        self.prepared = sum(s.n_words for s in stories)

    def signals(self, story, run: DemoRun):
        return np.sin(2 * np.pi * run.audio_frame_times / 40.0)[:, None], ["sine"]

    def describe(self):
        return {"kind": self.kind, "model": None, "settings": {"period_s": 40.0}, "signals": {"sine": "sin"}}


def test_deterministic_with_seed_and_pluggable_plant(demo, tmp_path):
    # Same seed, fewer participants: every file of the shared participants, the story and
    # the truth maps are byte-identical (and the third participant is absent).
    again = gen.generate_demo(tmp_path / "again", plant="word-features", n_subjects=2, seed=0)
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    shared = [f for f in files if f.name not in ("participants.tsv", "demo_truth.json", "dataset_description.json")]
    assert len(shared) > 25 and not any("sub-03" in str(f) for f in files)
    for rel in shared:
        assert _sha(demo / rel) == _sha(again / rel), rel
    t3, t2 = _truth(demo), _truth(again)
    assert t2["runs"] == [r for r in t3["runs"] if r["subject"] != "03"]
    plant = SineDrive()
    other = gen.generate_demo(tmp_path / "other", plant=plant, n_subjects=2, seed=1)
    assert demo_main([str(tmp_path / "other"), "--plant", "word-features"]) == CantCreateError.exit_code
    assert plant.prepared >= 900
    t = _truth(other)
    assert t["plant"]["kind"] == "sine" and [c["signal"] for c in t["couplings"]] == ["sine"]
    rel = Path(t["runs"][0]["preproc_bold"])
    assert _sha(other / rel) != _sha(demo / rel)
    assert not (other / "sub-03").exists()


def test_word_features_plant_signals_are_distinct():
    from bids_llm_encode.bids.stimuli import read_gentle_csv

    al = gen.align_story(gen.story_text(), seed=0)
    path = Path(os.environ["BIDS_LLM_ENCODE_CACHE"]) / "align_test.csv"
    path.write_text(gen.alignment_csv(al))
    story = read_gentle_csv(path, name=gen.STORY)
    run = DemoRun(subject="01", run=None, tr=1.5, n_frames=300, story_onset=6.0)
    sig, names = WordFeaturesPlant().signals(story, run)
    assert sig.shape == (300, len(names))
    r = np.corrcoef(sig.T)
    assert np.max(np.abs(r - np.eye(len(names)))) < 0.6
    # nothing before the story starts (the HRF cannot respond before the first word)
    assert np.allclose(sig[run.frame_times < 6.0, 1:], 0, atol=1e-6)
    picks = choose_distinct_atoms(sig, 3)
    assert len(set(picks)) == 3


def test_cli_errors_have_exit_codes(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert demo_main([str(tmp_path / "full"), "--plant", "word-features"]) == CantCreateError.exit_code
    assert "not an empty folder" in capsys.readouterr().err
    assert demo_main([str(tmp_path / "new"), "--participants", "1"]) == UsageError.exit_code
    assert demo_main([str(tmp_path / "new"), "--layout", "narratives", "--participants", "4"]) == UsageError.exit_code
    assert "its own 8 participants" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    with pytest.raises(UsageError, match="unknown plant"):
        gen.generate_demo(tmp_path / "n2", plant="nonsense")
    assert not any(p.name.startswith(".n2") for p in tmp_path.iterdir())  # no temporary leftovers


def test_existing_empty_folder_is_filled_in_place(tmp_path, monkeypatch):
    # `-v host:/data` in a container: /data is an empty mount point whose parent (/) is not
    # writable. The dataset is built in a hidden folder inside it, nothing is written beside it.
    roots = []

    def fake_generate(root, *args, **kwargs):
        roots.append(root)
        (root / "sub-01").mkdir()
        (root / "dataset_description.json").write_text("{}")

    monkeypatch.setattr(gen, "_generate", fake_generate)
    target = tmp_path / "mnt" / "data"
    target.mkdir(parents=True)
    inode = target.stat().st_ino
    before = sorted(os.listdir(tmp_path / "mnt"))
    assert gen.generate_demo(target, plant="word-features") == target
    assert roots[0].parent == target and roots[0].name.startswith(".")
    assert sorted(os.listdir(tmp_path / "mnt")) == before  # the parent was not written to
    assert target.stat().st_ino == inode  # the same folder (a mount point cannot be replaced)
    assert sorted(os.listdir(target)) == ["dataset_description.json", "sub-01"]  # no hidden leftovers
    (target / "old.txt").write_text("x")  # --overwrite replaces the contents, in place too
    gen.generate_demo(target, plant="word-features", overwrite=True)
    assert sorted(os.listdir(target)) == ["dataset_description.json", "sub-01"]
    assert target.stat().st_ino == inode and roots[1].parent == target
    if os.geteuid() != 0:  # root writes anywhere; for others, a read-only parent proves it
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro" / "data").mkdir()
        (tmp_path / "ro").chmod(0o555)
        try:
            gen.generate_demo(tmp_path / "ro" / "data", plant="word-features")
        finally:
            (tmp_path / "ro").chmod(0o755)
        assert (tmp_path / "ro" / "data" / "sub-01").is_dir()
    # a new folder is still built beside its target and renamed into place
    fresh = gen.generate_demo(tmp_path / "new", plant="word-features")
    assert roots[-1].parent == tmp_path and (fresh / "sub-01").is_dir()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.skipif(os.environ.get("BIDS_LLM_ENCODE_SLOW_TESTS") != "1",
                    reason="runs the embedded language model; set BIDS_LLM_ENCODE_SLOW_TESTS=1")
def test_model_atoms_plant(tmp_path):
    from bids_llm_encode.cache import Cache
    from bids_llm_encode.config import Config
    from bids_llm_encode.bids.inputs import dataset_stories
    from bids_llm_encode.workflows.stimulus import model_dictionary, run_design, story_activations, story_dictionary

    # BIDS_LLM_ENCODE_DEMO_SPARSITY overrides the dictionary sparsity (both in the plant and below)
    options = {}
    if os.environ.get("BIDS_LLM_ENCODE_DEMO_SPARSITY"):
        options["sparsity"] = float(os.environ["BIDS_LLM_ENCODE_DEMO_SPARSITY"])
    root = gen.generate_demo(tmp_path / "ma", plant="model-atoms", n_subjects=2, seed=0,
                             model_options=options)
    t = _truth(root)
    assert t["plant"]["kind"] == "model-atoms" and t["plant"]["model"] == "smollm2-135m"
    idx = {k: v["atom_index"] for k, v in t["plant"]["signals"].items()}
    assert len(set(idx.values())) == len(idx) >= 4
    assert {c["sign"] for c in t["couplings"]} == {"activation", "deactivation"}
    # the pipeline, run the way the participant workflow runs it, gives the same atoms
    from bids_llm_encode.bids.inputs import find_runs

    cfg = Config(bids_dir=root, output_dir=tmp_path / "out", analysis_level="participant", **options)
    assert t["plant"]["settings"]["sparsity"] == cfg.sparsity and t["plant"]["settings"]["model"] == cfg.model
    run = find_runs(cfg)[0]
    cache = Cache(os.environ["BIDS_LLM_ENCODE_CACHE"])
    # the default --dictionary-scope model: the dataset's stories (the demo's one), as the participant level
    acts = story_activations(run.story, cfg, cache)
    dictionary = model_dictionary(dataset_stories(cfg), cfg, cache)
    _, own = story_dictionary(run.story, cfg, cache)  # one story: the same atoms at story scope
    assert np.array_equal(dictionary.atoms, own.atoms)
    design = run_design(run.frame_times - run.story_onset, run.story, acts, dictionary, cfg)
    sig = pd.read_csv(root / t["runs"][0]["signals_tsv"], sep="\t")
    for name, k in idx.items():
        assert np.corrcoef(design[:, k], sig[name])[0, 1] > 0.999
    # the chosen atoms are distinct
    chosen = design[:, sorted(idx.values())]
    r = np.corrcoef(chosen.T)
    assert np.max(np.abs(r - np.eye(len(r)))) < 0.5
